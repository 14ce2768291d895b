from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from bench.ensemble_members import member_bundle
from models.base import AnomalyModel, EpochLog, FitContext
from models.bundle import Manifest, PipelineConfig, load_bundle, save_bundle
from models.calibration import Calibration
from models.draem import Draem, DraemConfig, focal_loss, pooled_max_scores, scheduled_lr
from models.pipeline import Detector
from models.registry import model_class
from models.synthesis import SynthesisMix
from tests.helpers import same_state, woven, woven_tile, woven_tile_set

ROOT = Path(__file__).resolve().parents[2]
TINY: dict[str, object] = {
    "recon_channels": 8,
    "disc_channels": 8,
    "recon_depth": 3,
    "disc_depth": 3,
    "lr": 3e-3,
    "score_pool": 5,
    "crop_size": 0,  # whole tiles, none skewed, validation each epoch, unless a test asks
    "augment_share": 0.0,
    "validate_every": 1,
    "select_from": 0.0,  # every scored state may be kept, unless a test asks
}
CAL = Calibration(image_threshold=0.5, image_min=0.0, image_max=1.0, pixel_threshold=0.5,
                  pixel_min=0.0, pixel_max=1.0, method="test")  # fmt: skip


def tiny(**changes: object) -> Draem:
    torch.manual_seed(0)
    return Draem(DraemConfig.model_validate({**TINY, **changes}))


def context(logs: list[EpochLog], **changes: Any) -> FitContext:
    return FitContext(callback=logs.append, progress=False, batch_size=4, **changes)


@pytest.fixture(scope="module")
def fitted(one_thread: None) -> Draem:
    model = tiny(max_epochs=2)
    model.fit(woven_tile_set(2), context([]))
    return model


def test_registry_and_config() -> None:
    assert model_class("draem") is Draem
    with pytest.raises(ValidationError):
        DraemConfig.model_validate({"width": 3})
    with pytest.raises(ValidationError):
        DraemConfig.model_validate({"synthesis": {"strategies": {"nope": 1.0}}})


def test_presets_are_valid_configs() -> None:
    paper = yaml.safe_load((ROOT / "training/configs/draem-paper.yaml").read_text())
    config = DraemConfig.model_validate(paper["model"])
    assert (config.recon_channels, config.disc_channels, config.lr) == (128, 64, 1e-4)
    assert (config.max_epochs, config.lr_steps, config.lr_gamma) == (700, [0.8, 0.9], 0.2)
    assert paper["pipeline"]["tile_size"] == 256 and paper["pipeline"]["batch_size"] == 8
    assert (config.crop_size, config.augment_share) == (0, 0.0)
    cpu = yaml.safe_load((ROOT / "training/configs/draem-cpu.yaml").read_text())
    assert DraemConfig.model_validate(cpu["model"]) == DraemConfig()  # the preset is the default


def test_focal_loss_by_hand() -> None:
    # Logits (0, ln 3): p(anomaly) = 3/4. A true anomaly: p_t = 3/4, loss (1/4)² * -ln(3/4);
    # true fabric: p_t = 1/4, loss (3/4)² * -ln(1/4).
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).repeat(1, 1, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]]]])
    anomaly, fabric = 0.0625 * -math.log(0.75), 0.5625 * -math.log(0.25)
    assert focal_loss(logits, target, 2.0).item() == pytest.approx((anomaly + fabric) / 2, 1e-6)
    weight = torch.tensor([[[[1.0, 0.0]]]])
    assert focal_loss(logits, target, 2.0, weight).item() == pytest.approx(anomaly, 1e-6)
    cross_entropy = torch.nn.functional.cross_entropy(logits, target[:, 0].long())
    assert focal_loss(logits, target, 0.0).item() == pytest.approx(cross_entropy.item(), 1e-6)


def test_pooled_max_score_by_hand() -> None:
    maps = torch.zeros(1, 1, 8, 8)
    maps[..., 4, 4] = 9.0
    weight = torch.ones_like(maps)
    assert pooled_max_scores(maps, weight, 3).item() == pytest.approx(1.0)  # 9 / 9 pixels
    assert pooled_max_scores(maps, weight, 1).item() == pytest.approx(9.0)
    assert pooled_max_scores(maps, torch.zeros_like(maps), 3).item() == 0.0


