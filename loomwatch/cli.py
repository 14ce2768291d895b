"""The ``loomwatch`` command line.

Every user mistake (missing folder, no images, unreadable file, unknown model, bad config)
ends as one line on stderr and a non-zero exit; tracebacks only with ``--debug``.

This is the one place that wires training (``training``) and serving (``app``) together. Each
command imports what it needs when it runs, so ``loomwatch --help`` loads neither torch nor MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("loomwatch")
EXIT_USAGE = 2
EXIT_FAILED = 1
# For --help only (models.registry, which imports torch, decides): a test keeps them equal.
MODEL_NAMES = ("draem", "patchcore", "vae")
# For --help only (training.decisions.FIGURES decides): a test keeps them equal.
PROMOTE_METRICS = (
    "detection_rate", "false_alarm_rate", "decision_balance", "region_recall",
    "region_precision", "strip_auroc", "image_auroc",
)  # fmt: skip


class CliError(Exception):
    """A user-facing problem: printed as one line, exit status 2."""


BUILTIN_USER_ERRORS = (CliError, FileNotFoundError, NotADirectoryError, PermissionError)
# The project's user-facing errors, by the module that defines them. Looked up only in modules
# already loaded: an error whose module was never imported cannot have been raised, and the
# modules (torch, MLflow behind them) are not imported just to catch it.
USER_ERRORS = {
    "models.manifest": ("BundleError",),
    "models.network": ("BackendError",),
    "models.device": ("DeviceError",),
    "models.export": ("ExportError",),
    "models.patchcore": ("WeightsError",),
    "models.preprocessing": ("ImageDecodeError",),
    "models.registry": ("UnknownModelError",),
    "training.calibrate": ("CalibrationError",),
    "training.config": ("ConfigError",),
    "training.data": ("DatasetError",),
    "training.decisions": ("NoCommonDataError",),
    "tracking.store": ("ModelUriError", "TrackingError"),
    "training.batch.files": ("BatchInputError",),
    "training.batch.job": ("BatchSettingsError",),
    "training.batch.output": ("OutputError",),
    "training.batch.spark": ("SparkUnavailableError",),
    "app.feedback.store": ("FeedbackUnavailableError",),
}


# What to install when a package is missing (pyproject.toml's extras; the core serves exported
# models). A command that always needs more than the core names its own extra; predict and serve
# need one only for some models (a PyTorch bundle, an MLflow URI): the missing package decides.
COMMAND_EXTRAS = {"train": "train", "evaluate": "train", "promote": "train", "demo": "train",
                  "export": "export", "batch": "batch", "calibrate": "train"}  # fmt: skip
PACKAGE_EXTRAS = {
    "torch": "torch", "torchvision": "torch", "safetensors": "torch",
    "mlflow": "tracking", "pandas": "tracking", "sklearn": "train", "matplotlib": "train",
    "onnx": "export", "onnxscript": "export", "nncf": "export",
    "onnxruntime": "onnxruntime", "openvino": "openvino", "pyspark": "batch", "pyarrow": "batch",
}  # fmt: skip


def missing_extra(command: str, exc: ImportError) -> str | None:
    """One line naming the extra to install when `exc` is an optional package not installed;
    None for any other import failure (a bug, or a broken installation: shown as such)."""
    package = (exc.name or "").split(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or package not in PACKAGE_EXTRAS:
        return None
    extra = COMMAND_EXTRAS.get(command, PACKAGE_EXTRAS[package])
    return (
        f"loomwatch {command} needs {package}, which is not installed: "
        f"pip install 'loomwatch[{extra}]'"
    )


def require_packages(command: str, packages: Sequence[str]) -> None:
    """Before any work: CliError naming the extra when one of `packages` is not installed."""
    import importlib.util

    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise CliError(missing_extra(command, ModuleNotFoundError(name=package)))


def is_user_error(exc: BaseException) -> bool:
    """A mistake of the user's (one line, exit 2), not a bug (internal error, exit 1)."""
    if isinstance(exc, BUILTIN_USER_ERRORS):
        return True
    for module_name, names in USER_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is not None and isinstance(exc, tuple(getattr(module, n) for n in names)):
            return True
    return False


