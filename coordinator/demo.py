"""The demo network: synthetic clinics, a local network with TLS and node
authentication, one study end to end, a verified bundle."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from coordinator import crypto
from coordinator.localnet import LocalNetwork, NetworkError, RunOutcome
from coordinator.pki import NETWORK_KEY, NETWORK_PUB, SITE_KEYS_DIR
from coordinator.publish import verify_bundle
from coordinator.synth import synthesize

__all__ = ["DemoError", "DemoResult", "app_dir", "run_demo", "run_simulation", "simulation_app_dir"]

FAMILIES = ["counts", "change", "categories", "trajectory", "histogram"]


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class DemoResult:
    bundle: Path
    outcome: RunOutcome
    network_key: Path  # the network's public key, to verify the bundle with
    study: Path
    sites: Path
    logs: Path


def app_dir() -> Path:
    """The Flower app to run: this project (its pyproject.toml declares the apps)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and "[tool.flwr.app]" in (
        root / "pyproject.toml"
    ).read_text():
        return root
    raise DemoError(
        "the Flower app (pyproject.toml with [tool.flwr.app]) was not found beside "
        "the installed package; install outcomebench from its source checkout"
    )


def prepare_sites(
    root: Path,
    n_sites: int,
    seed: int,
    rho: float = 0.25,
    clients: tuple[int, int] = (400, 3000),
    budget_rho: float | None = None,
) -> list[Path]:
    """Synthetic clinics, each with a privacy policy allowing the demo study (and, unless
    ``budget_rho`` says otherwise, a budget for 4 such studies)."""
    configs = []
    for site in synthesize(n_sites, root / "sites", seed=seed, clients_range=clients):
        doc = yaml.safe_load(site.config_path.read_text())
        doc["privacy_policy"] = "privacy.yaml"
        site.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))
        policy = {
            "unit": "client_id",
            "max_episodes_per_client": 1,
            "per_study": {"rho": rho},
            "budget": {"rho": 4 * rho if budget_rho is None else budget_rho, "period_days": 365},
            "allow": {"instruments": ["PHQ-9"], "families": FAMILIES},
            "approval": "auto",
            "state_dir": "state/",
        }
        (site.directory / "privacy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
        configs.append(site.config_path)
    return configs


def register_signing_keys(configs: list[Path], keys_dir: Path) -> None:
    """Each site's release-signing public key, as the network's registry holds it (asked of
    each site with `outcomebench-site pubkey`, a few at a time)."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    site_bin = Path(sys.executable).with_name("outcomebench-site")

    def register(config: Path) -> None:
        site_id = str(yaml.safe_load(config.read_text())["site"]["id"])
        pem = subprocess.run(
            [str(site_bin), "pubkey", "--config", str(config)],
            check=True,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        ).stdout
        (keys_dir / f"{site_id}.pub.pem").write_text(pem)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(register, configs))


def write_study(root: Path, n_sites: int, rho: float = 0.25) -> Path:
    study = {
        "study": {
            "id": "demo-phq9",
            "title": "PHQ-9 expected change (demo network, synthetic clinics)",
            "instrument": "PHQ-9",
            "window": {"start": "2025-01-01", "end": "2026-12-31"},
            "bands": [[0, 9], [10, 14], [15, 19], [20, 27]],
            "families": FAMILIES,
            "max_session": 20,
            "privacy": {"rho": rho},
            "min_sites": max(2, n_sites - 2),
        }
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_demo(root: Path, *, n_sites: int, seed: int, timeout: float, log: TextIO) -> DemoResult:
    print(f"synthesizing {n_sites} clinics in {root / 'sites'}", file=log)
    configs = prepare_sites(root, n_sites, seed)
    study = write_study(root, n_sites)
    net = LocalNetwork(root=root / "network", sites=configs)
    try:
        print(
            "starting the network on 127.0.0.1: PKI, site agents, SuperLink (TLS, node "
            "authentication, database), SuperNodes",
            file=log,
        )
        net.start()
        pki_dir = net.root / "pki"
        register_signing_keys(configs, pki_dir / SITE_KEYS_DIR)
        net.wait_online(n_sites)
        bundle = root / "bundle"
        print(f"running study {study.name} over Flower ({n_sites} sites)", file=log)
        outcome = net.run_study(
            app_dir(),
            {
                "study": str(study),
                "keys": str(pki_dir / SITE_KEYS_DIR),
                "out": str(bundle),
                "signing-key": str(pki_dir / NETWORK_KEY),
                "timeout": timeout,
                "wait-for-nodes": n_sites,
                "wait-timeout": 60.0,
            },
        )
    except NetworkError as exc:
        raise DemoError(f"the demo network failed: {exc}") from None
    finally:
        net.stop()
        print("stopped every process the demo started", file=log)
    return _finish(outcome, bundle, net.root / "pki" / NETWORK_PUB, net, log, study)


def _finish(
    outcome: RunOutcome,
    bundle: Path,
    network_pub: Path,
    net: LocalNetwork,
    log: TextIO,
    study: Path,
) -> DemoResult:
    record = outcome.round
    print(
        f"run {outcome.run_id}: {outcome.status} in {outcome.seconds:.1f} s; "
        f"{len(record.get('contributed', []))} site(s) contributed",
        file=log,
    )
    for missing in record.get("missing", []):
        print(f"  missing {missing['source']}: {missing['reason']}", file=log)
    if outcome.status != "finished:completed" or not record.get("published"):
        raise DemoError(
            f"the study did not complete (status {outcome.status}); logs in {net.root / 'logs'}"
        )
    problems = verify_bundle(bundle, crypto.load_public(network_pub))
    if problems:
        raise DemoError("the bundle does not verify: " + "; ".join(problems))
    return DemoResult(
        bundle=bundle,
        outcome=outcome,
        network_key=network_pub,
        study=study,
        sites=bundle.parent / "sites",
        logs=net.root / "logs",
    )


def simulation_app_dir(root: Path) -> Path:
    """A Flower app for the simulation engine: our ServerApp with the simulation
    ClientApp (installed modules; the FAB holds only this pyproject)."""
    app = root / "simulation-app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "outcomebench-simulation"\nversion = "0.1.0"\n\n'
        '[tool.flwr.app]\npublisher = "outcomebench"\n\n'
        '[tool.flwr.app.components]\nserverapp = "coordinator.app:app"\n'
        'clientapp = "site_agent.simulated:app"\n\n'
        '[tool.flwr.app.config]\nstudy = ""\nkeys = ""\nout = ""\nsigning-key = ""\n'
        'timeout = 600.0\nwait-for-nodes = 0\nwait-timeout = 60.0\nsim-sites = ""\n'
    )
    return app


def run_simulation(
    root: Path, *, n_sites: int, seed: int, timeout: float, log: TextIO
) -> DemoResult:
    """The same study on Flower's simulation engine (one virtual node per clinic)."""
    print(f"synthesizing {n_sites} clinics in {root / 'sites'}", file=log)
    configs = prepare_sites(root, n_sites, seed, clients=(30, 300))
    study = write_study(root, n_sites)
    keys = root / "keys"
    pki_dir = root / "pki"
    crypto.generate_keypair(pki_dir, "network")
    register_signing_keys(configs, keys)
    net = LocalNetwork(root=root / "network", sites=configs)
    bundle = root / "bundle"
    try:
        print(
            f"running study {study.name} on Flower's simulation engine ({n_sites} virtual nodes)",
            file=log,
        )
        net.start_simulation()
        outcome = net.run_study(
            simulation_app_dir(root),
            {
                "study": str(study),
                "keys": str(keys),
                "out": str(bundle),
                "signing-key": str(pki_dir / NETWORK_KEY),
                "timeout": timeout,
                "wait-for-nodes": n_sites,
                "wait-timeout": 120.0,
                "sim-sites": str(root / "sites"),
            },
            timeout=timeout + 300,
            federation_config=f"num-supernodes={n_sites}",
        )
    except NetworkError as exc:
        raise DemoError(f"the simulation failed: {exc}") from None
    finally:
        net.stop()
        print("stopped every process the demo started", file=log)
    return _finish(outcome, bundle, pki_dir / NETWORK_PUB, net, log, study)
