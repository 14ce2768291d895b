"""Devices and precision (models/device.py): names, refusals, device-clean models, bf16 on the
CPU, prefetching that changes nothing, device-neutral bundles, and the dynamic batcher."""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from models.base import AnomalyModel, FitContext
from models.batching import BatcherClosedError, BatchingNetwork
from models.bundle import WEIGHTS, Manifest, PipelineConfig, load_bundle, save_bundle
from models.calibration import Calibration
from models.device import DeviceError, Runtime, check_device_name, resolve_device
from models.draem import Draem, DraemConfig
from models.network import TorchNetwork
from models.patchcore import PatchCore, PatchCoreConfig
from models.vae import VAE, VAEConfig
from tests.helpers import same_state, woven_tile_set

ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = not torch.cuda.is_available()
TINY_DRAEM = {"recon_channels": 4, "disc_channels": 4, "recon_depth": 2, "disc_depth": 2,
              "max_epochs": 2, "crop_size": 32, "texture_tiles": 4, "smoothing_sigma": 1.0,
              "validate_every": 1}  # fmt: skip
CAL = Calibration(image_threshold=0.5, image_min=0.0, image_max=1.0, pixel_threshold=0.5,
                  pixel_min=0.0, pixel_max=1.0, method="test")  # fmt: skip


def tiny_draem(**changes: Any) -> Draem:
    torch.manual_seed(0)
    return Draem(DraemConfig.model_validate({**TINY_DRAEM, **changes}))


def tiny_models() -> list[AnomalyModel]:
    torch.manual_seed(0)
    patchcore = PatchCore(
        PatchCoreConfig(backbone="resnet18", pretrained=False, layer_dim=16, embed_dim=8),
        load_weights=False,
    )
    patchcore.memory_bank = torch.randn(12, 8)
    vae = VAE(VAEConfig(base_channels=4, max_channels=8, depth=2, latent_channels=2))
    return [tiny_draem(), vae, patchcore]


# ---- names and refusals -------------------------------------------------------------------------
def test_device_names() -> None:
    for name in ("auto", "cpu", "cuda", "cuda:1", "mps", " CPU "):
        assert check_device_name(name) in ("auto", "cpu", "cuda", "cuda:1", "mps")
    for name in ("gpu", "cuda:", "cuda:x", "tpu", ""):
        with pytest.raises(DeviceError, match="unknown device"):
            check_device_name(name)
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_a_missing_gpu_is_refused_in_one_line_and_auto_falls_back() -> None:
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError) as caught:
            resolve_device(name)
        assert "no CUDA GPU" in str(caught.value) and "\n" not in str(caught.value)
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(DeviceError, match="16-mixed needs a CUDA GPU"):
        Runtime.resolve("cpu", "16-mixed")
    with pytest.raises(DeviceError, match="unknown precision"):
        Runtime.resolve("cpu", "fp8")
    assert Runtime.resolve("cpu", "bf16").autocast_dtype == torch.bfloat16


# ---- every tensor where the model is ------------------------------------------------------------
class DeviceMismatch(TorchFunctionMode):
    """Records every torch call whose tensors sit on more than one device (0-d host scalars
    aside, which torch lets mix): with the model and its inputs on the ``meta`` device, a
    tensor the model made on the CPU shows up the moment it meets them."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, set[torch.device]]] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        devices = {
            leaf.device
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor)
            and not (leaf.device.type == "cpu" and leaf.dim() == 0)
        }
        if len(devices) > 1:
            self.found.append((getattr(func, "__name__", str(func)), devices))
        return func(*args, **kwargs)


def meta_batch() -> tuple[torch.Tensor, torch.Tensor]:
    tiles = torch.rand(2, 1, 32, 32, device="meta")
    return tiles, torch.ones(2, 1, 32, 32, dtype=torch.bool, device="meta")


@pytest.mark.parametrize("index", [0, 1, 2], ids=["draem", "vae", "patchcore"])
def test_scoring_makes_no_tensor_off_the_model_device(index: int) -> None:
    model = tiny_models()[index].to("meta")
    with DeviceMismatch() as detector:
        output = model.predict(*meta_batch())
    assert detector.found == []
    assert output.anomaly_map.device.type == "meta" and output.score.device.type == "meta"


def test_the_detector_sees_a_host_tensor_among_device_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check above can fail: a Gaussian kernel made on the host is caught."""
    import models.filters as filters

    made_on_host = filters.gaussian_kernel
    monkeypatch.setattr(filters, "gaussian_kernel", lambda sigma, device=None: made_on_host(sigma))
    model = tiny_models()[0].to("meta")
    with DeviceMismatch() as detector:
        model.predict(*meta_batch())
    assert any(name == "conv2d" for name, _ in detector.found)


def test_draem_device_step_makes_no_tensor_off_the_model_device() -> None:
    model = tiny_draem().to("meta")
    tiles, valid = meta_batch()
    with DeviceMismatch() as detector:
        total, figures = model._loss(tiles, tiles, tiles, valid, Runtime(torch.device("meta")))
        total.backward()
    assert detector.found == []
    assert figures.device.type == "meta" and figures.shape == (4,)


