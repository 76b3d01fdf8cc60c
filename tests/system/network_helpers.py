"""Helpers for the whole-network tests (tests/system/test_network.py): studies, site
signing keys, node ids from the SuperNodes' logs, rogue SuperNodes, and a check that
every process a :class:`~coordinator.localnet.LocalNetwork` started is really gone."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from coordinator import pki as netpki
from coordinator.localnet import CONNECTION, LocalNetwork, free_port, installed_bin
from site_agent import crypto as scrypto
from site_agent.privacy import load_engine

FAMILIES = ["counts", "change", "categories", "trajectory", "histogram"]
RHO = 0.25

_NODE_ID = re.compile(r"SuperNode ID: (\d+)")


def site_id_of(config: Path) -> str:
    return str(yaml.safe_load(config.read_text())["site"]["id"])


def write_study(path: Path, study_id: str, *, min_sites: int, rho: float = RHO) -> Path:
    """A draft study; every run gets its own id (a site answers a repeated id from its
    cache at no cost, so a new id is a new release through the ledger)."""
    doc = {
        "study": {
            "id": study_id,
            "title": f"PHQ-9 expected change ({study_id})",
            "instrument": "PHQ-9",
            "window": {"start": "2025-01-01", "end": "2026-12-31"},
            "bands": [[0, 9], [10, 14], [15, 19], [20, 27]],
            "families": FAMILIES,
            "max_session": 20,
            "privacy": {"rho": rho},
            "min_sites": min_sites,
        }
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def set_policy(config: Path, **change: Any) -> None:
    """Change the privacy policy beside ``site.yaml`` (written by demo.prepare_sites)."""
    policy = config.parent / "privacy.yaml"
    doc = yaml.safe_load(policy.read_text()) | change
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))


def register_signing_keys(configs: Sequence[Path], keys_dir: Path) -> None:
    """Each site's release-signing public key into the registry directory (what
    ``outcomebench-site pubkey`` prints, without a process per site)."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    for config in configs:
        key = load_engine(config).signing_key()  # as `pubkey`: creates a fresh site's ledger
        (keys_dir / f"{site_id_of(config)}.pub.pem").write_text(scrypto.public_pem(key))


def run_config(
    study: Path, keys: Path, out: Path, signing_key: Path, *, timeout: float, nodes: int
) -> dict[str, Any]:
    return {
        "study": str(study),
        "keys": str(keys),
        "out": str(out),
        "signing-key": str(signing_key),
        "timeout": float(timeout),
        "wait-for-nodes": nodes,
        "wait-timeout": 60.0,
    }


# -- what the network says about its nodes ----------------------------------------------


def log_of(net: LocalNetwork, name: str) -> str:
    path = net.root / "logs" / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def node_id(net: LocalNetwork, site: str, timeout: float = 60.0) -> int:
    """The node id a SuperNode was given (it logs ``SuperNode ID: N`` once activated)."""
    deadline = time.monotonic() + timeout
    while True:
        found = _NODE_ID.search(log_of(net, f"supernode-{site}"))
        if found:
            return int(found.group(1))
        if time.monotonic() > deadline:
            raise AssertionError(f"supernode-{site} logged no node id within {timeout:g} s")
        time.sleep(0.5)


def nodes(net: LocalNetwork) -> dict[int, str]:
    """Every node the SuperLink knows: node id -> status (online, registered, offline)."""
    out = json.loads(net.flwr(["supernode", "ls", CONNECTION, "--format", "json"]))
    return {int(n["node-id"]): str(n["status"]).lower() for n in out.get("nodes", [])}


def online(net: LocalNetwork) -> set[int]:
    return {nid for nid, status in nodes(net).items() if status == "online"}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.5)


def proc(net: LocalNetwork, name: str) -> Any:
    """The (latest) process of that name that the network started."""
    found = [p for p in net.procs if p.name == name]
    assert found, f"no process {name!r} was started"
    return found[-1]


def openssh_to_pem_lines(public_openssh: Path) -> list[str]:
    """The base64 lines of a node key in the PEM form the SuperLink logs."""
    key = serialization.load_ssh_public_key(public_openssh.read_bytes())
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def missing_by_site(
    missing: Sequence[Mapping[str, str]], ids: Mapping[str, int], key: str = "source"
) -> dict[str, str]:
    """Reasons by site, the node named in each entry (``node N`` or ``node N (site)``)
    attributed through the node ids the SuperNodes logged."""
    by_id = {nid: site for site, nid in ids.items()}
    out: dict[str, str] = {}
    for entry in missing:
        found = re.match(r"node (\d+)", entry[key])
        assert found, f"unattributed missing entry {entry}"
        out[by_id.get(int(found.group(1)), f"unknown node {found.group(1)}")] = entry["reason"]
    return out


# -- rogue SuperNodes -------------------------------------------------------------------


def start_unregistered_supernode(net: LocalNetwork, site: str) -> Any:
    """A SuperNode with a fresh node key that was never registered with the SuperLink."""
    assert net.pki_dir is not None
    netpki.add_site(net.pki_dir, site)
    net.sockets[site] = net.root / "sockets" / site / "no-agent.sock"
    return net.start_supernode(site)


def start_plaintext_supernode(net: LocalNetwork, name: str) -> Any:
    """A SuperNode speaking plaintext (``--insecure``, so no node key either: Flower
    refuses a node key without TLS before connecting) to the TLS SuperLink."""
    argv = [
        installed_bin("flower-supernode"),
        "--superlink",
        f"127.0.0.1:{net.port}",
        "--insecure",
        "--node-config",
        f'agent-socket="{net.root / "sockets" / "none.sock"}" site-id="{name}"',
        "--port",
        str(free_port()),
    ]
    return net._start(name, argv)


# -- faults -----------------------------------------------------------------------------


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """SIGSTOP a process (it accepts connections but never answers), SIGCONT after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@dataclass
class FlwrCalls:
    """Records every ``flwr`` command a LocalNetwork runs (args and stdout), and runs a
    hook after a given subcommand returned (e.g. kill a SuperNode once ``flwr run`` has
    submitted the run)."""

    net: LocalNetwork
    after: Mapping[str, Callable[[], None]] = field(default_factory=dict)
    calls: list[tuple[list[str], str]] = field(default_factory=list)

    def __enter__(self) -> FlwrCalls:
        real = type(self.net).flwr
        pending = dict(self.after)

        def flwr(args: Sequence[str], timeout: float = 120.0) -> str:
            out = real(self.net, args, timeout)
            self.calls.append((list(args), out))
            hook = pending.pop(args[0], None) if args else None
            if hook is not None:
                hook()
            return out

        self.net.flwr = flwr  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(AttributeError):
            del self.net.flwr

    def outputs(self, subcommand: str) -> list[str]:
        return [out for args, out in self.calls if args and args[0] == subcommand]


# -- teardown ---------------------------------------------------------------------------


def _live_members(groups: set[int]) -> list[tuple[int, str]]:
    """Processes (not zombies) in any of these process groups."""
    live = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, split after its ')'
        head, _, rest = stat.rpartition(")")
        fields = rest.split()
        if fields and fields[0] != "Z" and int(fields[2]) in groups:
            live.append((int(entry.name), head.partition("(")[2]))
    return live


def stop_and_check(net: LocalNetwork) -> list[tuple[int, str]]:
    """Stop the network; return processes of its groups still alive after 10 s
    (killed here by PID, so nothing outlives the tests even when this fails)."""
    groups = {p.popen.pid for p in net.procs}  # each was started in its own session
    net.stop()
    deadline = time.monotonic() + 10.0
    left = _live_members(groups)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _live_members(groups)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left
