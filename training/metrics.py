"""Evaluation metrics: image AUROC, F1-max, pixel AUROC, pixel AP and AUPRO.

ROC, AUROC, AP and precision-recall come from scikit-learn. Only AUPRO is written here, and even it
is a scikit-learn ROC curve: the per-region overlap (PRO, Bergmann et al., "The MVTec Anomaly
Detection Dataset", IJCV 2021) at a threshold t is the mean over all ground-truth regions C_k of
|{p in C_k : score(p) >= t}| / |C_k|, which is the true-positive rate of a ROC curve in which every
defect pixel of region k weighs 1 / (K |C_k|). So the PRO curve is ``roc_curve`` with those sample
weights; its false-positive rate is the plain pixel FPR over defect-free pixels.

Conventions shared by all pixel metrics:

- A pixel counts only where its ``valid`` flag is True (padding is not fabric). A mask pixel is a
  defect when it is non-zero. Maps, masks and valid flags of one image share one shape; images
  may differ in shape.
- Regions are the 8-connected components (OpenCV) of ``mask & valid`` in each image, so a defect
  cut in two by invalid pixels counts as two regions, and invalid defect pixels count nowhere.
- Thresholds are exact: every distinct score is a threshold (the curves are computed from the
  sorted scores), so there is no binning and AUPRO is interpolated linearly at ``fpr_limit``.
- Scale: at most ``max_pixels`` pixels are used. Up to that cap every valid pixel is used and the
  result is exact. Above it the pixels are subsampled, each class on its own: all defect pixels
  are kept up to ``max_pixels // 2`` (beyond that a uniform sample of them), and the rest of the
  budget is a uniform sample of defect-free pixels. The sample is drawn without replacement by
  giving each pixel a random key from a generator seeded with ``seed`` and keeping the smallest
  keys (bottom-k sampling), so it is deterministic for a given input order and seed. The
  subsampled classes are re-weighted by (pixels seen / pixels kept), so AUROC, AP and AUPRO stay
  unbiased estimates of the full-data values. Scores are held as float32.

Undefined metrics (one class only, no regions, no defect-free pixels) are ``float("nan")``, never
an exception. ``json.dumps`` would write NaN as an invalid JSON token: pass results through
:func:`to_jsonable`, which turns NaN and infinities into ``null``.

:class:`EvaluationAccumulator` collects these figures image by image in bounded memory for the
evaluation loop: it keeps image and tile scores, and a bounded pixel sample in place of the maps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import (
    auc,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "EvaluationAccumulator",
    "ImageRecord",
    "aupro",
    "f1_max",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "to_jsonable",
]

DEFAULT_MAX_PIXELS = 20_000_000
_NAN = float("nan")
_CURVE_POINTS = 2000  # per axis, when thinning long ROC curves for plotting


# --------------------------------------------------------------------------- image level


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image (or tile) scores; NaN when only one class is present."""
    y, s = _binary_labels_and_scores(labels, scores)
    if not _both_classes(y):
        return _NAN
    return float(roc_auc_score(y, s))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold achieving it.

    A unit is predicted anomalous when ``score >= threshold``; every distinct score is tried. Where
    several thresholds reach the best F1 the lowest is returned. (NaN, NaN) when there is no
    anomalous unit (F1 is undefined without positives).
    """
    y, s = _binary_labels_and_scores(labels, scores)
    if not y.any():
        return _NAN, _NAN
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision 1, recall 0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


# --------------------------------------------------------------------------- pixel level


def pixel_auroc(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    valids: Sequence[np.ndarray] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
) -> float:
    """AUROC over the valid pixels of all images (see the module notes on subsampling)."""
    return _collect(masks, maps, valids, max_pixels, seed).pool().auroc()


def pixel_ap(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    valids: Sequence[np.ndarray] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
) -> float:
    """Average precision (area under the precision-recall curve) over the valid pixels."""
    return _collect(masks, maps, valids, max_pixels, seed).pool().average_precision()


def aupro(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    valids: Sequence[np.ndarray] | None = None,
    fpr_limit: float = 0.3,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seed: int = 0,
) -> float:
    """Area under the PRO curve from FPR 0 to ``fpr_limit``, divided by ``fpr_limit``.

    A perfect detector scores 1.0. PRO is averaged over all regions of all images; FPR is over all
    valid defect-free pixels of all images. NaN without any region or defect-free pixel.
    """
    return _collect(masks, maps, valids, max_pixels, seed).pool().aupro(fpr_limit)


def to_jsonable(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts.

    NaN and infinities become ``None`` (JSON null); numpy scalars and arrays become Python numbers
    and lists; tuples become lists; paths become strings; dataclasses become dicts.
    """
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return [to_jsonable(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    return value


# --------------------------------------------------------------------------- pixel sample


class _BottomK:
    """A seeded uniform sample without replacement from a stream of items (bottom-k sampling).

    Every item arrives with an independent uniform random key; the sample is the ``capacity``
    items with the smallest keys. The capacity may shrink between calls (never grow): items
    dropped earlier could not be among the smallest keys for any later, smaller capacity.
    """

    def __init__(self) -> None:
        self._chunks: list[tuple[np.ndarray, ...]] = []  # (keys, column, column, ...)
        self._stored = 0
        self._cut: int | None = None  # keys above this can no longer enter the sample
        self.seen = 0

    def add(self, keys: np.ndarray, columns: tuple[np.ndarray, ...], capacity: int) -> None:
        self.seen += keys.size
        if self._cut is not None:
            keep = keys <= self._cut
            keys, columns = keys[keep], tuple(column[keep] for column in columns)
        if keys.size:
            self._chunks.append((keys, *columns))
            self._stored += keys.size
        if self._stored > 2 * capacity:
            self._shrink(capacity)

    def sample(self, capacity: int) -> tuple[np.ndarray, ...]:
        """The columns of the sampled items (without their keys)."""
        self._shrink(capacity)
        return self._chunks[0][1:] if self._chunks else ()

    @property
    def stored(self) -> int:
        return self._stored

    def _shrink(self, capacity: int) -> None:
        if not self._chunks:
            return
        merged = tuple(np.concatenate(parts) for parts in zip(*self._chunks, strict=True))
        keys = merged[0]
        if keys.size > capacity:
            chosen = np.argpartition(keys, capacity - 1)[:capacity]
            merged = tuple(column[chosen] for column in merged)
            self._cut = int(merged[0].max())
        self._chunks = [merged]
        self._stored = merged[0].size


@dataclass
class _PooledPixels:
    """The pixel sample of all images, sorted by score (so that scikit-learn's sorts are cheap)."""

    scores: np.ndarray  # float32, descending
    labels: np.ndarray  # bool, True = defect
    weights: np.ndarray | None  # subsampling weights; None when every pixel was kept
    pro_weights: np.ndarray  # 1 / (K |C_k|) on the pixels of region k, 1 on defect-free ones
    _roc: tuple[np.ndarray, np.ndarray] | None = None

    def defined(self) -> bool:
        return _both_classes(self.labels)

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        if self._roc is None:
            self._roc = np.zeros(0), np.zeros(0)
            if self.defined():
                fpr, tpr, _ = roc_curve(self.labels, self.scores, sample_weight=self.weights)
                self._roc = fpr, tpr
        return self._roc

    def auroc(self) -> float:
        fpr, tpr = self.roc()
        return float(auc(fpr, tpr)) if fpr.size else _NAN

    def average_precision(self) -> float:
        if not self.defined():
            return _NAN
        return float(average_precision_score(self.labels, self.scores, sample_weight=self.weights))

    def aupro(self, fpr_limit: float) -> float:
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if not self.defined():
            return _NAN
        fpr, pro, _ = roc_curve(self.labels, self.scores, sample_weight=self.pro_weights)
        return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _area_up_to(fpr: np.ndarray, tpr: np.ndarray, limit: float) -> float:
    """Trapezoidal area under the curve from fpr 0 to ``limit``, interpolated linearly there."""
    end = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:end], tpr[:end]
    if end < fpr.size:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], tpr[end - 1], tpr[end]
        x = np.append(x, limit)
        y = np.append(y, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(auc(x, y)) if x.size > 1 else 0.0


class _PixelSample:
    """Bounded sample of valid pixels (score, defect flag, region) across images."""

    def __init__(self, max_pixels: int, seed: int) -> None:
        if max_pixels < 2:
            raise ValueError(f"max_pixels must be at least 2, got {max_pixels}")
        self.max_pixels = max_pixels
        self._rng = np.random.default_rng(seed)
        self._positives = _BottomK()  # columns: score, global region index
        self._negatives = _BottomK()  # column: score
        self._region_sizes: list[np.ndarray] = []
        self._n_regions = 0

    @property
    def n_pixels(self) -> int:
        return self._positives.seen + self._negatives.seen

    def add(
        self, anomaly_map: np.ndarray, mask: np.ndarray, valid: np.ndarray | None, name: str
    ) -> None:
        scores = np.asarray(anomaly_map)
        defect = np.asarray(mask) > 0
        valid_flags = np.ones(scores.shape, bool) if valid is None else np.asarray(valid, bool)
        if scores.ndim != 2 or defect.shape != scores.shape or valid_flags.shape != scores.shape:
            raise ValueError(
                f"{name}: map {scores.shape}, mask {defect.shape} and valid {valid_flags.shape}"
                " must be one and the same 2-D shape"
            )
        defect &= valid_flags
        normal = valid_flags & ~defect
        positive_scores = scores[defect].astype(np.float32)
        negative_scores = scores[normal].astype(np.float32)
        if not (np.isfinite(positive_scores).all() and np.isfinite(negative_scores).all()):
            raise ValueError(f"{name}: the anomaly map has NaN or infinite values")

        count, components = cv2.connectedComponents(defect.astype(np.uint8), connectivity=8)
        self._region_sizes.append(np.bincount(components[defect], minlength=count)[1:])
        regions = (components[defect] - 1 + self._n_regions).astype(np.int32)
        self._n_regions += count - 1

        self._negatives.add(self._keys(negative_scores.size), (negative_scores,), self._neg_cap())
        self._positives.add(
            self._keys(positive_scores.size), (positive_scores, regions), self._pos_cap()
        )

    def pool(self) -> _PooledPixels:
        positive = self._positives.sample(self._pos_cap())
        negative = self._negatives.sample(self._neg_cap())
        positive_scores, regions = positive if positive else (np.zeros(0, np.float32),) * 2
        negative_scores = negative[0] if negative else np.zeros(0, np.float32)

        n_pos, n_neg = positive_scores.size, negative_scores.size
        pos_weight = self._positives.seen / n_pos if n_pos else 1.0
        neg_weight = self._negatives.seen / n_neg if n_neg else 1.0
        sizes = np.concatenate(self._region_sizes) if self._region_sizes else np.zeros(0, np.int64)
        region_weights = 1.0 / (max(self._n_regions, 1) * sizes.astype(np.float64))

        scores = np.concatenate([positive_scores, negative_scores])
        regions = np.concatenate([regions.astype(np.int32), np.full(n_neg, -1, np.int32)])
        # Descending: scikit-learn sorts descending again, which is fast on sorted input.
        order = np.argsort(scores, kind="stable")[::-1]
        scores, regions = scores[order], regions[order]
        labels = regions >= 0
        weights = None
        if pos_weight != 1.0 or neg_weight != 1.0:
            weights = np.where(labels, pos_weight, neg_weight)
        # A ROC curve normalises each class by its total weight, so one constant weight per
        # class is enough: 1 for defect-free pixels, 1 / (K |C_k|) for those of region k.
        pro_table = np.concatenate([[1.0], region_weights])
        return _PooledPixels(scores, labels, weights, pro_table[regions + 1])

    def _keys(self, size: int) -> np.ndarray:
        return self._rng.integers(0, 2**32, size=size, dtype=np.uint32)

    def _pos_cap(self) -> int:
        return self.max_pixels // 2

    def _neg_cap(self) -> int:
        return self.max_pixels - min(self._positives.seen, self._pos_cap())


def _collect(
    masks: Sequence[np.ndarray],
    maps: Sequence[np.ndarray],
    valids: Sequence[np.ndarray] | None,
    max_pixels: int,
    seed: int,
) -> _PixelSample:
    if len(masks) != len(maps) or (valids is not None and len(valids) != len(maps)):
        raise ValueError("masks, maps and valids must hold one entry per image")
    sample = _PixelSample(max_pixels, seed)
    for index, (mask, anomaly_map) in enumerate(zip(masks, maps, strict=True)):
        sample.add(anomaly_map, mask, None if valids is None else valids[index], f"image {index}")
    return sample


# --------------------------------------------------------------------------- accumulator


@dataclass(frozen=True)
class ImageRecord:
    """One evaluated image: its ground truth and what the detector said about it."""

    name: str
    label: int  # 1 = has a defect
    defect: str | None  # defect code (e.g. AITEX "002"), None when unknown or defect-free
    score: float  # raw image (strip) score
    normalized_score: float
    decision: bool  # predicted defective at the calibrated threshold
    has_mask: bool


class EvaluationAccumulator:
    """Collects images one at a time and computes every evaluation metric at the end.

    Memory stays bounded: image and tile scores are kept, full-resolution maps are not. Valid
    pixels go into a bottom-k sample of at most ``max_pixels`` pixels (all pixels while the total
    stays under the cap, so small evaluations are exact; see the module notes), each kept with its
    region index, and the exact size of every region is recorded, which is all AUPRO needs.

    Masks: an image with a mask contributes pixels and tiles (``record.has_mask`` is only carried
    along; what counts is the ``mask`` given). A defect-free image (label 0) without a mask has no
    defect pixels, so it contributes too, as an all-zero mask. A defective image without a mask,
    or whose mask has no defect pixel in its valid area (AITEX has an all-zero mask), contributes
    to image and strip metrics only: its defect is somewhere, so its pixels and tiles cannot be
    counted as defect-free.

    Tiles: ``tile_boxes`` are (y0, x0, y1, x1) in image pixels, end exclusive, clipped to the image.
    A tile is anomalous when the mask has a valid defect pixel inside it; tiles without any valid
    pixel (padding only) are left out.
    """

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, seed: int = 0) -> None:
        self._pixels = _PixelSample(max_pixels, seed)
        self._records: list[ImageRecord] = []
        self._tile_labels: list[int] = []
        self._tile_scores: list[float] = []
        self._tile_from_clean: list[bool] = []
        self._tiled = False
        self._pooled: _PooledPixels | None = None

    @property
    def records(self) -> tuple[ImageRecord, ...]:
        return tuple(self._records)

    def add_image(
        self,
        record: ImageRecord,
        anomaly_map: np.ndarray | None,
        mask: np.ndarray | None,
        valid: np.ndarray | None,
        tile_boxes: Sequence[tuple[int, int, int, int]] = (),
        tile_scores: Sequence[float] = (),
    ) -> None:
        if record.label not in (0, 1):
            raise ValueError(f"{record.name}: label must be 0 or 1, got {record.label}")
        if not math.isfinite(record.score):
            raise ValueError(f"{record.name}: the image score is {record.score}")
        if len(tile_boxes) != len(tile_scores):
            raise ValueError(
                f"{record.name}: {len(tile_boxes)} tile boxes but {len(tile_scores)} tile scores"
            )
        if not all(math.isfinite(score) for score in tile_scores):
            raise ValueError(f"{record.name}: a tile score is NaN or infinite")
        shapes = {array.shape for array in (anomaly_map, mask, valid) if array is not None}
        if len(shapes) > 1:
            raise ValueError(f"{record.name}: map, mask and valid differ in shape: {shapes}")
        if mask is None and record.label == 0 and shapes:
            mask = np.zeros(shapes.pop(), bool)
        if mask is not None and record.label == 1 and not _has_valid_defect(mask, valid):
            mask = None  # a defect we cannot locate: its pixels are not known to be normal

        if mask is not None and anomaly_map is not None:
            self._pixels.add(anomaly_map, mask, valid, record.name)  # checks before it adds
        if mask is not None or record.label == 0:  # tiles can be labelled
            defect = None if mask is None else np.asarray(mask) > 0
            self._add_tiles(tile_boxes, tile_scores, defect, valid, record.label == 0)
        self._records.append(record)
        self._tiled = self._tiled or bool(tile_boxes)
        self._pooled = None

    def compute(self) -> dict[str, Any]:
        """All metrics; NaN where one is undefined (see :func:`to_jsonable` for JSON).

        Keys: ``image_auroc`` and ``f1_max`` (with ``f1_max_threshold``, a raw score) over tiles
        when any image came with tiles, else over images; ``strip_auroc`` over whole images, only
        when tiles were given, with ``tile_auroc_clean_vs_defect`` (tiles of defect-free images
        against defective tiles only); ``pixel_auroc``, ``aupro`` (FPR limit 0.3), ``pixel_ap``;
        ``n_images``, ``n_anomalous``, ``n_tiles``, ``n_anomalous_tiles``; ``n_pixels`` (valid
        pixels seen) and ``n_pixels_used`` (in the sample). The pixel sample is pooled (sorted)
        once and reused until the next image is added.
        """
        image_labels, image_scores = self._image_units()
        units_labels, units_scores = (
            (self._tile_labels, self._tile_scores) if self._tiled else (image_labels, image_scores)
        )
        best_f1, best_threshold = f1_max(units_labels, units_scores)
        pooled = self._pool()
        result: dict[str, Any] = {"image_auroc": image_auroc(units_labels, units_scores)}
        if self._tiled:
            result["strip_auroc"] = image_auroc(image_labels, image_scores)
            result["tile_auroc_clean_vs_defect"] = self._clean_vs_defect_tile_auroc()
        result.update(
            pixel_auroc=pooled.auroc(),
            aupro=pooled.aupro(0.3),
            pixel_ap=pooled.average_precision(),
            f1_max=best_f1,
            f1_max_threshold=best_threshold,
            n_images=len(self._records),
            n_anomalous=int(sum(image_labels)),
            n_tiles=len(self._tile_labels),
            n_anomalous_tiles=int(sum(self._tile_labels)),
            n_pixels=self._pixels.n_pixels,
            n_pixels_used=int(pooled.scores.size),
        )
        return result

    def _clean_vs_defect_tile_auroc(self) -> float:
        """Tiles of defect-free images against defective tiles, leaving out the defect-free tiles
        of defective images: the protocol of tile folders split into good/ and defect/."""
        labels = np.asarray(self._tile_labels)
        keep = np.asarray(self._tile_from_clean, bool) | (labels == 1)
        return image_auroc(labels[keep], np.asarray(self._tile_scores)[keep])

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """ROC points (fpr, tpr): "strip" and "tile" for tiled data, else "image"; and "pixel".

        Curves with only one class are left out; long curves are thinned for plotting.
        """
        images = self._image_units()
        tiles = (self._tile_labels, self._tile_scores)
        units = {"strip": images, "tile": tiles} if self._tiled else {"image": images}
        result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, (labels, scores) in units.items():
            if _both_classes(np.asarray(labels)):
                fpr, tpr, _ = roc_curve(labels, scores)
                result[name] = (fpr, tpr)
        fpr, tpr = self._pool().roc()
        if fpr.size:
            result["pixel"] = _thin_curve(fpr, tpr)
        return result

    def per_defect(self) -> list[dict[str, Any]]:
        """One row per defect code, sorted by code, then one row for the defect-free images.

        Columns: ``defect`` (code; "unknown" for defective images without one, "defect-free" for
        the last row), ``n``, ``detected`` (images decided defective: false alarms in the last
        row), ``detection_rate``, ``mean_normalized_score`` and ``auroc`` (raw scores of that
        code's images against all defect-free images; NaN in the last row).
        """
        normal = [r for r in self._records if r.label == 0]
        normal_scores = [r.score for r in normal]
        groups: dict[str, list[ImageRecord]] = {}
        for record in self._records:
            if record.label == 1:
                groups.setdefault(record.defect or "unknown", []).append(record)
        rows = []
        for code in sorted(groups):
            group = groups[code]
            scores = [r.score for r in group]
            labels = [1] * len(group) + [0] * len(normal)
            rows.append(_defect_row(code, group, image_auroc(labels, scores + normal_scores)))
        if normal:
            rows.append(_defect_row("defect-free", normal, _NAN))
        return rows

    def _image_units(self) -> tuple[list[int], list[float]]:
        return [r.label for r in self._records], [r.score for r in self._records]

    def _pool(self) -> _PooledPixels:
        if self._pooled is None:
            self._pooled = self._pixels.pool()
        return self._pooled

    def _add_tiles(
        self,
        boxes: Sequence[tuple[int, int, int, int]],
        scores: Sequence[float],
        defect: np.ndarray | None,
        valid: np.ndarray | None,
        from_clean_image: bool = False,
    ) -> None:
        valid_flags = None if valid is None else np.asarray(valid, bool)
        if valid_flags is None and defect is not None:
            valid_flags = np.ones(defect.shape, bool)
        for (y0, x0, y1, x1), score in zip(boxes, scores, strict=True):
            window = (slice(max(y0, 0), max(y1, 0)), slice(max(x0, 0), max(x1, 0)))
            label = False
            if valid_flags is not None:
                tile_valid = valid_flags[window]
                if not tile_valid.any():
                    continue
                if defect is not None:
                    label = bool((defect[window] & tile_valid).any())
            self._tile_labels.append(int(label))
            self._tile_scores.append(float(score))
            self._tile_from_clean.append(from_clean_image)


