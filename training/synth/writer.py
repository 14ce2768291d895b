"""The data-set writer: synthetic strips in the AITEX folder layout, with a manifest.

Layout written by :func:`generate_dataset` (as in AITEX)::

    out/NoDefect_images/<roll>/nnnn_000_ff.png
    out/Defect_images/nnnn_ddd_ff.png
    out/Mask_images/nnnn_ddd_ff_mask.png     8-bit grey, 255 = defect, 0 elsewhere
    out/synth.json                           the arguments, fabric parameters and files written
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from training.synth.defects import DEFECT_KINDS, MASK_DELTA
from training.synth.fabric import WEAVES, FabricParams, sample_fabric_params
from training.synth.strip import make_strip

NORMAL_CODE = "000"
MANIFEST_NAME = "synth.json"
MANIFEST_FORMAT = 1
MIN_SIZE = 64
MAX_WIDTH = 16384
MAX_HEIGHT = 4096
MAX_FABRICS = 20
MAX_IDS = 9999


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_dataset` wrote."""

    out: Path
    fabrics: int
    normal: int  # defect-free strips, all fabrics
    defective: int  # strips with a defect, all fabrics
    by_code: tuple[tuple[str, int], ...]  # (defect code, strips) in code order
    files: tuple[Path, ...] = field(repr=False)

    def __str__(self) -> str:
        codes = ", ".join(f"{code} x{count}" for code, count in self.by_code) or "none"
        return (
            f"wrote {self.normal} defect-free and {self.defective} defective strips "
            f"of {self.fabrics} fabric(s) to {self.out} (defects: {codes})"
        )


