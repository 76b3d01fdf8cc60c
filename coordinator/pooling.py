"""Pooling site releases: verify, check, sum. Pooling is post-processing: it costs no
privacy budget.

Each release must be signed by its site's registered key, answer exactly this study (its
hash), carry exactly the study's block layout, and come from a site not counted yet.
Summed blocks keep the noise variance of each value (the sum of the sites' scale^2), so
every estimate can carry the DP noise in its interval.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator import crypto
from protocols.errors import SpecError
from protocols.layout import BlockSpec, block_layout
from protocols.release import SiteRelease, parse_envelope
from protocols.study import Study

__all__ = [
    "Contribution",
    "Pooled",
    "PooledBlock",
    "Rejection",
    "check_release",
    "load_release_file",
    "pool",
    "site_keys",
]


@dataclass(frozen=True, slots=True)
class Contribution:
    site_id: str
    release: SiteRelease
    sha256: str  # of the signed file's canonical payload


@dataclass(frozen=True, slots=True)
class Rejection:
    source: str  # a file or a site id
    reason: str


@dataclass(frozen=True, slots=True)
class PooledBlock:
    spec: BlockSpec
    values: npt.NDArray[np.float64]  # (n_bands, width) summed noisy values
    noise_var: npt.NDArray[np.float64]  # (n_bands, width) variance of the summed noise


@dataclass(frozen=True, slots=True)
class Pooled:
    study: Study
    contributions: tuple[Contribution, ...]
    blocks: Mapping[str, PooledBlock]

    @property
    def site_ids(self) -> tuple[str, ...]:
        return tuple(c.site_id for c in self.contributions)


def site_keys(directory: Path) -> dict[str, Path]:
    """Registered site keys: ``<site id>.pub.pem`` files in ``directory``."""
    if not directory.is_dir():
        raise SpecError(str(directory), [f"{directory}: no such directory of site keys"])
    return {p.name.removesuffix(".pub.pem"): p for p in sorted(directory.glob("*.pub.pem"))}


@functools.lru_cache(maxsize=16)
def _expected_blocks(study: Study) -> tuple[tuple[str, int, int, int], ...]:
    # Computed once per study, not once per release: pooling 1,000 releases re-derived it.
    return tuple((b.name, b.size, b.lo, b.hi) for b in block_layout(study))


def check_release(study: Study, payload: bytes | Mapping[str, Any]) -> SiteRelease:
    """Parse a release payload (bytes, or the JSON already parsed) and check it answers
    ``study`` with its exact layout."""
    doc = json.loads(payload) if isinstance(payload, bytes) else payload
    release = SiteRelease.from_json(doc)
    if release.study_hash != study.hash or release.study_id != study.id:
        raise SpecError(
            "release",
            [
                f"release answers study {release.study_id!r} "
                f"({release.study_hash[:12]}), not {study.id!r} "
                f"({study.hash[:12]})"
            ],
        )
    got = tuple((b.name, b.n_bands * b.width, b.lo, b.hi) for b in release.blocks)
    if got != _expected_blocks(study):
        raise SpecError("release", ["release blocks do not match the study's layout"])
    for b in release.blocks:
        if not (b.scale > 0 and np.isfinite(b.scale)) or b.rho <= 0:
            raise SpecError("release", [f"block {b.name}: no valid noise scale"])
    return release


def verify_release(data: bytes, study: Study, keys: Mapping[str, Path]) -> Contribution | str:
    """A verified contribution from signed release bytes, or the reason it is refused."""
    try:
        env = parse_envelope(data, "release")
        doc = json.loads(env.payload)
        site_id = str(doc.get("site_id", ""))
        if site_id not in keys:
            return (
                f"site {site_id!r} is not registered (no {site_id}.pub.pem in the keys directory)"
            )
        if not crypto.verify_with(env, crypto.load_public(keys[site_id])):
            return f"signature is not {site_id}'s registered key"
        release = check_release(study, doc)
    except SpecError as exc:
        return "; ".join(exc.problems)
    except (OSError, ValueError, AttributeError) as exc:
        return f"unreadable or malformed ({exc.__class__.__name__})"
    return Contribution(
        site_id=site_id, release=release, sha256=hashlib.sha256(env.payload).hexdigest()
    )


def load_release_file(
    path: Path, study: Study, keys: Mapping[str, Path]
) -> Contribution | Rejection:
    """A verified contribution, or the reason the file is rejected."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Rejection(str(path), f"unreadable ({exc.__class__.__name__})")
    result = verify_release(data, study, keys)
    return Rejection(str(path), result) if isinstance(result, str) else result


def pool(study: Study, contributions: Iterable[Contribution]) -> Pooled:
    """Sum the contributions' blocks. Raises SpecError if a site is counted twice."""
    contributions = tuple(contributions)
    seen: set[str] = set()
    for c in contributions:
        if c.site_id in seen:
            raise SpecError("pool", [f"site {c.site_id} contributes more than one release"])
        seen.add(c.site_id)
    by_name = [{b.name: b for b in c.release.blocks} for c in contributions]
    blocks: dict[str, PooledBlock] = {}
    for spec in block_layout(study):
        shape = (spec.n_bands, spec.width)
        mine = [named[spec.name] for named in by_name]
        # Integer sums are exact; one array for all sites keeps 1,000 releases fast.
        total = np.asarray([b.values for b in mine], dtype=np.int64).reshape(-1, *shape).sum(0)
        # A discrete Gaussian's variance is at most scale^2: the interval stays honest.
        var = np.full(shape, float(sum(b.scale**2 for b in mine)))
        blocks[spec.name] = PooledBlock(spec=spec, values=total.astype(np.float64), noise_var=var)
    return Pooled(study=study, contributions=contributions, blocks=blocks)
