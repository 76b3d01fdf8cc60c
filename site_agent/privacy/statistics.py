"""Exact sufficient statistics of a study: bounded integer sums per intake band.

Contribution bounding is by construction: each client keeps at most
``max_episodes_per_client`` episodes (the latest complete ones in the window), each
episode adds to exactly one band, and every per-episode value is clipped to the block's
declared bounds. Property tests check that adding or removing one client changes each
block by at most its declared L2 sensitivity.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from protocols.layout import BlockSpec, block_layout
from protocols.study import Study
from site_agent.outcomes import MISSING, Episodes, Reliable

__all__ = ["Selection", "exact_blocks", "select_episodes"]

_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """The episodes a study uses, with the study's band of each."""

    table: pd.DataFrame
    trajectory: npt.NDArray[np.int32]
    band: npt.NDArray[np.int64]
    window_applied: bool
    counts: Mapping[str, int]  # what was left out and why (local only)


def select_episodes(ep: Episodes, study: Study, max_episodes: int) -> Selection:
    t = ep.table
    keep = np.ones(len(t), dtype=bool)
    counts: dict[str, int] = {"derived": len(t)}
    window_applied = bool(len(t)) and bool((t["last_date"] != np.iinfo(np.int32).min).all())
    if window_applied:
        start = (study.window[0] - _EPOCH).days
        end = (study.window[1] - _EPOCH).days
        in_window = (t["last_date"] >= start) & (t["last_date"] <= end)
        keep &= in_window.to_numpy()
        counts["outside window"] = int((~in_window).sum())
    enough = (t["n_scores"] >= study.min_scores).to_numpy()
    counts["fewer scores than the study needs"] = int((keep & ~enough).sum())
    keep &= enough
    idx = np.flatnonzero(keep)
    # The latest m episodes per client, by last date then episode order.
    sub = t.iloc[idx][["client", "last_date", "episode"]].assign(_row=idx)
    sub = sub.sort_values(["client", "last_date", "episode"], kind="stable")
    from_end = sub.groupby("client", sort=False).cumcount(ascending=False).to_numpy()
    chosen = np.sort(sub["_row"].to_numpy()[from_end < max_episodes])
    counts["over the per-client episode limit"] = int(idx.size - chosen.size)
    table = t.iloc[chosen].reset_index(drop=True)
    lo = np.array([b[0] for b in study.bands])
    band = np.searchsorted(lo, table["intake"].to_numpy(), side="right") - 1
    counts["used"] = int(chosen.size)
    return Selection(
        table=table,
        trajectory=ep.trajectory[chosen],
        band=band.astype(np.int64),
        window_applied=window_applied,
        counts=counts,
    )


def _group_sum(
    band: npt.NDArray[np.int64], values: npt.NDArray[np.int64], n_bands: int
) -> npt.NDArray[np.int64]:
    """Exact integer sums of ``values`` (1-D, or 2-D by row) per band (bincount would go
    through float64)."""
    out = np.zeros((n_bands, *values.shape[1:]), dtype=np.int64)
    if band.size:
        order = np.argsort(band, kind="stable")
        b, v = band[order], values[order]
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        out[b[starts]] += np.add.reduceat(v, starts, axis=0)
    return out


def exact_blocks(sel: Selection, study: Study) -> dict[str, npt.NDArray[np.int64]]:
    """Every block of the study's layout as an exact integer vector (band-major)."""
    layout = block_layout(study)
    t = sel.table
    nb = len(study.bands)
    band = sel.band
    intake = t["intake"].to_numpy(np.int64)
    final = t["final"].to_numpy(np.int64)
    change = t["change"].to_numpy(np.int64)
    reliable = t["reliable"].to_numpy()
    per_episode: dict[str, npt.NDArray[np.int64]] = {
        "episodes": np.ones(len(t), dtype=np.int64),
        "sum_intake": intake,
        "sum_final": final,
        "sum_change": change,
        "sum_change_sq": change * change,
        "sum_intake_sq": intake * intake,
        "sum_intake_change": intake * change,
        "reliably_improved": (reliable == Reliable.IMPROVED).astype(np.int64),
        "reliably_deteriorated": (reliable == Reliable.DETERIORATED).astype(np.int64),
        "recovered": t["recovered"].to_numpy(np.int64),
        "reliably_recovered": t["reliably_recovered"].to_numpy(np.int64),
        "case_at_intake": t["case_start"].to_numpy(np.int64),
        "response": t["response"].to_numpy(np.int64),
        "remission": t["remission"].to_numpy(np.int64),
    }
    out: dict[str, npt.NDArray[np.int64]] = {}
    for spec in layout:
        if spec.name in per_episode:
            clipped = np.clip(per_episode[spec.name], spec.lo, spec.hi)
            out[spec.name] = _group_sum(band, clipped, nb)
        elif spec.name.startswith("traj_"):
            out[spec.name] = _trajectory(sel, spec, band, intake, nb)
        elif spec.name == "change_hist":
            w = (spec.width - 1) // 2
            cell = band * spec.width + np.clip(change, -w, w) + w
            out[spec.name] = np.bincount(cell, minlength=spec.size).astype(np.int64)
        else:
            raise KeyError(f"no statistic for block {spec.name}")  # a bug: layout drifted
    return out


def _trajectory(
    sel: Selection,
    spec: BlockSpec,
    band: npt.NDArray[np.int64],
    intake: npt.NDArray[np.int64],
    nb: int,
) -> npt.NDArray[np.int64]:
    traj = sel.trajectory.astype(np.int64)
    present = traj != MISSING
    diff = np.where(present, traj - intake[:, None], 0)
    if spec.name == "traj_n":
        per = present.astype(np.int64)
    elif spec.name == "traj_sum":
        per = np.clip(diff, spec.lo, spec.hi)
    else:
        per = np.clip(diff * diff, spec.lo, spec.hi)
    return _group_sum(band, per, nb).reshape(-1)
