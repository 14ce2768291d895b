"""The HTML evaluation report: decisions, headline figures, ROC curves, per-defect tables, misses.

:func:`write_report` writes ``report.html`` and its PNG files into one folder. The page is
self-contained: images are linked by relative file names in the same folder, the CSS is inline,
and there is no JavaScript and no network resource, so the folder can be opened from disk, zipped
or logged to MLflow as artifacts as it is. Every file is written to a temporary name and moved
into place (``os.replace``), and the page is written last, so it never links a missing image.
"""

from __future__ import annotations

import html
import io
import math
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc

__all__ = ["write_report"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Headline metrics, in the order shown, with what each one means.
METRIC_DESCRIPTIONS = {
    "image_auroc": "AUROC of image scores (over tiles when images were tiled)",
    "strip_auroc": "AUROC over whole input images (strips)",
    "pixel_auroc": "AUROC over valid pixels",
    "aupro": "Area under the per-region overlap curve up to 30% pixel FPR, normalised",
    "pixel_ap": "Average precision over valid pixels",
    "f1_max": "Best F1 over all thresholds (over tiles when images were tiled)",
}
HEADLINE_NAMES = {
    "image_auroc": "Image AUROC",
    "strip_auroc": "Strip AUROC",
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO (FPR ≤ 0.3)",
    "pixel_ap": "Pixel AP",
    "f1_max": "F1-max",
}
# For tiled images ``image_auroc`` is over tiles (the key stays, for the JSON and MLflow): its
# card says so. Tiled evaluations are the ones with a strip (whole-image) figure.
TILED_HEADLINES = {
    "image_auroc": ("Tile AUROC", "AUROC of tile scores, over the tiles of every image"),
    "f1_max": ("F1-max", "Best F1 over all thresholds, over tiles"),
}
OTHER_DESCRIPTIONS = {
    "detection_rate": "Defective images decided anomalous at the operating point",
    "false_alarm_rate": "Defect-free images decided anomalous at the operating point",
    "region_recall": "Defect regions touched by a reported region (images with masks)",
    "region_precision": "Reported regions that touch a defect",
    "n_defect_regions": "Defect regions (connected parts of the masks, on fabric)",
    "n_kept_regions": "Regions reported on images with known pixels",
    "n_defective_strips": "Defective images",
    "n_defect_free_strips": "Defect-free images",
    "f1_max_threshold": "Raw score at which F1-max is reached",
    "threshold": "Calibrated image threshold in use",
    "n_images": "Images evaluated",
    "n_anomalous": "Images with a defect",
    "n_tiles": "Tiles evaluated (padding-only tiles left out)",
    "n_anomalous_tiles": "Tiles with a defect pixel",
    "tile_auroc_clean_vs_defect": "Tile AUROC, defect-free images' tiles against defective tiles",
    "n_pixels": "Valid pixels seen",
    "n_pixels_used": "Valid pixels used by the pixel metrics (a uniform sample above the cap)",
}
# Which metric gives the AUROC of each ROC curve in the legend.
CURVE_METRIC = {
    "image": "image_auroc",
    "tile": "image_auroc",
    "strip": "strip_auroc",
    "pixel": "pixel_auroc",
}

CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dde1e8; --soft: #f4f6f9; --accent: #2f6fd6;
        --good: #2e9d5b; --bad: #d2473b; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 6px;
     border-bottom: 1px solid var(--line); }
