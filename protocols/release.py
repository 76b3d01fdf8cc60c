"""Site releases and signed envelopes: versioned JSON, one codec.

A release is what leaves a site: noisy integer blocks plus their provenance. The
envelope carries the release's canonical bytes and an Ed25519 signature over them;
verifying it is the receiver's job (crypto lives in one module per side).

Both readers, :func:`parse_envelope` and :meth:`SiteRelease.from_json`, take untrusted
input (a study from any Flower app, a release from any node) and are bounded before they
do any work: at most :data:`MAX_DOCUMENT_BYTES`, nesting at most :data:`MAX_DEPTH`
levels, integers of at most 20 digits and within int64, texts of bounded length, no NaN
or Infinity. Whatever is wrong, they raise one error type:

    ValueError
    └── SpecError                  (protocols/errors.py)
        └── MalformedDocument      not a well-formed envelope or release; ``problems``
                                   holds one short, bounded description
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from protocols.errors import SpecError

__all__ = [
    "MAX_BLOCKS",
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "MAX_EPISODES_PER_CLIENT",
    "MAX_TEXT",
    "MAX_VALUES",
    "RELEASE_FORMAT",
    "RELEASE_VERSION",
    "Envelope",
    "MalformedDocument",
    "NoisyBlock",
    "SiteRelease",
    "canonical_json",
    "load_json",
    "parse_envelope",
]

RELEASE_FORMAT = "outcomebench.release"
RELEASE_VERSION = 2
"""2: layout version 2 (centred, band-local blocks; protocols/layout.py). A release of an
earlier version is refused with the fix: the site runs an older outcomebench."""

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
"""The gRPC message limit between bridge and agent: nothing larger can cross anyway."""
MAX_DEPTH = 16
"""Nesting of any envelope we write is at most 6 levels (a release's block values)."""
MAX_TEXT = 256
"""Ids, names, timestamps, mechanism and version strings."""
MAX_BLOCKS = 64
"""A layout has at most 18 blocks."""
MAX_VALUES = MAX_DOCUMENT_BYTES // 2
"""Values per block: each takes at least a digit and a comma."""
MAX_EPISODES_PER_CLIENT = 10
"""The largest ``max_episodes_per_client`` a site policy may set."""

_INT64 = 2**63 - 1
_MAX_DIGITS = 20  # int64 needs 19 and a sign; longer literals are refused while parsing
_FRACTION = re.compile(r"-?[0-9]{1,400}(?:/[0-9]{1,400})?")  # str(Fraction) of any float
_MAX_REASON = 160


class MalformedDocument(SpecError):
    """An envelope or release that is not well-formed. ``problems`` has one entry, short
    and bounded, safe to record (it never quotes more than a few characters of input)."""

    def __init__(self, what: str, problem: str) -> None:
        super().__init__(what, [f"{what}: {problem}"[:_MAX_REASON]])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:20]}...{type(value).__name__}"


def _parse_int(text: str) -> int:
    if len(text) > _MAX_DIGITS:
        raise ValueError("integer literal too long")
    return int(text)


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a number")


