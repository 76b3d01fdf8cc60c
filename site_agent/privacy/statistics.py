"""Exact sufficient statistics of a study: bounded integer sums per intake band.

Contribution bounding is by construction: each client keeps at most
``max_episodes_per_client`` episodes (the latest complete ones in the window), each
episode adds to exactly one band, and every per-episode value is clipped to the block's
declared bounds. Property tests check that adding or removing one client changes each
block by at most its declared L2 sensitivity.

Total on any data: whatever the episodes hold, these functions return blocks and never
raise (a refusal or an error that depended on one client would leak it without noise). An
episode whose intake or final score lies outside the study instrument's range, or whose
intake lies in no band of the study, is not counted; every other value is clipped. No
episodes at all give the zero vectors (:func:`empty_blocks`), which the engine noises
like any other.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from protocols.instruments import Better
from protocols.layout import (
    COUNT_BLOCK,
    BlockSpec,
    block_layout,
    change_bounds,
    trajectory_groups,
)
from protocols.study import Study
from site_agent.outcomes import MISSING, Episodes, Reliable

__all__ = ["Selection", "empty_blocks", "exact_blocks", "select_episodes"]

_EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class Selection:
    """The episodes a study uses, with the study's band of each."""

    table: pd.DataFrame
    trajectory: npt.NDArray[np.int32]
    band: npt.NDArray[np.int64]
    window_applied: bool
    counts: Mapping[str, int]  # what was left out and why (local only)


def select_episodes(
    ep: Episodes, study: Study, max_episodes: int, *, dated: bool | None = None
) -> Selection:
    """The episodes ``study`` counts: in its window (when the export has dates), with
    enough scores, intake and final in the instrument's range and the intake in a band,
    the latest ``max_episodes`` per client.

    ``dated`` says whether the export has dates (the site's configuration: the release
    engine passes it, so that ``window_applied``, which leaves the site, does not depend
    on the data). None infers it from the episodes (local tools and tests).
    """
    t = ep.table
    keep = np.ones(len(t), dtype=bool)
    counts: dict[str, int] = {"derived": len(t)}
    if dated is None:
        dated = bool(len(t)) and bool((t["last_date"] != np.iinfo(np.int32).min).all())
    window_applied = dated
    if window_applied:
        start = (study.window[0] - _EPOCH).days
        end = (study.window[1] - _EPOCH).days
        in_window = (t["last_date"] >= start) & (t["last_date"] <= end)
        keep &= in_window.to_numpy()
        counts["outside window"] = int((~in_window).sum())
    enough = (t["n_scores"] >= study.min_scores).to_numpy()
    counts["fewer scores than the study needs"] = int((keep & ~enough).sum())
    keep &= enough
    # Possible only when the study's instrument is narrower than the one the data were
    # checked against: such episodes are left out, never an error.
    ins = study.instrument
    intake, final = t["intake"].to_numpy(np.int64), t["final"].to_numpy(np.int64)
    inside = (
        (intake >= max(ins.lo, study.bands[0][0]))
        & (intake <= min(ins.hi, study.bands[-1][1]))
        & (final >= ins.lo)
        & (final <= ins.hi)
    )
    counts["outside the study's range or bands"] = int((keep & ~inside).sum())
    keep &= inside
    idx = np.flatnonzero(keep)
    # The latest m episodes per client, by last date then episode order.
    clients = t["client"].to_numpy()[idx]
    order = np.lexsort((t["episode"].to_numpy()[idx], t["last_date"].to_numpy()[idx], clients))
    sorted_clients = clients[order]
    last_of_client = np.append(sorted_clients[1:] != sorted_clients[:-1], order.size > 0)
    # Position counted back from each client's latest episode: 0, 1, 2, ...
    last_pos = np.flatnonzero(last_of_client)
    group_end = np.repeat(last_pos, np.diff(np.r_[-1, last_pos]))
    from_end = group_end - np.arange(order.size)
    chosen = np.sort(idx[order[from_end < max_episodes]])
    counts["over the per-client episode limit"] = int(idx.size - chosen.size)
    lo = np.array([b[0] for b in study.bands])
    band = np.searchsorted(lo, t["intake"].to_numpy()[chosen], side="right") - 1
    # Sorted by band, so that every block sums contiguous slices.
    by_band = np.argsort(band, kind="stable")
    chosen, band = chosen[by_band], band[by_band]
    counts["used"] = int(chosen.size)
    return Selection(
        table=t.iloc[chosen].reset_index(drop=True),
        trajectory=ep.trajectory[chosen],
        band=band.astype(np.int64),
        window_applied=window_applied,
        counts=counts,
    )


