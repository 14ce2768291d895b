"""Benchmarks that print figures (speed, accuracy, load, reliability); not timed tests."""

from __future__ import annotations

import os
from pathlib import Path

AITEX_DIR_VARIABLE = "LOOMWATCH_AITEX_DIR"
DEFAULT_AITEX_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "aitex-dev"


def aitex_dir() -> Path:
    """The real AITEX folder used by real-data tests and benchmarks: `LOOMWATCH_AITEX_DIR`, else
    `shared/data/aitex-dev` beside the project folder. It may not exist; callers check."""
    configured = os.environ.get(AITEX_DIR_VARIABLE, "").strip()
    return Path(configured).expanduser() if configured else DEFAULT_AITEX_DIR
