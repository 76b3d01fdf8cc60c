"""Shared fixtures. Flower and anything else we start must stay offline."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
