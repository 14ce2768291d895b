"""The batch report: per fabric and per roll, how many strips, how many called defective, how the
scores sit against the threshold, and the worst strips with their overlays.

``report.json`` holds every figure; ``report.html`` shows them with a score histogram per fabric
(``scores_<fabric>.png``) and the overlays of the worst strips (``worst_<fabric>_NN.jpg``, drawn
by the same :func:`~models.overlay.render_overlay` as ``loomwatch predict``; the driver scores
those few strips again to draw them). Each file is written under a temporary name and renamed,
the page last, so it never links a missing picture.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.overlay import render_overlay, wrap_wide
from models.pipeline import Detector
from training.batch.output import read_output
from training.report import CSS

NONE = "(none)"
QUANTILES = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
BINS = 40
COLUMNS = ["path", "fabric", "roll", "decision", "is_anomalous", "score", "threshold", "n_regions",
           "error", "model_name", "model_version", "model_digest", "model_uri"]  # fmt: skip


def _figures(rows: pd.DataFrame) -> dict[str, Any]:
    """Counts, defect rate and score distribution of a group of rows."""
    scored = rows[rows["error"].isna()]
    scores = scored["score"].astype(float).to_numpy()
    threshold = float(scored["threshold"].iloc[0]) if len(scored) else 0.5
    anomalous = int(scored["is_anomalous"].astype(bool).sum())
    figures: dict[str, Any] = {
        "images": len(rows),
        "scored": len(scored),
        "errors": len(rows) - len(scored),
        "anomalous": anomalous,
        "defect_rate": anomalous / len(scored) if len(scored) else None,
        "threshold": threshold,
        "above_threshold": int((scores >= threshold).sum()),
        "score": {k: float(np.quantile(scores, q)) for k, q in QUANTILES.items()}
        if scores.size
        else None,
        "score_mean": float(scores.mean()) if scores.size else None,
    }
    return figures


def _histogram(scores: np.ndarray) -> dict[str, list[float]]:
    top = max(1.0, float(scores.max()) if scores.size else 1.0)
    counts, edges = np.histogram(scores, bins=BINS, range=(0.0, top))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def build_figures(rows: pd.DataFrame, worst: int) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready figures."""
    rows = rows.assign(
        fabric=rows["fabric"].fillna(NONE).astype(str), roll=rows["roll"].fillna(NONE).astype(str)
    )
    fabrics = []
    for fabric, group in rows.groupby("fabric", sort=True):
        entry = {"fabric": fabric, **_figures(group)}
        scored = group[group["error"].isna()]
        entry["histogram"] = _histogram(scored["score"].astype(float).to_numpy())
        entry["rolls"] = [
            {"roll": roll, **_figures(part)} for roll, part in group.groupby("roll", sort=True)
        ]
        top = scored.sort_values("score", ascending=False).head(worst)
        entry["worst"] = [
            {"path": r.path, "roll": r.roll, "score": float(r.score), "decision": r.decision,
             "n_regions": int(r.n_regions)}
            for r in top.itertuples()
        ]  # fmt: skip
        fabrics.append(entry)
    errors = rows[rows["error"].notna()]
    first = rows.iloc[0] if len(rows) else None
    return {
        "model": None
        if first is None
        else {
            "uri": first["model_uri"],
            "name": first["model_name"],
            "version": first["model_version"],
            "digest": first["model_digest"],
        },
        "overall": _figures(rows),
        "fabrics": fabrics,
        "errors": [{"path": r.path, "error": r.error} for r in errors.head(50).itertuples()],
    }


