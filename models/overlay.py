"""Pictures of a prediction for people: heatmap over the fabric, kept regions outlined in red,
suppressed regions in yellow, ground truth (when known) in green, padding (not fabric) greyed
out. Also PNG encoding of masks."""

from __future__ import annotations

import base64

import cv2
import numpy as np

from models.pipeline import Prediction

KEPT_BGR = (0, 0, 255)
SUPPRESSED_BGR = (0, 215, 255)
TRUTH_BGR = (0, 200, 0)


def encode_png(pixels: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise ValueError("PNG encoding failed")
    return bytes(data)


def png_base64(pixels: np.ndarray) -> str:
    return base64.b64encode(encode_png(pixels)).decode("ascii")


def heatmap(normalized_map: np.ndarray) -> np.ndarray:
    """BGR heatmap of a normalised map (0 blue .. 1 red)."""
    scaled = np.clip(normalized_map * 255.0, 0, 255).astype(np.uint8)
    return np.asarray(cv2.applyColorMap(scaled, cv2.COLORMAP_JET))


def render_overlay(
    prediction: Prediction, truth: np.ndarray | None = None, alpha: float = 0.6
) -> np.ndarray:
    """BGR uint8 image the size of the input.

    The heatmap is blended in proportion to the normalised score (invisible below 0.25, fully
    at 0.75), so normal fabric stays readable. `truth`, a ground-truth mask, is outlined in green.
    """
    analysis = prediction.analysis
    out = _blend(analysis.image, prediction.normalized_map, analysis.valid, alpha)
    for region in prediction.post.suppressed:
        corner = (region.x + region.width - 1, region.y + region.height - 1)
        cv2.rectangle(out, (region.x, region.y), corner, SUPPRESSED_BGR, 1)
    if truth is not None and truth.any():
        edges, _ = cv2.findContours(
            truth.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(out, edges, -1, TRUTH_BGR, 1)
    contours, _ = cv2.findContours(prediction.post.mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, KEPT_BGR, 2)
    for region in prediction.post.kept:
        pad = 6
        top_left = (max(region.x - pad, 0), max(region.y - pad, 0))
        corner = (region.x + region.width + pad, region.y + region.height + pad)
        cv2.rectangle(out, top_left, corner, KEPT_BGR, 1)
    return out


def _blend(
    image: np.ndarray, normalized_map: np.ndarray, valid: np.ndarray, alpha: float
) -> np.ndarray:
    """The heatmap over the grey fabric, in proportion to the score; padding greyed out."""
    grey = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR).astype(np.float32)
    heat = heatmap(normalized_map).astype(np.float32)
    weight = alpha * np.clip((normalized_map - 0.25) / 0.5, 0.0, 1.0)[..., None]
    blended = grey * (1.0 - weight) + heat * weight
    return np.ascontiguousarray(np.where(valid[..., None], blended, grey * 0.5).astype(np.uint8))


def render_thumbnail(
    prediction: Prediction, width: int = 512, height: int = 128, alpha: float = 0.6
) -> np.ndarray:
    """A small overlay (at most ``width`` x ``height``, the strip's shape kept), drawn at its own
    size, which costs a fraction of shrinking the full one: the fabric and its heatmap shrunk,
    padding greyed, and each kept region boxed in red, at least a pixel wide, so that even a
    defect smaller than a thumbnail pixel shows."""
    analysis = prediction.analysis
    full_height, full_width = analysis.image.shape
    scale = min(width / full_width, height / full_height, 1.0)
    size = (max(1, round(full_width * scale)), max(1, round(full_height * scale)))
    grey = cv2.resize(analysis.image, size, interpolation=cv2.INTER_AREA)
    scores = cv2.resize(prediction.normalized_map, size, interpolation=cv2.INTER_AREA)
    valid = cv2.resize(analysis.valid.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    out = _blend(grey, scores, valid > 0, alpha)
    for region in prediction.post.kept:
        left, top = int(region.x * scale), int(region.y * scale)
        right = max(left, int((region.x + region.width) * scale))
        bottom = max(top, int((region.y + region.height) * scale))
        cv2.rectangle(out, (left, top), (right, bottom), KEPT_BGR, 1)
    return out


def wrap_wide(picture: np.ndarray, max_ratio: float = 4.0) -> np.ndarray:
    """Cut a very wide strip into stacked rows (with a gap) so a person can see it."""
    height, width = picture.shape[:2]
    rows = max(1, int(np.ceil(width / (height * max_ratio))))
    if rows == 1:
        return picture
    step = int(np.ceil(width / rows))
    gap = np.full((8, step, *picture.shape[2:]), 255, dtype=picture.dtype)
    parts = []
    for start in range(0, width, step):
        part = picture[:, start : start + step]
        if part.shape[1] < step:
            fill = np.full((height, step - part.shape[1], *picture.shape[2:]), 255, picture.dtype)
            part = np.concatenate([part, fill], axis=1)
        parts.extend([part, gap])
    return np.concatenate(parts[:-1], axis=0)
