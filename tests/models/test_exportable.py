"""The VAE's and PatchCore's predict have no loop over tiles and no data-dependent size, so that
they export to ONNX (torch dynamo exporter, opset 18, dynamic batch): the same scores as the
straightforward per-tile definitions written here, and the same maps and scores from ONNX
Runtime as from PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.base import AnomalyModel, FitContext
from models.patchcore import PatchCore, PatchCoreConfig, nearest_distances
from models.tile_dataset import TileDataset
from models.vae import VAE, VAEConfig, image_scores
from tests.helpers import TINY_PATCHCORE, woven

SMALL_VAE: dict[str, object] = {
    "base_channels": 8,
    "max_channels": 32,
    "depth": 3,
    "latent_channels": 4,
    "smoothing_sigma": 2.0,
    "topk": 20,
}


def fabric_tiles() -> tuple[torch.Tensor, torch.Tensor]:
    """Six 64 px tiles [6,1,64,64] in [0,1] and their fabric masks (bool): clean weave, a dark
    line, fabric on the left 40 columns only, no fabric, fabric in a 16 px corner (fewer pixels
    than most top-k, four 8 px patches), and fabric in 3 x 3 pixels (no whole patch)."""
    tiles = torch.stack(
        [torch.from_numpy(woven(64, 64, seed=s)).float()[None] / 255 for s in range(6)]
    )
    tiles[1, :, 28:36, 20:44] = 0.05
    valid = torch.ones_like(tiles, dtype=torch.bool)
    tiles[2, :, :, 40:] = 1.0
    valid[2, :, :, 40:] = False
    valid[3] = False
    valid[4] = False
    valid[4, :, :16, :16] = True
    valid[5] = False
    valid[5, :, 30:33, 30:33] = True
    return tiles, valid


# ---- per-tile references ----------------------------------------------------------------------
def reference_image_scores(
    maps: torch.Tensor, valid: torch.Tensor, mode: str, topk: int
) -> torch.Tensor:
    scores = torch.zeros(maps.shape[0])
    for item in range(maps.shape[0]):
        values = maps[item][valid[item]]
        if values.numel() == 0:
            continue
        if mode == "max":
            scores[item] = values.max()
        else:
            scores[item] = values.topk(min(topk, values.numel())).values.mean()
    return scores


def reference_patchcore_scores(
    model: PatchCore, tiles: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Paper eq. 7 tile by tile: the top patch on fabric, reweighted by how isolated its nearest
    bank entry is among that entry's nearest neighbours in the bank; 0 without such a patch."""
    bank = model.memory_bank
    features = model.embed(tiles, valid)
    batch, dim, height, width = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, dim)
    distances, nearest = nearest_distances(flat, bank, model.config.chunk_size)
    patch_valid = model.patch_validity(valid, (height, width)).reshape(batch, -1)
    scores = torch.zeros(batch)
    for item in range(batch):
        candidates = distances.reshape(batch, -1)[item].masked_fill(~patch_valid[item], -1.0)
        position = int(candidates.argmax())
        if candidates[position] < 0:
            continue
        top_score = candidates[position]
        top = features[item].reshape(dim, -1)[:, position]
        anchor = bank[int(nearest.reshape(batch, -1)[item, position])]
        neighbours = min(model.config.num_neighbors, bank.shape[0])
        support = bank[torch.cdist(anchor[None], bank)[0].topk(neighbours, largest=False).indices]
        to_support = torch.cdist(top[None], support)[0]
        scores[item] = (1.0 - 1.0 / torch.exp(to_support - top_score).sum()) * top_score
    return scores


# ---- vectorised == per tile -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["max", "topk_mean"])
def test_image_scores_equal_the_per_tile_definition(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 12, 12, generator=generator) * 4.0
    valid = torch.rand(5, 12, 12, generator=generator) < 0.6
    valid[1] = False  # no fabric
    valid[2] = False
    valid[2, 4, 3:6] = True  # 3 fabric pixels: fewer than any topk below but 1
    for topk in (1, 3, 20, 144, 500):
        scores = image_scores(maps, valid, mode, topk)
        expected = reference_image_scores(maps, valid, mode, topk)
        assert (scores - expected).abs().max() < 1e-6, (topk, scores, expected)
        assert scores[1] == 0.0