def _check_arguments(
    out: Path, fabrics: int, normal: int, defective: int, seed: int, width: int, height: int
) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if not 1 <= fabrics <= MAX_FABRICS:
        raise ValueError(f"fabrics must be 1..{MAX_FABRICS}, got {fabrics}")
    if normal < 0 or defective < 0 or normal + defective == 0:
        raise ValueError(
            f"normal and defective must be >= 0 and not both 0, got {normal}, {defective}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if fabrics * (normal + defective) > MAX_IDS:
        raise ValueError(
            f"at most {MAX_IDS} strips in all, asked for {fabrics * (normal + defective)}"
        )
    if not MIN_SIZE <= width <= MAX_WIDTH or not MIN_SIZE <= height <= MAX_HEIGHT:
        raise ValueError(
            f"width must be {MIN_SIZE}..{MAX_WIDTH} and height {MIN_SIZE}..{MAX_HEIGHT}, "
            f"got {width}x{height}"
        )


def _previous_files(out: Path) -> list[Path]:
    """Files an earlier run wrote into ``out``; refuses a non-empty folder of other files."""
    if not out.exists() or not any(out.iterdir()):
        return []
    manifest = out / MANIFEST_NAME
    try:
        written = [str(name) for name in json.loads(manifest.read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"--out {out} is not empty and holds no synthetic data ({MANIFEST_NAME})"
        ) from exc
    root = out.resolve()
    paths = [(out / name).resolve() for name in written]
    # Only ever delete what lies inside ``out``, whatever the manifest says.
    return [path for path in paths if path.is_relative_to(root) and path != root]


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path.name} as PNG")
    _write_atomic(path, encoded.tobytes())


@dataclass(frozen=True)
class _Job:
    """One strip to write: its random stream, fabric, defect code and file names."""

    key: tuple[int, ...]
    fabric: int
    code: str
    image: Path
    mask: Path | None


def _defect_plan(seed: int, count: int) -> list[str]:
    """Defect code of each defective strip: every kind in turn, in an order drawn from ``seed``."""
    codes = list(DEFECT_KINDS)
    order = [codes[k] for k in np.random.default_rng([seed, 3]).permutation(len(codes))]
    return [order[k % len(order)] for k in range(count)]


def _fabric_plan(seed: int, fabrics: int) -> list[FabricParams]:
    """Fabric looks; the first two are one of each weave, so that a small dataset shows both."""
    plans: list[FabricParams] = []
    for f in range(fabrics):
        weave = WEAVES[(seed + f) % len(WEAVES)] if f < len(WEAVES) else None
        plans.append(sample_fabric_params(np.random.default_rng([seed, f, 0]), weave))
    return plans


def _jobs(
    out: Path, plans: list[FabricParams], normal: int, defective: int, seed: int
) -> list[_Job]:
    """Every strip in writing order, with a running id. Each strip has its own random stream,
    so asking for more strips leaves the first ones as they were."""
    kinds = iter(_defect_plan(seed, len(plans) * defective))
    jobs: list[_Job] = []
    for f, params in enumerate(plans):
        ff = f"{f:02d}"
        roll = out / "NoDefect_images" / f"synth{ff}-{params.weave}"
        for k in range(normal):
            name = f"{len(jobs) + 1:04d}_{NORMAL_CODE}_{ff}"
            jobs.append(_Job((seed, f, 1, k), f, NORMAL_CODE, roll / f"{name}.png", None))
        for k in range(defective):
            code = next(kinds)
            name = f"{len(jobs) + 1:04d}_{code}_{ff}"
            image = out / "Defect_images" / f"{name}.png"
            mask = out / "Mask_images" / f"{name}_mask.png"
            jobs.append(_Job((seed, f, 2, k), f, code, image, mask))
    return jobs


def _write_strip(job: _Job, params: FabricParams, height: int, width: int) -> None:
    kind = None if job.mask is None else job.code
    strip = make_strip(np.random.default_rng(job.key), params, height, width, kind)
    _write_png(job.image, strip.image)
    if job.mask is not None and strip.mask is not None:
        _write_png(job.mask, strip.mask.astype(np.uint8) * 255)


def generate_dataset(
    out: Path,
    *,
    fabrics: int = 2,
    normal: int = 8,
    defective: int = 6,
    seed: int = 0,
    width: int = 4096,
    height: int = 256,
    progress: bool = True,
) -> SynthSummary:
    """Write a synthetic AITEX-layout dataset into ``out``: ``normal`` defect-free and
    ``defective`` strips per fabric. The same arguments always give byte-identical files.

    ``out`` may be missing, empty, or an earlier output of this function (whose files are
    replaced); anything else raises ValueError, as do arguments out of range.
    """
    out = Path(out)
    _check_arguments(out, fabrics, normal, defective, seed, width, height)
    stale = _previous_files(out)
    plans = _fabric_plan(seed, fabrics)
    jobs = _jobs(out, plans, normal, defective, seed)
    for job in tqdm(jobs, desc="synth", unit="strip", disable=not progress):
        _write_strip(job, plans[job.fabric], height, width)
    files = [path for job in jobs for path in (job.image, job.mask) if path is not None]
    for path in set(stale) - {path.resolve() for path in files}:
        path.unlink(missing_ok=True)
    _write_manifest(out, files, plans, seed=seed, width=width, height=height)
    counts = Counter(job.code for job in jobs if job.mask is not None)
    return SynthSummary(
        out=out,
        fabrics=fabrics,
        normal=fabrics * normal,
        defective=fabrics * defective,
        by_code=tuple(sorted(counts.items())),
        files=tuple(files),
    )


def _write_manifest(
    out: Path, files: list[Path], plans: list[FabricParams], *, seed: int, width: int, height: int
) -> None:
    manifest = {
        "format": MANIFEST_FORMAT,
        "generator": "loomwatch training.synth",
        "seed": seed,
        "width": width,
        "height": height,
        "mask_rule": f"|change| >= {MASK_DELTA} grey levels, or changed and in the defect geometry",
        "defect_kinds": DEFECT_KINDS,
        "fabrics": [asdict(params) for params in plans],
        "files": [path.relative_to(out).as_posix() for path in files],
    }
    _write_atomic(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
