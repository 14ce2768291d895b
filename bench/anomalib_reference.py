"""Same-split reference: anomalib's PatchCore on Loomwatch's AITEX tiles (prints figures only).

    PYTHONPATH=. /tmp/anomalib-venv/bin/python bench/anomalib_reference.py \
        [--data DIR] [--fabric 02] [--workdir DIR] [--threads 2]

--data defaults to the real AITEX folder that ``bench.aitex_dir()`` names (LOOMWATCH_AITEX_DIR,
else ../shared/data/aitex-dev beside the project).

Runs in an environment that has anomalib (the project's own venv has none; add pydantic there
for Loomwatch's modules). Nothing of anomalib is imported at module level, so this file still
imports, lints and type-checks in the project venv.

The split and tiles are Loomwatch's own: ``split_dataset(load_dataset(data, fabric), 0.3, seed=0)``;
256x256 tiles at stride 256 laid by ``plan_tiles`` over ``valid_area``. Training tiles lie wholly
on fabric (``TileDataset(..., 1.0)``); validation tiles are those with any valid pixel, anomalous
when the mask has a defect pixel on a valid pixel. The tiles are written to a temporary anomalib
Folder layout (train/good, test/good, test/defect, ground_truth/defect) outside the repository;
anomalib's PatchCore (wide_resnet50_2, layer2+layer3, random backbone, coreset 1%) is fitted and
predicts on test/. Its raw scores and maps (no normalisation, no thresholds) are scored with
scikit-learn: tile AUROC over all validation tiles; tile AUROC of tiles from defect-free strips
against defective tiles; pixel AUROC over valid pixels of the tiles (pixels where the last
tiles overlap count once per tile) and over valid pixels of the strips, tile maps averaged back
into strips with ``stitch`` as Loomwatch does.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import aitex_dir
from models.preprocessing import valid_area
from models.tile_dataset import TileDataset
from models.tiling import Box, pad_to_tile, plan_tiles, stitch
from training.data import load_dataset, load_image, load_mask, split_dataset

TILE = 256
STRIDE = 256
VAL_FRACTION = 0.3
SPLIT_SEED = 0
REPO = Path(__file__).resolve().parents[1]


@dataclass
class TestTile:
    """One validation tile as exported: where it came from and its ground truth."""

    name: str
    strip: int
    box: Box
    label: int  # 1 when a defect pixel lies on a valid pixel of the tile
    clean_strip: bool  # the tile comes from a defect-free strip
    valid: np.ndarray
    mask: np.ndarray


@dataclass
class Strip:
    """One validation strip: its valid area, its defect mask and its exported tiles."""

    name: str
    valid: np.ndarray
    mask: np.ndarray
    tiles: list[str] = field(default_factory=list)


@dataclass
class Export:
    root: Path
    train_tiles: int
    train_strips: int
    tiles: dict[str, TestTile]
    strips: list[Strip]


@dataclass
class Prediction:
    scores: dict[str, float]
    maps: dict[str, np.ndarray]
    train_seconds: float
    ms_per_tile: list[float]
    peak_mib: float
    checkpoint: Path | None


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write_png(path: Path, pixels: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(pixels)):
        raise OSError(f"cannot write {path}")


def export_tiles(data: Path, fabric: str, root: Path) -> Export:
    """Write the split's tiles in anomalib's Folder layout below ``root``."""
    dataset = load_dataset(data, fabric=fabric)
    split = split_dataset(dataset, VAL_FRACTION, seed=SPLIT_SEED)
    folders = {
        key: root / sub
        for key, sub in (
            ("train", "train/good"),
            ("good", "test/good"),
            ("defect", "test/defect"),
            ("truth", "ground_truth/defect"),
        )
    }
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)

    images = [load_image(sample) for sample in split.train]
    valids = [valid_area(image) for image in images]
    training = TileDataset(images, valids, TILE, STRIDE, 1.0)
    for number, (owner, box) in enumerate(training.index):
        pixels = training.images[owner][box.y0 : box.y1, box.x0 : box.x1]
        _write_png(folders["train"] / f"{number:05d}.png", pixels)

    tiles: dict[str, TestTile] = {}
    strips: list[Strip] = []
    for number, sample in enumerate(split.validation):
        image = load_image(sample)
        mask = load_mask(sample, image.shape)
        image, valid = pad_to_tile(image, valid_area(image), TILE)
        pad = ((0, image.shape[0] - mask.shape[0]), (0, image.shape[1] - mask.shape[1]))
        mask = np.pad(mask, pad, constant_values=False) & valid
        strip = Strip(name=sample.name, valid=valid, mask=mask)
        strips.append(strip)
        for box in plan_tiles(image.shape[0], image.shape[1], TILE, STRIDE, valid):
            cut = (slice(box.y0, box.y1), slice(box.x0, box.x1))
            tile_valid = valid[cut]
            if not tile_valid.any():
                continue
            tile_mask = mask[cut]
            label = int(tile_mask.any())
            name = f"{number:03d}_{sample.name}_y{box.y0:04d}_x{box.x0:04d}"
            _write_png(folders["defect" if label else "good"] / f"{name}.png", image[cut])
            if label:
                _write_png(folders["truth"] / f"{name}.png", tile_mask.astype(np.uint8) * 255)
            tiles[name] = TestTile(
                name=name,
                strip=number,
                box=box,
                label=label,
                clean_strip=sample.label == 0,
                valid=tile_valid.copy(),
                mask=tile_mask.copy(),
            )
            strip.tiles.append(name)
    return Export(
        root=root,
        train_tiles=len(training),
        train_strips=len(split.train),
        tiles=tiles,
        strips=strips,
    )


def run_patchcore(root: Path, results: Path, threads: int, batch_size: int) -> Prediction:
    """Fit anomalib's PatchCore on train/good and predict test/ (raw scores and maps)."""
    import torch
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import Callback

    torch.set_num_threads(threads)
    seed_everything(0, workers=True)

    class BatchTimer(Callback):
        """Wall time of each predict batch (pre-processing, model), per tile."""

        def __init__(self) -> None:
            self.started = 0.0
            self.per_tile: list[float] = []

        def on_predict_batch_start(self, *args: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_predict_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, *args: Any, **kwargs: Any
        ) -> None:
            elapsed = (time.perf_counter() - self.started) * 1000.0
            self.per_tile.append(elapsed / len(batch.image))

    datamodule = Folder(
        name="loomwatch_tiles",
        root=root,
        normal_dir="train/good",
        abnormal_dir="test/defect",
        normal_test_dir="test/good",
        mask_dir="ground_truth/defect",
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=0,
        test_split_mode="from_dir",
        val_split_mode="none",
        seed=0,
    )
    # No post-processor: scores and maps stay raw (no min-max normalisation nor clamping, which
    # would need a validation set carved out of the test tiles). No evaluator, no visualizer.
    model = Patchcore(
        backbone="wide_resnet50_2",
        layers=("layer2", "layer3"),
        pre_trained=False,
        coreset_sampling_ratio=0.01,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    timer = BatchTimer()
    engine = Engine(
        callbacks=[timer],
        default_root_dir=results,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - started

    batches = engine.predict(model=model, datamodule=datamodule, return_predictions=True)
    peak = peak_mib()
    scores: dict[str, float] = {}
    maps: dict[str, np.ndarray] = {}
    for batch in batches or []:
        tile_maps = batch.anomaly_map.detach().cpu().float().numpy().reshape(-1, TILE, TILE)
        tile_scores = batch.pred_score.detach().cpu().float().numpy().reshape(-1)
        for path, score, tile_map in zip(batch.image_path, tile_scores, tile_maps, strict=True):
            scores[Path(path).stem] = float(score)
            maps[Path(path).stem] = tile_map
    checkpoints = sorted(results.rglob("*.ckpt"))
    return Prediction(
        scores=scores,
        maps=maps,
        train_seconds=train_seconds,
        ms_per_tile=timer.per_tile,
        peak_mib=peak,
        checkpoint=checkpoints[-1] if checkpoints else None,
    )


def check_checkpoint(path: Path | None) -> list[str]:
    """Whether the checkpoint loads with torch.load(weights_only=True) and through anomalib."""
    if path is None:
        return ["no checkpoint written"]
    import torch
    from anomalib.models import Patchcore

    lines = [f"checkpoint {path.name}: {path.stat().st_size / 2**20:.1f} MiB"]
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        lines.append("torch.load(weights_only=True): loads")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        lines.append(f"torch.load(weights_only=True): FAILS ({type(exc).__name__}: {first})")
    try:
        Patchcore.load_from_checkpoint(path, map_location="cpu")
        lines.append("Patchcore.load_from_checkpoint: loads")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        lines.append(f"Patchcore.load_from_checkpoint: FAILS ({type(exc).__name__}: {first})")
    return lines


def _auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    if y.min(initial=1) == y.max(initial=0):
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores)))