FACTORIES = {"zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "randperm",
             "tensor", "as_tensor", "linspace", "eye", "Generator"}  # fmt: skip
# Made once when a module is built (moved with it by Runtime.prepare), or host-only by design.
BUILT_ONCE = {("patchcore.py", "__init__"), ("patchcore.py", "pooling_matrix"),
              ("export.py", "export_onnx")}  # fmt: skip


def test_models_name_a_device_for_every_tensor_they_create() -> None:
    """No torch.zeros/arange/rand/... without device= in models/, but where a module is built."""
    unplaced = []
    for path in sorted((ROOT / "models").glob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                call = node.func
                if (
                    isinstance(call.value, ast.Name)
                    and call.value.id == "torch"
                    and call.attr in FACTORIES
                    and not any(keyword.arg == "device" for keyword in node.keywords)
                    and (path.name, function.name) not in BUILT_ONCE
                ):
                    unplaced.append(f"{path.name}:{node.lineno} {function.name}: torch.{call.attr}")
    assert unplaced == []


# ---- precision and prefetching ------------------------------------------------------------------
def test_bf16_runs_the_convolutions_in_bf16_and_keeps_losses_and_maps_in_fp32() -> None:
    model = tiny_draem()
    seen: list[torch.dtype] = []
    model.discriminative.head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    summary = model.fit(
        woven_tile_set(2),
        FitContext(progress=False, batch_size=4, runtime=Runtime.resolve("cpu", "bf16")),
    )
    assert seen and set(seen) == {torch.bfloat16}
    assert np.isfinite(summary["best_criterion"])
    tiles = woven_tile_set(1)[0][0][None]
    output = Runtime.resolve("cpu", "bf16").predict(
        model, tiles, torch.ones_like(tiles, dtype=torch.bool)
    )
    assert output.anomaly_map.dtype == torch.float32 and torch.isfinite(output.anomaly_map).all()
    assert seen[-1] == torch.bfloat16  # scoring ran under autocast too


def test_prefetching_the_data_stage_changes_nothing() -> None:
    """The data stage one batch ahead in a thread (what accelerators do) draws the same
    batches: the same seed gives the same weights, step by step."""
    states = []
    for prefetch in (False, True):
        model = tiny_draem(augment_share=0.5)
        model.fit(woven_tile_set(3), FitContext(progress=False, batch_size=4, prefetch=prefetch))
        states.append(model.state_dict())
    assert same_state(tiny_draem(), states[0]) is False
    model = tiny_draem()
    model.load_state_dict(states[1])
    assert same_state(model, states[0])


@pytest.mark.parametrize("prefetch", [False, True])
def test_an_epoch_averages_every_batch_and_a_cut_epoch_counts_what_ran(prefetch: bool) -> None:
    from torch.utils.data import DataLoader

    from models.epochs import train_epoch

    loader: DataLoader[Any] = DataLoader(woven_tile_set(3), batch_size=4)  # 12 tiles, 3 batches
    context = FitContext(progress=False, prefetch=prefetch)
    seen: list[float] = []

    def step(progress: float, batch: Any) -> tuple[dict[str, float], dict[str, float]]:
        seen.append(progress)
        return {"loss": float(len(seen))}, {"lr": 0.1}

    totals = train_epoch(loader, context, step, 0, float("inf"), "test")
    assert totals.finished and totals.batches == 3 and seen == pytest.approx([0, 1 / 3, 2 / 3])
    assert totals.outcome().metrics == {"loss": 2.0, "lr": 0.1}  # type: ignore[union-attr]
    seen.clear()

    def slow_step(progress: float, batch: Any) -> tuple[dict[str, float], dict[str, float]]:
        seen.append(progress)
        time.sleep(0.3)
        return {"loss": float(len(seen))}, {}

    # the third batch would start after the stop time: two ran, their mean is reported
    cut = train_epoch(loader, context, slow_step, 0, time.monotonic() + 0.45, "test")
    assert not cut.finished and cut.batches == 2
    assert cut.outcome().metrics == {"loss": 1.5}  # type: ignore[union-attr]


def test_profiled_steps_report_their_parts() -> None:
    summary = tiny_draem(max_epochs=1).fit(
        woven_tile_set(2), FitContext(progress=False, batch_size=4, profile=True)
    )
    assert {"step_data_ms", "step_forward_ms", "step_backward_ms"} <= set(summary)
    assert all(summary[key] > 0 for key in ("step_forward_ms", "step_backward_ms"))


# ---- bundles ------------------------------------------------------------------------------------
def test_a_bundle_saved_from_a_moved_channels_last_model_is_plain_host_tensors(
    tmp_path: Path,
) -> None:
    """The path a GPU takes (the model moved by a runtime, channels-last weights) saves host
    tensors in the plain layout that load anywhere and score the same."""
    model = tiny_draem()
    runtime = Runtime(torch.device("cpu"), "32", channels_last=True)
    model.fit(woven_tile_set(2), FitContext(progress=False, batch_size=4, runtime=runtime))
    weight = model.reconstructive.head.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    manifest = Manifest(model_type="draem", config=model.config.model_dump(mode="json"),
                        pipeline=PipelineConfig(tile_size=32, stride=32),
                        calibration=CAL)  # fmt: skip
    save_bundle(tmp_path / "bundle", model, manifest)
    with safe_open(str(tmp_path / "bundle" / WEIGHTS), framework="pt", device="cpu") as stored:
        for key in stored.keys():  # noqa: SIM118 - safe_open has no iterator
            assert stored.get_tensor(key).is_contiguous()
    loaded, _ = load_bundle(tmp_path / "bundle")
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    tiles = woven_tile_set(1)[0][0][None]
    valid = torch.ones_like(tiles, dtype=torch.bool)
    assert torch.allclose(
        Runtime.cpu().predict(loaded, tiles, valid).anomaly_map,
        runtime.predict(model, tiles, valid).anomaly_map,
        atol=1e-5,
    )


# ---- the dynamic batcher ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def network() -> TorchNetwork:
    return TorchNetwork(tiny_draem())


def some_tiles(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tiles = rng.uniform(0.3, 0.6, (count, 1, 32, 32)).astype(np.float32)
    return tiles, np.ones(tiles.shape, bool)


def test_concurrent_callers_share_a_pass_and_get_their_own_results(network: TorchNetwork) -> None:
    batcher = BatchingNetwork(network, max_batch=16, max_wait_ms=500)
    inputs = [some_tiles(4, seed) for seed in range(4)]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    start = threading.Barrier(4)

    def call(index: int) -> None:
        start.wait()
        results[index] = batcher.run(*inputs[index])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    batcher.close()
    assert batcher.passes == 1 and batcher.tiles_run == 16
    for index, (tiles, valid) in enumerate(inputs):
        maps, scores = network.run(tiles, valid)
        assert np.allclose(results[index][0], maps, atol=1e-5)
        assert np.allclose(results[index][1], scores, atol=1e-5)


def test_a_large_call_is_split_into_passes_and_errors_reach_the_caller(
    network: TorchNetwork,
) -> None:
    batcher = BatchingNetwork(network, max_batch=8, max_wait_ms=0)
    tiles, valid = some_tiles(20, 7)
    maps, scores = batcher.run(tiles, valid)
    assert batcher.passes == 3 and maps.shape == (20, 32, 32) and scores.shape == (20,)
    assert np.allclose(maps, network.run(tiles, valid)[0], atol=1e-5)
    with pytest.raises(RuntimeError):  # a wrong shape fails in the pass, raised to its caller
        batcher.run(tiles[:, :, :5], valid)
    batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher.run(tiles, valid)


# ---- on a GPU -----------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_fit_in_bf16_and_the_bundle_scores_the_same_on_the_cpu(tmp_path: Path) -> None:
    runtime = Runtime.resolve("cuda", "bf16", channels_last=True)
    model = tiny_draem()
    model.fit(woven_tile_set(2), FitContext(progress=False, batch_size=4, runtime=runtime))
    assert next(model.parameters()).device.type == "cuda"
    manifest = Manifest(model_type="draem", config=model.config.model_dump(mode="json"),
                        pipeline=PipelineConfig(tile_size=32, stride=32),
                        calibration=CAL)  # fmt: skip
    save_bundle(tmp_path / "bundle", model, manifest)
    loaded, _ = load_bundle(tmp_path / "bundle")
    tiles = woven_tile_set(1)[0][0][None]
    valid = torch.ones_like(tiles, dtype=torch.bool)
    on_gpu = Runtime.resolve("cuda").predict(model, tiles, valid).anomaly_map
    on_cpu = Runtime.cpu().predict(loaded, tiles, valid).anomaly_map
    assert torch.allclose(on_gpu, on_cpu, atol=1e-2)  # cuDNN may convolve in TF32


@pytest.mark.cuda
@pytest.mark.parametrize("index", [0, 1, 2], ids=["draem", "vae", "patchcore"])
def test_cuda_scoring_matches_the_cpu(index: int) -> None:
    model = tiny_models()[index]
    tiles = woven_tile_set(1)[0][0][None].repeat(2, 1, 1, 1)
    valid = torch.ones_like(tiles, dtype=torch.bool)
    on_cpu = Runtime.cpu().predict(model, tiles, valid)
    runtime = Runtime.resolve("cuda")
    on_gpu = runtime.predict(runtime.prepare(model), tiles, valid)
    assert torch.allclose(on_cpu.anomaly_map, on_gpu.anomaly_map, atol=1e-2)  # TF32 convolutions
    assert torch.allclose(on_cpu.score, on_gpu.score, atol=1e-2)
