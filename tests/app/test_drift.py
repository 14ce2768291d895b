"""Drift metrics: PSI and KS of the score window against the calibration's reference, checked
against their definitions and SciPy, and the service's /metrics moving when the fabric does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy.stats import ks_2samp

from app.drift import MIN_WINDOW, DriftWindow, ks, psi, reference_of
from app.main import create_app
from models.manifest import read_manifest
from tests.helpers import HEIGHT, WIDTH, make_settings, metric, png_bytes, woven


def test_psi_is_zero_for_the_same_shares_and_follows_its_formula() -> None:
    reference = np.arange(100, dtype=np.float64)  # deciles of 10 each
    assert psi(reference, reference) == pytest.approx(0.0, abs=1e-12)
    window = np.full(50, 95.0)  # everything in the top decile
    shares = np.array([1e-4] * 9 + [1.0])  # empty bins count as the floor
    expected = float(np.sum((shares - 0.1) * np.log(shares / 0.1)))
    assert psi(reference, window) == pytest.approx(expected, rel=1e-9)
    assert psi(reference, window) > 0.25  # a real shift by the usual reading


def test_ks_is_scipys_two_sample_statistic() -> None:
    rng = np.random.default_rng(1)
    reference, window = rng.normal(0, 1, 80), rng.normal(0.7, 1.2, 150)
    assert ks(reference, window) == pytest.approx(ks_2samp(reference, window).statistic)
    assert ks(reference, reference) == 0.0


def test_a_window_from_the_reference_distribution_is_stable_and_a_shifted_one_is_not() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(1.0, 0.1, 60)
    same, shifted = rng.normal(1.0, 0.1, 200), rng.normal(1.3, 0.1, 200)
    assert psi(reference, same) < 0.25 and ks(reference, same) < 0.2  # 60 scores: 6 bins
    assert psi(reference, shifted) > 1.0 and ks(reference, shifted) > 0.8


def test_the_window_slides_and_waits_for_enough_scores() -> None:
    window = DriftWindow(np.linspace(0.0, 1.0, 30), size=MIN_WINDOW)
    for _ in range(MIN_WINDOW - 1):
        stats = window.add(0.5, anomalous=False, kept_area=0)
    assert math.isnan(stats.psi) and math.isnan(stats.ks) and stats.size == MIN_WINDOW - 1
    stats = window.add(0.9, anomalous=True, kept_area=120)
    assert math.isfinite(stats.psi) and stats.size == MIN_WINDOW
    assert stats.anomaly_rate == pytest.approx(1 / MIN_WINDOW) and stats.mean_kept_area == 120
    for _ in range(MIN_WINDOW):
        stats = window.add(0.5, anomalous=False, kept_area=0)
    assert stats.size == MIN_WINDOW and stats.anomaly_rate == 0.0 and stats.mean_kept_area == 0
    no_reference = DriftWindow(None, size=MIN_WINDOW)
    for _ in range(MIN_WINDOW):
        stats = no_reference.add(0.5, anomalous=False, kept_area=0)
    assert math.isnan(stats.psi) and stats.anomaly_rate == 0.0
    assert reference_of({}) is None and reference_of({"reference": {}}) is None


def test_the_service_reports_drift_when_the_fabric_changes(bundle: Path) -> None:
    reference = reference_of(read_manifest(bundle).calibration.evidence)
    assert reference is not None  # training keeps the defect-free scores
    settings = make_settings(bundle, None, drift_window=MIN_WINDOW)
    labels = f'{{fabric="all",model="{bundle.name}"}}'

    def post(pixels: np.ndarray) -> None:
        files = {"file": ("strip.png", png_bytes(pixels), "image/png")}
        assert client.post("/predict", files=files).status_code == 200

    with TestClient(create_app(settings)) as client:
        for seed in range(MIN_WINDOW):  # the fabric it was calibrated on
            post(woven(HEIGHT, WIDTH, seed=300 + seed))
        text = client.get("/metrics").text
        stable_psi = metric(text, f"loomwatch_score_drift_psi{labels}")
        stable_ks = metric(text, f"loomwatch_score_drift_ks{labels}")
        assert metric(text, f"loomwatch_window_predictions{labels}") == MIN_WINDOW
        rng = np.random.default_rng(5)
        for _ in range(MIN_WINDOW):  # a coarser weave under a noisier camera
            coarse = woven(HEIGHT, WIDTH, seed=400).astype(np.float64)
            coarse = np.roll(coarse, 3, axis=1) * 0.6 + 60 + rng.normal(0, 25, coarse.shape)
            post(np.clip(coarse, 0, 255).astype(np.uint8))
        text = client.get("/metrics").text
        drifted_psi = metric(text, f"loomwatch_score_drift_psi{labels}")
        drifted_ks = metric(text, f"loomwatch_score_drift_ks{labels}")
        assert stable_psi < 0.5 < drifted_psi, (stable_psi, drifted_psi)
        assert stable_ks < drifted_ks and drifted_ks > 0.8, (stable_ks, drifted_ks)
        assert metric(text, f"loomwatch_window_anomaly_rate{labels}") > 0.5
        assert metric(text, f"loomwatch_window_kept_area_mean{labels}") >= 0.0
