"""The reconstruction parts the VAE and DRAEM share (models/components.py), checked against their
definitions on seeded inputs."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.base import ReportPanel
from models.components import (
    Reconstructor,
    normalise,
    pad_to_multiple,
    reconstruction_figure,
    smooth_on_fabric,
    ssim_map,
)
from models.draem import Draem, DraemConfig
from models.filters import gaussian_kernel
from models.vae import VAE, VAEConfig
from tests.helpers import woven_tile


def seeded(seed: int, shape: tuple[int, ...] = (2, 1, 24, 20)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_ssim_of_identical_images_is_one_and_hand_checked_case() -> None:
    noise = seeded(0, (2, 1, 32, 32))
    assert torch.allclose(ssim_map(noise, noise), torch.ones_like(noise), atol=1e-5)
    # Flat images: only the luminance term is left, (2ab + c1) / (a² + b² + c1) with c1 = 1e-4.
    flat = ssim_map(torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), 0.25))
    assert torch.allclose(flat, torch.full_like(flat, 0.2501 / 0.3126), atol=1e-5)
    other = seeded(1, (2, 1, 32, 32))
    assert ssim_map(noise, other).mean() < 0.5
    assert torch.allclose(ssim_map(noise, other), ssim_map(other, noise))


@pytest.mark.parametrize(("sigma", "data_range"), [(1.5, 1.0), (1.0, 2.0)])
def test_ssim_inside_the_image_is_wang_et_al_with_a_gaussian_window(
    sigma: float, data_range: float
) -> None:
    a, b = seeded(2, (1, 1, 24, 24)).double(), seeded(3, (1, 1, 24, 24)).double()
    got = ssim_map(a, b, sigma, data_range)[0, 0]
    kernel = gaussian_kernel(sigma).double()
    window = torch.outer(kernel, kernel)  # weights summing to 1
    radius = kernel.numel() // 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    for y, x in [(radius, radius), (12, 9), (23 - radius, 23 - radius)]:
        patch = (slice(y - radius, y + radius + 1), slice(x - radius, x + radius + 1))
        pa, pb = a[0, 0][patch], b[0, 0][patch]
        mu_a, mu_b = (window * pa).sum(), (window * pb).sum()
        var_a = (window * (pa - mu_a) ** 2).sum()
        var_b = (window * (pb - mu_b) ** 2).sum()
        cov = (window * (pa - mu_a) * (pb - mu_b)).sum()
        expected = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
            (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
        )
        assert got[y, x].item() == pytest.approx(expected.item(), abs=1e-6)


def lower_median(values: np.ndarray) -> float:
    ordered = np.sort(values)
    return float(ordered[(ordered.size - 1) // 2])


def test_normalise_uses_the_median_and_mad_of_fabric_pixels_and_fills_padding() -> None:
    tiles = seeded(4, (2, 1, 9, 7))
    valid = torch.ones_like(tiles, dtype=torch.bool)
    valid[0, 0, :, :3] = False  # padding on the left of the first tile
    valid[1, 0, 4:, :] = False
    tiles[0, 0, :, :3] = 1.0  # white padding must not move the statistics
    out = normalise(tiles, valid, per_tile=True)
    for item in range(2):
        pixels = tiles[item, 0].numpy().astype(np.float64)
        fabric = valid[item, 0].numpy()
        centre = lower_median(pixels[fabric])
        spread = max(1.4826 * lower_median(np.abs(pixels[fabric] - centre)), 0.01)
        expected = np.where(fabric, (pixels - centre) / spread, 0.0)
        assert out.centre[item].item() == pytest.approx(centre, abs=1e-7)
        assert out.spread[item].item() == pytest.approx(spread, rel=1e-6)
        assert np.allclose(out.x[item, 0].numpy(), expected, atol=1e-5)
        assert np.array_equal(out.weight[item, 0].numpy(), fabric.astype(np.float32))
    back = out.to_input_space(out.x)
    assert torch.allclose(back[valid], tiles[valid], atol=1e-6)


def test_a_large_defect_does_not_rescale_the_fabric_around_it() -> None:
    clean = woven_tile(4)
    defect = clean.clone()
    defect[..., 28:32, 8:56] = 0.02  # 5% of the tile, far darker than the fabric
    a, b = normalise(clean, None, True).x, normalise(defect, None, True).x
    assert torch.allclose(a[..., :20, :], b[..., :20, :], atol=0.25)  # mean/std: 2.0 apart
    assert b[..., 30, 30].item() < -5.0


def test_normalise_without_per_tile_only_fills_padding_and_a_flat_tile_keeps_a_floor() -> None:
    tiles = seeded(5, (1, 1, 8, 8))
    valid = torch.ones_like(tiles, dtype=torch.bool)
    valid[..., :2] = False
    out = normalise(tiles, valid, per_tile=False)
    centre = lower_median(tiles[valid].numpy())
    assert torch.equal(out.x[valid], tiles[valid])
    assert torch.allclose(out.x[~valid], torch.full((16,), centre))
    assert out.centre.item() == 0.0 and out.spread.item() == 1.0
    flat = normalise(torch.full((1, 1, 8, 8), 0.4), None, per_tile=True)
    assert flat.spread.item() == pytest.approx(0.01) and torch.allclose(flat.x, torch.zeros(1))


def test_pad_to_multiple_replicates_the_last_row_and_column() -> None:
    x = seeded(6, (1, 1, 5, 6))
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 1, 8, 8)
    assert torch.equal(padded[..., :5, :6], x)
    assert torch.equal(padded[..., 7, :6], x[..., 4, :])
    assert torch.equal(padded[..., 2, 7], x[..., 2, 5])
    assert torch.equal(pad_to_multiple(x[..., :4, :4], 4), x[..., :4, :4])


def test_smoothing_averages_over_fabric_only() -> None:
    weight = torch.ones(1, 1, 16, 16)
    weight[..., :, :5] = 0.0
    constant = torch.where(weight > 0, torch.tensor(2.0), torch.tensor(50.0))
    smoothed = smooth_on_fabric(constant, weight, 2.0)
    # Normalised convolution: a constant on fabric stays that constant up to the padding.
    assert torch.allclose(smoothed[weight > 0], torch.full((16 * 11,), 2.0), atol=1e-5)
    assert torch.equal(smoothed[weight == 0], torch.zeros(16 * 5))
    error = seeded(7, (1, 1, 16, 16))
    assert torch.equal(smooth_on_fabric(error, weight, 0.0), error * weight)


def tiny_reconstructor(kind: str) -> Reconstructor:
    torch.manual_seed(0)
    if kind == "vae":
        return VAE(VAEConfig(base_channels=8, max_channels=16, depth=3, latent_channels=4))
    return Draem(DraemConfig(recon_channels=8, disc_channels=8, recon_depth=3, disc_depth=3))


@pytest.mark.parametrize(("kind", "title"), [("vae", "error map"), ("draem", "anomaly map")])
def test_reconstruction_models_offer_a_reconstruction_panel(kind: str, title: str) -> None:
    model = tiny_reconstructor(kind)
    model.eval()
    tiles = torch.cat([woven_tile(1), woven_tile(2)])
    valid = torch.ones_like(tiles, dtype=torch.bool)
    valid[1, 0, :, :10] = False
    panels = model.report_panels(tiles, valid)
    assert [panel.title for panel in panels] == [f"Input | reconstruction | {title}"]
    assert isinstance(panels[0], ReportPanel)
    assert np.array_equal(panels[0].image, reconstruction_figure(model, tiles, valid))
    assert panels[0].image.shape == (2 * 64 + 4, 3 * 64 + 2 * 4, 3)
    assert (panels[0].image[64 + 4 :, 2 * 64 + 8 : 2 * 64 + 18] == 128).all()  # padding is grey
    reconstruction = model.reconstruct(tiles, valid)
    assert reconstruction.shape == tiles.shape
    assert reconstruction.min().item() >= 0.0 and reconstruction.max().item() <= 1.0
    assert not math.isnan(reconstruction.sum().item())


def test_neither_reconstruction_model_imports_the_other() -> None:
    root = Path(__file__).resolve().parents[2] / "models"
    for name, other in (("draem", "models.vae"), ("vae", "models.draem")):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        assert "models.components" in imported and other not in imported, name