.subtitle { color: var(--muted); margin: 0 0 20px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 12px; }
.card { background: var(--soft); border-radius: 10px; padding: 14px 16px; }
.card .value { font-size: 28px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .name { font-weight: 600; }
.card .what { color: var(--muted); font-size: 12.5px; line-height: 1.35; margin-top: 4px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
tr.reference td { color: var(--muted); font-style: italic; }
.bar { display: inline-block; height: 9px; border-radius: 5px; background: var(--line);
       width: 90px; margin-right: 8px; vertical-align: middle; overflow: hidden; }
.bar span { display: block; height: 100%; background: var(--good); }
.bar.alarm span { background: var(--bad); }
figure { margin: 0 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px;
             image-rendering: auto; background: var(--soft); }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 16px; }
.note { color: var(--muted); }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; word-break: break-all; }
"""


def write_report(
    out_dir: Path,
    *,
    title: str,
    metrics: dict[str, Any],
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    per_defect: list[dict[str, Any]],
    misses: Sequence[tuple[str, bytes]] = (),
    figures: Sequence[tuple[str, bytes]] = (),
    info: dict[str, str] | None = None,
    decisions: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write ``out_dir/report.html`` with its images beside it and return the page's path.

    ``curves`` maps a name ("image", "tile", "strip", "pixel"...) to ROC points (fpr, tpr); they
    are drawn in ``roc.png`` with their AUROC in the legend. ``misses`` and ``figures`` are
    (caption, PNG bytes) pairs: overlays of the worst misses, and any other images (such as
    reconstructions). ``per_defect`` rows are shown as they are, in order (the evaluation's
    ``EvaluationAccumulator.per_defect``). The decision figures (``detection_rate`` and the
    others of ``training.decisions``, with their intervals) come first, with ``decisions``, the
    per-defect decision rows, below them: what a line would do comes before how well scores
    rank. NaN values read "n/a".
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, items in (("miss", misses), ("figure", figures)):
        for index, (_, data) in enumerate(items, start=1):
            if not data.startswith(PNG_SIGNATURE):
                raise ValueError(f"{kind} {index} is not a PNG image")

    sections = [_decisions(metrics, decisions), _headline(metrics), _info_table(info or {})]
    if curves:
        _write_atomic(out_dir / "roc.png", _roc_png(curves, metrics))
        caption = "ROC curves. Right: the same curves at low false-positive rates (log scale)."
        sections.append(_section("ROC curves", _figure("roc.png", caption)))
    else:
        sections.append(_section("ROC curves", _note("No ROC curve: only one class was present.")))
    sections.append(_section("By defect type", _defect_table(per_defect)))
    sections.append(_section("All metrics", _metrics_table(metrics)))
    sections.append(_section("Worst misses", _images(out_dir, "miss", misses, grid=False)))
    if figures:
        sections.append(_section("Figures", _images(out_dir, "figure", figures, grid=True)))

    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{_text(title)}</h1>\n"
        f'<p class="subtitle">Loomwatch evaluation report, written {stamp}.</p>\n'
        + "\n".join(section for section in sections if section)
        + "\n</main>\n</body>\n</html>\n"
    )
    path = out_dir / "report.html"
    _write_atomic(path, page.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- sections


DECISION_CARDS = {
    "detection_rate": ("Detection rate", "defective images decided anomalous"),
    "false_alarm_rate": ("False-alarm rate", "defect-free images decided anomalous"),
    "region_recall": ("Region recall", "defect regions touched by a reported region"),
    "region_precision": ("Region precision", "reported regions that touch a defect"),
}


def _decisions(metrics: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    cards = []
    for key, (name, what) in DECISION_CARDS.items():
        if key not in metrics:
            continue
        low, high = metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")
        interval = f"95% CI {_format(low)} to {_format(high)}" if _is_number(low) else ""
        cards.append(
            f'<div class="card"><div class="value">{_format(metrics[key])}</div>'
            f'<div class="name">{_text(name)}</div>'
            f'<div class="what">{_text(what)}<br>{_text(interval)}</div></div>'
        )
    if not cards:
        return ""
    body = f'<div class="cards">{"".join(cards)}</div>'
    if rows:
        table_rows = "".join(
            f'<tr><td>{_text(str(row["defect"]))}</td><td class="num">{row["n"]}</td>'
            f'<td class="num">{row["decided_anomalous"]}</td>'
            f'<td class="num">{_rate_bar(float(row["rate"]), alarm=row["defect"] == "defect-free")}'
            f'</td><td class="num">{_format(row["rate_ci95"][0])} to '
            f"{_format(row['rate_ci95'][1])}</td>"
            f'<td class="num">{_format(row.get("region_recall", ""))}</td></tr>'
            for row in rows
        )
        body += (
            "<table><tr><th>defect</th><th>n</th><th>decided anomalous</th><th>rate</th>"
            f"<th>95% CI</th><th>region recall</th></tr>{table_rows}</table>"
            '<p class="note">At the calibrated operating point, as served. Rate: detection '
            "rate for a defect type, false-alarm rate on the defect-free row. Intervals: "
            "bootstrap over images (whole strips).</p>"
        )
    return _section("Decisions at the operating point", body)


def _headline(metrics: dict[str, Any]) -> str:
    tiled = "strip_auroc" in metrics
    cards = []
    for key, what in METRIC_DESCRIPTIONS.items():
        if key in metrics:
            name = HEADLINE_NAMES[key]
            if tiled and key in TILED_HEADLINES:
                name, what = TILED_HEADLINES[key]
            cards.append(
                f'<div class="card"><div class="value">{_format(metrics[key])}</div>'
                f'<div class="name">{_text(name)}</div>'
                f'<div class="what">{_text(what)}</div></div>'
            )
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _info_table(info: dict[str, str]) -> str:
    if not info:
        return ""
    rows = "".join(
        f"<tr><th>{_text(key)}</th><td><code>{_text(value)}</code></td></tr>"
        for key, value in info.items()
    )
    return _section("Run", f"<table>{rows}</table>")


def _metrics_table(metrics: dict[str, Any]) -> str:
    if not metrics:
        return _note("No metrics.")
    descriptions = {**METRIC_DESCRIPTIONS, **OTHER_DESCRIPTIONS}
    ordered = [key for key in descriptions if key in metrics]
    ordered += [key for key in metrics if key not in descriptions]
    rows = "".join(
        f'<tr><td>{_text(key)}</td><td class="num">{_format(metrics[key])}</td>'
        f"<td>{_text(descriptions.get(key, ''))}</td></tr>"
        for key in ordered
    )
    return f"<table><tr><th>Metric</th><th>Value</th><th>Meaning</th></tr>{rows}</table>"


def _defect_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return _note("No defect types to show.")
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    head = "".join(f"<th>{_text(column.replace('_', ' '))}</th>" for column in columns)
    body = []
    for row in rows:
        reference = row.get("defect") == "defect-free"
        cells = []
        for column in columns:
            value = row.get(column, "")
            if column == "detection_rate" and _is_number(value):
                cells.append(f'<td class="num">{_rate_bar(float(value), alarm=reference)}</td>')
            elif _is_number(value):
                cells.append(f'<td class="num">{_format(value)}</td>')
            else:
                cells.append(f"<td>{_text(str(value))}</td>")
        css = ' class="reference"' if reference else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    note = (
        '<p class="note">detected: images decided defective at the calibrated threshold '
        "(false alarms on the defect-free row); auroc: that type's raw scores against all "
        "defect-free images.</p>"
    )
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{note}"


def _rate_bar(rate: float, *, alarm: bool) -> str:
    if not math.isfinite(rate):
        return "n/a"
    width = max(0.0, min(rate, 1.0)) * 100
    css = "bar alarm" if alarm else "bar"
    return f'<span class="{css}"><span style="width:{width:.0f}%"></span></span>{rate:.0%}'


def _images(out_dir: Path, kind: str, items: Sequence[tuple[str, bytes]], *, grid: bool) -> str:
    if not items:
        return _note("None.")
    parts = []
    for index, (caption, data) in enumerate(items, start=1):
        name = f"{kind}_{index:02d}.png"
        _write_atomic(out_dir / name, data)
        parts.append(_figure(name, caption))
    return f'<div class="grid">{"".join(parts)}</div>' if grid else "".join(parts)


def _section(heading: str, body: str) -> str:
    return f"<section><h2>{_text(heading)}</h2>\n{body}\n</section>"


def _figure(file_name: str, caption: str) -> str:
    return (
        f'<figure><img src="{_text(file_name)}" alt="{_text(caption)}" loading="lazy">'
        f"<figcaption>{_text(caption)}</figcaption></figure>"
    )


def _note(text: str) -> str:
    return f'<p class="note">{_text(text)}</p>'


# --------------------------------------------------------------------------- ROC figure


def _roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], metrics: dict[str, Any]) -> bytes:
    figure = Figure(figsize=(10, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    linear, logarithmic = figure.subplots(1, 2)
    for name, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
        label = f"{name} (AUROC {_curve_auroc(name, fpr, tpr, metrics):.3f})"
        for axes in (linear, logarithmic):
            axes.plot(fpr, tpr, linewidth=1.8, label=label)
    linear.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    logarithmic.set_xscale("log")
    logarithmic.set_xlim(1e-4, 1)
    for axes, heading in ((linear, "ROC"), (logarithmic, "Low false-positive rates")):
        axes.set_title(heading)
        axes.set_xlabel("false-positive rate")
        axes.set_ylabel("true-positive rate")
        axes.set_ylim(0, 1.01)
        axes.grid(alpha=0.3)
    linear.set_xlim(0, 1)
    linear.legend(loc="lower right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _curve_auroc(name: str, fpr: np.ndarray, tpr: np.ndarray, metrics: dict[str, Any]) -> float:
    """The evaluation's exact figure if any (plotted curves may be thinned), else the area."""
    value: Any = metrics.get(CURVE_METRIC.get(name, ""))
    if _is_number(value) and math.isfinite(value):
        return float(value)
    return float(auc(fpr, tpr)) if fpr.size > 1 else math.nan


# --------------------------------------------------------------------------- helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _format(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        number = float(value)
        if not math.isfinite(number):
            return "n/a"
        return f"{number:.4f}" if abs(number) < 1e4 else f"{number:.4g}"
    if value is None:
        return "n/a"
    return _text(str(value))


def _text(value: str) -> str:
    return html.escape(value, quote=True)


def _write_atomic(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; a report is for reading
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
