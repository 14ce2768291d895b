"""Fleets: one model per fabric, listed in a fleet manifest (``fleet.json``).

A fleet is addressed like a model, by a URI (see :func:`resolve_fleet`):

* a local fleet folder holding ``fleet.json`` (``loomwatch train --fabric all --out FLEET``);
* the ``fleet.json`` file itself;
* ``runs:/<parent run id>/fleet``: the manifest logged as an artifact of the fleet's parent run.

Each fabric's entry names its model twice: ``bundle``, a folder relative to the manifest, and
``uri``, a model URI (``models:/NAME-FF@A`` or ``models:/NAME-FF/V`` when registered, else
``runs:/<run id>/model``). An alias URI is always followed (the alias may move: ``serve`` polls
it); otherwise the bundle folder is used when it is there, as in the folder ``train`` wrote. The
manifest is written atomically (a temporary file renamed into place) and last, so a folder without
``fleet.json`` is never taken for a fleet.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracking.store import ModelUriError, TrackingError, mlflow_errors, use_tracking_store

FLEET_MANIFEST = "fleet.json"
FLEET_KIND = "loomwatch-fleet"
FLEET_FORMAT = 1
FLEET_IN_RUN = "fleet"  # runs:/<parent run id>/fleet


@dataclass(frozen=True)
class FleetMember:
    fabric: str
    uri: str  # what to load when the bundle folder is absent (and what an alias poll re-pins)
    bundle: Path | None  # the local bundle folder, when the manifest sits beside it
    info: dict[str, Any]

    @property
    def follows_alias(self) -> bool:
        return self.uri.startswith("models:/") and "@" in self.uri

    @property
    def source(self) -> str:
        """The URI to load: ``uri`` when it is a registry alias (the alias says which version is
        meant, and may move), else the local bundle folder when there is one, else ``uri``."""
        if self.follows_alias or self.bundle is None:
            return self.uri
        return str(self.bundle)


@dataclass(frozen=True)
class Fleet:
    uri: str
    manifest: dict[str, Any]
    members: dict[str, FleetMember]

    @property
    def fabrics(self) -> list[str]:
        return sorted(self.members)

    def member(self, fabric: str) -> FleetMember | None:
        """The member of ``fabric`` ("2" finds AITEX fabric "02"; MVTec names any case)."""
        if fabric in self.members:
            return self.members[fabric]
        wanted = fabric.strip().lower()
        for code, member in self.members.items():
            if code.lower() == wanted or (wanted.isdigit() and code == wanted.zfill(len(code))):
                return member
        return None


def write_fleet_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``folder/fleet.json`` atomically (temporary file, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / FLEET_MANIFEST
    handle, staging = tempfile.mkstemp(prefix=f".{FLEET_MANIFEST}.", dir=folder)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(manifest, stream, indent=2, sort_keys=False)
            stream.write("\n")
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


def is_fleet_uri(uri: str) -> bool:
    """Whether ``uri`` names a fleet (a folder with fleet.json, the file, or runs:/ID/fleet)."""
    if uri.startswith("runs:/"):
        return uri.rstrip("/").endswith(f"/{FLEET_IN_RUN}")
    if uri.startswith("models:/"):
        return False
    path = Path(uri).expanduser()
    return (path.name == FLEET_MANIFEST and path.is_file()) or (path / FLEET_MANIFEST).is_file()


def resolve_fleet(uri: str) -> Fleet:
    """Read the fleet manifest ``uri`` names; ModelUriError (one line) when it cannot be read."""
    if uri.startswith("runs:/"):
        path = _download_manifest(uri)
        local = False
    else:
        path = Path(uri).expanduser()
        if path.is_dir():
            path = path / FLEET_MANIFEST
        local = True
    if not path.is_file():
        raise ModelUriError(f"{uri}: no {FLEET_MANIFEST} (not a fleet)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelUriError(f"{path}: unreadable fleet manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != FLEET_KIND:
        raise ModelUriError(f"{path}: not a Loomwatch fleet manifest (kind {FLEET_KIND!r})")
    entries = manifest.get("fabrics")
    if not isinstance(entries, dict) or not entries:
        raise ModelUriError(f"{path}: the fleet manifest lists no fabric")
    members = {}
    for fabric, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("uri"), str):
            raise ModelUriError(f"{path}: fabric {fabric!r} has no model URI")
        bundle = None
        if local and isinstance(entry.get("bundle"), str):
            candidate = path.parent / entry["bundle"]
            bundle = candidate if candidate.is_dir() else None
        members[str(fabric)] = FleetMember(str(fabric), entry["uri"], bundle, entry)
    return Fleet(uri, manifest, members)


def _download_manifest(uri: str) -> Path:
    import mlflow

    run_id = uri.removeprefix("runs:/").split("/", 1)[0]
    try:
        use_tracking_store()
        with mlflow_errors(uri):
            folder = tempfile.mkdtemp(prefix="loomwatch-fleet-")
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"runs:/{run_id}/{FLEET_IN_RUN}/{FLEET_MANIFEST}", dst_path=folder
            )
    except TrackingError as exc:
        raise ModelUriError(str(exc)) from None
    return Path(local)