DEMO_PLAN = (
    "Synthetic fabric (1 fabric, 16 strips) -> PatchCore trained on CPU, tracked in MLflow and "
    "registered with alias champion -> evaluated (HTML report) -> 3 predictions -> served "
    "(unless --no-serve)."
)
# Measured: 290 s on 2 shared CPU cores; 36 MB work folder + 33 MB store + 12 MB model cache.
DEMO_COST = (
    "About 5 minutes on 2 CPU cores (training is capped by --max-minutes) and 80 MB of disk "
    "(the work folder, plus mlflow.db, mlruns/ and .loomwatch/ in this folder)."
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must lie in [0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loomwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write a synthetic AITEX-layout fabric data set")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--fabrics", type=_positive_int, default=2)
    synth.add_argument("--normal", type=_positive_int, default=8, help="defect-free per fabric")
    synth.add_argument("--defective", type=_positive_int, default=6, help="defective per fabric")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--width", type=int, default=4096)
    synth.add_argument("--height", type=int, default=256)

    train = commands.add_parser("train", help="train, calibrate, evaluate and save a model")
    train.add_argument("--model", required=True, help=f"one of {', '.join(MODEL_NAMES)}")
    train.add_argument("--data", type=Path, required=True)
    train.add_argument(
        "--fabric",
        help="AITEX fabric code (e.g. 02) or MVTec category; all: one model per fabric (a fleet: "
        "--out FLEET, registered as NAME-FF; see docs/fleets.md)",
    )
    train.add_argument(
        "--config", type=Path, help="YAML file with config sections, or a packaged config name"
    )
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    train.add_argument("--max-minutes", type=float, help="hard time budget for the command")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", type=Path, help="bundle folder (default runs/<model>-<time>)")
    train.add_argument(
        "--register", metavar="NAME", help="register the model as a new version of NAME"
    )
    train.add_argument("--alias", metavar="A", help="point alias A of NAME at the new version")
    _runtime_options(train, training=True)

    evaluate = commands.add_parser("evaluate", help="metrics and an HTML report on labelled data")
    evaluate.add_argument("--model-uri", required=True)
    evaluate.add_argument("--data", type=Path, required=True)
    evaluate.add_argument("--fabric")
    evaluate.add_argument("--split", choices=("test", "all"), default="test")
    evaluate.add_argument("--json", type=Path, dest="json_path")
    evaluate.add_argument("--report", type=Path, dest="report_dir")
    _backend_option(evaluate)
    _runtime_options(evaluate)

    predict = commands.add_parser("predict", help="score images; write overlays and JSON")
    predict.add_argument("--model-uri", required=True)
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--out", type=Path, default=Path("predictions"))
    predict.add_argument("--threshold", type=float, help="normalised image threshold (0.5)")
    _backend_option(predict)
    _runtime_options(predict)

    export = commands.add_parser(
        "export",
        help="export a model's network for ONNX Runtime or OpenVINO (fp32 or int8)",
        description="Write an exported model folder (manifest + network file) that predict, "
        "evaluate and serve accept as a model URI like any bundle.",
    )
    export.add_argument("--model-uri", required=True, help="the PyTorch bundle to export")
    export.add_argument("--format", required=True, dest="export_format", metavar="{onnx,openvino}")
    export.add_argument("--out", type=Path, required=True, help="the exported folder to write")
    export.add_argument("--int8", action="store_true", help="static int8 quantisation")
    export.add_argument(
        "--calibration-data", type=Path, help="folder whose defect-free images calibrate int8"
    )
    export.add_argument("--fabric", help="fabric of the calibration data (default: the model's)")
    export.add_argument(
        "--calibration-tiles",
        type=_positive_int,
        default=256,
        help="at most this many defect-free tiles calibrate int8 (default 256)",
    )
    export.add_argument(
        "--calibration-anomalies",
        type=_share,
        default=0.5,
        metavar="SHARE",
        help="share of the calibration tiles given a synthetic defect, so that int8 ranges "
        "cover what defects do to the network (default 0.5; 0: defect-free tiles only)",
    )
    export.add_argument(
        "--register",
        metavar="NAME",
        help="log the exported model to MLflow (a run of its own) and register it as a new "
        "version of NAME",
    )
    export.add_argument("--alias", metavar="A", help="point alias A of NAME at the new version")

    calibrate = commands.add_parser(
        "calibrate",
        help="re-fit a model's thresholds without retraining, from labelled data or from "
        "operators' feedback; writes a new model folder with the same weights",
    )
    calibrate.add_argument("--model-uri", required=True)
    evidence = calibrate.add_mutually_exclusive_group(required=True)
    evidence.add_argument(
        "--data", type=Path, help="labelled images (any layout train reads; masks fit regions)"
    )
    evidence.add_argument(
        "--feedback",
        metavar="DATABASE_URL",
        help="the service's feedback database (sqlite:///FILE, postgresql+psycopg://...)",
    )
    calibrate.add_argument("--fabric", help="with --data: one AITEX fabric or MVTec category")
    calibrate.add_argument(
        "--split",
        choices=("auto", "test", "all"),
        default="auto",
        help="with --data: test = the model's validation split of its training data; all = "
        "every image; auto (default): test when DIR is the training data, else all",
    )
    calibrate.add_argument(
        "--image-rule",
        choices=("false_alarm", "f1"),
        help="the operating-point rule (default: the one the model was trained with)",
    )
    calibrate.add_argument(
        "--target-false-alarm",
        type=float,
        metavar="RATE",
        help="false alarms on defect-free images, in (0, 1) (default: the model's)",
    )
    calibrate.add_argument(
        "--false-alarm-bound",
        choices=("auto", "conformal", "gaussian"),
        help="how the false_alarm rule sets the threshold from the defect-free images "
        "(default: the model's; auto for models trained before the setting existed)",
    )
    calibrate.add_argument(
        "--smoothing-by",
        choices=("pixel_ap", "region_f1"),
        help="with --data and defect masks: how the map's smoothing is chosen (default: the "
        "model's; pixel_ap for models trained before the setting existed)",
    )
    calibrate.add_argument(
        "--image-level",
        choices=("none", "median"),
        help="with --data: score the images with each image's median map level subtracted "
        "(median, the default for models trained since it existed) or not (none) and re-fit "
        "the operating point on that scale (default: the model's)",
    )
    calibrate.add_argument("--out", type=Path, help="new model folder (default runs/calibrated-*)")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument(
        "--register", metavar="NAME", help="log it to MLflow and register it as a new version"
    )
    calibrate.add_argument("--alias", metavar="A", help="point alias A of NAME at the new version")
    _backend_option(calibrate)

    promote = commands.add_parser(
        "promote",
        help="move alias 'champion' to the newest version when the 95%% CI of its improvement "
        "on the same strips lies above a margin",
    )
    promote.add_argument(
        "name",
        metavar="NAME",
        help="registered model name, or the NAME a fleet was registered under (train --fabric "
        "all --register NAME): each fabric's model NAME-FF is judged and promoted on its own",
    )
    promote.add_argument(
        "--metric",
        default="decision_balance",
        help=f"one of {', '.join(PROMOTE_METRICS)} (default decision_balance: detection rate "
        "minus false-alarm rate)",
    )
    promote.add_argument(
        "--data",
        type=Path,
        help="judge both versions on every image here (default: the validation strips both "
        "versions share, from the data folder their manifests record)",
    )
    promote.add_argument("--fabric", help="with --data: one AITEX fabric or MVTec category")
    promote.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="promote only when the whole 95%% CI of the improvement lies above this, in [0, 1)",
    )
    promote.add_argument(
        "--resamples", type=int, default=2000, help="paired bootstrap resamples (>= 100)"
    )

    serve = commands.add_parser("serve", help="run the HTTP service (FastAPI under uvicorn)")
    serve.add_argument(
        "--model-uri",
        help="bundle folder or MLflow URI, or a fleet (folder with fleet.json, runs:/ID/fleet: "
        "one model per fabric, the request names its fabric) (default: $MODEL_URI)",
    )
    serve.add_argument("--host", help="interface to listen on (default: $HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: $PORT or 8000)")
    serve.add_argument(
        "--backend", help="runtime of the network: auto, torch, onnxruntime, openvino ($BACKEND)"
    )
    serve.add_argument("--device", help=f"{DEVICE_HELP} ($DEVICE, default auto)")
    serve.add_argument("--precision", help=f"{PRECISION_HELP} ($PRECISION, default 32)")

    batch = commands.add_parser(
        "batch",
        help="score every image of an archive into Parquet (local processes or Apache Spark)",
        description="Score every image below DIR (or matching GLOB) through one model and write "
        "one row per image to OUT.parquet (a folder partitioned by fabric). Re-running skips "
        "images this model already scored. Exit status 0: all scored; 1: some images could not "
        "be scored (their rows say why); 2: the job could not run. See docs/batch.md.",
    )
    batch.add_argument("--model-uri", required=True)
    batch.add_argument("--input", required=True, metavar="DIR|GLOB")
    batch.add_argument("--output", type=Path, required=True, metavar="OUT.parquet")
    batch.add_argument("--engine", default="local", metavar="{local,spark}")
    batch.add_argument(
        "--master", help="Spark master URL (default local[--workers]; spark-submit's own)"
    )
    batch.add_argument(
        "--workers", type=int, default=1, help="local processes, or N of local[N] (default 1)"
    )
    batch.add_argument("--report", type=Path, dest="report_dir", metavar="DIR")
    batch.add_argument(
        "--worst", type=_positive_int, default=8, help="worst strips shown per fabric (8)"
    )
    batch.add_argument(
        "--checkpoint-every",
        type=int,
        default=256,
        help="images per checkpoint: what a killed job keeps (256)",
    )
    batch.add_argument(
        "--max-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="larger files get an error row unread (256 MiB)",
    )
    _backend_option(batch)
    _runtime_options(batch)

    demo = commands.add_parser(
        "demo",
        help="synthetic fabric -> train -> register (alias champion) -> serve",
        description=f"{DEMO_PLAN} {DEMO_COST}",
    )
    demo.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    demo.add_argument("--max-minutes", type=float, default=2.0, help="training budget")
    demo.add_argument("--name", default="fabric-demo", help="registered model name")
    demo.add_argument("--no-serve", action="store_true", help="stop after predict")
    demo.add_argument("--host", help="serve on this interface (default: $HOST or 127.0.0.1)")
    demo.add_argument("--port", type=int, help="serve on this port (default: $PORT or 8000)")
    demo.add_argument("--device", help=f"{DEVICE_HELP} (default auto)")
    demo.add_argument("--precision", help=f"{PRECISION_HELP} (default 32)")
    return parser


