"""Prometheus metrics of one app instance (its own registry, so several apps can coexist)."""

from __future__ import annotations

import threading
from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from app.drift import WindowStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ANOMALY_WINDOW = 100


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loomwatch_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "loomwatch_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "loomwatch_inference_duration_seconds",
            "time per pipeline stage of one image (stage=total: the whole pipeline)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "loomwatch_inference_queue_wait_seconds",
            "time an inference job waited for a worker",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "loomwatch_inference_queue_depth", "inference jobs waiting for a worker", registry=r
        )
        self.in_progress = Gauge(
            "loomwatch_inference_in_progress", "inference jobs running", registry=r
        )
        self.rejected = Counter(
            "loomwatch_inference_rejected",
            "requests refused with 503 (reason: queue_full, timeout, not_ready)",
            ["reason"],
            registry=r,
        )
        self.predictions = Counter(
            "loomwatch_predictions", "images scored, by decision", ["decision"], registry=r
        )
        self.anomaly_rate = Gauge(
            "loomwatch_anomaly_rate",
            f"share of anomalous decisions over the last {ANOMALY_WINDOW} predictions",
            registry=r,
        )
        self.kept_regions = Counter("loomwatch_regions_kept", "defect regions reported", registry=r)
        self.suppressed_regions = Counter(
            "loomwatch_regions_suppressed", "regions suppressed, by reason", ["reason"], registry=r
        )
        self.log_failures = Counter(
            "loomwatch_inference_log_failures",
            "inference-log lines that could not be written",
            registry=r,
        )
        self.feedback = Counter(
            "loomwatch_feedback",
            "feedback given on predictions, by verdict",
            ["verdict"],
            registry=r,
        )
        self.database_failures = Counter(
            "loomwatch_feedback_database_failures",
            "operations the feedback database refused or could not reach (predictions not "
            "recorded, feedback answered 503)",
            registry=r,
        )
        by_model = ["model", "fabric"]
        self.drift_psi = Gauge(
            "loomwatch_score_drift_psi",
            "population-stability index of the raw image scores of the latest DRIFT_WINDOW "
            "predictions against the calibration's defect-free reference (NaN: fewer than 20 "
            "predictions, or no reference)",
            by_model,
            registry=r,
        )
        self.drift_ks = Gauge(
            "loomwatch_score_drift_ks",
            "Kolmogorov-Smirnov statistic of the same window against the same reference",
            by_model,
            registry=r,
        )
        self.window_anomaly_rate = Gauge(
            "loomwatch_window_anomaly_rate",
            "share of anomalous decisions among the latest DRIFT_WINDOW predictions",
            by_model,
            registry=r,
        )
        self.window_kept_area = Gauge(
            "loomwatch_window_kept_area_mean",
            "mean fabric pixels kept per anomalous prediction among the latest DRIFT_WINDOW",
            by_model,
            registry=r,
        )
        self.window_size = Gauge(
            "loomwatch_window_predictions", "predictions in the drift window", by_model, registry=r
        )
        self.ready = Gauge("loomwatch_ready", "1 when the model is loaded and warmed", registry=r)
        self.model = Info("loomwatch_model", "the model being served", registry=r)
        self._recent: deque[bool] = deque(maxlen=ANOMALY_WINDOW)
        self._lock = threading.Lock()

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        labels = {"method": method, "route": route, "status": str(status)}
        self.requests.labels(**labels).inc()
        self.latency.labels(**labels).observe(seconds)

    def observe_prediction(
        self, anomalous: bool, kept: int, suppressed: list[str], timings: dict[str, float]
    ) -> None:
        self.predictions.labels(decision="anomalous" if anomalous else "normal").inc()
        self.kept_regions.inc(kept)
        for reason in suppressed:
            self.suppressed_regions.labels(reason=reason).inc()
        for stage, seconds in timings.items():
            self.inference.labels(stage=stage).observe(seconds)
        with self._lock:
            self._recent.append(anomalous)
            self.anomaly_rate.set(sum(self._recent) / len(self._recent))

    def observe_window(self, model: str, fabric: str, stats: WindowStats) -> None:
        labels = {"model": model, "fabric": fabric}
        self.drift_psi.labels(**labels).set(stats.psi)
        self.drift_ks.labels(**labels).set(stats.ks)
        self.window_anomaly_rate.labels(**labels).set(stats.anomaly_rate)
        self.window_kept_area.labels(**labels).set(stats.mean_kept_area)
        self.window_size.labels(**labels).set(stats.size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
