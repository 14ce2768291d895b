"""Serving a fleet: one model per fabric in one process (MODEL_URI names a fleet, see
:mod:`tracking.fleet`).

* Lazy: a fabric's model is loaded (and warmed) by the first request that names the fabric;
  concurrent first requests for one fabric wait for one load.
* Bounded: at most ``MAX_LOADED_MODELS`` models stay loaded; loading one more evicts the one
  used least recently.
* Aliases: every ``MODEL_POLL_S`` seconds the fabrics whose URI is a registry alias
  (``models:/NAME-FF@champion``) are pinned again; when the alias has moved, the new version is
  loaded beside the old one and swapped in at once. Requests already holding the old model
  finish on it; a replaced or evicted model is closed only after ``REQUEST_TIMEOUT_S``, when no
  request can still be using it.
* Refusals: a fabric the fleet has no model for is 404 with the known fabrics; a model that
  cannot be loaded (say, the manifest names a version that does not exist) is 503 with the
  reason, and the other fabrics go on being served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.errors import ApiError
from app.model import LoadedModel, StartupError, load_model
from app.service import Scorer
from app.settings import Settings
from tracking.fleet import Fleet, FleetMember
from tracking.uris import pin_model_uri

log = logging.getLogger("loomwatch.app")


@dataclass
class Served:
    scorer: Scorer
    pinned: str  # the immutable URI loaded (an alias resolved to its version)
    last_used: float


class FleetModels:
    def __init__(
        self, fleet: Fleet, settings: Settings, make_scorer: Callable[[LoadedModel], Scorer]
    ) -> None:
        self.fleet = fleet
        self.settings = settings
        self.make_scorer = make_scorer
        self._loaded: OrderedDict[str, Served] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {f: threading.Lock() for f in fleet.members}
        self._retired: list[tuple[float, LoadedModel]] = []
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.swaps = 0

    # ---- requests --------------------------------------------------------------------------

    def member(self, fabric: str | None) -> FleetMember:
        known = ", ".join(self.fleet.fabrics)
        if fabric is None or not fabric.strip():
            raise ApiError(422, "fabric_required",
                           f"this service serves a fleet: name the fabric (form field or query "
                           f"parameter 'fabric'); known fabrics: {known}")  # fmt: skip
        member = self.fleet.member(fabric)
        if member is None:
            raise ApiError(404, "unknown_fabric",
                           f"no model for fabric {fabric!r}; known fabrics: {known}")  # fmt: skip
        return member

    def scorer(self, fabric: str | None) -> Scorer:
        """The scorer of ``fabric``, loading its model first when it is not loaded (blocking:
        call it from a worker thread)."""
        member = self.member(fabric)
        with self._lock:
            served = self._loaded.get(member.fabric)
            if served is not None:
                self._loaded.move_to_end(member.fabric)
                served.last_used = time.monotonic()
                return served.scorer
        with self._loading[member.fabric]:  # one load per fabric; others wait for it
            with self._lock:
                served = self._loaded.get(member.fabric)
                if served is not None:
                    return served.scorer
            pinned, model = self._load(member)
            with self._lock:
                self._loaded[member.fabric] = Served(self.make_scorer(model), pinned,
                                                     time.monotonic())  # fmt: skip
                while len(self._loaded) > self.settings.max_loaded_models:
                    fabric_out, evicted = self._loaded.popitem(last=False)
                    log.info("fabric %s: model evicted (least recently used)", fabric_out)
                    self._retire(evicted.scorer.model)
                return self._loaded[member.fabric].scorer

    def _load(self, member: FleetMember) -> tuple[str, LoadedModel]:
        try:
            pinned = pin_model_uri(member.source)
            model = load_model(self.settings, pinned)
        except Exception as exc:  # any failure: this fabric's 503
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = first if isinstance(exc, StartupError) else f"{member.source}: {first}"
            detail = f"fabric {member.fabric}: {reason}"
            raise ApiError(503, "model_unavailable", detail, {"Retry-After": "30"}) from None
        log.info("fabric %s: serving %s", member.fabric, pinned)
        return pinned, model

    def loaded(self) -> dict[str, Served]:
        with self._lock:
            return dict(self._loaded)

    def describe(self) -> list[dict[str, Any]]:
        """One entry per fabric of the fleet: its URI and, when loaded, what is served."""
        loaded = self.loaded()
        rows = []
        for fabric in self.fleet.fabrics:
            member = self.fleet.members[fabric]
            row: dict[str, Any] = {"fabric": fabric, "uri": member.source, "loaded": False}
            served = loaded.get(fabric)
            if served is not None:
                model = served.scorer.model
                row.update(loaded=True, pinned=served.pinned, name=model.name,
                           version=model.version, type=model.type, digest=model.digest)  # fmt: skip
            rows.append(row)
        return rows

    # ---- alias polling ---------------------------------------------------------------------

    def start_polling(self) -> None:
        if self.settings.model_poll_s <= 0 or not any(
            m.follows_alias for m in self.fleet.members.values()
        ):
            return
        self._poller = threading.Thread(target=self._poll_loop, name="fleet-poll", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.settings.model_poll_s):
            self.poll()

    def poll(self) -> list[str]:
        """Re-pin every loaded fabric that follows an alias; swap in what moved. The fabrics
        swapped."""
        swapped = []
        for fabric, served in self.loaded().items():
            member = self.fleet.members[fabric]
            if not member.follows_alias:
                continue
            try:
                pinned = pin_model_uri(member.uri)
                if pinned == served.pinned:
                    continue
                model = load_model(self.settings, pinned)
            except Exception as exc:  # keep serving the old model
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                log.warning("fabric %s: alias poll failed, keeping %s: %s", fabric,
                            served.pinned, why)  # fmt: skip
                continue
            with self._lock:
                current = self._loaded.get(fabric)
                if current is None:  # evicted meanwhile: the next request loads the new one
                    self._retire(model)
                    continue
                self._loaded[fabric] = Served(self.make_scorer(model), pinned, current.last_used)
                self._retire(current.scorer.model)
                self.swaps += 1
            log.info("fabric %s: alias %s moved: %s -> %s", fabric, member.uri,
                     served.pinned, pinned)  # fmt: skip
            swapped.append(fabric)
        self._close_retired()
        return swapped

    def _retire(self, model: LoadedModel) -> None:
        """Close ``model`` once no request can still be using it (after REQUEST_TIMEOUT_S)."""
        self._retired.append((time.monotonic() + self.settings.request_timeout_s, model))

    def _close_retired(self, everything: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [m for t, m in self._retired if everything or t <= now]
            self._retired = [(t, m) for t, m in self._retired if not (everything or t <= now)]
        for model in due:
            model.close()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        with self._lock:
            for served in self._loaded.values():
                self._retired.append((0.0, served.scorer.model))
            self._loaded.clear()
        self._close_retired(everything=True)


def open_fleet(settings: Settings) -> Fleet | None:
    """The fleet MODEL_URI names (nothing is loaded yet), or None when it names one model."""
    from tracking.fleet import is_fleet_uri, resolve_fleet

    uri = settings.model_uri
    if not uri or not is_fleet_uri(uri):
        return None
    try:
        return resolve_fleet(uri)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StartupError(f"cannot read fleet {uri!r}: {first}") from None
