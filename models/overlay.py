"""Pictures of a prediction for people: heatmap over the fabric, kept regions outlined in red,
suppressed regions in yellow, padding (not fabric) greyed out. Also PNG encoding of masks."""

from __future__ import annotations

import base64

import cv2
import numpy as np

from models.pipeline import Prediction

KEPT_BGR = (0, 0, 255)
SUPPRESSED_BGR = (0, 215, 255)


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


def render_overlay(prediction: Prediction, alpha: float = 0.35) -> np.ndarray:
    """BGR uint8 image the size of the input."""
    analysis = prediction.analysis
    grey = cv2.cvtColor(analysis.image, cv2.COLOR_GRAY2BGR)
    heat = heatmap(prediction.normalized_map)
    blended = cv2.addWeighted(grey, 1.0 - alpha, heat, alpha, 0.0)
    out = np.where(analysis.valid[..., None], blended, (grey * 0.5).astype(np.uint8))
    out = np.ascontiguousarray(out)
    for region in prediction.post.suppressed:
        corner = (region.x + region.width - 1, region.y + region.height - 1)
        cv2.rectangle(out, (region.x, region.y), corner, SUPPRESSED_BGR, 1)
    contours, _ = cv2.findContours(prediction.post.mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, KEPT_BGR, 2)
    for region in prediction.post.kept:
        pad = 6
        top_left = (max(region.x - pad, 0), max(region.y - pad, 0))
        corner = (region.x + region.width + pad, region.y + region.height + pad)
        cv2.rectangle(out, top_left, corner, KEPT_BGR, 1)
    return out
