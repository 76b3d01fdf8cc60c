"""Builders for small site configurations and exports in a temporary directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from site_agent.config import SiteConfig, load_site_config

HEADER = "client,session_no,seen_on,total\n"


def write_site(tmp: Path, csv_text: str, *, data: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> SiteConfig:
    (tmp / "outcomes.csv").write_text(csv_text)
    doc: dict[str, Any] = {
        "site": {"id": "clinic-test"},
        "data": data or {
            "path": "outcomes.csv",
            "instrument": "PHQ-9",
            "columns": {"client_id": "client", "session": "session_no", "date": "seen_on",
                        "score": "total"},
        },
    }
    doc |= extra or {}
    (tmp / "site.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_site_config(tmp / "site.yaml")
