"""The one interface every detector implements.

A detector is a pure ``nn.Module``: it is rebuilt from its config and its tensors (nanoGPT style),
fits on defect-free tiles, and predicts, for a batch of grey tiles, an anomaly map (higher = more
anomalous) and an image score. Every detector returns the same :class:`ModelOutput` whether it is
training or not, so calibration, post-processing and metrics are shared.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.utils.data import Dataset

from models.device import Runtime


class ModelConfig(BaseModel):
    """Base of every model config: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ModelOutput:
    anomaly_map: torch.Tensor  # [B, H, W] float, same size as the input tiles
    score: torch.Tensor  # [B] float


@dataclass
class EpochLog:
    """What a model reports after each epoch (or fitting stage) through the fit callback."""

    epoch: int
    metrics: dict[str, float]
    seconds: float


EpochCallback = Callable[[EpochLog], None]
Tile = tuple[torch.Tensor, torch.Tensor]


class TileData(Dataset[Tile], ABC):
    """Training tiles: a sized dataset of (image [1,T,T] float in [0,1], valid [1,T,T] bool)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> Tile: ...


@dataclass
class ReportPanel:
    """A picture a model offers for evaluation reports: one row per sample tile."""

    title: str
    image: np.ndarray  # BGR uint8


class StepTimer:
    """Seconds spent in each part of a training step (data, forward, backward), when on.

    Off by default: timing a part of a step on an accelerator means waiting for the device
    before and after it, which costs throughput. ``sync=False`` for parts that only wait on the
    host (the next batch)."""

    def __init__(self, runtime: Runtime | None = None, enabled: bool = False) -> None:
        self.runtime = runtime
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str, sync: bool = True) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if sync and self.runtime is not None:
            self.runtime.synchronize()
        started = time.perf_counter()
        yield
        if sync and self.runtime is not None:
            self.runtime.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.counts[name] = self.counts.get(name, 0) + 1

    def summary(self) -> dict[str, float]:
        """Mean milliseconds per step of each part timed: ``step_<part>_ms``."""
        return {
            f"step_{name}_ms": 1000.0 * total / max(self.counts[name], 1)
            for name, total in self.seconds.items()
        }


@dataclass
class FitContext:
    """What fitting may use besides the training tiles.

    ``deadline`` is a ``time.monotonic()`` value: fitting must return by then, keeping the best
    state it has. ``validate`` scores the model on validation data (higher is better), for the
    models that select their best state by it.
    """

    deadline: float | None = None
    budget_seconds: float | None = None
    callback: EpochCallback | None = None
    validate: Callable[[AnomalyModel], float] | None = None
    progress: bool = True
    seed: int = 0
    batch_size: int = 8
    # where and in what precision fitting runs (the model has been moved there already)
    runtime: Runtime = field(default_factory=Runtime.cpu)
    profile: bool = False  # time the parts of each step (``timer``)
    # prepare the next batch in a thread while this one trains; None: on accelerators only
    prefetch: bool | None = None
    timer: StepTimer = field(init=False)

    def __post_init__(self) -> None:
        self.timer = StepTimer(self.runtime, self.profile)

    def seconds_left(self) -> float:
        if self.deadline is None:
            return float("inf")
        return self.deadline - time.monotonic()

    def budget_left(self) -> float:
        """Share of the time budget still left (1.0 without a budget)."""
        if self.deadline is None or not self.budget_seconds:
            return 1.0
        return max(self.seconds_left(), 0.0) / self.budget_seconds

    def schedule_share(self, epochs: float, max_epochs: int) -> float:
        """How far through its schedule a fit is after ``epochs`` (fractional) epochs: the
        larger of the epochs over ``max_epochs`` and the share of the time budget used (on a
        CPU the budget ends the schedule long before ``max_epochs``). What learning-rate steps
        and ``select_from`` count in."""
        return max(epochs / max_epochs, 1.0 - self.budget_left())

    def report(self, log: EpochLog) -> None:
        if self.callback is not None:
            self.callback(log)


class AnomalyModel(nn.Module, ABC):
    """Base class of DRAEM, VAE and PatchCore."""

    model_type: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    # True for models that train in epochs and keep the state FitContext.validate scores best.
    selects_best_state: ClassVar[bool] = False
    # True where the model's maps of the images it was fitted on look like its maps of new
    # defect-free images (DRAEM), so figures learned from them hold for new images; PatchCore
    # remembers its training patches and the VAE reconstructs what it was fitted on better.
    representative_training_maps: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, load_weights: bool = True) -> None:
        """`load_weights=False` skips fetching external (pretrained) weights: a bundle follows."""
        super().__init__()
        self.config = config

    @abstractmethod
    def fit(self, tiles: TileData, context: FitContext) -> dict[str, Any]:
        """Fit on defect-free tiles; return a summary (figures worth logging)."""

    @abstractmethod
    def predict(self, tiles: torch.Tensor, valid: torch.Tensor) -> ModelOutput:
        """Score grey tiles [B,1,H,W] in [0,1]; `valid` [B,1,H,W] bool marks fabric pixels.

        The image score must only use valid pixels.
        """

    def report_panels(self, tiles: torch.Tensor, valid: torch.Tensor) -> list[ReportPanel]:
        """Pictures of how the model sees sample tiles [B,1,H,W] in [0,1] (``valid`` bool), for
        the evaluation report, such as reconstructions; none by default."""
        return []

    def prepare_state(self, state: dict[str, torch.Tensor]) -> None:
        """Resize buffers whose shape is only known after fitting, before load_state_dict."""
