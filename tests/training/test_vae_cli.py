"""The VAE through the command line: train, then an evaluation report showing reconstructions."""

from __future__ import annotations

from pathlib import Path

import pytest

from loomwatch.cli import main

pytestmark = pytest.mark.slow  # a real VAE training through the CLI

TINY_VAE = [
    "--set", "model.max_epochs=2", "--set", "model.base_channels=8", "--set", "model.depth=3",
    "--set", "model.latent_channels=4", "--set", "pipeline.tile_size=64",
    "--set", "pipeline.stride=64",
]  # fmt: skip


def test_vae_trains_and_its_report_shows_reconstructions(synth_data: Path, tmp_path: Path) -> None:
    bundle, report = tmp_path / "vae", tmp_path / "report"
    train = ["--quiet", "train", "--model", "vae", "--data", str(synth_data), "--out", str(bundle)]
    assert main([*train, *TINY_VAE]) == 0
    evaluate = ["--quiet", "evaluate", "--model-uri", str(bundle), "--data", str(synth_data)]
    assert main([*evaluate, "--report", str(report)]) == 0
    html = (report / "report.html").read_text()
    assert "reconstruction" in html
    figures = sorted(report.glob("figure_*.png"))
    assert figures and figures[0].stat().st_size > 0
