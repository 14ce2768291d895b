from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models.base import AnomalyModel, EpochLog, FitContext
from models.bundle import Manifest, PipelineConfig, load_bundle, save_bundle
from models.calibration import Calibration
from models.components import reconstruction_figure
from models.pipeline import Detector
from models.registry import model_class
from models.vae import VAE, VAEConfig, image_scores, kl_weight
from tests.helpers import same_state, woven, woven_tile, woven_tile_set

TINY: dict[str, object] = {
    "base_channels": 8,
    "max_channels": 32,
    "depth": 3,
    "latent_channels": 4,
    "kl_warmup_epochs": 2,
    "lr": 3e-3,
    "smoothing_sigma": 2.0,
    "topk": 20,
}
CAL = Calibration(image_threshold=2.0, image_min=1.0, image_max=4.0, pixel_threshold=2.0,
                  pixel_min=0.0, pixel_max=5.0, method="test")  # fmt: skip


def tiny(**changes: object) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig.model_validate({**TINY, **changes}))


def fit_logged(
    model: VAE,
    validate: Callable[[AnomalyModel], float] | None = None,
    deadline: float | None = None,
) -> tuple[dict[str, float], list[EpochLog]]:
    logs: list[EpochLog] = []
    context = FitContext(deadline=deadline, callback=logs.append, validate=validate,
                         progress=False, batch_size=4)  # fmt: skip
    return model.fit(woven_tile_set(4), context), logs


@pytest.fixture(scope="module")
def fitted(one_thread: None) -> VAE:
    model = tiny(max_epochs=6)
    fit_logged(model)
    return model


def test_registry_builds_the_vae_from_its_config() -> None:
    assert model_class("vae") is VAE
    with pytest.raises(ValueError, match="latent"):
        VAEConfig.model_validate({"latent": 3})


