"""Image-threshold rules side by side on a fleet's held-out strips (issue 13's operating point).

    python -m bench.operating_point --fleet runs/fleet-a --data runs/hall/fit \
        --test runs/hall/test --json runs/operating-point.json

For every fabric of ``--fleet`` it analyses the validation split of ``--data`` (the data the
fleet trained on: the same held-back defect-free strips its calibration used) and every strip of
``--test``, once. Each rule and target then sets a raw image threshold from the validation
strips (``false_alarm``: the held-back defect-free ones; ``f1``: all of them, balanced), with
the code recalibration uses (``training.recalibrate.image_threshold``), and the held-out strips are
decided through ``Detector.finish`` (the serving path, veto included) at that threshold, with
the bundle's pixel threshold and suppression kept. Printed: per fabric and pooled, defective
strips flagged and defect-free strips flagged, with each threshold and its 95 % interval. The
JSON also keeps every validation strip's score and fabric tile scores and every held-out
strip's score, to try other rules without scoring again (how the tile-score rules of
docs/fleets.md, "Where the operating point comes from", were judged).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.pipeline import Analysis, Detector
from tracking.fleet import resolve_fleet
from training.config import CalibrationConfig
from training.data import load_dataset, split_dataset
from training.evaluate import analyse_samples
from training.recalibrate import image_threshold

Rule = Literal["false_alarm", "f1"]
RULES: tuple[Rule, ...] = ("false_alarm", "f1")


def threshold_for(
    rule: Rule, validation: list[tuple[int, Analysis]], target: float
) -> tuple[float, dict[str, Any]]:
    """The raw image threshold a rule sets from the validation analyses (label, analysis), as
    recalibration sets it from image scores (``training.recalibrate.image_threshold``)."""
    labels = np.asarray([label for label, _ in validation])
    scores = np.asarray([analysis.score for _, analysis in validation])
    if rule == "f1" and (labels == 1).sum() == 0:
        rule = "false_alarm"  # f1 needs both classes (AITEX fabric 05 has no defective strip)
    config = CalibrationConfig(image_rule=rule, target_false_alarm=target)
    threshold, evidence, _ = image_threshold(scores, labels, config, seed=0, where="validation")
    return threshold, evidence


def _fabric_tiles(analysis: Analysis) -> list[float]:
    """The tile scores an image score is the maximum of (tiles with fabric)."""
    pairs = zip(analysis.tile_scores, analysis.tile_valid, strict=True)
    return [float(score) for score, share in pairs if share > 0]


def judge_fabric(
    detector: Detector, validation: list[tuple[int, Analysis]],
    test: list[tuple[int, str, Analysis]], targets: list[float],
) -> dict[str, Any]:  # fmt: skip
    """Thresholds of every rule and target, and the decisions on the held-out strips."""
    results: dict[str, Any] = {}
    for rule in RULES:
        for target in targets if rule != "f1" else targets[:1]:
            threshold, evidence = threshold_for(rule, validation, target)
            calibration = detector.calibration.model_copy(
                update={
                    "image_threshold": threshold,
                    "image_max": max(detector.calibration.image_max, threshold),
                    "image_min": min(detector.calibration.image_min, threshold),
                }
            )
            flagged = [
                (label, name, detector.finish(analysis, calibration=calibration).decision)
                for label, name, analysis in test
            ]
            results[f"{rule}@{target:g}"] = {
                "threshold": threshold,
                "threshold_ci95": evidence.get("threshold_ci95"),
                "defective": sum(label == 1 for label, _, _ in flagged),
                "detected": sum(label == 1 and flag for label, _, flag in flagged),
                "defect_free": sum(label == 0 for label, _, _ in flagged),
                "false_alarms": sum(label == 0 and flag for label, _, flag in flagged),
                "missed": [name for label, name, flag in flagged if label == 1 and not flag],
                "alarms": [name for label, name, flag in flagged if label == 0 and flag],
            }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--data", type=Path, required=True, help="the data the fleet trained on")
    parser.add_argument("--test", type=Path, required=True, help="held-out strips, same layout")
    parser.add_argument("--target", type=float, action="append", help="default 0.05 and 0.1")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    targets = args.target or [0.05, 0.1]
    fleet = resolve_fleet(args.fleet)
    report: dict[str, Any] = {"fleet": args.fleet, "fabrics": {}}
    for fabric in fleet.fabrics:
        entry = fleet.member(fabric)
        if entry is None or entry.bundle is None:
            raise SystemExit(f"{args.fleet}: fabric {fabric} has no bundle folder beside it")
        detector = Detector.from_bundle(entry.bundle)
        training = detector.manifest.training
        dataset = load_dataset(args.data, fabric=fabric)
        split = split_dataset(dataset, training.get("val_fraction", 0.3), training.get("seed", 0))
        analysed = analyse_samples(detector, list(split.validation), desc=f"{fabric} validation")
        validation = [(sample.label, analysis) for sample, analysis, _ in analysed]
        test_samples = load_dataset(args.test, fabric=fabric).samples
        analysed = analyse_samples(detector, test_samples, desc=f"{fabric} test")
        test = [(sample.label, sample.name, analysis) for sample, analysis, _ in analysed]
        results = judge_fabric(detector, validation, test, targets)
        report["fabrics"][fabric] = results
        # the raw figures, to try other rules without scoring again
        report.setdefault("scores", {})[fabric] = {
            "validation": [
                {"label": label, "score": a.score, "tiles": _fabric_tiles(a)}
                for label, a in validation
            ],
            "test": [{"label": label, "name": name, "score": a.score} for label, name, a in test],
        }  # fmt: skip
        for key, row in results.items():
            interval = row["threshold_ci95"]
            ci = f" [{interval[0]:.5g}, {interval[1]:.5g}]" if interval else ""
            print(
                f"{fabric} {key:16s} threshold {row['threshold']:.5g}{ci} "
                f"detected {row['detected']}/{row['defective']} "
                f"false alarms {row['false_alarms']}/{row['defect_free']}",
                flush=True,
            )
    pooled: dict[str, Any] = {}
    keys = {key for results in report["fabrics"].values() for key in results}
    for key in sorted(keys):
        rows = [results[key] for results in report["fabrics"].values() if key in results]
        total = {f: sum(row[f] for row in rows) for f in
                 ("detected", "defective", "false_alarms", "defect_free")}  # fmt: skip
        pooled[key] = total
        print(
            f"pooled {key:16s} detected {total['detected']}/{total['defective']} "
            f"false alarms {total['false_alarms']}/{total['defect_free']}"
        )
    report["pooled"] = pooled
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
