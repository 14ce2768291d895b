"""The HTML report: its files exist, it shows every figure, and it links only what it wrote."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from training.metrics import EvaluationAccumulator, ImageRecord
from training.report import write_report


def png(value: int, shape: tuple[int, int] = (16, 64)) -> bytes:
    ok, encoded = cv2.imencode(".png", np.full(shape, value, np.uint8))
    assert ok
    return encoded.tobytes()


def linked_files(page: str) -> list[str]:
    return re.findall(r'src="([^"]+)"', page)


METRICS = {
    "image_auroc": 0.91,
    "strip_auroc": 0.87,
    "pixel_auroc": 0.95,
    "aupro": 0.71,
    "pixel_ap": 0.33,
    "f1_max": float("nan"),
    "n_images": 12,
    "n_anomalous": 5,
    "threshold": 1.25,
}
PER_DEFECT = [
    {"defect": "002", "n": 3, "detected": 2, "detection_rate": 2 / 3, "auroc": 0.9},
    {"defect": "019", "n": 2, "detected": 0, "detection_rate": 0.0, "auroc": 0.4},
    {"defect": "defect-free", "n": 7, "detected": 1, "detection_rate": 1 / 7, "auroc": np.nan},
]
CURVES = {
    "tile": (np.array([0.0, 0.2, 1.0]), np.array([0.0, 0.8, 1.0])),
    "pixel": (np.array([0.0, 0.01, 0.1, 1.0]), np.array([0.0, 0.5, 0.9, 1.0])),
}


def test_report_files_and_content(tmp_path: Path) -> None:
    out = tmp_path / "report"
    path = write_report(
        out,
        title="PatchCore on <fabric 02>",
        metrics=METRICS,
        curves=CURVES,
        per_defect=PER_DEFECT,
        misses=[("0044_019_02: missed fuzzyball", png(80)), ("0097_002_02", png(120))],
        figures=[("VAE reconstruction", png(200, (32, 32)))],
        info={"model_uri": "models:/loomwatch@champion", "data": "/data/aitex"},
    )
    assert path == out / "report.html"
    page = path.read_text(encoding="utf-8")

    for key in METRICS:
        assert key in page
    for row in PER_DEFECT:
        assert f"<td>{row['defect']}</td>" in page
    assert "models:/loomwatch@champion" in page
    assert "0044_019_02: missed fuzzyball" in page and "VAE reconstruction" in page
    assert "n/a" in page  # NaN F1 and the defect-free AUROC
    assert "&lt;fabric 02&gt;" in page and "<fabric 02>" not in page  # text is escaped

    linked = linked_files(page)
    assert set(linked) == {"roc.png", "miss_01.png", "miss_02.png", "figure_01.png"}
    for name in linked:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (out / "miss_02.png").read_bytes() == png(120)
    roc = cv2.imdecode(np.frombuffer((out / "roc.png").read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert roc is not None and roc.shape[0] > 200 and roc.shape[1] > 400

    # Self-contained: no script, no network resource, no stray temporary file.
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "@import" not in page and "url(" not in page
    assert sorted(p.name for p in out.iterdir()) == sorted([*linked, "report.html"])


def test_report_without_curves_or_images_links_nothing_missing(tmp_path: Path) -> None:
    path = write_report(
        tmp_path, title="empty", metrics={"image_auroc": float("nan")}, curves={}, per_defect=[]
    )
    page = path.read_text(encoding="utf-8")
    assert linked_files(page) == []
    assert not (tmp_path / "roc.png").exists()
    assert "only one class" in page


def card_names(page: str) -> list[str]:
    return re.findall(r'<div class="name">([^<]+)</div>', page)


def test_the_auroc_card_of_tiled_images_is_named_a_tile_figure(tmp_path: Path) -> None:
    tiled = write_report(tmp_path / "tiled", title="t", metrics=METRICS, curves={}, per_defect=[])
    names = card_names(tiled.read_text(encoding="utf-8"))
    assert names[:2] == ["Tile AUROC", "Strip AUROC"] and "Image AUROC" not in names
    whole = {key: value for key, value in METRICS.items() if key != "strip_auroc"}
    untiled = write_report(tmp_path / "whole", title="t", metrics=whole, curves={}, per_defect=[])
    names = card_names(untiled.read_text(encoding="utf-8"))
    assert names[0] == "Image AUROC" and "Tile AUROC" not in names


def test_report_rejects_bytes_that_are_not_png(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="miss 1"):
        write_report(
            tmp_path,
            title="t",
            metrics={},
            curves=CURVES,
            per_defect=[],
            misses=[("bad", b"GIF89a")],
        )
    assert list(tmp_path.iterdir()) == []


def test_report_from_an_accumulator_and_rewritten_in_place(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    accumulator = EvaluationAccumulator()
    for index in range(6):
        label = index % 2
        mask = np.zeros((32, 128), np.uint8)
        if label:
            mask[10:14, 20 + 10 * index : 30 + 10 * index] = 1
        anomaly_map = rng.random((32, 128)).astype(np.float32) + mask
        boxes = [(0, x, 32, x + 32) for x in range(0, 128, 32)]
        record = ImageRecord(
            name=f"{index:04d}",
            label=label,
            defect="027" if label else None,
            score=float(anomaly_map.max()),
            normalized_score=float(anomaly_map.max()) / 2,
            decision=bool(label),
            has_mask=bool(label),
        )
        tile_scores = [float(anomaly_map[:, x : x + 32].max()) for _, x, _, _ in boxes]
        accumulator.add_image(
            record, anomaly_map, mask if label else None, None, boxes, tile_scores
        )

    for _ in range(2):  # the second run replaces the first
        path = write_report(
            tmp_path,
            title="synthetic",
            metrics=accumulator.compute(),
            curves=accumulator.curves(),
            per_defect=accumulator.per_defect(),
        )
    page = path.read_text(encoding="utf-8")
    for key in ("strip", "tile", "pixel", "aupro", "pixel_ap", "n_tiles", "027", "defect-free"):
        assert key in page
    assert linked_files(page) == ["roc.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "roc.png"]