def _defect_row(code: str, group: Sequence[ImageRecord], auroc: float) -> dict[str, Any]:
    detected = sum(r.decision for r in group)
    return {
        "defect": code,
        "n": len(group),
        "detected": detected,
        "detection_rate": detected / len(group),
        "mean_normalized_score": float(np.mean([r.normalized_score for r in group])),
        "auroc": auroc,
    }


def _thin_curve(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most ~2 x _CURVE_POINTS points of a long ROC curve, evenly spread along both axes."""
    if fpr.size <= 2 * _CURVE_POINTS:
        return fpr, tpr
    grid = np.linspace(0.0, 1.0, _CURVE_POINTS)
    keep = np.unique(
        np.concatenate(
            [
                np.searchsorted(fpr, grid).clip(max=fpr.size - 1),
                np.searchsorted(tpr, grid).clip(max=tpr.size - 1),
                [0, fpr.size - 1],
            ]
        )
    )
    return fpr[keep], tpr[keep]


# --------------------------------------------------------------------------- helpers


def _binary_labels_and_scores(
    labels: ArrayLike, scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or infinity)")
    return y.astype(bool), s


def _has_valid_defect(mask: np.ndarray, valid: np.ndarray | None) -> bool:
    defect = np.asarray(mask) > 0
    return bool((defect if valid is None else defect & np.asarray(valid, bool)).any())


def _both_classes(labels: np.ndarray) -> bool:
    return bool(labels.size) and bool(labels.any()) and not bool(labels.all())