DEVICE_HELP = (
    "where the network runs: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, "
    "cuda:N or mps"
)
PRECISION_HELP = "32 (fp32), bf16 (autocast; CUDA or CPU) or 16-mixed (float16; CUDA)"


def _runtime_options(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """--device and --precision (models/device.py); for train also channels-last and step
    profiling. train's defaults come from the config's runtime section (auto, 32)."""
    source = "the config's runtime section, else " if training else ""
    parser.add_argument("--device", default=None if training else "auto",
                        help=f"{DEVICE_HELP} (default: {source}auto)")  # fmt: skip
    parser.add_argument("--precision", default=None if training else "32",
                        help=f"{PRECISION_HELP} (default: {source}32)")  # fmt: skip
    if training:
        parser.add_argument(
            "--channels-last",
            action="store_true",
            default=None,
            help="convolutions in channels-last layout (helps GPUs with bf16/16-mixed)",
        )
        parser.add_argument(
            "--profile-steps",
            action="store_true",
            help="time each training step's parts (data, forward, backward) and print the means",
        )


# ---- commands -------------------------------------------------------------------------------


def _backend_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="auto",
        metavar="{auto,torch,onnxruntime,openvino}",
        help="what runs the network (auto: torch for a bundle, the export's runtime for an "
        "exported model)",
    )