def test_networks_keep_the_tile_size() -> None:
    model = tiny()
    x = torch.rand(2, 1, 60, 52)
    reconstruction, logits = model._forward(x)
    assert reconstruction.shape == (2, 1, 60, 52) and logits.shape == (2, 2, 60, 52)


def test_training_steps_lower_the_loss() -> None:
    model = tiny()
    loader = torch.utils.data.DataLoader(woven_tile_set(2), batch_size=8)
    tiles, valid = next(iter(loader))
    mix = SynthesisMix(model.config.synthesis.model_copy(update={"anomaly_free_share": 0.0}))
    augmented, masks = model.synthesise(tiles, valid, mix, np.random.default_rng(0))
    assert (masks.flatten(1).sum(1) > 0).all()
    assert torch.equal(augmented != tiles, masks > 0)  # the mask is where the tile changed
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, parts = model.loss(tiles, augmented, masks, valid)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(parts)
    assert losses[-1]["loss"] < 0.9 * losses[0]["loss"], losses
    assert losses[-1]["l2"] < losses[0]["l2"] and losses[-1]["focal"] < losses[0]["focal"]


def test_fit_logs_each_epoch_and_keeps_the_lowest_loss() -> None:
    model = tiny(max_epochs=3, lr_steps=[0.5])
    logs: list[EpochLog] = []
    summary = model.fit(woven_tile_set(2), context(logs))
    assert [log.epoch for log in logs] == [0, 1, 2]
    assert all({"loss", "l2", "ssim_loss", "focal", "lr"} <= log.metrics.keys() for log in logs)
    assert [log.metrics["lr"] for log in logs] == pytest.approx([3e-3, 6e-4, 6e-4])
    best = min(range(3), key=lambda epoch: logs[epoch].metrics["loss"])
    assert summary["best_epoch"] == best and summary["epochs"] == 3


def test_validate_chooses_the_state_that_is_restored() -> None:
    model = tiny(max_epochs=3)
    snapshots: list[dict[str, torch.Tensor]] = []

    def validate(candidate: AnomalyModel) -> float:
        snapshots.append({k: v.clone() for k, v in candidate.state_dict().items()})
        return [0.2, 0.9, 0.1][len(snapshots) - 1]

    logs: list[EpochLog] = []
    summary = model.fit(woven_tile_set(2), context(logs, validate=validate))
    assert summary["best_epoch"] == 1 and [log.metrics["val_score"] for log in logs] == [
        0.2,
        0.9,
        0.1,
    ]
    assert same_state(model, snapshots[1]) and not same_state(model, snapshots[-1])


def test_validate_every_scores_first_every_nth_and_last_epoch() -> None:
    model = tiny(max_epochs=5, validate_every=2)
    logs: list[EpochLog] = []
    scores = iter([0.3, 0.5, 0.4, 0.1])
    summary = model.fit(woven_tile_set(2), context(logs, validate=lambda _: next(scores)))
    scored = [log.epoch for log in logs if "val_score" in log.metrics]
    assert scored == [0, 2, 4] and summary["best_epoch"] == 2 and len(logs) == 5


def test_by_default_only_states_from_the_first_learning_rate_step_are_kept() -> None:
    assert DraemConfig().select_from == 0.8 == DraemConfig().lr_steps[0]
    model = tiny(max_epochs=5, select_from=0.8)
    logs: list[EpochLog] = []
    scores = iter([0.9, 0.5, 0.4])  # validation likes the untrained state best
    summary = model.fit(woven_tile_set(2), context(logs, validate=lambda _: next(scores)))
    scored = [log.epoch for log in logs if "val_score" in log.metrics]
    assert scored == [0, 3, 4] and summary["best_epoch"] == 3 and summary["select_from"] == 0.8


def test_vary_crops_and_skews_training_tiles() -> None:
    tiles = torch.cat([woven_tile(1), woven_tile(2), woven_tile(3)])
    valid = torch.ones_like(tiles, dtype=torch.bool)
    valid[..., :10] = False
    before, before_valid = tiles.clone(), valid.clone()
    generator = torch.Generator().manual_seed(0)
    same, same_valid = tiny().vary(tiles, valid, generator)
    assert same is tiles and same_valid is valid  # nothing asked: the batch as it is
    cropped, cropped_valid = tiny(crop_size=24).vary(tiles, valid, generator)
    assert cropped.shape == (3, 1, 24, 24) and cropped_valid.shape == (3, 1, 24, 24)
    windows = tiles.unfold(2, 24, 1).unfold(3, 24, 1)  # every 24 x 24 window of each tile
    for index in range(3):
        found = (windows[index, 0] == cropped[index, 0]).flatten(2).all(-1)
        assert found.any()  # each crop is a window of its own tile
    skewed, skewed_valid = tiny(augment_share=1.0, augment={"shear": 0.5}).vary(
        tiles, valid, generator
    )
    assert skewed.shape == tiles.shape and not torch.equal(skewed, tiles)
    assert not torch.equal(skewed_valid, valid)  # the fabric mask moves with the weave
    assert torch.equal(tiles, before) and torch.equal(valid, before_valid)  # not in place


