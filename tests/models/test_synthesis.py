from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from models.synthesis import (
    STRATEGIES,
    AnomalySynthesis,
    PerlinSynthesis,
    SynthesisConfig,
    SynthesisMix,
    TextileSynthesis,
    TextureBank,
    perlin_noise,
)
from tests.helpers import woven


def tile(seed: int = 0, size: int = 64) -> np.ndarray:
    return woven(size, size, seed=seed).astype(np.float32) / 255.0


def other_tiles() -> list[np.ndarray]:
    return [tile(seed) for seed in range(10, 14)]


def check_mask_matches_change(
    original: np.ndarray, augmented: np.ndarray, mask: np.ndarray
) -> None:
    assert augmented.dtype == np.float32 and augmented.shape == original.shape
    assert mask.dtype == bool and mask.shape == original.shape
    assert augmented.min() >= 0.0 and augmented.max() <= 1.0
    changed = augmented != original
    assert not (changed & ~mask).any()  # nothing changes outside the mask
    if mask.any():
        assert changed[mask].mean() > 0.95  # and (almost) everything inside it changes


@pytest.mark.parametrize("name", ["perlin", "textile", "weave", "spot"])
def test_each_strategy_yields_a_mask_that_matches_the_change(name: str) -> None:
    config = SynthesisConfig()
    strategy = STRATEGIES[name](config, TextureBank(other_tiles()))
    rng = np.random.default_rng(0)
    non_empty = 0
    for seed in range(30):
        original = tile(seed)
        augmented, mask = strategy(original.copy(), rng)
        check_mask_matches_change(original, augmented, mask)
        non_empty += bool(mask.any())
        assert mask.mean() < 0.9
    assert non_empty >= 25


def test_textile_defects_are_thin_lines_blobs_or_bands() -> None:
    strategy = TextileSynthesis(SynthesisConfig(), TextureBank())
    rng = np.random.default_rng(1)
    areas = []
    for seed in range(30):
        _, mask = strategy(tile(seed), rng)
        rows, cols = np.nonzero(mask)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert min(height, width) <= 17  # narrow across: a line, a blob or a band
        areas.append(mask.mean())
    assert min(areas) < 0.02 and max(areas) > 0.05  # small lines and blobs, wider bands


def test_perlin_noise_is_smooth_and_bounded() -> None:
    noise = perlin_noise((64, 48), (4, 3), np.random.default_rng(0))
    assert noise.shape == (64, 48) and np.abs(noise).max() <= 1.5
    assert np.abs(np.diff(noise, axis=0)).max() < 0.3  # smooth at 16 px per cell
    assert np.allclose(noise[::16, ::16], 0.0, atol=1e-6)  # zero at the lattice points


def test_texture_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for bank in (TextureBank(), TextureBank(other_tiles())):
        texture = bank.sample((64, 64), rng)
        assert texture.shape == (64, 64) and texture.dtype == np.float32
        assert texture.min() >= 0.0 and texture.max() <= 1.0 and texture.std() > 0
    cv2.imwrite(
        str(tmp_path / "small.png"), np.tile(np.arange(0, 256, 8).astype(np.uint8), (20, 1))
    )
    folder = TextureBank(folder=str(tmp_path))
    assert folder.sample((64, 80), rng).shape == (64, 80)  # resized up, then cropped
    with pytest.raises(FileNotFoundError):
        TextureBank(folder=str(tmp_path / "missing"))


def test_anomaly_free_share_is_respected() -> None:
    valid = np.ones((32, 32), bool)
    for share in (0.0, 0.3, 1.0):
        mix = SynthesisMix(SynthesisConfig(anomaly_free_share=share), other_tiles())
        rng = np.random.default_rng(2)
        clean = sum(not mix(tile(s, 32), valid, rng)[1].any() for s in range(300))
        assert abs(clean / 300 - share) < 0.07, (share, clean)


def test_the_mix_changes_fabric_only() -> None:
    mix = SynthesisMix(SynthesisConfig(anomaly_free_share=0.0), other_tiles())
    valid = np.zeros((64, 64), bool)
    valid[:, :40] = True
    rng = np.random.default_rng(3)
    for seed in range(20):
        original = tile(seed)
        augmented, mask = mix(original, valid, rng)
        check_mask_matches_change(original, augmented, mask)
        assert mask.any() and not mask[:, 40:].any()
        assert np.array_equal(augmented[:, 40:], original[:, 40:])
    assert not mix(tile(), np.zeros((64, 64), bool), rng)[1].any()


def test_a_new_strategy_is_one_class_and_a_config_entry() -> None:
    class Invert(AnomalySynthesis):
        name = "test_invert"

        def __call__(
            self, tile: np.ndarray, rng: np.random.Generator
        ) -> tuple[np.ndarray, np.ndarray]:
            mask = np.zeros(tile.shape, bool)
            mask[8:16, 8:16] = True
            return np.where(mask, 1.0 - tile, tile).astype(np.float32), mask

    try:
        config = SynthesisConfig(strategies={"test_invert": 1.0}, anomaly_free_share=0.0)
        original = tile()
        augmented, mask = SynthesisMix(config)(original, np.ones((64, 64), bool),
                                               np.random.default_rng(0))  # fmt: skip
        assert mask.sum() == 64 and np.allclose(augmented[8:16, 8:16], 1.0 - original[8:16, 8:16])
    finally:
        del STRATEGIES["test_invert"]


def test_config_rejects_unknown_strategies_and_bad_weights() -> None:
    with pytest.raises(ValidationError, match="unknown synthesis"):
        SynthesisConfig(strategies={"cutpaste": 1.0})
    with pytest.raises(ValidationError, match="positive sum"):
        SynthesisConfig(strategies={"perlin": 0.0})
    assert isinstance(
        SynthesisMix(SynthesisConfig(strategies={"perlin": 1.0})).strategies[0], PerlinSynthesis
    )


def test_weave_faults_are_faint_or_structural() -> None:
    """The weave strategy's defects change the grey a little (a faint yarn, a shifted band of
    the pattern, a pushed-aside patch), unlike textile's lines and blobs."""
    weave = STRATEGIES["weave"](SynthesisConfig(), TextureBank())
    textile = TextileSynthesis(SynthesisConfig(), TextureBank())
    rng = np.random.default_rng(2)

    def mean_change(strategy: AnomalySynthesis) -> float:
        changes = []
        for seed in range(40):
            original = tile(seed)
            augmented, mask = strategy(original.copy(), rng)
            if mask.any():
                changes.append(abs(float(augmented[mask].mean() - original[mask].mean())))
        return float(np.median(changes))

    assert mean_change(weave) < 0.5 * mean_change(textile)


def test_spots_are_fuzzyball_sized_and_faint() -> None:
    """The spot strategy's defects: 9-50 px (AITEX fabric 02's fuzzy balls), 0.12-0.2 of the
    grey range off the weave at their centre, mostly darker."""
    spot = STRATEGIES["spot"](SynthesisConfig(), TextureBank())
    rng = np.random.default_rng(2)
    areas, changes, darker = [], [], 0
    for seed in range(40):
        original = tile(seed)
        augmented, mask = spot(original.copy(), rng)
        check_mask_matches_change(original, augmented, mask)
        areas.append(int(mask.sum()))
        change = augmented[mask] - original[mask]
        changes.append(float(np.abs(change).max()))
        darker += bool(change.mean() < 0)
    assert min(areas) >= 9 and max(areas) <= 80
    assert min(changes) >= 0.08 and max(changes) <= 0.2 + 1e-6
    assert 25 <= darker < 40
