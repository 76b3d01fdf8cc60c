"""Exact, local-only outcome summary per instrument and intake band.

These figures are exact counts about the clinic's own clients. They are for the clinic
and never leave the site: nothing here is differentially private.

Effect size: mean change divided by the SD of intake scores of the instrument's episodes
at caseness at intake (ACORN's convention), the same reference SD for every band so
that bands are comparable; improvement is positive.

Trajectory: per session number 1..K (``--max-session``), the clients with a score at that
session and their mean change from intake (improvement positive), as the published
expected trajectory is defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from protocols.effect import effect_size
from protocols.instruments import Better
from site_agent.outcomes import JT, MISSING, Episodes, Reliable

__all__ = ["LOCAL_ONLY", "summarize"]

LOCAL_ONLY = (
    "LOCAL ONLY: exact figures about this clinic's own clients. They are not "
    "differentially private and never leave the site."
)


def _num(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 4)


def _trajectory(
    t: pd.DataFrame, traj: np.ndarray[Any, Any], better: Better
) -> list[dict[str, Any]]:
    rows = t.index.to_numpy()
    scores = traj[rows].astype(np.float64)
    seen = traj[rows] != MISSING
    intake = t["intake"].to_numpy(dtype=np.float64)[:, None]
    change = intake - scores if better is Better.LOWER else scores - intake
    clients = seen.sum(axis=0)
    total = np.where(seen, change, 0.0).sum(axis=0)
    return [
        {
            "session": k + 1,
            "clients": int(clients[k]),
            "mean_change": _num(total[k] / clients[k]) if clients[k] else None,
        }
        for k in range(traj.shape[1])
    ]


def _group(t: pd.DataFrame, ref_sd: float, has_rc: bool) -> dict[str, Any]:
    n = len(t)
    change = t["change"].to_numpy(dtype=np.float64)
    mean_change = float(change.mean()) if n else math.nan
    sd_change = float(change.std(ddof=1)) if n > 1 else math.nan
    out: dict[str, Any] = {
        "episodes": n,
        "mean_intake": _num(float(t["intake"].mean()) if n else math.nan),
        "mean_change": _num(mean_change),
        "sd_change": _num(sd_change),
        "effect_size": _num(effect_size(mean_change, ref_sd)),
        "case_at_intake": int(t["case_start"].sum()),
    }
    rel = t["reliable"].to_numpy()
    jt = t["jt"].to_numpy()

    def count(mask: np.ndarray[Any, Any]) -> int | None:
        return int(mask.sum()) if has_rc else None

    out |= {
        "reliably_improved": count(rel == Reliable.IMPROVED),
        "no_reliable_change": count(rel == Reliable.NO_CHANGE),
        "reliably_deteriorated": count(rel == Reliable.DETERIORATED),
        "recovered": int(t["recovered"].sum()),
        "reliably_recovered": count(t["reliably_recovered"].to_numpy()),
        "response": int(t["response"].sum()),
        "remission": int(t["remission"].sum()),
        "jacobson_truax": {
            "recovered": count(jt == JT.RECOVERED),
            "improved": count(jt == JT.IMPROVED),
            "unchanged": count(jt == JT.UNCHANGED),
            "deteriorated": count(jt == JT.DETERIORATED),
        },
    }
    return out


def summarize(episodes: Mapping[str, Episodes]) -> list[dict[str, Any]]:
    """One entry per instrument: exclusions, then groups ``all`` and one per intake band."""
    result: list[dict[str, Any]] = []
    for ins_id in sorted(episodes):
        ep = episodes[ins_id]
        t = ep.table
        ins = ep.instrument
        clinical = t.loc[t["case_start"], "intake"]
        ref_sd = float(clinical.std(ddof=1)) if len(clinical) > 1 else math.nan
        t = t.reset_index(drop=True)  # row i is episode i of ep.trajectory
        groups = [
            {
                "band": "all",
                "label": "all intakes",
                **_group(t, ref_sd, ep.has_reliable_change),
                "trajectory": _trajectory(t, ep.trajectory, ins.better),
            }
        ]
        for i, band in enumerate(ins.bands):
            sub = t[t["band"] == i]
            groups.append(
                {
                    "band": band.name,
                    "label": band.label,
                    **_group(sub, ref_sd, ep.has_reliable_change),
                    "trajectory": _trajectory(sub, ep.trajectory, ins.better),
                }
            )
        result.append(
            {
                "instrument": ins_id,
                "reliable_change_points": _num(ins.reliable_change)
                if ins.reliable_change
                else None,
                "cutoff": ins.cutoff,
                "better": str(ins.better),
                "effect_size_reference_sd": _num(ref_sd),
                "excluded": dict(ep.excluded),
                "groups": groups,
            }
        )
    return result
