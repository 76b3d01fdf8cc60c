"""Pooling checks what it is told: malformed releases are rejected one by one, each block's
noise is recomputed from the study, impossible values are refused, sums are exact.

Releases here are built without the site (fast, and any lie is easy to write); that an
honest site's release passes the same checks is pinned in test_rounds.py (real releases)."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator import crypto
from coordinator.pooling import (
    MAX_SITE_CLIENTS,
    Contribution,
    QuorumNotReached,
    check_release,
    pool,
    require_quorum,
    verify_release,
)
from protocols.layout import block_layout, budget_weights
from protocols.release import NoisyBlock, SiteRelease, canonical_json
from protocols.study import Study, parse_study
from protocols.zcdp import gaussian_scale
from site_agent.privacy.accounting import rho_for_epsilon
from tests.system.offline import study_doc

INT64 = 2**63 - 1


def honest(
    study: Study, site: str, *, rho: Fraction | None = None, max_episodes: int = 1, seed: int = 0
) -> SiteRelease:
    """What a correct site would send: the study's scales and rho, small noisy values."""
    layout = block_layout(study)
    total = rho if rho is not None else study.privacy.rho
    assert total is not None
    rng = np.random.default_rng(seed)
    blocks = []
    for spec, share in zip(layout, budget_weights(layout), strict=True):
        d_in = spec.sensitivity(max_episodes)
        blocks.append(
            NoisyBlock(
                name=spec.name,
                family=str(spec.family),
                n_bands=spec.n_bands,
                width=spec.width,
                values=tuple(int(v) for v in rng.integers(0, 50, spec.size)),
                lo=spec.lo,
                hi=spec.hi,
                sensitivity=d_in,
                scale=gaussian_scale(d_in, total * share),
                rho=total * share,
            )
        )
    return SiteRelease(
        study_id=study.id,
        study_hash=study.hash,
        site_id=site,
        created="2026-05-01T12:00:00+00:00",
        blocks=tuple(blocks),
        rho=sum((b.rho for b in blocks), Fraction(0)),
        epsilon=1.0,
        delta=1e-6,
        unit="client",
        max_episodes_per_client=max_episodes,
        mechanism="discrete Gaussian",
        window_applied=True,
        versions={"outcomebench": "0.1.0"},
    )


class Sites:
    """Registered site keys in a directory, and signing for any of them."""

    def __init__(self, root: Path, n: int) -> None:
        self.dir = root / "keys"
        self.private: dict[str, Ed25519PrivateKey] = {}
        for i in range(n):
            site = f"clinic-{i:02d}"
            private, _ = crypto.generate_keypair(self.dir, site)
            self.private[site] = crypto.load_private(private)
        self.keys = {s: self.dir / f"{s}.pub.pem" for s in self.private}

    def sign(self, site: str, payload: dict[str, Any] | bytes) -> bytes:
        """A signed envelope around ``payload``; raw bytes go in verbatim, JSON or not."""
        raw = payload if isinstance(payload, bytes) else canonical_json(payload)
        env = crypto.sign(self.private[site], "release", raw)
        sig = json.dumps(
            {
                "alg": "ed25519",
                "public_key": base64.b64encode(env.public_key).decode(),
                "value": base64.b64encode(env.signature).decode(),
            }
        ).encode()
        return (
            b'{"format": "outcomebench.signed-release", "version": 1, "payload": '
            + raw
            + b', "signature": '
            + sig
            + b"}"
        )


@pytest.fixture(scope="module")
def study() -> Study:
    return parse_study(study_doc())


@pytest.fixture()
def sites(tmp_path: Path) -> Sites:
    return Sites(tmp_path, 4)


def _block(release: SiteRelease, name: str, **change: Any) -> SiteRelease:
    blocks = tuple(
        dataclasses.replace(b, **change) if b.name == name else b for b in release.blocks
    )
    return dataclasses.replace(release, blocks=blocks)