def _band_sums(
    bounds: npt.NDArray[np.int64], values: npt.NDArray[np.integer]
) -> npt.NDArray[np.int64]:
    """Exact int64 sums of ``values`` (1-D, or 2-D by row) over each band's slice."""
    return np.stack(
        [values[lo:hi].sum(axis=0, dtype=np.int64) for lo, hi in itertools.pairwise(bounds)]
    )


def empty_blocks(study: Study) -> dict[str, npt.NDArray[np.int64]]:
    """Every block of the study's layout for no episodes: zero vectors."""
    return {spec.name: np.zeros(spec.size, dtype=np.int64) for spec in block_layout(study)}


def exact_blocks(sel: Selection, study: Study) -> dict[str, npt.NDArray[np.int64]]:
    """Every block of the study's layout as an exact integer vector (band-major), each
    value encoded as protocols/layout.py says (centred, band-local, times m_b)."""
    layout = block_layout(study)
    nb = len(study.bands)
    if sel.band.size and (int(sel.band.min()) < 0 or int(sel.band.max()) >= nb):
        # select_episodes never keeps such episodes; a Selection made otherwise still
        # gets blocks, not an IndexError.
        ok = (sel.band >= 0) & (sel.band < nb)
        sel = Selection(
            table=sel.table[ok].reset_index(drop=True),
            trajectory=sel.trajectory[ok],
            band=sel.band[ok],
            window_applied=sel.window_applied,
            counts=sel.counts,
        )
    t = sel.table
    ins = study.instrument
    band = sel.band
    # Episodes are sorted by band (select_episodes), so each band is one slice.
    bounds = np.searchsorted(band, np.arange(nb + 1)).astype(np.int64)
    band_lo = np.array([b[0] for b in study.bands], dtype=np.int64)[band]
    band_w = np.array([b[1] - b[0] for b in study.bands], dtype=np.int64)[band]
    intake = t["intake"].to_numpy(np.int64)
    final = t["final"].to_numpy(np.int64)
    change = t["change"].to_numpy(np.int64)
    reliable = t["reliable"].to_numpy()
    case = t["case_start"].to_numpy(bool)
    u = 2 * (intake - band_lo) - band_w
    g = 2 * final - (ins.lo + ins.hi)
    raw: dict[str, Callable[[], npt.NDArray[np.int64]]] = {
        "sum_intake": lambda: u,
        "sum_final": lambda: g,
        "sum_intake_sq": lambda: u * u,
        "sum_final_sq": lambda: g * g,
        "sum_intake_final": lambda: u * g,
        "reliably_improved": lambda: (reliable == Reliable.IMPROVED).astype(np.int64),
        "reliably_deteriorated": lambda: (reliable == Reliable.DETERIORATED).astype(np.int64),
        "recovered": lambda: t["recovered"].to_numpy(np.int64),
        "reliably_recovered": lambda: t["reliably_recovered"].to_numpy(np.int64),
        "case_at_intake": lambda: case.astype(np.int64),
        "response": lambda: t["response"].to_numpy(np.int64),
        "remission": lambda: t["remission"].to_numpy(np.int64),
    }
    names = {spec.name for spec in layout}
    traj: dict[str, npt.NDArray[np.int64]] = {}
    if names & {"traj_n", "traj_sum", "traj_sum_sq"}:
        traj = _trajectory_sums(sel, layout, bounds, intake, study)
    out: dict[str, npt.NDArray[np.int64]] = {}
    for spec in layout:
        if spec.name == COUNT_BLOCK:
            out[spec.name] = _band_sums(bounds, np.ones(len(t), dtype=np.int64))
        elif spec.name in raw:
            mask = case if spec.over == "cases" else None
            out[spec.name] = _band_sums(bounds, _encode(spec, band, raw[spec.name](), mask))
        elif spec.name in traj:
            out[spec.name] = traj[spec.name]
        elif spec.name == "change_hist":
            c_lo = np.array([r[0] for r in spec.raw], dtype=np.int64)
            c_hi = np.array([r[1] for r in spec.raw], dtype=np.int64)
            bins = np.clip(change, c_lo[band], c_hi[band]) - c_lo[band]
            cell = band * spec.width + bins
            out[spec.name] = np.bincount(cell, minlength=spec.size).astype(np.int64)
        else:
            raise KeyError(f"no statistic for block {spec.name}")  # a bug: layout drifted
    return out