@pytest.mark.parametrize("mode", ["max", "topk_mean"])
def test_vae_scores_equal_the_per_tile_definition(mode: str) -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig.model_validate({**SMALL_VAE, "score": mode, "topk": 30})).eval()
    tiles, valid = fabric_tiles()
    out = model.predict(tiles, valid)
    expected = reference_image_scores(out.anomaly_map, valid[:, 0], mode, 30)
    assert (out.score - expected).abs().max() < 1e-6
    assert out.score[3] == 0.0 and out.score[5] > 0.0  # 9 fabric pixels, fewer than topk


@pytest.fixture(scope="module")
def patchcore(one_thread: None) -> PatchCore:
    """TINY_PATCHCORE fitted on three woven strips, its bank (77 rows) scanned in chunks of 32."""
    torch.manual_seed(0)
    model = PatchCore(PatchCoreConfig.model_validate({**TINY_PATCHCORE, "chunk_size": 32}))
    images = [woven(64, 256, seed=s) for s in range(3)]
    tiles = TileDataset(images, [np.ones_like(i, bool) for i in images], 64, 64)
    model.fit(tiles, FitContext(progress=False, seed=0))
    return model.eval()


def test_patchcore_scores_equal_the_per_tile_definition(patchcore: PatchCore) -> None:
    tiles, valid = fabric_tiles()
    scores = patchcore.predict(tiles, valid).score
    expected = reference_patchcore_scores(patchcore, tiles, valid)
    # equal on fabric; a defect's score of about 90 may differ in its last bit (7.6e-6)
    assert ((scores - expected).abs() <= 1e-6 * expected.abs().clamp_min(1.0)).all()
    assert scores[3] == 0.0 and scores[5] == 0.0 and scores[4] > 0.0
    assert scores[1] > scores[0]


# ---- ONNX Runtime == PyTorch ------------------------------------------------------------------
class Graph(torch.nn.Module):
    """What an export runs: tiles and a float 0/1 mask in, maps and scores out."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tiles: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.predict(tiles, valid > 0.5)
        return out.anomaly_map, out.score


def assert_onnx_matches_torch(model: AnomalyModel, path: Path) -> None:
    """Export with a batch of 3, run ONNX Runtime on batches of 5 and 1.

    Not on the tile with 9 fabric pixels: normalised, it is nearly constant, and GroupNorm then
    amplifies rounding so much that PyTorch itself differs by 4e-4 between batch sizes."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    tiles, valid = (part[:5] for part in fabric_tiles())
    batch = torch.export.Dim("batch", max=1024)
    torch.onnx.export(
        Graph(model).eval(),
        (tiles[:3], valid[:3].float()),
        str(path),
        input_names=["tiles", "valid"],
        output_names=["map", "score"],
        dynamo=True,
        opset_version=18,
        dynamic_shapes={"tiles": {0: batch}, "valid": {0: batch}},
        verbose=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = model.predict(tiles, valid)
    for part in (slice(0, 5), slice(4, 5)):
        feeds = {"tiles": tiles[part].numpy(), "valid": valid[part].float().numpy()}
        maps, scores = session.run(None, feeds)
        # 1e-4 absolute; relative 1e-6 beyond it for a strongly anomalous tile's larger values
        np.testing.assert_allclose(maps, expected.anomaly_map[part].numpy(), rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(scores, expected.score[part].numpy(), rtol=1e-6, atol=1e-4)


def test_vae_exports_to_onnx(tmp_path: Path) -> None:
    torch.manual_seed(0)
    assert_onnx_matches_torch(VAE(VAEConfig.model_validate(SMALL_VAE)).eval(), tmp_path / "v.onnx")


def test_patchcore_exports_to_onnx(patchcore: PatchCore, tmp_path: Path) -> None:
    assert_onnx_matches_torch(patchcore, tmp_path / "patchcore.onnx")
