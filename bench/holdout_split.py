"""Split one AITEX fabric into a folder to train on and a held-out folder to judge decisions on.

    python -m bench.holdout_split --fabric 02 --out runs/holdout-02 [--data DIR] [--seed 13]
        [--defective 8] [--defect-free 5]

writes ``OUT/fit`` and ``OUT/test``, each in the AITEX layout, made of symbolic links to the
original files (nothing is copied, so no image lands in the project). ``train`` runs on ``fit``
(it holds back part of its defect-free strips for the operating point by itself) and
``evaluate --split all`` on ``test``, strips that took no part in fitting, state selection or
calibration: what a line would see from a model tuned on its own data. The held-out strips are
drawn at random with ``--seed``, so the figures on them are one draw among many.
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


def split(data: Path, fabric: str, out: Path, seed: int, defective: int, clean: int) -> None:
    defects = sorted((data / DEFECTS).glob(f"*_{fabric}.png"))
    normals = sorted((data / CLEAN).rglob(f"*_{fabric}.png"))
    if len(defects) <= defective or len(normals) <= clean:
        raise SystemExit(
            f"fabric {fabric} has {len(defects)} defective and {len(normals)} defect-free strips: "
            f"cannot hold back {defective} and {clean} and keep some to train on"
        )
    rng = random.Random(seed)
    held_defects, held_normals = (
        set(rng.sample(defects, defective)),
        set(rng.sample(normals, clean)),
    )
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty")
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
    print(f"{out / 'fit'}: {kept[0]} defective, {kept[1]} defect-free strips")
    print(f"{out / 'test'}: {defective} defective, {clean} defect-free strips (held out)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="AITEX root (default: aitex_dir)")
    parser.add_argument("--fabric", default="02")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--defective", type=int, default=8)
    parser.add_argument("--defect-free", type=int, default=5, dest="clean")
    args = parser.parse_args()
    data = args.data or aitex_dir()
    if not (data / DEFECTS).is_dir():
        raise SystemExit(f"{data} is not an AITEX folder (no {DEFECTS}/)")
    split(data, args.fabric, args.out, args.seed, args.defective, args.clean)


if __name__ == "__main__":
    main()