def _encode(
    spec: BlockSpec,
    band: npt.NDArray[np.int64],
    values: npt.NDArray[np.int64],
    mask: npt.NDArray[np.bool_] | None = None,
) -> npt.NDArray[np.int64]:
    """m_b * (2 v - (lo_b + hi_b)) with v clipped to the band's bounds (never binding
    for honest values; it makes the sensitivity hold for any input); 0 where the band's
    value is fixed (m_b = 0) or the episode is outside the block's denominator."""
    lo = np.array([r[0] for r in spec.raw], dtype=np.int64)[band]
    hi = np.array([r[1] for r in spec.raw], dtype=np.int64)[band]
    mult = np.array(spec.mult, dtype=np.int64)[band]
    enc = mult * (2 * np.clip(values, lo, hi) - (lo + hi))
    if mask is not None:
        enc = np.where(mask, enc, 0)
    return enc


def _trajectory_sums(
    sel: Selection,
    layout: tuple[BlockSpec, ...],
    bounds: npt.NDArray[np.int64],
    intake: npt.NDArray[np.int64],
    study: Study,
) -> dict[str, npt.NDArray[np.int64]]:
    """traj_n, traj_sum and traj_sum_sq at the review groups: each client's change from
    intake (positive = improvement) at the latest session of each group it was scored at."""
    spec = {b.name: b for b in layout}
    groups = trajectory_groups(study.max_session)
    n, g = sel.trajectory.shape[0], len(groups)
    present = np.zeros((n, g), dtype=bool)
    score = np.zeros((n, g), dtype=np.int64)
    for k, (first, last) in enumerate(groups):
        block = sel.trajectory[:, first - 1 : last]
        seen = block != MISSING
        # The latest scored session of the group: the last True of each row.
        latest = block.shape[1] - 1 - np.argmax(seen[:, ::-1], axis=1)
        present[:, k] = seen.any(axis=1)
        score[:, k] = block[np.arange(n), latest]
    diff = score - intake[:, None]
    change = -diff if study.instrument.better is Better.LOWER else diff
    band = np.repeat(sel.band, g)
    out: dict[str, npt.NDArray[np.int64]] = {}
    if "traj_n" in spec:
        out["traj_n"] = _band_sums(bounds, present.astype(np.int64)).reshape(-1)
    if "traj_sum" in spec:
        enc = _encode(spec["traj_sum"], band, change.reshape(-1), present.reshape(-1))
        out["traj_sum"] = _band_sums(bounds, enc.reshape(n, g)).reshape(-1)
    if "traj_sum_sq" in spec:
        bounds_c = [change_bounds(study.instrument, lo, hi) for lo, hi in study.bands]
        c_mid = np.array([lo + hi for lo, hi in bounds_c], dtype=np.int64)
        centred = 2 * change - c_mid[sel.band][:, None]
        enc = _encode(spec["traj_sum_sq"], band, (centred * centred).reshape(-1),
                      present.reshape(-1))
        out["traj_sum_sq"] = _band_sums(bounds, enc.reshape(n, g)).reshape(-1)
    return out
