"""Pooling site releases: verify, check, sum. Pooling is post-processing: it costs no
privacy budget.

Each release must be signed by its site's registered key, answer exactly this study (its
hash), carry exactly the study's block layout, and come from a site not counted yet.
What a release says about its noise is not taken on trust: each block's sensitivity,
scale and rho are recomputed from the study and the layout (:func:`check_noise`), and
each value must be possible for the study (:func:`check_values`). A release that fails
any check is rejected on its own, with its reason; the others are still pooled.
Summed blocks keep the noise variance of each value (the sum of the sites' scale^2), so
every estimate can carry the DP noise in its interval. Sums are exact: int64 when the
values' bounds prove it cannot overflow, Python integers otherwise.

    SpecError               (protocols/errors.py) a release or study is invalid
    QuorumNotReached        fewer valid contributions than the study's min_sites
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator import crypto
from protocols.errors import SpecError
from protocols.layout import BlockSpec, block_layout, budget_weights
from protocols.release import (
    MAX_DOCUMENT_BYTES,
    MalformedDocument,
    NoisyBlock,
    SiteRelease,
    load_json,
    parse_envelope,
)
from protocols.study import Study
from protocols.zcdp import gaussian_scale, rho_cap

__all__ = [
    "MAX_SITE_CLIENTS",
    "NOISE_TAIL",
    "SCALE_TOLERANCE",
    "Contribution",
    "Pooled",
    "PooledBlock",
    "QuorumNotReached",
    "Rejection",
    "check_noise",
    "check_release",
    "check_values",
    "load_release_file",
    "pool",
    "require_quorum",
    "site_keys",
    "verify_release",
]

MAX_SITE_CLIENTS = 10_000_000
"""No site has more clients in one study: a value beyond what this many clients (each with
the site's max_episodes_per_client episodes at the block's bound) could sum to, plus
NOISE_TAIL noise scales, cannot come from a correct release."""
NOISE_TAIL = 100
"""Noise scales a discrete Gaussian value never reaches (P < exp(-5000))."""
SCALE_TOLERANCE = 1e-9
"""Relative slack of the recomputed scale and rho: the site widens its scale by at most
64 steps of 1e-12 (site_agent/privacy/accounting.py compile_block)."""
_INT64 = 2**63 - 1


class QuorumNotReached(Exception):
    """Fewer valid contributions than the study's ``min_sites``: nothing is published."""

    def __init__(self, study: Study, contributed: int) -> None:
        self.study_id = study.id
        self.contributed = contributed
        self.needed = study.min_sites
        super().__init__(
            f"quorum not reached: {contributed} valid release(s) of the {study.min_sites} "
            f"the study {study.id!r} needs (min_sites); nothing was published"
        )


def require_quorum(study: Study, contributions: Sequence[Contribution]) -> None:
    """Raise QuorumNotReached below the study's ``min_sites``."""
    if len(contributions) < study.min_sites:
        raise QuorumNotReached(study, len(contributions))


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


@dataclass(frozen=True, slots=True)
class _Expected:
    """What the study fixes about every release: the layout, each block's share of the
    study's rho, and that rho (or, for an (epsilon, delta) study, its cap)."""

    layout: tuple[BlockSpec, ...]
    shares: tuple[Fraction, ...]
    rho: Fraction | None  # the study's rho, exact; None for an (epsilon, delta) study
    cap: Fraction  # no honest release spends more


@functools.lru_cache(maxsize=16)
def _expected(study: Study) -> _Expected:
    # Computed once per study, not once per release: pooling 1,000 releases re-derived it.
    layout = block_layout(study)
    req = study.privacy
    if req.rho is not None:
        rho, cap = req.rho, req.rho
    else:
        rho, cap = None, rho_cap(req.epsilon or Fraction(0), req.delta or Fraction(0))
    return _Expected(layout=layout, shares=budget_weights(layout), rho=rho, cap=cap)