def test_crops_pinned_to_the_edges_train_the_tile_borders() -> None:
    """Row coverage of 128 px crops of a 256 px tile: uniform origins hold the tile's first row
    in ~1/129 of crops; with ``crop_edge_share`` 0.5 in about a quarter, and no row in more than
    about three quarters."""
    count, size, last = 4000, 128, 128

    def coverage(share: float) -> torch.Tensor:
        model = tiny(crop_size=size, crop_edge_share=share)
        origins = torch.tensor(model._crop_origins(count, last, torch.Generator().manual_seed(1)))
        rows = torch.arange(size + last)
        return ((rows >= origins[:, None]) & (rows < origins[:, None] + size)).float().mean(0)

    uniform, pinned = coverage(0.0), coverage(0.5)
    assert uniform[0] < 0.03 and uniform[-1] < 0.03 and uniform[size - 1 : size + 1].min() > 0.97
    assert 0.2 < pinned[0] < 0.3 and 0.2 < pinned[-1] < 0.3 and pinned.max() < 0.8
    assert coverage(1.0)[0] == pytest.approx(0.5, abs=0.05)  # every row half the time
    with pytest.raises(ValidationError):
        DraemConfig(crop_edge_share=1.5)


def test_learning_rate_steps_by_epochs_or_by_the_time_budget() -> None:
    config = DraemConfig(lr=1e-3, lr_steps=[0.8, 0.9], lr_gamma=0.2)
    lrs = [scheduled_lr(config, p) for p in (0.0, 0.79, 0.8, 0.95)]
    assert lrs == pytest.approx([1e-3, 1e-3, 2e-4, 4e-5])
    model = tiny(max_epochs=2, lr_steps=[0.8, 0.9])
    logs: list[EpochLog] = []
    # 92 % of a 1000 s budget already spent: both steps passed, whatever the epoch count says.
    spent = context(logs, deadline=time.monotonic() + 80.0, budget_seconds=1000.0)
    model.fit(woven_tile_set(2), spent)
    assert [log.metrics["lr"] for log in logs] == pytest.approx([3e-3 * 0.2**2] * 2)


def test_fit_past_the_deadline_leaves_the_model_untouched() -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logs: list[EpochLog] = []
    summary = model.fit(woven_tile_set(2), context(logs, deadline=time.monotonic() - 1.0))
    assert logs == [] and summary["epochs"] == 0 and summary["stopped_at_deadline"] == 1.0
    assert same_state(model, before)


def test_scoring_is_deterministic_and_bounded(fitted: Draem) -> None:
    tiles = torch.cat([woven_tile(1), woven_tile(2)])
    valid = torch.ones_like(tiles, dtype=torch.bool)
    first, second = fitted.predict(tiles, valid), fitted.predict(tiles, valid)
    assert first.anomaly_map.shape == (2, 64, 64) and first.score.shape == (2,)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    assert ((first.anomaly_map >= 0) & (first.anomaly_map <= 1)).all()
    assert fitted.reconstruct(tiles).shape == tiles.shape


def test_bundle_round_trip_gives_identical_maps(fitted: Draem, tmp_path: Path) -> None:
    manifest = Manifest(model_type="draem", config=fitted.config.model_dump(), calibration=CAL,
                        pipeline=PipelineConfig(tile_size=64, stride=64))  # fmt: skip
    path = save_bundle(tmp_path / "bundle", fitted, manifest)
    loaded, _ = load_bundle(path)
    assert isinstance(loaded, Draem) and loaded.config == fitted.config
    image = woven(64, 200, seed=11)  # three overlapping tiles
    a, b = Detector(fitted, manifest).analyse(image), Detector.from_bundle(path).analyse(image)
    assert np.array_equal(a.anomaly_map, b.anomaly_map) and a.score == b.score


