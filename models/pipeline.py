"""The one inference path: decode, preprocess, tile, model, stitch, calibrate, post-process.

The API, the CLI's predict and the evaluation all call :class:`Detector`, so what is measured is
what is served. :meth:`Detector.analyse` stops before calibration (raw map and scores, used by
calibration and metrics); :meth:`Detector.predict` runs the whole path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from models.baseline import subtract_baseline
from models.calibration import Calibration
from models.manifest import Manifest, read_manifest
from models.network import Network, TorchNetwork, load_network
from models.postprocess import (
    PostProcessResult,
    SuppressionSettings,
    Verdict,
    decide,
    postprocess,
    settle,
    smooth,
)
from models.preprocessing import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, valid_area
from models.tiling import Box, pad_to_tile, plan_tiles, stitch, valid_fraction

if TYPE_CHECKING:
    from models.base import AnomalyModel

ImageSource = np.ndarray | bytes | str | Path


@dataclass
class Analysis:
    """Raw model output for one image, before calibration."""

    image: np.ndarray  # uint8 H x W
    valid: np.ndarray  # bool H x W, fabric pixels
    anomaly_map: np.ndarray  # float32 H x W, raw units
    boxes: list[Box]
    tile_scores: list[float]
    tile_valid: list[float]  # share of each tile on fabric
    score: float  # raw image score: the largest score of a tile with fabric
    timings: dict[str, float] = field(default_factory=dict)
    # columns [start, stop) of the bundle's learned field of view when it applied to this image
    field_of_view: tuple[int, int] | None = None
    # raw map level subtracted from the map and the tile scores (pipeline.image_level); 0 if none
    level: float = 0.0
    # with pipeline.isolated_peak: the highest tile score and the peak gap the score combines
    peak: dict[str, float] | None = None


@dataclass
class _Tiled:
    """One image cut into tiles, before the network."""

    image: np.ndarray
    valid: np.ndarray
    padded: np.ndarray
    padded_valid: np.ndarray
    boxes: list[Box]
    pixels: np.ndarray  # uint8 [N,T,T]
    masks: np.ndarray  # bool [N,T,T]
    timings: dict[str, float]
    field_of_view: tuple[int, int] | None = None


@dataclass
class Prediction:
    analysis: Analysis
    raw_score: float
    score: float  # normalised, 0.5 = calibrated threshold
    threshold: float  # normalised image threshold used
    raw_threshold: float
    decision: bool
    verdict: Verdict
    # smoothed and normalised (0.5 = pixel threshold): the map the regions were cut from, which
    # an operator is shown and evaluation judges (pixel AUROC, AUPRO, pixel AP)
    normalized_map: np.ndarray
    post: PostProcessResult
    timings: dict[str, float]

    def summary(self) -> dict[str, Any]:
        """JSON-ready result without pixel arrays."""
        height, width = self.analysis.image.shape
        view = self.analysis.field_of_view
        return {
            "image_size": {"width": width, "height": height},
            "tiles": len(self.analysis.boxes),
            "fabric_fraction": round(float(np.mean(self.analysis.valid)), 4),
            "field_of_view": (None if view is None else {"start": view[0], "stop": view[1]}),
            "map_level": round(self.analysis.level, 6),
            "isolated_peak": (
                None
                if self.analysis.peak is None
                else {k: round(v, 6) for k, v in self.analysis.peak.items()}
            ),
            "score": round(self.score, 6),
            "raw_score": self.raw_score,
            "threshold": self.threshold,
            "raw_threshold": self.raw_threshold,
            "decision": "anomalous" if self.decision else "normal",
            "is_anomalous": self.decision,
            "decision_reason": self.verdict.reason,
            "regions": [region.to_json() for region in self.post.kept],
            "suppressed": {
                "settings": self.post.settings.model_dump(),
                "regions": [region.to_json() for region in self.post.suppressed],
                "vetoed_decision": self.verdict.vetoed,
            },
            "timings_ms": {k: round(v * 1000.0, 2) for k, v in self.timings.items()},
        }


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started


def _box_peak(anomaly: np.ndarray, valid: np.ndarray, box: Box) -> float:
    """The highest value of ``anomaly`` on fabric inside ``box`` (clipped to the image); 0
    without fabric there."""
    window = anomaly[box.y0 : box.y1, box.x0 : box.x1]
    fabric = valid[box.y0 : box.y1, box.x0 : box.x1]
    return float(window[fabric].max()) if fabric.any() else 0.0


def _score_window(analysis: Analysis) -> tuple[int, int, int, int] | None:
    """The tile the image score came from (the highest-scoring tile on fabric), in image pixels."""
    on_fabric = [i for i, share in enumerate(analysis.tile_valid) if share > 0]
    if not on_fabric:
        return None
    box = analysis.boxes[max(on_fabric, key=lambda i: analysis.tile_scores[i])]
    height, width = analysis.image.shape
    return box.y0, box.x0, min(box.y1, height), min(box.x1, width)


class Detector:
    """A model's network with its calibration and pipeline settings.

    ``network`` is what runs the model (:mod:`models.network`): an ``AnomalyModel`` is run by
    PyTorch; an exported folder's network by ONNX Runtime or OpenVINO. Everything around it
    (tiling, valid area, calibration, post-processing) is this one Python pipeline.
    """

    def __init__(
        self,
        network: Network | AnomalyModel,
        manifest: Manifest,
        batch_size: int | None = None,
    ):
        if hasattr(network, "run"):
            self.network: Network = cast(Network, network)
        else:
            self.network = TorchNetwork(cast("AnomalyModel", network))
        self.manifest = manifest
        self.pipeline = manifest.pipeline
        self.batch_size = batch_size or manifest.pipeline.batch_size
        self.suppression = SuppressionSettings.model_validate(manifest.suppression)

    @classmethod
    def from_bundle(
        cls,
        directory: Path | str,
        batch_size: int | None = None,
        backend: str = "auto",
        threads: int | None = None,
        device: str = "auto",
        precision: str = "32",
        channels_last: bool = False,
    ) -> Detector:
        """The model folder at ``directory`` (a bundle or an exported model) on ``backend``,
        ``device`` and ``precision`` (models/device.py)."""
        manifest = read_manifest(directory)
        network = load_network(
            directory, manifest, backend, threads, device, precision, channels_last
        )
        return cls(network, manifest, batch_size)

    @property
    def backend(self) -> str:
        return self.network.backend

    @property
    def device(self) -> str:
        return self.network.device

    @property
    def precision(self) -> str:
        return self.network.precision

    @property
    def model(self) -> AnomalyModel | None:
        """The PyTorch model when PyTorch runs it (report pictures need it); else None."""
        return self.network.model if isinstance(self.network, TorchNetwork) else None

    @property
    def calibration(self) -> Calibration:
        return self.manifest.calibration

    def _decode(self, source: ImageSource, max_pixels: int) -> np.ndarray:
        if isinstance(source, np.ndarray):
            if source.dtype != np.uint8 or source.ndim != 2:
                raise ValueError("arrays passed to the detector must be uint8 H x W grey")
            return source
        return decode_image(source, max_pixels=max_pixels)

    def _tile(self, source: ImageSource, max_pixels: int) -> _Tiled:
        """Decode, valid area, padding and the tiles of one image (the CPU work before the
        network)."""
        timings: dict[str, float] = {}
        tile = self.pipeline.tile_size
        with _timed(timings, "decode"):
            image = self._decode(source, max_pixels)
        with _timed(timings, "preprocess"):
            valid = valid_area(image, self.pipeline.valid_area)
            padded, padded_valid = pad_to_tile(image, valid, tile)
        with _timed(timings, "tile"):
            height, width = padded.shape
            boxes = plan_tiles(height, width, tile, self.pipeline.stride, padded_valid)
            pixels = np.stack([padded[b.y0 : b.y1, b.x0 : b.x1] for b in boxes])
            masks = np.stack([padded_valid[b.y0 : b.y1, b.x0 : b.x1] for b in boxes])
        view = self.pipeline.valid_area.field_of_view
        applied = (view.start, view.stop) if view and view.applies(image.shape[1]) else None
        return _Tiled(image, valid, padded, padded_valid, boxes, pixels, masks, timings, applied)

    def _run(self, pixels: np.ndarray, masks: np.ndarray) -> tuple[list[np.ndarray], list[float]]:
        """The network over uint8 tiles [N,T,T] in batches of ``batch_size``."""
        maps: list[np.ndarray] = []
        scores: list[float] = []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start : start + self.batch_size, None].astype(np.float32) / 255.0
            batch_valid = masks[start : start + self.batch_size, None]
            batch_maps, batch_scores = self.network.run(batch, batch_valid)
            maps.extend(batch_maps)
            scores.extend(float(s) for s in batch_scores)
        return maps, scores

    def _stitch(self, tiled: _Tiled, maps: list[np.ndarray], scores: list[float]) -> Analysis:
        timings = tiled.timings
        image, padded_valid, boxes = tiled.image, tiled.padded_valid, tiled.boxes
        with _timed(timings, "stitch"):
            full = stitch(maps, boxes, *tiled.padded.shape)[: image.shape[0], : image.shape[1]]
            level = 0.0
            if self.pipeline.image_level == "median" and tiled.valid.any():
                # the strip's own level: its worst spot is judged against the rest of it
                # (before the column baseline, which is learned from maps so shifted)
                level = float(np.median(full[tiled.valid]))
                full[tiled.valid] -= level  # a fresh float32 array from stitch
                scores = [score - level for score in scores]
            baseline = self.pipeline.column_baseline
            if baseline is not None and baseline.applies(image.shape[1]):
                # each tile's score becomes its highest pixel above the column's level
                full = subtract_baseline(full, baseline)
                scores = [_box_peak(full, tiled.valid, box) for box in boxes]
            fractions = [valid_fraction(padded_valid, box) for box in boxes]
            on_fabric = [s for s, f in zip(scores, fractions, strict=True) if f > 0]
            score = max(on_fabric) if on_fabric else 0.0
            peak = None
            isolated = self.pipeline.isolated_peak
            if isolated is not None and on_fabric:
                # the more unusual of "its worst spot is high" and "it stands alone"
                gap = isolated.gap(full, tiled.valid)
                peak = {"tile_score": score, "gap": gap}
                score = isolated.combine(score, gap)
        return Analysis(
            image, tiled.valid, full, boxes, scores, fractions, score, timings,
            tiled.field_of_view, level, peak,
        )  # fmt: skip

    def analyse(self, source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Analysis:
        tiled = self._tile(source, max_pixels)
        with _timed(tiled.timings, "model"):
            maps, scores = self._run(tiled.pixels, tiled.masks)
        return self._stitch(tiled, maps, scores)

    def analyse_many(
        self, sources: Sequence[ImageSource], max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> list[Analysis | ImageDecodeError]:
        """:meth:`analyse` of several images with their tiles scored together: the network
        runs over all of them in batches of ``batch_size`` (full batches across images). An
        image that cannot be decoded gets its exception in its place; the others are scored.
        Each image's ``model`` time is its share (by tiles) of the shared passes."""
        prepared: list[_Tiled | ImageDecodeError] = []
        for source in sources:
            try:
                prepared.append(self._tile(source, max_pixels))
            except ImageDecodeError as exc:
                prepared.append(exc)
        tiled = [item for item in prepared if isinstance(item, _Tiled)]
        if not tiled:
            return [item for item in prepared if not isinstance(item, _Tiled)]
        started = time.perf_counter()
        maps, scores = self._run(
            np.concatenate([item.pixels for item in tiled]),
            np.concatenate([item.masks for item in tiled]),
        )
        seconds = time.perf_counter() - started
        total = sum(len(item.boxes) for item in tiled)
        results: list[Analysis | ImageDecodeError] = []
        start = 0
        for item in prepared:
            if not isinstance(item, _Tiled):
                results.append(item)
                continue
            stop = start + len(item.boxes)
            item.timings["model"] = seconds * len(item.boxes) / total
            results.append(self._stitch(item, maps[start:stop], scores[start:stop]))
            start = stop
        return results

    def predict(
        self,
        source: ImageSource,
        *,
        threshold: float | None = None,
        suppression: SuppressionSettings | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> Prediction:
        """Score one image. `threshold` is a normalised image threshold (default 0.5)."""
        analysis = self.analyse(source, max_pixels)
        return self.finish(analysis, threshold=threshold, suppression=suppression)

    def finish(
        self,
        analysis: Analysis,
        *,
        threshold: float | None = None,
        suppression: SuppressionSettings | None = None,
        calibration: Calibration | None = None,
    ) -> Prediction:
        """Calibrate and post-process an analysis (cheap: the model is not run again).

        ``calibration`` stands in for the bundle's own, to try a candidate while calibrating.
        """
        timings = dict(analysis.timings)
        settings = suppression or self.suppression
        calibration = calibration or self.calibration
        used = 0.5 if threshold is None else float(threshold)
        with _timed(timings, "calibrate"):
            score = calibration.normalize_image(analysis.score)
            # smoothed in raw units, then normalised: the pixel calibration is fitted on the map
            # smoothed the same way (training.calibrate)
            raw_map = smooth(analysis.anomaly_map, settings.smoothing_sigma)
            normalized_map = calibration.normalize_pixels(raw_map)
        with _timed(timings, "postprocess"):
            strong = score >= used + settings.veto_margin
            evidence = _score_window(analysis) if strong else None
            found = postprocess(normalized_map, analysis.valid, settings, evidence)
            verdict = decide(score, used, found)
            post = settle(found, verdict)
        timings["total"] = sum(timings.values())
        return Prediction(
            analysis=analysis,
            raw_score=analysis.score,
            score=score,
            threshold=used,
            raw_threshold=calibration.image_threshold_from_normalized(used),
            decision=verdict.anomalous,
            verdict=verdict,
            normalized_map=normalized_map,
            post=post,
            timings=timings,
        )
