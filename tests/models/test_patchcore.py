from __future__ import annotations

import time

import pytest
import torch

from models.patchcore import PatchCore, PatchCoreConfig, greedy_coreset, nearest_distances
from tests.helpers import TINY_PATCHCORE, fitted_patchcore, woven


def test_nearest_distances_match_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(50, 8, generator=generator)
    bank = torch.randn(300, 8, generator=generator)
    distances, index = nearest_distances(queries, bank, chunk_size=64)
    brute = torch.cdist(queries, bank)
    assert torch.allclose(distances, brute.min(1).values, atol=1e-4)
    assert torch.equal(index, brute.argmin(1))


def test_coreset_covers_far_points_and_respects_deadline() -> None:
    points = torch.cat([torch.zeros(100, 4), torch.full((1, 4), 50.0)])
    chosen = greedy_coreset(points, 2, projection_dim=0, seed=0, deadline=None)
    assert 100 in chosen.tolist()  # the outlier is the farthest point from any start
    assert len(greedy_coreset(points, 50, 0, 0, deadline=time.monotonic() - 1)) == 1


def test_fit_builds_bank_and_scores_a_defect_higher() -> None:
    model = fitted_patchcore()
    assert model.memory_bank.shape[1] == 32 and model.memory_bank.shape[0] > 0
    clean = torch.from_numpy(woven(64, 64, seed=9)).float()[None, None] / 255
    defect = clean.clone()
    defect[..., 28:36, 20:44] = 0.05  # a dark broken-yarn-like line
    valid = torch.ones_like(clean, dtype=torch.bool)
    out = model.predict(torch.cat([clean, defect]), torch.cat([valid, valid]))
    assert out.anomaly_map.shape == (2, 64, 64)
    assert out.score[1] > out.score[0]
    assert out.anomaly_map[1, 28:36, 20:44].mean() > out.anomaly_map[1, :8, :8].mean()


def test_invalid_pixels_never_drive_the_image_score() -> None:
    model = fitted_patchcore()
    tile = torch.from_numpy(woven(64, 64, seed=5)).float()[None, None] / 255
    tile[..., :, 48:] = 1.0  # white padding on the right
    valid = torch.ones_like(tile, dtype=torch.bool)
    valid[..., :, 32:] = False
    masked = model.predict(tile, valid).score
    unmasked = model.predict(tile, torch.ones_like(valid)).score
    assert masked < unmasked


def test_predict_before_fit_is_an_error() -> None:
    model = PatchCore(PatchCoreConfig.model_validate(TINY_PATCHCORE))
    with pytest.raises(RuntimeError, match="empty memory bank"):
        model.predict(torch.zeros(1, 1, 64, 64), torch.ones(1, 1, 64, 64, dtype=torch.bool))


def test_random_backbone_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    PatchCore(PatchCoreConfig.model_validate(TINY_PATCHCORE))
    assert "RANDOM resnet18 backbone" in caplog.text


def test_local_weights_file_is_loaded_without_pickle(tmp_path: pytest.TempPathFactory) -> None:
    import torchvision

    path = tmp_path / "resnet18.pth"  # type: ignore[operator]
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), path)
    model = PatchCore(PatchCoreConfig.model_validate({**TINY_PATCHCORE, "weights_file": str(path)}))
    stem_conv = model.extractor.stem[0]
    assert isinstance(stem_conv, torch.nn.Conv2d)
    assert torch.equal(stem_conv.weight, reference.conv1.weight)


def test_folded_projection_equals_pooling_twice() -> None:
    import torch.nn.functional as F

    from models.patchcore import patch_embedding, projection_matrices

    generator = torch.Generator().manual_seed(0)
    maps = [
        torch.randn(2, 12, 8, 8, generator=generator),
        torch.randn(2, 20, 4, 4, generator=generator),
    ]
    folded = patch_embedding(maps, projection_matrices((12, 20), layer_dim=16, embed_dim=10))
    pooled = []  # the definition: pool each layer's channels, concatenate, pool again
    for feature in maps:
        feature = F.avg_pool2d(feature, 3, 1, 1)
        feature = F.interpolate(feature, size=(8, 8), mode="bilinear", align_corners=False)
        flat = feature.permute(0, 2, 3, 1).reshape(-1, 1, feature.shape[1])
        pooled.append(F.adaptive_avg_pool1d(flat, 16).reshape(-1, 16))
    both = F.adaptive_avg_pool1d(torch.cat(pooled, 1)[:, None], 10).reshape(2, 8, 8, 10)
    assert torch.allclose(folded, both.permute(0, 3, 1, 2), atol=1e-5)