def cmd_synth(args: argparse.Namespace) -> int:
    from training.synth import generate_dataset

    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out {args.out} exists and is not a folder")
    try:
        summary = generate_dataset(
            args.out,
            fabrics=args.fabrics,
            normal=args.normal,
            defective=args.defective,
            seed=args.seed,
            width=args.width,
            height=args.height,
            progress=not args.quiet,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(summary)
    return 0


def _default_out(model: str, fabric: str | None) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{model}-{fabric or 'all'}-{stamp}"


_REGISTRY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_ALIAS = re.compile(r"[A-Za-z0-9_-]+")


def _check_registration(name: str | None, alias: str | None) -> None:
    """Refuse a name or alias MLflow would reject before training, not after."""
    if alias and not name:
        raise CliError("--alias needs --register NAME")
    if name is not None and not _REGISTRY_NAME.fullmatch(name):
        raise CliError(f"--register {name!r}: use letters, digits, '_', '.', '-' (no '/' or '@')")
    if alias is not None and (
        not _ALIAS.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias)
    ):
        raise CliError(f"--alias {alias!r}: use letters, digits, '_', '-'; not 'latest' or 'v<N>'")


def cmd_train(args: argparse.Namespace) -> int:
    from models.registry import MODEL_TYPES, UnknownModelError
    from training.calibrate import describe_operating_point
    from training.config import load_config, resolve_config_file
    from training.data import load_dataset, split_dataset
    from training.runs import run_tags, training_run
    from training.train import check_split, train

    # Every input is checked before the MLflow run opens: a mistake leaves no FAILED run behind.
    if args.model not in MODEL_TYPES:
        raise UnknownModelError(f"unknown model '{args.model}' (known: {', '.join(MODEL_TYPES)})")
    if args.model == "patchcore":  # its backbones; DRAEM and the VAE need torch alone
        require_packages("train", ("torchvision",))
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise CliError("--max-minutes must be positive")
    _check_registration(args.register, args.alias)
    config, _ = load_config(args.model, args.config, args.overrides)
    runtime = _train_runtime(args, config)  # a device this machine lacks: one line, no run
    config_file = resolve_config_file(args.config) if args.config is not None else None
    if args.fabric is not None and args.fabric.strip().lower() == "all":
        return _train_fleet(args, config, runtime, config_file)
    dataset = load_dataset(args.data, fabric=args.fabric)  # the folder, its images, the fabric
    split = split_dataset(dataset, config.data.val_fraction, args.seed)  # images to train on
    check_split(split, config, str(args.data))  # and enough held back for the operating point
    out = args.out or _default_out(args.model, args.fabric)
    tags = run_tags(args.model, args.fabric, args.data)
    with training_run(out.name, tags, progress=not args.quiet) as run:
        print(f"MLflow run {run.run_id} (store {run.store})", flush=True)
        run.log_params(
            config,
            {
                "model_type": args.model,
                "data": str(args.data),
                "fabric": args.fabric,
                "seed": args.seed,
                "max_minutes": args.max_minutes,
                "config_file": str(config_file) if config_file else None,
                "out": str(out),
            },
        )
        result = train(
            args.model,
            args.data,
            config,
            out=out,
            fabric=args.fabric,
            max_minutes=args.max_minutes,
            seed=args.seed,
            progress=not args.quiet,
            callback=run.on_epoch,
            on_split=run.on_split,
            runtime=runtime,
            profile=args.profile_steps,
        )
        scope = f"{args.data} (validation split, fabric {args.fabric or 'all'})"
        run.log_result(result, config, config_file, scope)
        if args.register:
            run.register(args.register, args.alias)
    metrics = result.evaluation.metrics
    shown = ("image_auroc", "strip_auroc", "pixel_auroc", "aupro", "pixel_ap", "f1_max")
    figures = "  ".join(f"{k}={metrics[k]:.4f}" for k in shown if k in metrics)
    print(
        f"trained {args.model} in {result.seconds['total']:.1f} s "
        f"(fit {result.seconds['fit']:.1f} s) on {runtime.describe()['device_name']}, "
        f"precision {runtime.precision}"
    )
    fit_summary = result.manifest.training.get("fit_summary", {})
    parts = [(k[5:-3], v) for k, v in fit_summary.items() if k.startswith("step_") and v]
    if parts:
        print("step: " + ", ".join(f"{name} {value:.1f} ms" for name, value in parts))
    print(f"validation: {figures}")
    print(_decision_line(metrics).replace("decisions", "validation decisions", 1))
    evidence = result.manifest.calibration.evidence
    if "operating_point" in evidence:
        print(describe_operating_point(evidence["operating_point"]))
    regions = evidence.get("regions", {})
    if regions.get("fitted"):
        print(
            f"regions: pixel threshold from {regions['pixel_threshold_from']}, smoothing "
            f"{regions['smoothing_sigma']:g} px, min area {regions['min_region_area']} px "
            f"(region F1 {regions['region_f1']:.2f} on validation)"
        )
    elif regions:
        print(f"regions: configured suppression kept ({regions.get('reason', 'not fitted')})")
    print(f"bundle: {result.bundle}")
    print(f"MLflow run: {run.run_id}")
    print(f"model URI: {run.model_uri}")
    if args.register and args.alias:
        print(f"alias: models:/{args.register}@{args.alias}")
    return 0


