"""A small real site (synthetic clinic) with a privacy policy, for engine tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from coordinator.synth import synthesize
from protocols.study import parse_study
from site_agent.config import load_site_config
from site_agent.privacy import ReleaseEngine, StudyRequest, load_policy

POLICY: dict[str, Any] = {
    "unit": "client_id",
    "max_episodes_per_client": 1,
    "per_study": {"rho": 0.1},
    "budget": {"rho": 0.25, "period_days": 365},
    "allow": {"instruments": ["PHQ-9", "GAD-7"],
              "families": ["counts", "change", "categories", "trajectory", "histogram"]},
    "approval": "auto",
    "state_dir": "state/",
}

STUDY: dict[str, Any] = {
    "id": "phq9-2026",
    "title": "PHQ-9 expected change",
    "instrument": "PHQ-9",
    "window": {"start": "2025-01-01", "end": "2026-12-31"},
    "bands": [[0, 9], [10, 14], [15, 19], [20, 27]],
    "families": ["counts", "change", "categories", "trajectory", "histogram"],
    "max_session": 20,
    "privacy": {"rho": 0.05},
    "min_sites": 3,
}


def make_site(tmp: Path, policy: dict[str, Any] | None = None, seed: int = 7) -> Path:
    """A synthetic clinic with ``privacy_policy: privacy.yaml``; returns site.yaml."""
    [site] = synthesize(1, tmp, seed=seed, clients_range=(60, 90))
    doc = yaml.safe_load(site.config_path.read_text())
    doc["privacy_policy"] = "privacy.yaml"
    site.config_path.write_text(yaml.safe_dump(doc))
    (site.directory / "privacy.yaml").write_text(yaml.safe_dump(policy or POLICY))
    return site.config_path


def engine(config: Path) -> ReleaseEngine:
    cfg = load_site_config(config)
    assert cfg.privacy_policy is not None
    return ReleaseEngine(cfg, load_policy(cfg.privacy_policy))


def request(**change: Any) -> StudyRequest:
    return StudyRequest(parse_study(STUDY | change))