def test_padding_never_drives_the_score(fitted: Draem) -> None:
    valid = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    valid[..., :, 40:] = False
    white, dark = woven_tile(5), woven_tile(5)
    white[..., :, 40:] = 1.0
    dark[..., :, 40:] = 0.0
    a, b = fitted.predict(white, valid), fitted.predict(dark, valid)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.score, b.score)
    assert (a.anomaly_map[0, :, 40:] == 0).all()
    assert fitted.predict(white, torch.zeros_like(valid)).score.item() == 0.0


def test_members_train_in_turn_keep_their_own_states_and_average_their_maps(
    tmp_path: Path,
) -> None:
    model = tiny(max_epochs=2, members=2)
    assert len(model.others) == 1 and all(
        k.startswith("others.0.") for k in set(model.state_dict()) - set(tiny().state_dict())
    )
    scored: list[tuple[AnomalyModel, bool]] = []
    criteria = iter([0.1, 0.9, 0.8, 0.2])  # member 1 keeps epoch 1, member 2 epoch 0

    def validate(candidate: AnomalyModel) -> float:
        scored.append((candidate, getattr(candidate, "_alone", False)))
        return next(criteria)

    summary = model.fit(woven_tile_set(2), context([], validate=validate))
    # each member is scored on its own: the first alone (not averaged with an untrained one)
    assert [c is model for c, _ in scored] == [True, True, False, False]
    assert all(alone for c, alone in scored if c is model)
    assert scored[2][0] is model.others[0] and not model._alone
    assert summary["members"] == 2 and summary["epochs"] == 4
    assert summary["member1_best_epoch"] == 1 and summary["member2_best_epoch"] == 0
    assert not same_state(model.others[0], {
        k.removeprefix("others.0."): v for k, v in tiny().state_dict().items()
        if not k.startswith("others.")})  # fmt: skip
    tiles = torch.cat([woven_tile(1), woven_tile(2)])
    valid = torch.ones_like(tiles, dtype=torch.bool)
    output = model.predict(tiles, valid)
    x = model._normalise(tiles, valid).x
    expected = (model._anomaly(x) + model.others[0]._anomaly(x)) / 2  # type: ignore[operator]
    assert torch.allclose(output.anomaly_map, expected[:, 0], atol=1e-6)
    assert not torch.allclose(model._anomaly(x), expected, atol=1e-4)  # the members differ
    manifest = Manifest(model_type="draem", config=model.config.model_dump(), calibration=CAL,
                        pipeline=PipelineConfig(tile_size=64, stride=64))  # fmt: skip
    loaded, _ = load_bundle(save_bundle(tmp_path / "bundle", model, manifest))
    assert torch.equal(loaded.predict(tiles, valid).anomaly_map, output.anomaly_map)


def test_members_share_the_time_budget_evenly() -> None:
    model = tiny(max_epochs=10_000, members=2)
    started = time.monotonic()
    summary = model.fit(woven_tile_set(2), context([], deadline=started + 4.0, budget_seconds=4.0))
    assert time.monotonic() - started < 6.0
    first, second = summary["member1_fit_seconds"], summary["member2_fit_seconds"]
    assert 1.0 < first < 3.0 and 1.0 < second < 3.0


def test_one_member_of_an_ensemble_bundle_is_a_bundle_of_its_own(tmp_path: Path) -> None:
    model = tiny(max_epochs=1, members=2)
    model.fit(woven_tile_set(2), context([]))
    manifest = Manifest(model_type="draem", config=model.config.model_dump(), calibration=CAL,
                        pipeline=PipelineConfig(tile_size=64, stride=64))  # fmt: skip
    ensemble = save_bundle(tmp_path / "ensemble", model, manifest)
    tiles, valid = woven_tile(3), torch.ones(1, 1, 64, 64, dtype=torch.bool)
    x = model._normalise(tiles, valid).x
    for number, network in [(1, model), (2, model.others[0])]:
        loaded, saved = load_bundle(member_bundle(ensemble, number, tmp_path / f"m{number}"))
        assert isinstance(loaded, Draem) and not loaded.others and saved.config["members"] == 1
        expected = network._anomaly(x)[:, 0]  # type: ignore[operator]
        assert torch.allclose(loaded.predict(tiles, valid).anomaly_map, expected, atol=1e-6)
    with pytest.raises(SystemExit, match=r"1\.\.2"):
        member_bundle(ensemble, 3, tmp_path / "m3")