def _depth_ok(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests at most ``limit`` containers (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return False
                stack.append((child, depth + 1))
    return not isinstance(doc, dict | list) or limit >= 1


def load_json(data: str | bytes, what: str) -> Any:
    """JSON from untrusted ``data``, bounded in size, nesting and number length;
    MalformedDocument naming ``what`` otherwise."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise MalformedDocument(what, f"larger than {MAX_DOCUMENT_BYTES} bytes")
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
        if len(data) > MAX_DOCUMENT_BYTES:
            raise MalformedDocument(what, f"larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        doc = json.loads(data, parse_int=_parse_int, parse_constant=_no_constant)
    except RecursionError:
        raise MalformedDocument(what, f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError) as exc:
        raise MalformedDocument(what, f"not JSON ({exc.__class__.__name__})") from None
    if isinstance(doc, dict | list) and not _depth_ok(doc, MAX_DEPTH):
        raise MalformedDocument(what, f"nested deeper than {MAX_DEPTH} levels")
    return doc


class _Reader:
    """Typed field access for one document: the first problem raises MalformedDocument
    with the field's path."""

    def __init__(self, what: str) -> None:
        self.what = what

    def fail(self, where: str, expected: str, value: Any) -> MalformedDocument:
        return MalformedDocument(self.what, f"{where}: expected {expected}, got {_short(value)}")

    def mapping(self, doc: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(doc, dict):
            raise self.fail(where, "an object", doc)
        return doc

    def field(self, doc: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in doc:
            raise MalformedDocument(self.what, f"{where}.{key}: missing")
        return doc[key]

    def text(self, doc: Mapping[str, Any], key: str, where: str) -> str:
        value = self.field(doc, key, where)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
            raise self.fail(f"{where}.{key}", f"a text of 1-{MAX_TEXT} characters", value)
        return value

    def integer(self, doc: Mapping[str, Any], key: str, where: str, lo: int, hi: int) -> int:
        return self.int_value(self.field(doc, key, where), f"{where}.{key}", lo, hi)

    def int_value(self, value: Any, where: str, lo: int = -_INT64, hi: int = _INT64) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(where, f"an integer in [{lo}, {hi}]", value)
        return value

    def number(self, doc: Mapping[str, Any], key: str, where: str, *, positive: bool) -> float:
        value = self.field(doc, key, where)
        ok = not isinstance(value, bool) and isinstance(value, int | float)
        if ok:
            value = float(value) if abs(value) <= 1e308 else math.inf
            ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
        if not ok:
            kind = "a finite number > 0" if positive else "a finite number >= 0"
            raise self.fail(f"{where}.{key}", kind, value)
        return float(value)

    def fraction(self, doc: Mapping[str, Any], key: str, where: str) -> Fraction:
        value = self.field(doc, key, where)
        if isinstance(value, str) and _FRACTION.fullmatch(value):
            num, _, den = value.partition("/")
            n, d = int(num), int(den) if den else 1
            if n > 0 and d > 0:
                return Fraction(n, d)
        raise self.fail(f"{where}.{key}", "a fraction p/q > 0 as text", value)

    def flag(self, doc: Mapping[str, Any], key: str, where: str) -> bool:
        value = self.field(doc, key, where)
        if not isinstance(value, bool):
            raise self.fail(f"{where}.{key}", "true or false", value)
        return value


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
        """A release from its parsed JSON (see :func:`load_json`); every field is type-
        and range-checked. MalformedDocument on the first problem."""
        r = _Reader("release")
        top = r.mapping(doc, "release")
        if top.get("format") != RELEASE_FORMAT:
            raise MalformedDocument("release", f"expected format {RELEASE_FORMAT}")
        if top.get("version") != RELEASE_VERSION:
            got = top.get("version")
            shown = got if isinstance(got, int) and not isinstance(got, bool) else "?"
            raise MalformedDocument(
                "release",
                f"format version {shown}"
                f", this coordinator reads {RELEASE_VERSION} (new layout): update outcomebench "
                "at the site, answer again",
            )
        p = r.mapping(r.field(top, "privacy", "release"), "release.privacy")
        raw_blocks = r.field(top, "blocks", "release")
        if not isinstance(raw_blocks, list) or not 0 < len(raw_blocks) <= MAX_BLOCKS:
            raise r.fail("release.blocks", f"a list of 1-{MAX_BLOCKS} blocks", raw_blocks)
        blocks = tuple(_block(r, raw, f"release.blocks[{i}]") for i, raw in enumerate(raw_blocks))
        eps = r.field(p, "epsilon", "release.privacy")
        versions = r.mapping(r.field(top, "versions", "release"), "release.versions")
        if len(versions) > 32 or any(len(k) > MAX_TEXT for k in versions):
            raise r.fail("release.versions", f"at most 32 names of {MAX_TEXT} characters", versions)
        return cls(
            study_id=r.text(top, "study_id", "release"),
            study_hash=r.text(top, "study_hash", "release"),
            site_id=r.text(top, "site_id", "release"),
            created=r.text(top, "created", "release"),
            blocks=blocks,
            rho=r.fraction(p, "rho", "release.privacy"),
            epsilon=math.inf
            if eps is None
            else r.number(p, "epsilon", "release.privacy", positive=False),
            delta=r.number(p, "delta", "release.privacy", positive=False),
            unit=r.text(p, "unit", "release.privacy"),
            max_episodes_per_client=r.integer(
                p, "max_episodes_per_client", "release.privacy", 1, MAX_EPISODES_PER_CLIENT
            ),
            mechanism=r.text(p, "mechanism", "release.privacy"),
            window_applied=r.flag(top, "window_applied", "release"),
            versions={k: r.text(versions, k, "release.versions") for k in versions},
        )


def _block(r: _Reader, raw: Any, where: str) -> NoisyBlock:
    b = r.mapping(raw, where)
    n_bands = r.integer(b, "n_bands", where, 1, MAX_VALUES)
    width = r.integer(b, "width", where, 1, MAX_VALUES)
    values = r.field(b, "values", where)
    if not isinstance(values, list) or len(values) != n_bands * width:
        raise MalformedDocument(
            "release", f"{where}.values: expected n_bands * width = {n_bands * width} values"
        )
    for i, v in enumerate(values):
        r.int_value(v, f"{where}.values[{i}]")  # ints within int64, never bool or float
    lo = r.integer(b, "lo", where, -_INT64, _INT64)
    hi = r.integer(b, "hi", where, lo, _INT64)
    return NoisyBlock(
        name=r.text(b, "name", where),
        family=r.text(b, "family", where),
        n_bands=n_bands,
        width=width,
        values=tuple(values),
        lo=lo,
        hi=hi,
        sensitivity=r.number(b, "sensitivity", where, positive=True),
        scale=r.number(b, "scale", where, positive=True),
        rho=r.fraction(b, "rho", where),
    )


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
    """Parse a signed envelope of ``kind`` (bounded: see the module docstring); the payload
    is re-canonicalised, so any whitespace change is harmless and any content change
    breaks the signature. MalformedDocument if it is not one."""
    what = f"signed {kind}"
    r = _Reader(what)
    doc = r.mapping(load_json(text, what), "top level")
    if doc.get("format") != f"outcomebench.signed-{kind}" or doc.get("version") != 1:
        raise MalformedDocument(what, f"not a signed outcomebench {kind} (format, version)")
    payload = r.mapping(r.field(doc, "payload", what), f"{what}.payload")
    sig = r.mapping(r.field(doc, "signature", what), f"{what}.signature")
    if sig.get("alg") != "ed25519":
        raise MalformedDocument(what, "signature.alg: expected ed25519")
    return Envelope(
        kind=kind,
        payload=canonical_json(payload),  # bounded depth: json.dumps cannot recurse away
        public_key=_b64(r, sig, "public_key", 32),
        signature=_b64(r, sig, "value", 64),
    )


def _b64(r: _Reader, sig: Mapping[str, Any], key: str, size: int) -> bytes:
    text = r.text(sig, key, "signature")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise r.fail(f"signature.{key}", f"base64 of {size} bytes", text)
    return raw
