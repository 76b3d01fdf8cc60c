"""Site releases and signed envelopes: versioned JSON, one codec.

A release is what leaves a site: noisy integer blocks plus their provenance. The
envelope carries the release's canonical bytes and an Ed25519 signature over them;
verifying it is the receiver's job (crypto lives in one module per side).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from protocols.errors import SpecError

__all__ = [
    "RELEASE_FORMAT",
    "RELEASE_VERSION",
    "Envelope",
    "NoisyBlock",
    "SiteRelease",
    "canonical_json",
    "parse_envelope",
]

RELEASE_FORMAT = "outcomebench.release"
RELEASE_VERSION = 1


def canonical_json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class NoisyBlock:
    name: str
    family: str
    n_bands: int
    width: int
    values: tuple[int, ...]
    lo: int  # per-episode contribution bounds
    hi: int
    sensitivity: float  # L2 bound for one client (all of their episodes)
    scale: float  # discrete Gaussian scale
    rho: Fraction  # OpenDP's privacy map of this block at ``sensitivity``

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "n_bands": self.n_bands,
            "width": self.width,
            "values": list(self.values),
            "lo": self.lo,
            "hi": self.hi,
            "sensitivity": self.sensitivity,
            "scale": self.scale,
            "rho": str(self.rho),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteRelease:
    study_id: str
    study_hash: str
    site_id: str
    created: str
    blocks: tuple[NoisyBlock, ...]
    rho: Fraction
    epsilon: float
    delta: float
    unit: str
    max_episodes_per_client: int
    mechanism: str
    window_applied: bool
    versions: Mapping[str, str]

    def as_json(self) -> dict[str, Any]:
        return {
            "format": RELEASE_FORMAT,
            "version": RELEASE_VERSION,
            "study_id": self.study_id,
            "study_hash": self.study_hash,
            "site_id": self.site_id,
            "created": self.created,
            "privacy": {
                "rho": str(self.rho),
                "epsilon": self.epsilon if math.isfinite(self.epsilon) else None,
                "delta": self.delta,
                "unit": self.unit,
                "max_episodes_per_client": self.max_episodes_per_client,
                "mechanism": self.mechanism,
            },
            "window_applied": self.window_applied,
            "blocks": [b.as_json() for b in self.blocks],
            "versions": dict(self.versions),
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.as_json())

    @classmethod
    def from_json(cls, doc: Any) -> SiteRelease:
        try:
            if doc["format"] != RELEASE_FORMAT or doc["version"] != RELEASE_VERSION:
                raise SpecError(
                    "release", [f"release: expected {RELEASE_FORMAT} version {RELEASE_VERSION}"]
                )
            p = doc["privacy"]
            blocks = tuple(
                NoisyBlock(
                    name=str(b["name"]),
                    family=str(b["family"]),
                    n_bands=int(b["n_bands"]),
                    width=int(b["width"]),
                    values=tuple(int(v) for v in b["values"]),
                    lo=int(b["lo"]),
                    hi=int(b["hi"]),
                    sensitivity=float(b["sensitivity"]),
                    scale=float(b["scale"]),
                    rho=Fraction(b["rho"]),
                )
                for b in doc["blocks"]
            )
            for b in blocks:
                if len(b.values) != b.n_bands * b.width:
                    raise SpecError("release", [f"release: block {b.name} has the wrong size"])
            return cls(
                study_id=str(doc["study_id"]),
                study_hash=str(doc["study_hash"]),
                site_id=str(doc["site_id"]),
                created=str(doc["created"]),
                blocks=blocks,
                rho=Fraction(p["rho"]),
                epsilon=math.inf if p["epsilon"] is None else float(p["epsilon"]),
                delta=float(p["delta"]),
                unit=str(p["unit"]),
                max_episodes_per_client=int(p["max_episodes_per_client"]),
                mechanism=str(p["mechanism"]),
                window_applied=bool(doc["window_applied"]),
                versions={str(k): str(v) for k, v in doc["versions"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError("release", [f"release: malformed ({exc.__class__.__name__})"]) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """Signed bytes: ``payload`` is canonical JSON, ``signature`` Ed25519 over it by the
    holder of ``public_key`` (raw 32 bytes)."""

    kind: str  # "release" or "study"
    payload: bytes
    public_key: bytes
    signature: bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "format": f"outcomebench.signed-{self.kind}",
            "version": 1,
            "payload": json.loads(self.payload),
            "signature": {
                "alg": "ed25519",
                "public_key": base64.b64encode(self.public_key).decode(),
                "value": base64.b64encode(self.signature).decode(),
            },
        }

    def dumps(self) -> str:
        return json.dumps(self.as_json(), indent=1, sort_keys=True) + "\n"


def parse_envelope(text: str | bytes, kind: str) -> Envelope:
    """Parse a signed envelope of ``kind``; the payload is re-canonicalised, so any
    whitespace change is harmless and any content change breaks the signature."""
    try:
        doc = json.loads(text)
        if doc["format"] != f"outcomebench.signed-{kind}" or doc["version"] != 1:
            raise ValueError("format")
        sig = doc["signature"]
        if sig["alg"] != "ed25519":
            raise ValueError("alg")
        return Envelope(
            kind=kind,
            payload=canonical_json(doc["payload"]),
            public_key=base64.b64decode(sig["public_key"], validate=True),
            signature=base64.b64decode(sig["value"], validate=True),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError(
            kind, [f"{kind}: not a signed outcomebench {kind} ({exc.__class__.__name__})"]
        ) from None
