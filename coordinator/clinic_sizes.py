"""Synthetic clinic sizes, apart from :mod:`coordinator.synth` so that the command line
can state them in its help without importing pandas (pooling runs faster without it)."""

from __future__ import annotations

__all__ = ["DEFAULT_CLIENTS_RANGE", "MIN_CLIENTS"]

DEFAULT_CLIENTS_RANGE = (30, 3000)
"""Clinic sizes, drawn log-uniformly: from a few dozen to a few thousand clients."""

MIN_CLIENTS = 10
"""The smallest clinic :func:`synthesize` writes: room for every kind of bad row."""