def compute_metrics(export: Export, prediction: Prediction) -> dict[str, float]:
    missing = sorted(set(export.tiles) - set(prediction.scores))
    if missing:
        raise RuntimeError(f"anomalib returned no prediction for {len(missing)} tiles")
    tiles = list(export.tiles.values())
    labels = [tile.label for tile in tiles]
    scores = [prediction.scores[tile.name] for tile in tiles]
    clean_vs_defect = [tile for tile in tiles if tile.clean_strip or tile.label]
    pixel_truth = np.concatenate([tile.mask[tile.valid] for tile in tiles])
    pixel_scores = np.concatenate([prediction.maps[tile.name][tile.valid] for tile in tiles])
    tile_pixel = _auroc(pixel_truth, pixel_scores)
    del pixel_truth, pixel_scores

    strip_truth: list[np.ndarray] = []
    strip_scores: list[np.ndarray] = []
    for strip in export.strips:
        height, width = strip.valid.shape
        boxes = [export.tiles[name].box for name in strip.tiles]
        stitched = stitch([prediction.maps[name] for name in strip.tiles], boxes, height, width)
        strip_truth.append(strip.mask[strip.valid])
        strip_scores.append(stitched[strip.valid])
    return {
        "tile_auroc_all": _auroc(labels, scores),
        "tile_auroc_clean_vs_defect": _auroc(
            [tile.label for tile in clean_vs_defect],
            [prediction.scores[tile.name] for tile in clean_vs_defect],
        ),
        "pixel_auroc_tiles": tile_pixel,
        "pixel_auroc_strips": _auroc(np.concatenate(strip_truth), np.concatenate(strip_scores)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=aitex_dir())
    parser.add_argument("--fabric", default="02")
    parser.add_argument("--workdir", type=Path, help="exported tiles and anomalib output (kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="anomalib-ref-")) if temporary else args.workdir
    workdir = workdir.resolve()
    if workdir == REPO or REPO in workdir.parents:
        parser.error(f"--workdir {workdir} lies inside the repository; AITEX tiles stay outside it")
    try:
        cv2.setNumThreads(args.threads)
        export = export_tiles(args.data, args.fabric, workdir / "dataset")
        tiles = list(export.tiles.values())
        defective = sum(tile.label for tile in tiles)
        clean = sum(tile.clean_strip for tile in tiles)
        print(
            f"split: {export.train_strips} train strips -> {export.train_tiles} train tiles; "
            f"{len(export.strips)} validation strips -> {len(tiles)} tiles "
            f"({defective} defective, {len(tiles) - defective} good of which {clean} "
            "from defect-free strips)"
        )
        prediction = run_patchcore(export.root, workdir / "results", args.threads, args.batch_size)
        figures = compute_metrics(export, prediction)
        checkpoint_notes = check_checkpoint(prediction.checkpoint)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)

    import anomalib
    import torch

    median_ms = statistics.median(prediction.ms_per_tile)
    rows = (
        ("tile AUROC, all validation tiles", f"{figures['tile_auroc_all']:.4f}"),
        (
            "tile AUROC, defect-free strips vs defective",
            f"{figures['tile_auroc_clean_vs_defect']:.4f}",
        ),
        ("pixel AUROC, valid pixels of the tiles", f"{figures['pixel_auroc_tiles']:.4f}"),
        ("pixel AUROC, valid pixels of stitched strips", f"{figures['pixel_auroc_strips']:.4f}"),
        ("train seconds (fit incl. coreset)", f"{prediction.train_seconds:.1f}"),
        (f"predict ms/tile (median, batches of {args.batch_size})", f"{median_ms:.1f}"),
        ("peak RSS after predict, MiB", f"{prediction.peak_mib:.0f}"),
        ("peak RSS at the end, MiB", f"{peak_mib():.0f}"),
    )
    print(f"anomalib {anomalib.__version__}, torch {torch.__version__}, threads {args.threads}")
    for label, value in rows:
        print(f"{label + ':':<50} {value}")
    for line in checkpoint_notes:
        print(line)


if __name__ == "__main__":
    main()
