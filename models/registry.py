"""Model types by name: the one place that knows which detectors exist."""

from __future__ import annotations

from models.base import AnomalyModel
from models.draem import Draem
from models.patchcore import PatchCore
from models.vae import VAE

MODEL_TYPES: dict[str, type[AnomalyModel]] = {
    Draem.model_type: Draem,
    PatchCore.model_type: PatchCore,
    VAE.model_type: VAE,
}


class UnknownModelError(ValueError):
    pass


def model_class(name: str) -> type[AnomalyModel]:
    try:
        return MODEL_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_TYPES))
        raise UnknownModelError(f"unknown model '{name}' (known: {known})") from None
