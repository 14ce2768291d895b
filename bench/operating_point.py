"""Image-threshold rules side by side on a fleet's held-out strips (issue 13's operating point).

    python -m bench.operating_point --fleet runs/fleet-a --data runs/hall/fit \
        --test runs/hall/test --json runs/operating-point.json
    python -m bench.operating_point --scores runs/operating-point.json [--held-back 3]

For every fabric of ``--fleet`` it analyses the validation split of ``--data`` (the data the
fleet trained on: the same held-back defect-free strips its calibration used) and every strip of
``--test``, once. Each rule and target then sets a raw image threshold from the validation
strips (``conformal`` and ``gaussian``: the false-alarm rule with that bound, from the
held-back defect-free ones alone; ``default``: the default calibration, which also counts the
defect-free images the model was fitted on when they score no lower; ``f1``: all of them,
balanced), with the code calibration uses
(``training.calibrate.image_threshold``), and the held-out strips are decided through
``Detector.finish`` (the serving path, veto included) at that threshold, with the bundle's pixel
threshold and suppression kept. Printed: per fabric and pooled, defective strips flagged and
defect-free strips flagged, with each threshold and its 95 % interval. The JSON also keeps
every strip's score and fabric tile scores, to try other rules without scoring again.

One split of 3 held-back and 5 new defect-free strips a fabric is one draw: which strips happen
to be held back moves a fabric's false alarms by several strips. ``--scores`` reads such a JSON
and, per fabric, pools its defect-free strips (validation and test), holds back every possible
``--held-back`` of them in turn, sets each rule's threshold from those and judges the rest and
the test's defective strips (raw score at or above the threshold; no veto): the false-alarm and
detection rates each rule gives on average over the draws, what a new split would give.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models.pipeline import Analysis, Detector
from tracking.fleet import resolve_fleet
from training.calibrate import image_threshold
from training.config import CalibrationConfig
from training.data import load_dataset, recorded_split
from training.evaluate import analyse_samples, fitted_clean_scores

Rule = Literal["conformal", "gaussian", "default", "f1"]
RULES: tuple[Rule, ...] = ("conformal", "gaussian", "default", "f1")
RESAMPLED: tuple[Rule, ...] = ("conformal", "gaussian", "default")


def rule_config(rule: Rule, target: float) -> CalibrationConfig:
    """``conformal``, ``gaussian``: that bound on the held-back images alone; ``default``: the
    default calibration (auto bound, fitted-on images joined when they score no lower)."""
    if rule == "f1":
        return CalibrationConfig(image_rule="f1", target_false_alarm=target)
    if rule == "default":
        return CalibrationConfig(target_false_alarm=target)
    return CalibrationConfig(
        target_false_alarm=target, false_alarm_bound=rule, use_training_images=False
    )


def threshold_of(
    rule: Rule,
    scores: np.ndarray,
    labels: np.ndarray,
    target: float,
    trained: Sequence[float] = (),
) -> tuple[float, dict[str, Any]]:
    """The raw image threshold a rule sets from labelled image scores (and the fitted-on
    defect-free images' scores), as calibration sets it (``training.calibrate.image_threshold``)."""
    if rule == "f1" and (labels == 1).sum() == 0:
        rule = "conformal"  # f1 needs both classes (AITEX fabric 05 has no defective strip)
    config = rule_config(rule, target)
    threshold, evidence, _ = image_threshold(
        scores, labels, config, seed=0, where="validation", trained=trained
    )
    return threshold, evidence


def threshold_for(
    rule: Rule,
    validation: list[tuple[int, Analysis]],
    target: float,
    trained: Sequence[float] = (),
) -> tuple[float, dict[str, Any]]:
    """The raw image threshold a rule sets from the validation analyses (label, analysis)."""
    labels = np.asarray([label for label, _ in validation])
    scores = np.asarray([analysis.score for _, analysis in validation])
    return threshold_of(rule, scores, labels, target, trained)


def resample(
    scores: dict[str, Any], held_back: int | None, targets: list[float]
) -> dict[str, dict[str, dict[str, float]]]:
    """Per rule and target, per fabric and pooled: the false-alarm and detection rates averaged
    over every choice of ``held_back`` of a fabric's defect-free strips to set the threshold."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for rule in RESAMPLED:
        for target in targets:
            key, rows = f"{rule}@{target:g}", {}
            for fabric, strips in scores.items():
                clean = [s["score"] for s in strips["validation"] + strips["test"]
                         if s["label"] == 0]  # fmt: skip
                defective = np.asarray([s["score"] for s in strips["test"] if s["label"] == 1])
                trained = strips.get("trained", [])
                n = held_back or sum(s["label"] == 0 for s in strips["validation"])
                if len(clean) <= n:
                    continue
                alarms, found, draws = 0.0, 0.0, 0
                for chosen in itertools.combinations(range(len(clean)), n):
                    kept = np.asarray([clean[i] for i in chosen])
                    rest = np.asarray([v for i, v in enumerate(clean) if i not in chosen])
                    threshold, _ = threshold_of(rule, kept, np.zeros(n, int), target, trained)
                    alarms += float((rest >= threshold).mean())
                    found += float((defective >= threshold).sum())
                    draws += 1
                rows[fabric] = {
                    "held_back": n,
                    "draws": draws,
                    "false_alarm_rate": alarms / draws,
                    "defective": int(defective.size),
                    "detected": found / draws,
                }
            judged = list(rows.values())
            rows["pooled"] = {  # every fabric's defect-free strips weigh the same
                "false_alarm_rate": float(np.mean([r["false_alarm_rate"] for r in judged])),
                "defective": sum(r["defective"] for r in judged),
                "detected": sum(r["detected"] for r in judged),
            }
            results[key] = rows
    return results


def print_resampled(results: dict[str, dict[str, dict[str, float]]]) -> None:
    for key, rows in results.items():
        for fabric, row in rows.items():
            rate = row["detected"] / row["defective"] if row["defective"] else float("nan")
            print(
                f"{key:16s} {fabric:6s} false alarms {row['false_alarm_rate']:.3f} "
                f"detection {rate:.3f} ({row['detected']:.2f}/{row['defective']})"
            )


def _fabric_tiles(analysis: Analysis) -> list[float]:
    """The tile scores an image score is the maximum of (tiles with fabric)."""
    pairs = zip(analysis.tile_scores, analysis.tile_valid, strict=True)
    return [float(score) for score, share in pairs if share > 0]


def judge_fabric(
    detector: Detector, validation: list[tuple[int, Analysis]],
    test: list[tuple[int, str, Analysis]], targets: list[float], trained: Sequence[float] = (),
) -> dict[str, Any]:  # fmt: skip
    """Thresholds of every rule and target, and the decisions on the held-out strips."""
    results: dict[str, Any] = {}
    for rule in RULES:
        for target in targets if rule != "f1" else targets[:1]:
            threshold, evidence = threshold_for(rule, validation, target, trained)
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
    parser.add_argument("--fleet")
    parser.add_argument("--data", type=Path, help="the data the fleet trained on")
    parser.add_argument("--test", type=Path, help="held-out strips, same layout")
    parser.add_argument("--target", type=float, action="append", help="default 0.05 and 0.1")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--scores", type=Path, help="a JSON of this bench: resample its strips")
    parser.add_argument("--held-back", type=int, help="with --scores (default: as validation)")
    args = parser.parse_args(argv)
    targets = args.target or [0.05, 0.1]
    if args.scores is not None:
        resampled = resample(json.loads(args.scores.read_text())["scores"], args.held_back, targets)
        print_resampled(resampled)
        if args.json:
            args.json.write_text(json.dumps(resampled, indent=2) + "\n")
        return
    if not (args.fleet and args.data and args.test):
        parser.error("--fleet, --data and --test are needed (or --scores)")
    fleet = resolve_fleet(args.fleet)
    report: dict[str, Any] = {"fleet": args.fleet, "fabrics": {}}
    for fabric in fleet.fabrics:
        entry = fleet.member(fabric)
        if entry is None or entry.bundle is None:
            raise SystemExit(f"{args.fleet}: fabric {fabric} has no bundle folder beside it")
        detector = Detector.from_bundle(entry.bundle)
        training = detector.manifest.training
        dataset = load_dataset(args.data, fabric=fabric)
        split = recorded_split(dataset, training)
        analysed = analyse_samples(detector, list(split.validation), desc=f"{fabric} validation")
        validation = [(sample.label, analysis) for sample, analysis, _ in analysed]
        test_samples = load_dataset(args.test, fabric=fabric).samples
        analysed = analyse_samples(detector, test_samples, desc=f"{fabric} test")
        test = [(sample.label, sample.name, analysis) for sample, analysis, _ in analysed]
        trained = fitted_clean_scores(detector, split.train, CalibrationConfig())
        results = judge_fabric(detector, validation, test, targets, trained)
        report["fabrics"][fabric] = results
        # the raw figures, to try other rules without scoring again
        report.setdefault("scores", {})[fabric] = {
            "validation": [
                {"label": label, "score": a.score, "tiles": _fabric_tiles(a)}
                for label, a in validation
            ],
            "test": [
                {"label": label, "name": name, "score": a.score, "tiles": _fabric_tiles(a)}
                for label, name, a in test
            ],
            "trained": trained,
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
