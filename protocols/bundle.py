"""Benchmark bundle manifests: which files, with which SHA-256. Checking the manifest's
signature is each side's crypto module's job; checking the files against it is here, so
the coordinator and the clinics check bundles the same way."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from protocols.errors import SpecError
from protocols.release import Envelope, parse_envelope

__all__ = ["BENCHMARK_FORMAT", "BENCHMARK_VERSION", "MANIFEST", "check_files", "read_manifest"]

MANIFEST = "MANIFEST.json"
BENCHMARK_FORMAT = "outcomebench.benchmark"
BENCHMARK_VERSION = 2
"""2: figures from layout version 2 (review groups, figures known by definition, not
estimable at this budget); the document says which layout made it (``layout_version``)."""


def read_manifest(bundle: Path) -> Envelope:
    try:
        return parse_envelope((bundle / MANIFEST).read_bytes(), "manifest")
    except OSError as exc:
        raise SpecError(str(bundle), [f"{bundle / MANIFEST}: missing or unreadable "
                                      f"({exc.__class__.__name__})"]) from None


def check_files(bundle: Path, env: Envelope) -> list[str]:
    """Every file that is missing, changed or added relative to the manifest."""
    try:
        listed = json.loads(env.payload)["files"]
        if not isinstance(listed, dict):
            raise TypeError("files")
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST}: malformed"]
    problems = []
    present = {p.name for p in bundle.iterdir() if p.name != MANIFEST}
    for name, digest in sorted(listed.items()):
        path = bundle / name
        if "/" in name or name.startswith(".") or not path.is_file():
            problems.append(f"{name}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{name}: changed since it was signed")
    problems += [f"{name}: added after signing" for name in sorted(present - set(listed))]
    return problems