def check_release(study: Study, payload: bytes | Mapping[str, Any]) -> SiteRelease:
    """Parse a release payload (bytes, or the JSON already parsed) and check it answers
    ``study`` with its exact layout, the study's noise and possible values. SpecError
    (MalformedDocument if it is not a well-formed release) with the reason."""
    doc = load_json(payload, "release") if isinstance(payload, bytes) else payload
    return _check(study, SiteRelease.from_json(doc))


def _check(study: Study, release: SiteRelease) -> SiteRelease:
    if release.study_hash != study.hash or release.study_id != study.id:
        raise SpecError(
            "release",
            [
                f"release answers study {release.study_id[:80]!r} "
                f"({release.study_hash[:12]}), not {study.id!r} "
                f"({study.hash[:12]})"
            ],
        )
    got = tuple((b.name, b.n_bands * b.width, b.lo, b.hi) for b in release.blocks)
    want = tuple((b.name, b.size, b.lo, b.hi) for b in _expected(study).layout)
    if got != want:
        raise SpecError("release", ["release blocks do not match the study's layout"])
    check_noise(study, release)
    check_values(release)
    return release


def check_noise(study: Study, release: SiteRelease) -> None:
    """Recompute each block's sensitivity, scale and rho from the study, the layout and
    the site's ``max_episodes_per_client`` (which the sensitivity scales with), the way
    the site compiles them; SpecError on any mismatch.

    For a rho study the study's rho is exact and every scale must be its own. For an
    (epsilon, delta) study it is the rho the site derived with OpenDP, which the
    coordinator bounds without OpenDP (protocols/zcdp.py rho_cap, within 1e-6 of it):
    the blocks' rho / share give one common rho, at most the cap, and every scale must be
    that rho's. Claiming a smaller rho (and so larger scales) only widens the intervals."""
    exp = _expected(study)
    m = release.max_episodes_per_client
    ratios = [b.rho / share for b, share in zip(release.blocks, exp.shares, strict=True)]
    total = exp.rho if exp.rho is not None else max(ratios)
    if total > exp.cap:
        raise _noise(
            f"claims rho {float(total):.6g}, more than the study allows ({float(exp.cap):.6g})"
        )
    for b, spec, share in zip(release.blocks, exp.layout, exp.shares, strict=True):
        d_in = spec.sensitivity(m)
        if not math.isclose(b.sensitivity, d_in, rel_tol=SCALE_TOLERANCE):
            raise _noise(
                f"block {spec.name}: sensitivity {b.sensitivity:.6g}, the study's is "
                f"{d_in:.6g} at max_episodes_per_client {m}"
            )
        if b.rho > share * total:
            raise _noise(
                f"block {spec.name}: rho {float(b.rho):.6g} exceeds its share "
                f"{float(share * total):.6g} of the study's rho"
            )
        scale = gaussian_scale(d_in, share * total)
        if not scale * (1 - SCALE_TOLERANCE) <= b.scale <= scale * (1 + SCALE_TOLERANCE):
            raise _noise(
                f"block {spec.name}: noise scale {b.scale:.6g}, the study's is {scale:.6g}"
            )
        if float(b.rho) < (d_in / b.scale) ** 2 / 2 * (1 - SCALE_TOLERANCE):
            raise _noise(f"block {spec.name}: rho {float(b.rho):.6g} is less than its scale costs")
    if release.rho != sum((b.rho for b in release.blocks), Fraction(0)):
        raise _noise("total rho is not the sum of its blocks' rho")


def _noise(problem: str) -> SpecError:
    return SpecError("release", [f"noise does not match the study: {problem}"])


def _value_limit(block: NoisyBlock, max_episodes: int) -> int:
    bound = max(abs(block.lo), abs(block.hi))
    return MAX_SITE_CLIENTS * max_episodes * bound + math.ceil(NOISE_TAIL * block.scale)