def test_kl_weight_rises_linearly_during_warm_up() -> None:
    config = VAEConfig(beta=2.0, kl_warmup_epochs=4)
    assert [kl_weight(config, e) for e in (0, 1, 2, 4, 9)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert kl_weight(VAEConfig(beta=0.5, kl_warmup_epochs=0), 0) == 0.5


def test_elbo_decreases_on_synthetic_fabric() -> None:
    _, logs = fit_logged(tiny(max_epochs=4, kl_warmup_epochs=0))
    losses = [log.metrics["neg_elbo"] for log in logs]
    assert losses[-1] < 0.9 * losses[0], losses


def test_callback_gets_one_log_per_epoch_and_lowest_loss_is_kept() -> None:
    model = tiny(max_epochs=3)
    summary, logs = fit_logged(model)
    assert [log.epoch for log in logs] == [0, 1, 2]
    assert all({"loss", "recon", "kl", "beta", "neg_elbo"} <= log.metrics.keys() for log in logs)
    assert all("val_score" not in log.metrics and log.seconds > 0 for log in logs)
    betas = [log.metrics["beta"] for log in logs]
    assert betas == sorted(betas) and betas[0] < 1.0 and betas[-1] == 1.0  # warm-up over 2
    best = min(range(3), key=lambda epoch: logs[epoch].metrics["neg_elbo"])
    assert summary["best_epoch"] == best and summary["epochs"] == 3


def test_validate_chooses_the_state_that_is_restored() -> None:
    model = tiny(max_epochs=4)
    snapshots: list[dict[str, torch.Tensor]] = []

    def validate(candidate: AnomalyModel) -> float:
        snapshots.append({k: v.clone() for k, v in candidate.state_dict().items()})
        return [0.2, 0.9, 0.1, 0.3][len(snapshots) - 1]

    summary, logs = fit_logged(model, validate=validate)
    assert summary["best_epoch"] == 1 and len(snapshots) == 4
    assert [log.metrics["val_score"] for log in logs] == [0.2, 0.9, 0.1, 0.3]
    assert same_state(model, snapshots[1]) and not same_state(model, snapshots[-1])


def test_fit_returns_by_a_real_deadline() -> None:
    started = time.monotonic()
    summary, _ = fit_logged(tiny(max_epochs=200), deadline=started + 0.5)  # ~10 s without it
    assert time.monotonic() - started < 1.5  # one batch past the deadline at most
    assert summary["stopped_at_deadline"] == 1.0 and summary["epochs"] < 200


def test_fit_past_the_deadline_leaves_the_model_untouched() -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary, logs = fit_logged(model, deadline=time.monotonic() - 1.0)
    assert logs == [] and summary["epochs"] == 0 and summary["best_epoch"] == -1
    assert same_state(model, before)


def test_scoring_is_deterministic(fitted: VAE) -> None:
    tiles = torch.cat([woven_tile(1), woven_tile(2)])
    valid = torch.ones_like(tiles, dtype=torch.bool)
    first, second = fitted.predict(tiles, valid), fitted.predict(tiles, valid)
    assert first.anomaly_map.shape == (2, 64, 64) and first.score.shape == (2,)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    assert torch.equal(first.score, second.score)
    assert torch.equal(fitted.reconstruct(tiles), fitted.reconstruct(tiles))


def test_bundle_round_trip_gives_identical_maps(fitted: VAE, tmp_path: Path) -> None:
    manifest = Manifest(model_type="vae", config=fitted.config.model_dump(), calibration=CAL,
                        pipeline=PipelineConfig(tile_size=64, stride=64))  # fmt: skip
    path = save_bundle(tmp_path / "bundle", fitted, manifest)
    loaded, _ = load_bundle(path)
    assert isinstance(loaded, VAE)
    image = woven(64, 200, seed=11)  # three overlapping tiles
    a, b = Detector(fitted, manifest).analyse(image), Detector.from_bundle(path).analyse(image)
    assert np.array_equal(a.anomaly_map, b.anomaly_map) and a.score == b.score


def test_invalid_pixels_never_drive_the_score(fitted: VAE) -> None:
    valid = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    valid[..., :, 40:] = False
    white, dark = woven_tile(5), woven_tile(5)
    white[..., :, 40:] = 1.0  # padding beside the fabric
    dark[..., :, 40:] = 0.0
    a, b = fitted.predict(white, valid), fitted.predict(dark, valid)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.score, b.score)
    assert (a.anomaly_map[0, :, 40:] == 0).all()
    assert fitted.predict(white, torch.zeros_like(valid)).score.item() == 0.0


def test_image_scores_use_only_valid_pixels() -> None:
    maps = torch.tensor([[[1.0, 2.0], [3.0, 9.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    assert image_scores(maps, valid, "max", 2).item() == 3.0
    assert image_scores(maps, valid, "topk_mean", 2).item() == 2.5
    assert image_scores(maps, valid, "topk_mean", 10).item() == 2.0


def test_dark_line_scores_higher_than_clean_fabric(fitted: VAE) -> None:
    clean = woven_tile(9)
    defect = clean.clone()
    defect[..., 28:36, 20:44] = 0.05  # a dark broken-yarn-like line
    valid = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    out = fitted.predict(torch.cat([clean, defect]), valid)
    assert out.score[1] > 1.5 * out.score[0]
    assert out.anomaly_map[1, 28:36, 20:44].mean() > 2 * out.anomaly_map[1, :8, :8].mean()


def test_tiles_of_any_size_are_scored(fitted: VAE) -> None:
    tiles = torch.rand(1, 1, 60, 52)
    out = fitted.predict(tiles, torch.ones_like(tiles, dtype=torch.bool))
    assert out.anomaly_map.shape == (1, 60, 52)
    assert fitted.reconstruct(tiles).shape == tiles.shape


def test_reconstruction_figure_shows_each_tile_in_a_row(fitted: VAE) -> None:
    tiles = torch.cat([woven_tile(1), woven_tile(2)])
    figure = reconstruction_figure(fitted, tiles, torch.ones_like(tiles, dtype=torch.bool))
    assert figure.dtype == np.uint8 and figure.shape == (2 * 64 + 4, 3 * 64 + 2 * 4, 3)
