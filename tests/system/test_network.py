"""The whole network on loopback: a real SuperLink (TLS, node authentication, a database),
real SuperNodes and site agent services, studies run with ``flwr run``.

One network is shared by the module (starting one costs 30-50 s on 2 cores): three
clinics form it; the fault tests add four more, so they come last. Every process is
started by :class:`~coordinator.localnet.LocalNetwork` and stopped by PID in the
fixture's ``finally``, which then checks that nothing of its process groups is left.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest

from coordinator import crypto
from coordinator import pki as netpki
from coordinator.demo import app_dir, prepare_sites
from coordinator.localnet import CONNECTION, LocalNetwork, RunOutcome
from coordinator.publish import verify_bundle
from site_agent.cli import main as site_cli

from .network_helpers import (
    FlwrCalls,
    log_of,
    missing_by_site,
    node_id,
    nodes,
    online,
    openssh_to_pem_lines,
    paused,
    proc,
    register_signing_keys,
    run_config,
    set_policy,
    site_id_of,
    start_plaintext_supernode,
    start_unregistered_supernode,
    stop_and_check,
    wait_for,
    write_study,
)

pytestmark = pytest.mark.slow

N_HEALTHY = 3
# The ServerApp's reply timeout in runs where a site never answers. Seven ClientApp
# processes start at once on 2 cores: a healthy clinic's reply took up to 25 s under load.
TIMEOUT = 40.0


@dataclass
class Network:
    net: LocalNetwork
    root: Path
    configs: list[Path]  # seven clinics: the first three start the network
    keys: Path  # the registry of site signing keys

    @property
    def healthy(self) -> list[str]:
        return [site_id_of(c) for c in self.configs[:N_HEALTHY]]

    @property
    def pki(self) -> Path:
        assert self.net.pki_dir is not None
        return self.net.pki_dir

    def run(self, study: Path, out: Path, *, timeout: float, nodes: int) -> RunOutcome:
        cfg = run_config(
            study, self.keys, out, self.pki / netpki.NETWORK_KEY, timeout=timeout, nodes=nodes
        )
        return self.net.run_study(app_dir(), cfg, timeout=300)

    def verify(self, bundle: Path) -> list[str]:
        return verify_bundle(bundle, crypto.load_public(self.pki / netpki.NETWORK_PUB))


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    root = tmp_path_factory.mktemp("wholenet")
    configs = prepare_sites(root, 7, seed=7)
    keys = root / "site-keys"
    register_signing_keys(configs, keys)
    net = LocalNetwork(root=root / "network", sites=configs[:N_HEALTHY])
    # A CI timeout's SIGTERM becomes KeyboardInterrupt, so this teardown still runs.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        net.start()
        net.wait_online(N_HEALTHY)
        yield Network(net=net, root=root, configs=configs, keys=keys)
    finally:
        left = stop_and_check(net)
        signal.signal(signal.SIGTERM, previous)
    assert not left, f"processes outlived LocalNetwork.stop(): {left}"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}: stopping the network")


# -- 1-3: a complete study, while an unregistered and two plaintext SuperNodes try to join --


@dataclass
class Complete:
    outcome: RunOutcome
    bundle: Path
    ids: dict[str, int]  # site -> node id of the three clinics


UNREGISTERED = "rogue-unregistered"
PLAINTEXT = "supernode-plaintext"  # no node key: --insecure refuses one
PLAINTEXT_KEYED = "plain-keyed"  # a registered node key, started with tls=False


@pytest.fixture(scope="module")
def complete(network: Network) -> Complete:
    net = network.net
    start_unregistered_supernode(net, UNREGISTERED)
    start_plaintext_supernode(net, PLAINTEXT)
    netpki.add_site(network.pki, PLAINTEXT_KEYED)
    public = network.pki / netpki.SITES_DIR / PLAINTEXT_KEYED / netpki.NODE_PUB
    net.flwr(["supernode", "register", str(public), CONNECTION, "--name", PLAINTEXT_KEYED])
    net.sockets[PLAINTEXT_KEYED] = net.root / "sockets" / PLAINTEXT_KEYED / "none.sock"
    net.start_supernode(PLAINTEXT_KEYED, tls=False)

    study = write_study(network.root / "complete.yaml", "net-complete", min_sites=N_HEALTHY)
    bundle = network.root / "bundle-complete"
    outcome = network.run(study, bundle, timeout=120.0, nodes=N_HEALTHY)
    ids = {site: node_id(net, site) for site in network.healthy}
    return Complete(outcome=outcome, bundle=bundle, ids=ids)


def test_complete_study_over_tls_with_node_auth(network: Network, complete: Complete) -> None:
    net, outcome = network.net, complete.outcome
    assert f"Uvicorn running on https://127.0.0.1:{net.port}" in log_of(net, "superlink")
    assert "root-certificates" in (net.flwr_home / "config.toml").read_text()
    assert outcome.status == "finished:completed", outcome
    record = outcome.round
    assert record["asked"] == N_HEALTHY
    assert sorted(record["contributed"]) == network.healthy
    assert record["missing"] == []
    assert record["published"] is True and record["bundle"] == str(complete.bundle)
    assert network.verify(complete.bundle) == []
    doc = json.loads((complete.bundle / "benchmark.json").read_text())
    assert sorted(s["site_id"] for s in doc["sites"]["contributed"]) == network.healthy
    assert doc["sites"]["missing"] == []
    assert doc["privacy"]["sites"] == N_HEALTHY
    # Each clinic's release came through its own authenticated SuperNode.
    assert len(set(complete.ids.values())) == N_HEALTHY
    for site in network.healthy:
        assert "Release study 'net-complete'" in log_of(net, f"agent-{site}")


def test_unregistered_node_is_rejected(network: Network, complete: Complete) -> None:
    net = network.net
    rogue = proc(net, f"supernode-{UNREGISTERED}")
    wait_for(lambda: rogue.popen.poll() is not None, 60, "the unregistered SuperNode gives up")
    assert rogue.popen.returncode != 0
    log = log_of(net, f"supernode-{UNREGISTERED}")
    assert "Failed to activate SuperNode" in log, log[-2000:]
    assert "SuperNode ID" not in log
    # The SuperLink refused exactly this key.
    link = log_of(net, "superlink")
    assert "No SuperNode found with the given public key" in link
    pem = openssh_to_pem_lines(network.pki / netpki.SITES_DIR / UNREGISTERED / netpki.NODE_PUB)
    assert pem[0] in link and pem[-1] in link
    # Never a node of the federation, and not asked in the run.
    assert online(net) == set(complete.ids.values())
    assert complete.outcome.round["asked"] == N_HEALTHY
    assert complete.outcome.round["missing"] == []


def test_plaintext_node_is_refused(network: Network, complete: Complete) -> None:
    net = network.net
    # Without a node key: it keeps trying and failing against the TLS SuperLink.
    plain = proc(net, PLAINTEXT)
    wait_for(
        lambda: "Connection attempt failed" in log_of(net, PLAINTEXT),
        60,
        "the plaintext SuperNode fails to connect",
    )
    log = log_of(net, PLAINTEXT)
    assert plain.popen.poll() is None, log[-2000:]  # still retrying, not crashed
    assert "Starting insecure channel" in log
    assert "SuperNode ID" not in log, log[-2000:]
    # With a registered node key, Flower refuses plaintext before connecting at all.
    keyed = proc(net, f"supernode-{PLAINTEXT_KEYED}")
    wait_for(lambda: keyed.popen.poll() is not None, 60, "the keyed plaintext SuperNode exits")
    assert keyed.popen.returncode != 0
    log = log_of(net, f"supernode-{PLAINTEXT_KEYED}")
    assert "TLS is not enabled" in log, log[-2000:]
    assert "SuperNode ID" not in log
    # Neither ever came online: the online nodes are the three clinics', the keyed one's
    # registration stays "registered".
    known = nodes(net)
    assert {nid for nid, s in known.items() if s == "online"} == set(complete.ids.values())
    assert sorted(s for nid, s in known.items() if nid not in complete.ids.values()) == [
        "registered"
    ]
    assert complete.outcome.round["asked"] == N_HEALTHY


# -- 4-5: faults; the round completes on quorum, below quorum nothing is published --------


@dataclass
class Faulted:
    ids: dict[str, int]  # site -> node id, all seven clinics
    budget: str  # its budget was already spent by another study
    agent_down: str  # its site agent was SIGKILLed before the run
    node_down: str  # its SuperNode was SIGKILLed just after `flwr run` submitted
    frozen: str  # its site agent was SIGSTOPped: it never answers
    quorum: RunOutcome
    quorum_bundle: Path
    quorum_calls: FlwrCalls
    below: RunOutcome
    below_bundle: Path
    below_calls: FlwrCalls


@pytest.fixture(scope="module")
def faulted(network: Network) -> Faulted:
    net, root = network.net, network.root
    extra = network.configs[N_HEALTHY:]
    budget, agent_down, node_down, frozen = (site_id_of(c) for c in extra)

    # The budget clinic allows one study a year, and has answered one already.
    set_policy(extra[0], per_study={"rho": 0.25}, budget={"rho": 0.25, "period_days": 365})
    filler = write_study(root / "filler.yaml", "net-filler", min_sites=1)
    spend = ["release", "--config", str(extra[0]), "--study", str(filler)]
    assert site_cli([*spend, "--out", str(root / "filler-release.json")]) == 0

    def join(config: Path) -> None:  # an agent and a registration: a few s of CPU each
        site = site_id_of(config)
        public = network.pki / netpki.SITES_DIR / site / netpki.NODE_PUB
        net.start_agent(config)
        net.flwr(["supernode", "register", str(public), CONNECTION, "--name", site])

    for config in extra:
        netpki.add_site(network.pki, site_id_of(config))
    with ThreadPoolExecutor(len(extra)) as pool:
        list(pool.map(join, extra))
    for config in extra:
        net.start_supernode(site_id_of(config))
    net.wait_online(len(network.configs))
    ids = {site_id_of(c): node_id(net, site_id_of(c)) for c in network.configs}

    net.kill(f"agent-{agent_down}")
    quorum_study = write_study(root / "quorum.yaml", "net-quorum", min_sites=N_HEALTHY)
    below_study = write_study(root / "below.yaml", "net-below", min_sites=N_HEALTHY + 1)
    quorum_bundle, below_bundle = root / "bundle-quorum", root / "bundle-below"
    with paused(proc(net, f"agent-{frozen}").popen.pid):
        kill_node = {"run": lambda: net.kill(f"supernode-{node_down}")}
        with FlwrCalls(net, after=kill_node) as quorum_calls:
            quorum = network.run(quorum_study, quorum_bundle, timeout=TIMEOUT, nodes=7)
        with FlwrCalls(net) as below_calls:
            # The killed SuperNode may have gone offline by now: wait for the other six.
            below = network.run(below_study, below_bundle, timeout=TIMEOUT, nodes=6)
    return Faulted(
        ids=ids,
        budget=budget,
        agent_down=agent_down,
        node_down=node_down,
        frozen=frozen,
        quorum=quorum,
        quorum_bundle=quorum_bundle,
        quorum_calls=quorum_calls,
        below=below,
        below_bundle=below_bundle,
        below_calls=below_calls,
    )


def _assert_fault_reasons(f: Faulted, missing: dict[str, str], *, node_down_asked: bool) -> None:
    assert missing[f.budget] == "refused: budget_exhausted"
    assert missing[f.agent_down] == "refused: internal_error"
    # A frozen agent either outlasts the round (timeout) or makes the bridge give up on
    # the connection first (gRPC's ~20 s handshake limit): both say why, neither leaks.
    assert missing[f.frozen] in (
        f"no reply within {TIMEOUT:g} s (timeout)",
        "refused: internal_error",
    ), missing[f.frozen]
    if node_down_asked or f.node_down in missing:
        reason = missing[f.node_down]
        assert reason.endswith("(timeout)") or reason.startswith("node unavailable"), reason


def test_round_completes_on_quorum_and_says_why_sites_are_missing(
    network: Network, faulted: Faulted
) -> None:
    outcome, f = faulted.quorum, faulted
    assert outcome.status == "finished:completed", outcome
    record = outcome.round
    assert record["asked"] == 7
    assert sorted(record["contributed"]) == network.healthy
    assert record["published"] is True
    missing = missing_by_site(record["missing"], f.ids)
    assert set(missing) == {f.budget, f.agent_down, f.node_down, f.frozen}
    _assert_fault_reasons(f, missing, node_down_asked=True)
    # Refusals name the site the bridge answered for; silence can only name the node. The
    # frozen agent is silence when the round's timeout came first, and a refusal the bridge
    # answered for when gRPC gave up on the connection first.
    sources = {m["source"] for m in record["missing"]}
    assert f"node {f.ids[f.budget]} ({f.budget})" in sources
    frozen_answered = missing[f.frozen].startswith("refused:")
    frozen_source = f"node {f.ids[f.frozen]}" + (f" ({f.frozen})" if frozen_answered else "")
    assert frozen_source in sources, (frozen_source, sources)

    assert network.verify(f.quorum_bundle) == []
    doc = json.loads((f.quorum_bundle / "benchmark.json").read_text())
    assert sorted(s["site_id"] for s in doc["sites"]["contributed"]) == network.healthy
    assert doc["sites"]["missing"] == [
        {"site": m["source"], "reason": m["reason"]} for m in record["missing"]
    ]
    assert missing_by_site(doc["sites"]["missing"], f.ids, key="site") == missing


def test_below_quorum_fails_and_publishes_nothing(network: Network, faulted: Faulted) -> None:
    outcome, f = faulted.below, faulted
    assert outcome.status == "finished:failed", outcome
    record = outcome.round
    assert record["published"] is False and "bundle" not in record
    assert record["min_sites"] == N_HEALTHY + 1
    assert sorted(record["contributed"]) == network.healthy
    missing = missing_by_site(record["missing"], f.ids)
    _assert_fault_reasons(f, missing, node_down_asked=False)
    assert not f.below_bundle.exists()
    assert Path(f"{f.below_bundle}.round.json").is_file()
    run_log = network.net.root / "logs" / f"run-{outcome.run_id}.log"
    assert "quorum not reached" in run_log.read_text()


def test_flwr_run_reports_success_even_when_the_serverapp_fails(faulted: Faulted) -> None:
    # `flwr run` exited 0 (LocalNetwork.flwr raises otherwise) and said success ...
    (submitted,) = faulted.below_calls.outputs("run")
    doc = json.loads(submitted)
    assert doc["success"] is True
    assert int(doc.get("run-id", doc.get("run_id"))) == faulted.below.run_id
    # ... while Flower's real status, which run_study read from `flwr ls`, is failed.
    assert faulted.below.status == "finished:failed"
    listed = [
        json.loads(out)
        for args, out in faulted.below_calls.calls
        if args[:1] == ["ls"] and "--run-id" in args
    ]
    assert listed, "run_study never asked `flwr ls` for the run's status"
    (last,) = (r for r in listed[-1]["runs"] if int(r["run-id"]) == faulted.below.run_id)
    assert last["status"] == "finished:failed"
    # The same holds for a run that went well: success is not the ServerApp's verdict.
    (ok,) = faulted.quorum_calls.outputs("run")
    assert json.loads(ok)["success"] is True and faulted.quorum.status == "finished:completed"
