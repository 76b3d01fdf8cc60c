"""An offline network in a temporary directory: synthetic clinics with policies and keys,
a network key, and a study. Everything runs through the real CLIs' functions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coordinator import crypto as ccrypto
from coordinator.synth import synthesize
from site_agent import crypto as scrypto
from site_agent.privacy import load_engine

FAMILIES = ["counts", "change", "categories", "trajectory", "histogram"]


def study_doc(**change: Any) -> dict[str, Any]:
    return {
        "id": "phq9-2026",
        "title": "PHQ-9 expected change",
        "instrument": "PHQ-9",
        "window": {"start": "2025-01-01", "end": "2026-12-31"},
        "bands": [[0, 9], [10, 14], [15, 19], [20, 27]],
        "families": FAMILIES,
        "max_session": 20,
        "privacy": {"rho": 0.5},
        "min_sites": 3,
    } | change


def policy_doc(rho: float = 0.5, **change: Any) -> dict[str, Any]:
    return {
        "unit": "client_id",
        "max_episodes_per_client": 1,
        "per_study": {"rho": rho},
        "budget": {"rho": 2 * rho, "period_days": 365},
        "allow": {"instruments": ["PHQ-9"], "families": FAMILIES},
        "approval": "auto",
        "state_dir": "state/",
    } | change


@dataclass(frozen=True)
class Network:
    root: Path
    sites: list[Path]  # site.yaml of each clinic
    keys: Path  # registered site keys + the network key
    study: Path

    @property
    def network_pub(self) -> Path:
        return self.keys / "network.pub.pem"


def make_network(
    root: Path,
    n_sites: int = 3,
    *,
    seed: int = 11,
    rho: float = 0.5,
    clients: tuple[int, int] = (300, 900),
    policy: dict[str, Any] | None = None,
    study: dict[str, Any] | None = None,
) -> Network:
    keys = root / "keys"
    ccrypto.generate_keypair(keys, "network")
    configs = []
    for site in synthesize(n_sites, root / "sites", seed=seed, clients_range=clients):
        doc = yaml.safe_load(site.config_path.read_text())
        doc["privacy_policy"] = "privacy.yaml"
        site.config_path.write_text(yaml.safe_dump(doc))
        pol = policy or policy_doc(rho)
        (site.directory / "privacy.yaml").write_text(yaml.safe_dump(pol))
        key = load_engine(site.config_path).signing_key()  # as `pubkey`: a fresh ledger
        (keys / f"{site.site_id}.pub.pem").write_text(scrypto.public_pem(key))
        configs.append(site.config_path)
    study_path = root / "study.yaml"
    study_path.write_text(yaml.safe_dump({"study": study or study_doc(privacy={"rho": rho})}))
    return Network(root=root, sites=configs, keys=keys, study=study_path)
