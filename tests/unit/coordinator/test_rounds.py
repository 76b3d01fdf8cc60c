"""A study round over the in-memory twin of the Flower transport."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import yaml

from coordinator.app import run_study
from coordinator.crypto import generate_keypair
from coordinator.pooling import QuorumNotReached
from coordinator.rounds import NodeReply, run_round
from coordinator.study import load_study
from protocols.release import SiteRelease, load_json, parse_envelope
from site_agent import crypto as scrypto
from site_agent.cli import main as site
from tests.system.offline import make_network, study_doc


class MemoryTransport:
    """Replies prepared per node; nodes absent from ``replies`` time out."""

    def __init__(self, replies: Mapping[int, NodeReply], online: Sequence[int]) -> None:
        self.replies = dict(replies)
        self.online = list(online)
        self.asked: list[int] = []

    def node_ids(self) -> Sequence[int]:
        return self.online

    def ask(self, node_ids: Sequence[int], study: bytes, envelope: bytes | None,
            timeout: float) -> Mapping[int, NodeReply]:
        self.asked = list(node_ids)
        return {n: r for n, r in self.replies.items() if n in node_ids}


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bytes]]:
    root = tmp_path_factory.mktemp("net")
    net = make_network(root, 3, clients=(150, 250))
    bodies = []
    for i, config in enumerate(net.sites):
        out = root / f"r{i}.json"
        assert site(["release", "--config", str(config), "--study", str(net.study),
                     "--out", str(out)]) == 0
        bodies.append(out.read_bytes())
    return root, bodies


def test_round_attributes_and_explains(releases: tuple[Path, list[bytes]]) -> None:
    root, bodies = releases
    study = load_study(root / "study.yaml")
    keys = {p.name.removesuffix(".pub.pem"): p for p in (root / "keys").glob("clinic-*.pub.pem")}
    stranger = scrypto.sign(scrypto.load_or_create_key(root / "stranger"), "release",
                            json.dumps({"site_id": "clinic-01"}).encode())
    transport = MemoryTransport({
        1: NodeReply(node_id=1, site_id="clinic-01", release=bodies[0]),
        2: NodeReply(node_id=2, site_id="clinic-02", release=bodies[1]),
        3: NodeReply(node_id=3, site_id="clinic-03", code="budget_exhausted"),
        4: NodeReply(node_id=4, site_id="clinic-01", release=bodies[0]),  # counted twice
        5: NodeReply(node_id=5, transport_error="node unavailable (Flower error code 3)"),
        6: NodeReply(node_id=6, release=stranger.dumps().encode()),  # forged
        8: NodeReply(node_id=8, code="not-a-code"),
    }, online=[1, 2, 3, 4, 5, 6, 7, 8])
    result = run_round(transport, study, None, keys, timeout=1.0)
    assert transport.asked == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [c.site_id for c in result.contributions] == ["clinic-01", "clinic-02"]
    reasons = {m.source: m.reason for m in result.missing}
    assert reasons["node 3 (clinic-03)"] == "refused: budget_exhausted"
    assert "already counted from node 1" in reasons["node 4 (clinic-01)"]
    assert "Flower error code" in reasons["node 5"]
    assert "registered key" in reasons["node 6"] or "malformed" in reasons["node 6"]
    assert "timeout" in reasons["node 7"]
    assert reasons["node 8"] == "refused: unknown refusal code"


def test_run_study_publishes_or_fails_below_quorum(releases: tuple[Path, list[bytes]],
                                                   tmp_path: Path) -> None:
    root, bodies = releases
    private, _ = generate_keypair(tmp_path, "net2")
    cfg = {"study": str(root / "study.yaml"), "keys": str(root / "keys"),
           "out": str(tmp_path / "bundle"), "signing-key": str(private), "timeout": 1.0}
    full = MemoryTransport({i + 1: NodeReply(node_id=i + 1, release=b)
                            for i, b in enumerate(bodies)}, online=[1, 2, 3, 4])
    result = run_study(full, cfg)
    assert len(result.contributions) == 3
    record = json.loads((tmp_path / "bundle.round.json").read_text())
    assert record["published"] and record["missing"][0]["source"] == "node 4"
    doc = json.loads((tmp_path / "bundle" / "benchmark.json").read_text())
    assert doc["sites"]["missing"] == [{"site": "node 4",
                                        "reason": "no reply within 1 s (timeout)"}]

    cfg["out"] = str(tmp_path / "bundle2")
    short = MemoryTransport({1: NodeReply(node_id=1, release=bodies[0])}, online=[1, 2])
    with pytest.raises(QuorumNotReached, match="quorum not reached"):
        run_study(short, cfg)
    assert not (tmp_path / "bundle2").exists()
    record = json.loads((tmp_path / "bundle2.round.json").read_text())
    assert record["published"] is False and record["contributed"] == ["clinic-01"]
    assert yaml.safe_load((root / "study.yaml").read_text())["study"]["min_sites"] == 3


def _resigned(root: Path, body: bytes, change: dict[str, object]) -> bytes:
    """A real release with ``change`` applied to its first block, signed with the site's
    own key: a registered site that lies."""
    release = SiteRelease.from_json(load_json(parse_envelope(body, "release").payload, "r"))
    blocks = (dataclasses.replace(release.blocks[0], **change), *release.blocks[1:])
    lie = dataclasses.replace(release, blocks=blocks)
    key = scrypto.load_or_create_key(root / "sites" / release.site_id / "state")
    return scrypto.sign(key, "release", lie.canonical_bytes()).dumps().encode()


def test_malformed_and_lying_releases_do_not_stop_the_round(
    releases: tuple[Path, list[bytes]], tmp_path: Path
) -> None:
    # M3: a bracket bomb made run_round raise, so nothing was published at quorum.
    root, bodies = releases
    private, _ = generate_keypair(tmp_path, "net3")
    bomb = b"[" * 100_000 + b"]" * 100_000
    tiny = _resigned(root, bodies[0], {"scale": 1e-9})  # the finding: scale 1e-9
    transport = MemoryTransport({
        1: NodeReply(node_id=1, site_id="clinic-01", release=bodies[0]),
        2: NodeReply(node_id=2, site_id="clinic-02", release=bodies[1]),
        3: NodeReply(node_id=3, site_id="clinic-03", release=bodies[2]),
        4: NodeReply(node_id=4, site_id="x" * 10_000, release=bomb),
        5: NodeReply(node_id=5, site_id="clinic-01", release=tiny),
    }, online=[1, 2, 3, 4, 5])
    cfg = {"study": str(root / "study.yaml"), "keys": str(root / "keys"),
           "out": str(tmp_path / "bundle"), "signing-key": str(private), "timeout": 1.0}
    result = run_study(transport, cfg)
    assert [c.site_id for c in result.contributions] == ["clinic-01", "clinic-02", "clinic-03"]
    reasons = {m.source: m.reason for m in result.missing}
    assert reasons["node 4 (" + "x" * 64 + ")"] == (
        "malformed release: signed release: nested deeper than 16 levels"
    )
    assert reasons["node 5 (clinic-01)"].startswith("noise does not match the study: block "
                                                    "episodes: noise scale 1e-09")
    record = json.loads((tmp_path / "bundle.round.json").read_text())
    assert record["published"] and len(record["missing"]) == 2
    assert (tmp_path / "bundle" / "benchmark.json").exists()


def test_real_epsilon_study_release_is_accepted(tmp_path: Path) -> None:
    # The coordinator recomputes an (epsilon, delta) study's rho without OpenDP.
    net = make_network(tmp_path, 1, clients=(60, 80),
                       study=study_doc(privacy={"epsilon": 1.0, "delta": 1e-6}, min_sites=1))
    out = tmp_path / "r.json"
    assert site(["release", "--config", str(net.sites[0]), "--study", str(net.study),
                 "--out", str(out)]) == 0
    keys = {p.name.removesuffix(".pub.pem"): p for p in net.keys.glob("clinic-*.pub.pem")}
    transport = MemoryTransport({1: NodeReply(node_id=1, release=out.read_bytes())}, online=[1])
    result = run_round(transport, load_study(net.study), None, keys, timeout=1.0)
    assert len(result.contributions) == 1, result.missing
