"""Split AITEX fabrics into a folder to train on and a held-out folder to judge decisions on.

    python -m bench.holdout_split --fabric 02 --out runs/holdout-02 [--data DIR] [--seed 13]
        [--defective 8] [--defect-free 5]
    python -m bench.holdout_split --fabric all --out runs/holdout-all [--share 0.42]
        [--defect-free 5]

writes ``OUT/fit`` and ``OUT/test``, each in the AITEX layout, made of symbolic links to the
original files (nothing is copied, so no image lands in the project). ``train`` runs on ``fit``
(it holds back part of its defect-free strips for the operating point by itself) and
``evaluate --split all`` on ``test``, strips that took no part in fitting, state selection or
calibration: what a line would see from a model tuned on its own data. The held-out strips are
drawn at random with ``--seed``, so the figures on them are one draw among many.

``--fabric all`` splits every fabric of the folder the same way into one ``fit`` and one
``test`` folder (for a fleet): ``--share`` of each fabric's defective strips (at least one, and
at least one left to fit on) and ``--defect-free`` of its defect-free strips are held out; a
fabric with fewer strips than that keeps them all in ``fit``. Each fabric draws with its own
generator seeded by ``--seed``, so fabric 02 of ``--fabric all --share 0.42 --defect-free 5``
holds out what ``--fabric 02 --defective 8 --defect-free 5`` holds out.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from bench import aitex_dir

DEFECTS, MASKS, CLEAN = "Defect_images", "Mask_images", "NoDefect_images"


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())


def _roll_of(path: Path, root: Path) -> str:
    return path.parent.relative_to(root / CLEAN).as_posix()


def _strips(data: Path, fabric: str) -> tuple[list[Path], list[Path]]:
    return (
        sorted((data / DEFECTS).glob(f"*_{fabric}.png")),
        sorted((data / CLEAN).rglob(f"*_{fabric}.png")),
    )


def split(data: Path, fabric: str, out: Path, seed: int, defective: int, clean: int) -> None:
    defects, normals = _strips(data, fabric)
    if len(defects) <= defective or len(normals) <= clean:
        raise SystemExit(
            f"fabric {fabric} has {len(defects)} defective and {len(normals)} defect-free strips: "
            f"cannot hold back {defective} and {clean} and keep some to train on"
        )
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty")
    _write(data, fabric, out, seed, defective, clean)


def split_all(data: Path, out: Path, seed: int, share: float, clean: int) -> None:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty")
    images = [*(data / DEFECTS).glob("*_*_*.png"), *(data / CLEAN).rglob("*_*_*.png")]
    fabrics = sorted({image.stem.rsplit("_", 1)[-1] for image in images})
    for fabric in fabrics:
        defects, normals = _strips(data, fabric)
        held = min(max(1, round(share * len(defects))), len(defects) - 1) if len(defects) > 1 else 0
        if not normals or len(normals) <= clean:
            held, kept_clean = 0, 0
        else:
            kept_clean = clean
        _write(data, fabric, out, seed, held, kept_clean)


def _write(data: Path, fabric: str, out: Path, seed: int, defective: int, clean: int) -> None:
    defects, normals = _strips(data, fabric)
    rng = random.Random(seed)
    held_defects, held_normals = (
        set(rng.sample(defects, defective)),
        set(rng.sample(normals, clean)),
    )
    for name, chosen in (("fit", False), ("test", True)):
        root = out / name
        for image in defects:
            if (image in held_defects) == chosen:
                _link(image, root / DEFECTS / image.name)
                for mask in (data / MASKS).glob(f"{image.stem}_mask*.png"):
                    _link(mask, root / MASKS / mask.name)
        for image in normals:
            if (image in held_normals) == chosen:
                _link(image, root / CLEAN / _roll_of(image, data) / image.name)
    kept = (len(defects) - defective, len(normals) - clean)
    print(
        f"fabric {fabric}: {out / 'fit'} {kept[0]} defective, {kept[1]} defect-free strips; "
        f"{out / 'test'} {defective} defective, {clean} defect-free strips (held out)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="AITEX root (default: aitex_dir)")
    parser.add_argument("--fabric", default="02", help="a fabric code, or all")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--defective", type=int, default=8)
    parser.add_argument("--defect-free", type=int, default=5, dest="clean")
    parser.add_argument(
        "--share",
        type=float,
        default=0.42,
        help="with --fabric all: the share of each fabric's defective strips held out",
    )
    args = parser.parse_args()
    data = args.data or aitex_dir()
    if not (data / DEFECTS).is_dir():
        raise SystemExit(f"{data} is not an AITEX folder (no {DEFECTS}/)")
    if args.fabric == "all":
        split_all(data, args.out, args.seed, args.share, args.clean)
    else:
        split(data, args.fabric, args.out, args.seed, args.defective, args.clean)


if __name__ == "__main__":
    main()