def _train_fleet(
    args: argparse.Namespace, config: Any, runtime: Any, config_file: Path | None
) -> int:
    """``train --fabric all``: one model per fabric, a fleet folder (training/fleet.py)."""
    from training.fleet import check_fleet_data, fleet_fabrics, train_fleet

    if args.out is None:
        raise CliError("--fabric all needs --out FLEET (the fleet folder to write)")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise CliError(f"--out {args.out} exists and is not an empty folder")
    fabrics = fleet_fabrics(args.data)
    for fabric in fabrics if args.register else ():
        _check_registration(f"{args.register}-{fabric}", args.alias)
    skipped = check_fleet_data(args.data, fabrics, config, args.seed)  # before any run opens
    for fabric, why in skipped.items():
        print(f"fabric {fabric} skipped: {why}", flush=True)
    fabrics = [fabric for fabric in fabrics if fabric not in skipped]
    result = train_fleet(
        args.model,
        args.data,
        config,
        out=args.out,
        fabrics=fabrics,
        max_minutes=args.max_minutes,
        seed=args.seed,
        runtime=runtime,
        register=args.register,
        alias=args.alias,
        config_file=config_file,
        progress=not args.quiet,
        say=lambda text: print(text, flush=True),
        skipped=skipped,
    )
    print(f"fleet: {result.folder / 'fleet.json'} ({len(fabrics)} fabrics: {', '.join(fabrics)})")
    print(f"MLflow run: {result.parent_run_id}")
    print(f"model URI: {result.folder} (or {result.uri})")
    return 0


def _train_runtime(args: argparse.Namespace, config: Any) -> Any:
    """The runtime of ``train``: the flags over the config's runtime section (which the run
    then records as used); DeviceError when this machine cannot run it."""
    from models.device import Runtime, check_device_name, check_precision_name

    if args.device is not None:
        config.runtime.device = check_device_name(args.device)
    if args.precision is not None:
        config.runtime.precision = check_precision_name(args.precision)
    if args.channels_last:
        config.runtime.channels_last = True
    chosen = config.runtime
    return Runtime.resolve(chosen.device, chosen.precision, chosen.channels_last)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.pipeline import Detector
    from tracking.uris import resolve_model_uri
    from training.data import fingerprint, load_dataset, recorded_split
    from training.evaluate import analyse_samples, evaluation_summary, run_evaluation, write_outputs

    if _is_fleet(args.model_uri):
        return _evaluate_fleet(args)
    bundle = resolve_model_uri(args.model_uri)
    detector = Detector.from_bundle(
        bundle, backend=args.backend, device=args.device, precision=args.precision
    )
    training = detector.manifest.training
    fabric = args.fabric if args.fabric is not None else training.get("fabric")
    dataset = load_dataset(args.data, fabric=fabric if args.split == "test" else args.fabric)
    if args.split == "test":
        if training.get("fingerprint") != fingerprint(dataset.samples, dataset.root):
            raise CliError(
                f"{args.data} is not the data this model was trained on (fingerprint differs); "
                "use --split all to evaluate on other data"
            )
        split = recorded_split(dataset, training)
        samples = list(split.validation)
    else:
        samples = list(dataset.samples)
    if not samples:
        raise CliError(f"no images to evaluate in {args.data}")
    analysed = analyse_samples(detector, samples, progress=not args.quiet, desc="evaluate")
    result = run_evaluation(detector, analysed)
    summary = evaluation_summary(detector, result, args.model_uri)
    report = write_outputs(
        detector,
        result,
        summary,
        json_path=args.json_path,
        report_dir=args.report_dir,
        data=f"{args.data} ({args.split}, fabric {fabric or 'all'})",
    )
    print(json.dumps(summary, indent=2))
    print(_decision_line(summary), file=sys.stderr)
    if report is not None:
        print(f"report: {report}", file=sys.stderr)
    return 0


