"""Where a network runs and in what precision: ``--device`` and ``--precision``, one meaning.

- Device: ``auto`` (CUDA when PyTorch sees one, else Apple's ``mps`` when present, else the
  CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. A device asked for by name that this machine
  does not have is a :class:`DeviceError` (one line: the CLI exits 2, the service does not
  become ready); only ``auto`` ever falls back to the CPU.
- Precision: ``32`` (fp32, the default: results as they always were), ``bf16`` (autocast to
  bfloat16: CUDA, and CPUs too) or ``16-mixed`` (autocast to float16 with a gradient scaler;
  CUDA only). Losses, normalisation statistics and the maps a model returns stay in fp32.
- Channels-last: the convolutions' memory layout; it helps with tensor cores (CUDA, reduced
  precision) and made a DRAEM step twice as slow on this project's CPUs, so it is off unless
  asked for.

:class:`Runtime` carries the three. Models keep their tensors where their parameters are and
create new ones on the device of their input (``device=x.device``), so the one code path runs
on any device; what moves tensors between the host and the device is the caller that holds the
runtime (fitting, :class:`models.network.TorchNetwork`). The checks of names import no torch,
so an exported model's service can check them too.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("32", "bf16", "16-mixed")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class DeviceError(ValueError):
    """A device or precision this machine (or this model) cannot run; the message is one line."""


def check_device_name(name: str) -> str:
    """``name`` when it is one of :data:`DEVICES` (``cuda:N`` with a number), else DeviceError."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name.strip().lower()):
        raise DeviceError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    return name.strip().lower()


def check_precision_name(name: str) -> str:
    text = str(name).strip().lower()
    if text in ("fp32", "32-true"):
        text = "32"
    if text not in PRECISIONS:
        raise DeviceError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    return text


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """The ``torch.device`` for ``name``; DeviceError when it is not there (no fallback but
    ``auto``'s)."""
    import torch

    name = check_device_name(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise DeviceError("device mps asked for, but PyTorch sees no Apple GPU (MPS) here")
        return torch.device("mps")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise DeviceError(
            f"device {name} asked for, but PyTorch ({torch.__version__}, {build}) sees no CUDA "
            "GPU here; use --device cpu (or auto)"
        )
    index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {name} asked for, but there are {count} CUDA GPU(s) here")
    return torch.device("cuda", index)


def device_label(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)``, ``cpu``: for logs, /ready and /model."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def module_device(module: nn.Module) -> torch.device:
    """Where a module's tensors are (its first parameter or buffer); the CPU when it has none."""
    import torch

    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """A device, a precision and the memory layout of convolutions: how a network runs."""

    device: torch.device
    precision: str = "32"
    channels_last: bool = False

    @classmethod
    def resolve(
        cls, device: str = "auto", precision: str = "32", channels_last: bool = False
    ) -> Runtime:
        """Names -> a runtime this machine can run; DeviceError (one line) otherwise."""
        chosen = resolve_device(device)
        precision = check_precision_name(precision)
        if precision == "16-mixed" and chosen.type != "cuda":
            raise DeviceError(
                f"precision 16-mixed needs a CUDA GPU (device here: {chosen}); use bf16 or 32"
            )
        return cls(chosen, precision, channels_last)

    @classmethod
    def cpu(cls) -> Runtime:
        import torch

        return cls(torch.device("cpu"))

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        import torch

        return {"bf16": torch.bfloat16, "16-mixed": torch.float16}.get(self.precision)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def autocast(self) -> Any:
        """The autocast context of this precision (nothing for fp32)."""
        import torch

        dtype = self.autocast_dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A gradient scaler for float16 training (bf16 and fp32 need none)."""
        import torch

        if self.precision != "16-mixed":
            return None
        return torch.amp.GradScaler(self.device.type)

    def generator(self, seed: int, host: torch.Generator | None = None) -> torch.Generator:
        """A random generator on this device seeded with ``seed``; on the CPU, ``host`` itself
        when given, so that the CPU draws the very numbers it always drew from one generator."""
        import torch

        if self.on_cpu and host is not None:
            return host
        return torch.Generator(device=self.device).manual_seed(seed)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move ``module`` to the device (and to channels-last when asked)."""
        import torch

        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device (and in channels-last when asked and it is 4-D)."""
        import torch

        moved = tensor.to(self.device, non_blocking=not self.on_cpu)
        if self.channels_last and moved.dim() == 4 and moved.is_floating_point():
            moved = moved.contiguous(memory_format=torch.channels_last)
        return moved

    def predict(self, model: Any, tiles: torch.Tensor, valid: torch.Tensor) -> Any:
        """``model.predict`` (an AnomalyModel's) of host tiles on this device and precision; its
        ModelOutput with host fp32 tensors."""
        import dataclasses

        import torch

        with torch.inference_mode(), self.autocast():
            output = model.predict(self.put(tiles), self.put(valid))
        return dataclasses.replace(
            output, anomaly_map=output.anomaly_map.float().cpu(), score=output.score.float().cpu()
        )

    def synchronize(self) -> None:
        """Wait for the device's queued work (for honest timings; nothing on the CPU)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "device_name": device_label(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
        }