def write_batch_report(out: Path, report_dir: Path, detector: Detector, worst: int = 8) -> Path:
    """``report.html`` and ``report.json`` for the batch output ``out``; the page's path."""
    rows = read_output(out, COLUMNS).to_pandas()
    figures = build_figures(rows, worst)
    if figures["model"] is not None:  # a model scores the fabric it learned; others look odd
        figures["model"]["trained_on_fabric"] = detector.manifest.training.get("fabric")
    report_dir.mkdir(parents=True, exist_ok=True)
    sections = [_summary(figures, out)]
    for index, fabric in enumerate(figures["fabrics"]):
        label = _slug(fabric["fabric"], index)
        histogram = f"scores_{label}.png"
        _write_atomic(report_dir / histogram, _histogram_png(fabric))
        fabric["histogram_png"] = histogram
        pictures = []
        for rank, strip in enumerate(fabric["worst"], start=1):
            name = f"worst_{label}_{rank:02d}.jpg"
            try:
                prediction = detector.predict(Path(strip["path"]))
            except Exception as exc:  # the file changed or vanished since it was scored
                strip["overlay_error"] = f"{type(exc).__name__}: {exc}"
                continue
            _write_atomic(report_dir / name, _jpeg(wrap_wide(render_overlay(prediction))))
            strip["overlay"] = name
            pictures.append((name, strip))
        sections.append(_fabric_section(fabric, histogram, pictures))
    if figures["errors"]:
        sections.append(_errors_section(figures["errors"], figures["overall"]["errors"]))
    _write_atomic(report_dir / "report.json", (json.dumps(figures, indent=2) + "\n").encode())
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Batch scoring report</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        "<h1>Batch scoring report</h1>\n"
        f'<p class="subtitle">Loomwatch batch report, written {stamp}.</p>\n'
        + "\n".join(sections)
        + "\n</main>\n</body>\n</html>\n"
    )
    path = report_dir / "report.html"
    _write_atomic(path, page.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- page parts


def _summary(figures: dict[str, Any], out: Path) -> str:
    model = figures["model"] or {}
    overall = figures["overall"]
    facts = {
        "output": str(out),
        "model": f"{model.get('name')} version {model.get('version')} ({model.get('digest')})",
        "model URI": str(model.get("uri")),
        "trained on fabric": str(model.get("trained_on_fabric") or "all in its data"),
        "images": f"{overall['images']:,}",
        "scored": f"{overall['scored']:,}",
        "errors": f"{overall['errors']:,}",
        "called defective": f"{overall['anomalous']:,} ({_rate(overall['defect_rate'])})",
        "threshold": f"{overall['threshold']:g} (normalised score)",
    }
    rows = "".join(f"<tr><th>{_text(k)}</th><td>{_text(v)}</td></tr>" for k, v in facts.items())
    return f"<section><h2>Summary</h2>\n<table>{rows}</table>\n</section>"


def _fabric_section(
    fabric: dict[str, Any], histogram: str, pictures: list[tuple[str, dict[str, Any]]]
) -> str:
    header = ("roll", "images", "scored", "errors", "defective", "defect rate",
              "median score", "p99 score", "max score", "at or above threshold")  # fmt: skip
    body = []
    for roll in [*fabric["rolls"], {"roll": "all rolls", **fabric}]:
        score = roll["score"] or {}
        cells = [roll["roll"], roll["images"], roll["scored"], roll["errors"], roll["anomalous"],
                 _rate(roll["defect_rate"]), score.get("p50"), score.get("p99"),
                 score.get("max"), roll["above_threshold"]]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{_format(c)}</td>" for c in cells) + "</tr>")
    table = (
        "<table><tr>" + "".join(f"<th>{_text(h)}</th>" for h in header) + "</tr>"
        + "".join(body) + "</table>"
    )  # fmt: skip
    caption = (
        f"Normalised scores of fabric {fabric['fabric']}; the dashed line is the threshold "
        f"({fabric['threshold']:g}): strips to its right are called defective."
    )
    parts = [table, _figure(histogram, caption)]
    if pictures:
        parts.append(f"<h3>Worst {len(pictures)} strips</h3>")
        for name, strip in pictures:
            parts.append(
                _figure(
                    name,
                    f"{strip['path']} (roll {strip['roll']}): score {strip['score']:.3f}, "
                    f"{strip['decision']}, {strip['n_regions']} regions kept",
                )
            )
    return f"<section><h2>Fabric {_text(fabric['fabric'])}</h2>\n{''.join(parts)}\n</section>"


def _errors_section(errors: list[dict[str, str]], total: int) -> str:
    rows = "".join(
        f"<tr><td><code>{_text(e['path'])}</code></td><td>{_text(e['error'])}</td></tr>"
        for e in errors
    )
    shown = f" (the first {len(errors)})" if total > len(errors) else ""
    return (
        f"<section><h2>Images not scored: {total}{shown}</h2>\n"
        f"<table><tr><th>path</th><th>error</th></tr>{rows}</table>\n</section>"
    )


def _histogram_png(fabric: dict[str, Any]) -> bytes:
    figure = Figure(figsize=(8, 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    edges = np.asarray(fabric["histogram"]["edges"])
    counts = np.asarray(fabric["histogram"]["counts"])
    threshold = fabric["threshold"]
    colours = ["#c0392b" if left >= threshold else "#2e86c1" for left in edges[:-1]]
    axes.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colours)
    axes.axvline(threshold, color="0.2", linestyle="--", linewidth=1.2, label="threshold")
    axes.set_xlabel("normalised score")
    axes.set_ylabel("strips")
    axes.set_title(f"Fabric {fabric['fabric']}: {fabric['scored']} strips scored")
    axes.legend(loc="upper right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _jpeg(picture: np.ndarray) -> bytes:
    """An overlay for people: JPEG (a strip's PNG is 1.5-2.5 MB of noisy texture; this is a
    tenth of that, the defects and outlines as clear)."""
    ok, data = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(data)


def _figure(file_name: str, caption: str) -> str:
    return (
        f'<figure><img src="{_text(file_name)}" alt="{_text(caption)}" loading="lazy">'
        f"<figcaption>{_text(caption)}</figcaption></figure>"
    )


def _slug(fabric: str, index: int) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in fabric).strip("_")
    return safe or f"fabric{index}"


def _rate(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1%}"


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return _text(str(value))


def _text(value: str) -> str:
    return html.escape(value, quote=True)


def _write_atomic(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