def _is_fleet(uri: str) -> bool:
    from tracking.fleet import is_fleet_uri

    return is_fleet_uri(uri)


def _evaluate_fleet(args: argparse.Namespace) -> int:
    """``evaluate`` of a fleet: every fabric it has a model for (training/fleet_eval.py)."""
    from tracking.fleet import resolve_fleet
    from training.evaluate import evaluation_summary, write_outputs
    from training.fleet_eval import evaluate_fleet, table, write_fleet_report, write_json

    fleet = resolve_fleet(args.model_uri)
    summary, judgements = evaluate_fleet(
        fleet,
        args.data,
        split=args.split,
        fabric=args.fabric,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        progress=not args.quiet,
    )
    if args.json_path is not None:
        write_json(args.json_path, summary)
    print(table(summary))
    for fabric, reason in summary["skipped"].items():
        print(f"fabric {fabric} skipped: {reason}", file=sys.stderr)
    if args.report_dir is not None:

        def write_one(judgement: Any, folder: Path) -> Path | None:
            single = evaluation_summary(judgement.detector, judgement.result, judgement.uri)
            scope = f"{args.data} ({args.split}, fabric {judgement.fabric})"
            return write_outputs(judgement.detector, judgement.result, single, json_path=None,
                                 report_dir=folder, data=scope)  # fmt: skip

        page = write_fleet_report(args.report_dir, summary, judgements, str(args.data), write_one)
        print(f"report: {page}", file=sys.stderr)
    return 0


def _decision_line(summary: dict[str, Any]) -> str:
    """The decision figures in one line, each with its 95 % interval."""
    parts = []
    for key in ("detection_rate", "false_alarm_rate", "region_recall", "region_precision"):
        value, low, high = (summary.get(k) for k in (key, f"{key}_ci95_low", f"{key}_ci95_high"))
        if value is None:
            parts.append(f"{key} n/a")
        else:
            interval = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
            parts.append(f"{key} {value:.2f}{interval}")
    return "decisions (95% CI over images): " + ", ".join(parts)