def check_values(release: SiteRelease) -> None:
    """Every value within what MAX_SITE_CLIENTS clients plus NOISE_TAIL noise scales can
    reach (a saturated or invented value is refused, not published); SpecError if not."""
    for b in release.blocks:
        limit = _value_limit(b, release.max_episodes_per_client)
        worst = max((abs(v) for v in b.values), default=0)
        if worst > limit:
            raise SpecError(
                "release",
                [
                    f"impossible value in block {b.name}: |value| {worst} exceeds {limit} "
                    f"({MAX_SITE_CLIENTS} clients at the block's bound plus {NOISE_TAIL} "
                    "noise scales)"
                ],
            )


def verify_release(data: bytes, study: Study, keys: Mapping[str, Path]) -> Contribution | str:
    """A verified contribution from signed release bytes, or the reason it is refused.
    Total: no input makes it raise; a malformed release gives "malformed release: ..."."""
    try:
        env = parse_envelope(data, "release")
        release = SiteRelease.from_json(load_json(env.payload, "release"))
    except MalformedDocument as exc:
        return f"malformed release: {exc.problems[0]}"
    site_id = release.site_id
    if site_id not in keys:
        shown = site_id[:64]
        return f"site {shown!r} is not registered (no {shown}.pub.pem in the keys directory)"
    try:
        key = crypto.load_public(keys[site_id])
    except (OSError, ValueError) as exc:
        return f"registered key {keys[site_id]} is unreadable ({exc.__class__.__name__})"
    if not crypto.verify_with(env, key):
        return f"signature is not {site_id}'s registered key"
    try:
        _check(study, release)
    except SpecError as exc:
        return "; ".join(exc.problems)
    return Contribution(
        site_id=site_id, release=release, sha256=hashlib.sha256(env.payload).hexdigest()
    )


def load_release_file(
    path: Path, study: Study, keys: Mapping[str, Path]
) -> Contribution | Rejection:
    """A verified contribution, or the reason the file is rejected."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_DOCUMENT_BYTES + 1)  # one byte over is enough to refuse
    except OSError as exc:
        return Rejection(str(path), f"unreadable ({exc.__class__.__name__})")
    result = verify_release(data, study, keys)
    return Rejection(str(path), result) if isinstance(result, str) else result


def pool(study: Study, contributions: Iterable[Contribution]) -> Pooled:
    """Sum the contributions' blocks exactly. Raises SpecError if a site is counted twice."""
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
        blocks[spec.name] = PooledBlock(
            spec=spec,
            values=_exact_sum(mine, shape),
            # A discrete Gaussian's variance is at most scale^2: the interval stays honest.
            noise_var=np.full(shape, float(sum(b.scale**2 for b in mine))),
        )
    return Pooled(study=study, contributions=contributions, blocks=blocks)


def _exact_sum(blocks: Sequence[NoisyBlock], shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    """The exact integer sum of ``blocks``' values, as floats. Each value is within int64
    (the release codec checks); one array for all sites keeps 1,000 releases fast, and
    int64 is used only when the sum of the sites' largest magnitudes proves it exact."""
    if not blocks:
        return np.zeros(shape, dtype=np.float64)
    values = np.asarray([b.values for b in blocks], dtype=np.int64).reshape(-1, *shape)
    # |v| <= 2^63 - 1 for every value, so abs cannot overflow; the bound is a Python int.
    bound = sum(int(m) for m in np.abs(values).reshape(len(blocks), -1).max(axis=1))
    if bound <= _INT64:
        exact: npt.NDArray[np.float64] = values.sum(axis=0).astype(np.float64)
        return exact
    # Python integers: exact whatever the sites sent (the checks bound each value).
    total = np.asarray([b.values for b in blocks], dtype=object).reshape(-1, *shape).sum(0)
    wide: npt.NDArray[np.float64] = np.array([float(v) for v in total.ravel()]).reshape(shape)
    return wide