def test_honest_releases_are_pooled_exactly(study: Study, sites: Sites) -> None:
    releases = [honest(study, s, seed=i) for i, s in enumerate(sites.keys)]
    got = [verify_release(sites.sign(r.site_id, r.as_json()), study, sites.keys) for r in releases]
    assert all(isinstance(c, Contribution) for c in got), got
    pooled = pool(study, [c for c in got if isinstance(c, Contribution)])
    want = sum(np.asarray(r.blocks[0].values) for r in releases)
    assert pooled.blocks["episodes"].values.ravel().tolist() == want.tolist()


def _json_with(release: SiteRelease, path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    doc = json.loads(release.canonical_bytes())
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc  # type: ignore[no-any-return]


MALFORMED: dict[str, Callable[[SiteRelease], bytes | dict[str, Any]]] = {
    "bracket bomb": lambda r: b"[" * 100_000 + b"]" * 100_000,
    "object bomb": lambda r: b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "not json": lambda r: b"{not json",
    "huge integer": lambda r: b"9" * 5000,
    "NaN scale": lambda r: canonical_json(r.as_json()).replace(
        f'"scale":{r.blocks[0].scale!r}'.encode(), b'"scale":NaN', 1
    ),
    "float value": lambda r: _json_with(r, ("blocks", 0, "values", 0), 1.5),
    "bool value": lambda r: _json_with(r, ("blocks", 0, "values", 0), True),
    "text value": lambda r: _json_with(r, ("blocks", 0, "values", 0), "7"),
    "nested value": lambda r: _json_with(r, ("blocks", 0, "values", 0), [[[1]]]),
    "value beyond int64": lambda r: _json_with(r, ("blocks", 0, "values", 0), INT64 + 1),
    "missing rho": lambda r: {k: v for k, v in r.as_json().items() if k != "privacy"},
    "rho as exponent": lambda r: _json_with(r, ("blocks", 0, "rho"), "1e-1000000"),
    "zero scale": lambda r: _json_with(r, ("blocks", 0, "scale"), 0),
    "long site id": lambda r: _json_with(r, ("site_id",), "x" * 100_000),
    "wrong size": lambda r: _json_with(r, ("blocks", 0, "n_bands"), 7),
    "blocks not a list": lambda r: _json_with(r, ("blocks",), {"a": 1}),
    "too many episodes": lambda r: _json_with(r, ("privacy", "max_episodes_per_client"), 11),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_release_rejected_alone(study: Study, sites: Sites, kind: str) -> None:
    good = [honest(study, s, seed=i) for i, s in enumerate(sites.keys)]
    bad = sites.sign("clinic-03", MALFORMED[kind](good[3]))
    results = [
        verify_release(sites.sign(r.site_id, r.as_json()), study, sites.keys) for r in good[:3]
    ]
    reason = verify_release(bad, study, sites.keys)
    assert all(isinstance(c, Contribution) for c in results)
    assert isinstance(reason, str) and reason.startswith("malformed release: "), reason
    assert len(reason) <= 200
    assert len(pool(study, [c for c in results if isinstance(c, Contribution)]).site_ids) == 3


def test_unsigned_garbage_never_raises(study: Study, sites: Sites) -> None:
    for data in (
        b"[" * 10**6,
        b"\xff\xfe\x00",
        b"",
        b"null",
        b'{"format": 1}',
        b"x" * (17 * 1024 * 1024),
    ):
        reason = verify_release(data, study, sites.keys)
        assert isinstance(reason, str) and reason.startswith("malformed release: ")


LIES: dict[str, Callable[[SiteRelease], SiteRelease]] = {
    "tiny scale": lambda r: _block(r, "episodes", scale=1e-9),
    "scale 1% small": lambda r: _block(r, "episodes", scale=r.blocks[0].scale * 0.99),
    "scale 1% large": lambda r: _block(r, "episodes", scale=r.blocks[0].scale * 1.01),
    "rho beyond share": lambda r: _block(r, "episodes", rho=r.blocks[0].rho * 2),
    "rho below its scale": lambda r: _block(r, "episodes", rho=r.blocks[0].rho / 2),
    "half sensitivity": lambda r: _block(r, "episodes", sensitivity=0.5),
    "more episodes, same sensitivity": lambda r: dataclasses.replace(r, max_episodes_per_client=3),
    "total rho not the sum": lambda r: dataclasses.replace(r, rho=r.rho / 2),
}


@pytest.mark.parametrize("kind", sorted(LIES))
def test_lying_noise_refused(study: Study, sites: Sites, kind: str) -> None:
    lie = LIES[kind](honest(study, "clinic-00"))
    reason = verify_release(sites.sign("clinic-00", lie.as_json()), study, sites.keys)
    assert isinstance(reason, str) and reason.startswith("noise does not match the study"), reason


def test_site_max_episodes_enters_the_sensitivity(study: Study, sites: Sites) -> None:
    # Carried in release.privacy.max_episodes_per_client: recomputed, not assumed to be 1.
    r = honest(study, "clinic-00", max_episodes=3)
    spec = block_layout(study)[1]
    assert r.blocks[1].sensitivity == 3 * math.sqrt(spec.sensitivity_sq) > 0
    assert isinstance(check_release(study, r.as_json()), SiteRelease)


def test_rho_study_refuses_more_than_asked(study: Study) -> None:
    assert study.privacy.rho is not None
    over = honest(study, "clinic-00", rho=study.privacy.rho * Fraction(101, 100))
    with pytest.raises(ValueError, match="noise does not match the study"):
        check_release(study, over.as_json())


def test_epsilon_study_recomputed_without_opendp() -> None:
    study = parse_study(study_doc(privacy={"epsilon": 1.0, "delta": 1e-6}))
    assert study.privacy.epsilon is not None and study.privacy.delta is not None
    site_rho = rho_for_epsilon(study.privacy.epsilon, study.privacy.delta)  # what OpenDP gives
    assert isinstance(check_release(study, honest(study, "c", rho=site_rho).as_json()), SiteRelease)
    with pytest.raises(ValueError, match="noise does not match the study: claims rho"):
        check_release(study, honest(study, "c", rho=site_rho * Fraction(101, 100)).as_json())
    # Less rho, with the scales that go with it, only widens the intervals.
    assert check_release(study, honest(study, "c", rho=site_rho / 2).as_json())
    # Scales of one rho and block rho of another do not.
    lie = honest(study, "c", rho=site_rho)
    lie = dataclasses.replace(
        lie,
        blocks=(dataclasses.replace(lie.blocks[0], scale=lie.blocks[0].scale / 2), *lie.blocks[1:]),
    )
    with pytest.raises(ValueError, match="noise does not match the study"):
        check_release(study, lie.as_json())


def test_impossible_values_refused(study: Study, sites: Sites) -> None:
    r = honest(study, "clinic-00")
    n = r.blocks[0].n_bands
    saturated = _block(r, "episodes", values=(INT64,) * n)
    reason = verify_release(sites.sign("clinic-00", saturated.as_json()), study, sites.keys)
    assert isinstance(reason, str) and reason.startswith("impossible value in block episodes")
    # The limit is MAX_SITE_CLIENTS episodes at the bound plus 100 noise scales.
    limit = MAX_SITE_CLIENTS + int(100 * r.blocks[0].scale) + 1
    for v, ok in ((limit - 2, True), (-(limit - 2), True), (limit + 1, False)):
        doc = _block(r, "episodes", values=(v,) * n).as_json()
        reason = verify_release(sites.sign("clinic-00", doc), study, sites.keys)
        assert isinstance(reason, Contribution) is ok, reason


def test_sums_cannot_overflow(study: Study) -> None:
    # Values a check would refuse, summed directly: int64 would wrap around.
    big = 2**62 + 12345
    contributions = []
    for i in range(4):
        r = honest(study, f"s{i}")
        r = _block(r, "episodes", values=(big,) * r.blocks[0].n_bands)
        contributions.append(Contribution(site_id=f"s{i}", release=r, sha256=""))
    got = pool(study, contributions).blocks["episodes"].values
    assert got.ravel().tolist() == [float(4 * big)] * got.size
    assert np.asarray([big] * 4, dtype=np.int64).sum() != 4 * big  # what this guards against


def test_quorum_is_typed(study: Study) -> None:
    with pytest.raises(QuorumNotReached, match="quorum not reached") as info:
        require_quorum(study, [])
    assert info.value.contributed == 0 and info.value.needed == study.min_sites