def cmd_predict(args: argparse.Namespace) -> int:
    from models.overlay import encode_png, render_overlay
    from models.pipeline import Detector
    from models.preprocessing import ImageDecodeError
    from tracking.uris import resolve_model_uri

    bundle = resolve_model_uri(args.model_uri)
    detector = Detector.from_bundle(
        bundle, backend=args.backend, device=args.device, precision=args.precision
    )
    args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.images:
        try:
            prediction = detector.predict(path, threshold=args.threshold)
        except (ImageDecodeError, OSError) as exc:
            print(f"loomwatch: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        stem = path.stem
        result = prediction.summary()
        result.update(image=str(path), model_uri=args.model_uri)
        result["model_type"] = detector.manifest.model_type
        (args.out / f"{stem}.overlay.png").write_bytes(encode_png(render_overlay(prediction)))
        (args.out / f"{stem}.mask.png").write_bytes(encode_png(prediction.post.mask))
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(
            f"{path}: {result['decision']}: {prediction.verdict.reason}; "
            f"{len(prediction.post.kept)} regions kept, "
            f"{len(prediction.post.suppressed)} suppressed -> {args.out / stem}.json"
        )
    return EXIT_FAILED if failures else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.listen import address_problem

    problem = address_problem(args.host, args.port)  # before the app, torch and the model load
    if problem:
        raise CliError(problem)
    from app.server import run

    return run(
        model_uri=args.model_uri,
        host=args.host,
        port=args.port,
        backend=args.backend,
        device=args.device,
        precision=args.precision,
    )


def cmd_export(args: argparse.Namespace) -> int:
    from models.export import FORMATS, check_export_request, export_bundle, exported_size
    from models.manifest import read_manifest
    from tracking.uris import resolve_model_uri

    if args.export_format not in FORMATS:
        raise CliError(
            f"unknown --format {args.export_format!r}: choose one of {', '.join(FORMATS)}"
        )
    if args.int8 and args.calibration_data is None:
        raise CliError("--int8 needs --calibration-data DIR (defect-free images of the fabric)")
    check_export_request(args.export_format, False, None)  # runtimes, before any work
    _check_registration(args.register, args.alias)
    bundle = resolve_model_uri(args.model_uri)
    calibration, images, synthetic = None, None, None
    if args.int8:
        from training.export import calibration_tiles

        drawn = calibration_tiles(
            args.calibration_data,
            read_manifest(bundle),
            fabric=args.fabric,
            limit=args.calibration_tiles,
            anomaly_share=args.calibration_anomalies,
            progress=not args.quiet,
        )
        calibration, images, synthetic = (drawn.tiles, drawn.valid), drawn.images, drawn.synthetic
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    out = export_bundle(
        bundle,
        args.out,
        args.export_format,
        source_uri=args.model_uri,
        int8=args.int8,
        calibration=calibration,
        calibration_images=images,
        calibration_synthetic=synthetic,
        say=say,
    )
    sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in exported_size(out).items())
    precision = "int8" if args.int8 else "fp32"
    print(f"exported {args.model_uri} as {args.export_format} {precision} to {out} ({sizes})")
    if not args.register:
        print(f"model URI: {out}")
        return 0
    from training.runs import log_export

    run = log_export(out, args.model_uri, args.register, args.alias, progress=not args.quiet)
    print(f"MLflow run: {run.run_id} (store {run.store})")
    print(f"model URI: {run.model_uri}")
    if args.alias:
        print(f"alias: models:/{args.register}@{args.alias}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from tracking.uris import resolve_model_uri
    from training.recalibrate import describe, recalibrate_on_data, recalibrate_on_feedback

    _check_registration(args.register, args.alias)
    if args.data is None and (args.fabric or args.split != "auto"):
        raise CliError("--fabric and --split go with --data")
    overrides: dict[str, Any] = {}
    if args.image_rule is not None:
        overrides["image_rule"] = args.image_rule
    if args.target_false_alarm is not None:
        if not 0.0 < args.target_false_alarm < 1.0:
            raise CliError(
                f"--target-false-alarm must lie strictly between 0 and 1, got "
                f"{args.target_false_alarm:g}"
            )
        overrides["target_false_alarm"] = args.target_false_alarm
    if args.smoothing_by is not None:
        overrides["smoothing_by"] = args.smoothing_by
    if args.false_alarm_bound is not None:
        overrides["false_alarm_bound"] = args.false_alarm_bound
    if args.image_level is not None and args.data is None:
        raise CliError(
            "--image-level goes with --data: the images must be scored again on the new scale"
        )
    out = args.out or Path("runs") / time.strftime("calibrated-%Y%m%d-%H%M%S")
    model = resolve_model_uri(args.model_uri)
    if args.data is not None:
        result = recalibrate_on_data(
            model,
            args.data,
            out,
            fabric=args.fabric,
            split=args.split,
            backend=args.backend,
            seed=args.seed,
            progress=not args.quiet,
            overrides=overrides,
            image_level=args.image_level,
        )
    else:
        from app.feedback.store import FeedbackStore, safe_url
        from models.manifest import weights_digest

        try:
            store = FeedbackStore(args.feedback)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        try:
            reviewed = store.labelled_scores(weights_digest(model))
        finally:
            store.close()
        source = safe_url(args.feedback)
        result = recalibrate_on_feedback(
            model, reviewed, out, source=source, seed=args.seed, overrides=overrides
        )
    print(describe(result.evidence, result.before, result.manifest.calibration))
    print(f"bundle: {result.folder}")
    if not args.register:
        print(f"model URI: {result.folder}")
        return 0
    from training.runs import log_recalibration

    run = log_recalibration(
        result.folder,
        args.model_uri,
        result.evidence,
        result.description(),
        args.register,
        args.alias,
        progress=not args.quiet,
    )
    print(f"MLflow run: {run.run_id} (store {run.store})")
    print(f"model URI: {run.model_uri}")
    if args.alias:
        print(f"alias: models:/{args.register}@{args.alias}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Exit 0 whether or not the alias moved: "not promoted: <why>" is an answer, not an error."""
    from tracking.store import use_tracking_store
    from training.promote import promote

    use_tracking_store(progress=not args.quiet)
    from training.fleet import fleet_model_names, promote_fleet

    fleet = fleet_model_names(args.name)  # NAME-FF models of a fleet registered as NAME
    if fleet:
        lines = promote_fleet(fleet, args.metric, data=args.data, fabric=args.fabric,
                              margin=args.margin, resamples=args.resamples,
                              progress=not args.quiet)  # fmt: skip
        print("\n".join(lines))
        return 0
    if args.fabric is not None and args.data is None:
        raise CliError("--fabric needs --data DIR")
    decision = promote(
        args.name,
        args.metric,
        data=args.data,
        fabric=args.fabric,
        margin=args.margin,
        resamples=args.resamples,
        progress=not args.quiet,
    )
    print(decision.message)
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    """Exit 0 when every image was scored, 1 when some could not be (rows with an error)."""
    require_packages("batch", ("pyarrow",) + (("pyspark",) if args.engine == "spark" else ()))
    from training.batch.job import BatchRequest, run_batch

    request = BatchRequest(
        model_uri=args.model_uri,
        input=args.input,
        output=args.output,
        engine=args.engine,
        master=args.master,
        workers=args.workers,
        backend=args.backend,
        report_dir=args.report_dir,
        worst=args.worst,
        checkpoint_every=args.checkpoint_every,
        max_bytes=args.max_bytes,
        device=args.device,
        precision=args.precision,
        progress=not args.quiet,
    )
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    try:
        summary = run_batch(request, say)
    except Exception as exc:  # the job could not finish: exit 2, as for bad input (1 = images)
        if args.debug or is_user_error(exc) or isinstance(exc, ImportError):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(
            f"loomwatch: error: the batch job failed: {type(exc).__name__}: {first} (the output "
            "is unchanged; what was scored is kept: run it again to resume)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(summary.line())
    if summary.report is not None:
        print(f"report: {summary.report}")
    return summary.exit_code


def cmd_demo(args: argparse.Namespace) -> int:
    """Fresh machine: synthetic fabric -> PatchCore (random backbone) -> MLflow, registered with
    alias champion -> evaluate and predict through the registry -> serve it."""
    # what its PatchCore training needs: the demo stops here, not after writing its data
    require_packages("demo", ("torch", "torchvision", "safetensors", "mlflow", "sklearn"))
    from models.device import Runtime

    device, precision = args.device or "auto", args.precision or "32"
    Runtime.resolve(device, precision)  # a device this machine lacks: one line, before any work
    runtime = ["--device", device, "--precision", precision]
    if not args.no_serve:  # a taken port fails now, not after minutes of training
        from app.listen import address_problem

        problem = address_problem(args.host, args.port)
        if problem:
            raise CliError(f"{problem}; or pass --no-serve")
    print(f"loomwatch demo: {DEMO_PLAN}\n{DEMO_COST}\n", flush=True)
    work: Path = args.workdir
    data, bundle, report = work / "data", work / "bundle", work / "report"
    champion = f"models:/{args.name}@champion"
    quiet = ["--quiet"] if args.quiet else []
    steps: list[list[str]] = [
        [*quiet, "synth", "--out", str(data), "--fabrics", "1", "--normal", "10",
         "--defective", "6"],
        [*quiet, "train", "--model", "patchcore", "--data", str(data), "--out", str(bundle),
         "--max-minutes", str(args.max_minutes), "--config", "patchcore-cpu",
         "--set", "model.augment.copies=0",  # a quick model: no augmented copies
         "--register", args.name, "--alias", "champion", *runtime],
        [*quiet, "evaluate", "--model-uri", champion, "--data", str(data),
         "--json", str(work / "metrics.json"), "--report", str(report), *runtime],
    ]  # fmt: skip
    for step in steps:
        print(f"$ loomwatch {' '.join(step)}", flush=True)
        code = main(step)
        if code:
            return code
    defects = sorted((data / "Defect_images").glob("*.png"))[:2]
    normal = sorted((data / "NoDefect_images").rglob("*.png"))[:1]
    step = ["predict", "--model-uri", champion, *map(str, defects + normal)]
    step += ["--out", str(work / "predictions"), *runtime]
    print(f"$ loomwatch {' '.join(step)}", flush=True)
    code = main([*quiet, *step])
    print(f"\ndemo done: bundle {bundle}, report {report / 'report.html'}, ")
    print(f"predictions in {work / 'predictions'}")
    print(f"registered: {champion}; `mlflow ui` in this folder shows the run and the model")
    serve = ["serve", "--model-uri", champion, *runtime]
    serve += ["--host", args.host] if args.host else []
    serve += ["--port", str(args.port)] if args.port is not None else []
    if code or args.no_serve:
        print(f"to serve it: loomwatch {' '.join(serve)}")
        return code
    print(f"$ loomwatch {' '.join(serve)}    (Ctrl-C stops it)", flush=True)
    host = args.host or os.environ.get("HOST") or "127.0.0.1"
    port = args.port if args.port is not None else os.environ.get("PORT") or 8000
    print(f"review page: http://{host}:{port}/ui   API docs: http://{host}:{port}/docs", flush=True)
    return main([*quiet, *serve])


COMMANDS = {
    "synth": cmd_synth,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "promote": cmd_promote,
    "export": cmd_export,
    "calibrate": cmd_calibrate,
    "serve": cmd_serve,
    "demo": cmd_demo,
    "batch": cmd_batch,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    debug = args.debug or bool(os.environ.get("LOOMWATCH_DEBUG"))
    started = time.monotonic()
    try:
        code = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("loomwatch: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        missing = missing_extra(args.command, exc) if isinstance(exc, ImportError) else None
        if missing:
            print(f"loomwatch: error: {missing}", file=sys.stderr)
            return EXIT_USAGE
        if is_user_error(exc):
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"loomwatch: error: {message}", file=sys.stderr)
            return EXIT_USAGE
        print(
            f"loomwatch: internal error: {type(exc).__name__}: {exc} (rerun with --debug)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    log.debug("%s took %.1f s", args.command, time.monotonic() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
