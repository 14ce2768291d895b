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
    grey = cv2.cvtColor(analysis.image, cv2.COLOR_GRAY2BGR).astype(np.float32)
    heat = heatmap(prediction.normalized_map).astype(np.float32)
    weight = alpha * np.clip((prediction.normalized_map - 0.25) / 0.5, 0.0, 1.0)[..., None]
    blended = grey * (1.0 - weight) + heat * weight
    out = np.where(analysis.valid[..., None], blended, grey * 0.5).astype(np.uint8)
    out = np.ascontiguousarray(out)
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


def thumbnail(picture: np.ndarray, width: int = 512, height: int = 128) -> np.ndarray:
    """The picture shrunk (never enlarged) to fit ``width`` x ``height``, keeping its shape."""
    scale = min(width / picture.shape[1], height / picture.shape[0], 1.0)
    size = (max(1, round(picture.shape[1] * scale)), max(1, round(picture.shape[0] * scale)))
    return np.asarray(cv2.resize(picture, size, interpolation=cv2.INTER_AREA))


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
