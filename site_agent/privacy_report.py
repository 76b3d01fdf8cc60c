"""The privacy officer's printable report of one budget period: the guarantees in words,
the budget over time and every request, from the audit chain (``Ledger.history``).

Everything here is post-processing of the ledger, which holds no client data; the report
stays with the privacy officer like the ledger itself. It is one self-contained HTML page
(inline CSS and SVG, no scripts, nothing fetched) laid out for A4 printing.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from site_agent.privacy.accounting import zcdp_to_epsilon
from site_agent.privacy.ledger import Budget, HistoryRow
from site_agent.privacy.policy import PrivacyPolicy

__all__ = ["PeriodReport", "period_rows", "render"]

# What each decision means, for the table's legend (the ledger's decision names).
DECISIONS = {
    "released": "answered: a signed release left the site and was charged",
    "cached": "answered again with the release already paid for (no cost)",
    "refused": "refused by a check of the policy or the study; charged only if the "
    "budget was already reserved when it failed",
    "pending": "waiting for the privacy officer's approval (nothing charged yet)",
    "approved": "approved by the privacy officer (charged when released)",
    "denied": "denied by the privacy officer (no cost)",
    "interrupted": "reserved but never completed (the agent stopped): charged, "
    "nothing left the site",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class PeriodReport:
    site_id: str
    key_fingerprint: str
    policy: PrivacyPolicy
    budget: Budget  # of the reported period
    current_period: int
    periods: tuple[Budget, ...]  # every period from the first to the current
    rows: tuple[HistoryRow, ...]  # of the reported period, oldest first
    problems: tuple[str, ...]  # from the audit chain's verification
    generated: dt.datetime


def _rho(x: Fraction) -> str:
    return f"{float(x):.4g}"


def _eps(policy: PrivacyPolicy, rho: Fraction) -> str:
    if rho <= 0:
        return "0"
    e = zcdp_to_epsilon(rho, policy.delta)
    return "unbounded" if not math.isfinite(e) else f"{e:.3g}"


def _when(ts: str) -> str:
    try:
        t = dt.datetime.fromisoformat(ts)
    except ValueError:
        return ts
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _guarantees(r: PeriodReport) -> str:
    pol, b = r.policy, r.budget
    delta = f"{float(pol.delta):g}"
    eps_b = _eps(pol, b.budget)
    lifetime = sum((p.spent for p in r.periods), Fraction(0))
    factor = ""
    e_spent = zcdp_to_epsilon(b.spent, pol.delta) if b.spent > 0 else 0.0
    if 0 < e_spent < 50:
        factor = (
            f" (a factor of at most {math.exp(e_spent):.3g} on the probability of any "
            f"outcome, except with probability {delta})"
        )
    episodes = (
        "one episode" if pol.max_episodes_per_client == 1
        else f"at most {pol.max_episodes_per_client} episodes"
    )
    return f"""
<ul class="words">
<li><b>Who is protected:</b> each client of this service. Everything this site
released in the period is differentially private with respect to adding or removing all
of one client's records (each client counts with {episodes} per study).</li>
<li><b>How much:</b> the period's budget is &rho; = {_rho(b.budget)} in zero-concentrated
DP (zCDP), which implies (&epsilon;, &delta;)-DP with &epsilon; = {eps_b} at
&delta; = {delta}. This period has spent &rho; = {_rho(b.spent)} (&epsilon; =
{_eps(pol, b.spent)}): anyone who sees every release of the period, whatever else they
know, can tell whether one client's records were used only to that degree{factor}.</li>
<li><b>Per study:</b> no one study may cost more than &rho; = {_rho(pol.per_study_rho)}
(&epsilon; = {_eps(pol, pol.per_study_rho)}).</li>
<li><b>Over time:</b> the budget starts afresh every {pol.period_days} days. That is a
choice of this policy, not a property of differential privacy: the protection of periods
adds up. Over all {len(r.periods)} period(s) since the ledger began, the site has spent
&rho; = {_rho(lifetime)} (&epsilon; = {_eps(pol, lifetime)} at &delta; = {delta}).</li>
<li><b>What left the site:</b> only signed releases of noisy integer sums (each listed
below with the SHA-256 of its bytes) and refusal codes with fixed messages. Once a study
has passed the policy's checks, whether it is answered, and how, never depends on the
clients' data except through the noise.</li>
<li><b>What did not leave:</b> the export, the quarantine report, <code>summary</code>,
<code>compare</code> and this ledger are exact and stay at the clinic.</li>
</ul>"""


def _chart(r: PeriodReport) -> str:
    """Cumulative spending over the period's days as a step line under the budget."""
    b = r.budget
    w, h, left, right, top, bottom = 700, 220, 64, 150, 14, 34
    pw, ph = w - left - right, h - top - bottom
    days = max((b.period_end - b.period_start).days + 1, 1)
    today = r.generated.date()
    last_day = min(max((today - b.period_start).days + 1, 0), days)
    if r.budget.period != r.current_period:
        last_day = days
    ymax = float(max(b.budget, b.spent)) or 1.0

    def x(day: float) -> float:
        return left + pw * day / days

    def y(rho: float) -> float:
        return top + ph * (1 - rho / ymax)

    def day_of(row: HistoryRow) -> float:
        try:
            t = dt.datetime.fromisoformat(row.when)
        except ValueError:
            return 0.0
        d = (t.date() - b.period_start).days + (t.hour * 3600 + t.minute * 60 + t.second) / 86400
        return min(max(d, 0.0), days)

    pts = [(x(0), y(0))]
    total = Fraction(0)
    marks: list[str] = []
    for row in r.rows:
        if row.cost <= 0:
            continue
        d = day_of(row)
        pts.append((x(d), y(float(total))))
        total += row.cost
        pts.append((x(d), y(float(total))))
        marks.append(
            f'<circle cx="{x(d):.1f}" cy="{y(float(total)):.1f}" r="3" class="mark">'
            f"<title>{_esc(row.study_id)}: rho {_rho(row.cost)}</title></circle>"
        )
    pts.append((x(last_day), y(float(total))))
    path = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
    ticks = []
    for i in range(5):
        v = ymax * i / 4
        ticks.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
            f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>'
        )
    xt = []
    for i in range(5):
        d = days * i / 4
        # The right edge is the end of the period's last day: label it with that day.
        label = (b.period_start + dt.timedelta(days=min(int(d), days - 1))).isoformat()
        xt.append(
            f'<text x="{x(d):.1f}" y="{top + ph + 18}" text-anchor="middle">{label}</text>'
        )
    by = y(float(b.budget))
    return f"""<svg viewBox="0 0 {w} {h}" width="100%" role="img"
aria-label="Privacy budget spent over the period">
{"".join(ticks)}{"".join(xt)}
<line x1="{left}" x2="{left + pw}" y1="{by:.1f}" y2="{by:.1f}" class="budget"/>
<text x="{left + pw + 6}" y="{by + 4:.1f}" class="budget-label">budget &rho; {_rho(b.budget)}</text>
<polyline points="{path}" class="spent"/>{"".join(marks)}
<text x="{left + pw + 6}" y="{y(float(total)) + 16:.1f}" class="spent-label">spent &rho; \
{_rho(total)}</text>
<text x="{14}" y="{top + ph / 2:.1f}" transform="rotate(-90 14 {top + ph / 2:.1f})"
text-anchor="middle">rho (zCDP)</text>
</svg>"""


def _events(r: PeriodReport) -> str:
    if not r.rows:
        return "<p>No requests in this period.</p>"
    out = []
    total = Fraction(0)
    for row in r.rows:
        total += row.cost
        left = f'<code class="sha">{_esc(row.sha256)}</code>' if row.sha256 else "nothing"
        code = f"<br><small>{_esc(row.code)}</small>" if row.code else ""
        out.append(
            f"<tr class='{_esc(row.decision)}'><td>{_esc(_when(row.when))}</td>"
            f"<td>{_esc(row.study_id or '(malformed request)')}<br>"
            f"<span class='title'>{_esc(row.title)}</span></td>"
            f"<td>{_esc(row.decision)}{code}</td>"
            f"<td class='num'>{_rho(row.cost) if row.cost else '0'}</td>"
            f"<td class='num'>{_eps(r.policy, row.cost)}</td>"
            f"<td class='num'>{_rho(total)}</td><td>{left}</td></tr>"
        )
    return (
        "<table class='events'><thead><tr><th>when (UTC)</th><th>study</th><th>decision</th>"
        "<th>cost &rho;</th><th>alone &epsilon;</th><th>spent after &rho;</th>"
        "<th>what left (SHA-256)</th></tr></thead><tbody>" + "".join(out) + "</tbody></table>"
    )


def _periods(r: PeriodReport) -> str:
    rows = "".join(
        f"<tr{' class=this' if p.period == r.budget.period else ''}><td>{p.period}</td>"
        f"<td>{p.period_start.isoformat()} to {p.period_end.isoformat()}</td>"
        f"<td class='num'>{_rho(p.spent)}</td><td class='num'>{_eps(r.policy, p.spent)}</td>"
        f"<td class='num'>{_rho(p.budget)}</td></tr>"
        for p in r.periods
    )
    return (
        "<table><thead><tr><th>period</th><th>dates</th><th>spent &rho;</th>"
        "<th>spent &epsilon;</th><th>budget &rho;</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _audit(r: PeriodReport) -> str:
    if not r.problems:
        return (
            "<p class='ok'>The audit chain verified when this report was made: every entry "
            "is hash-chained to the one before, the spending summed from it matches the "
            "ledger, and its head matches the checkpoint signed with the site key "
            f"(fingerprint <code>{_esc(r.key_fingerprint)}</code>).</p>"
        )
    items = "".join(f"<li>{_esc(p)}</li>" for p in r.problems)
    return (
        "<p class='bad'>The audit chain did NOT verify: the figures below may not be the "
        "site's true spending. Problems:</p>"
        f"<ul class='bad'>{items}</ul>"
    )


_CSS = """
@page{size:A4;margin:14mm}
body{font-family:system-ui,sans-serif;color:#1d1d1d;max-width:960px;margin:1.5em auto;
padding:0 1em;font-size:14px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.4em;break-after:avoid;
border-bottom:1px solid #bbb}
.meta{color:#555}.words li{margin:.35em 0}
.cards{display:flex;gap:.8em;flex-wrap:wrap;margin:1em 0}
.card{border:1px solid #bbb;border-radius:4px;padding:.5em .8em;flex:1;min-width:7em}
svg{break-inside:avoid}
.card b{display:block;font-size:1.3em}
.bar{height:10px;background:#e6e6e6;border-radius:5px;overflow:hidden;margin-top:.3em}
.bar span{display:block;height:100%;background:#2f6db5}
table{border-collapse:collapse;width:100%;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .45em;vertical-align:top;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;white-space:nowrap}
tr{break-inside:avoid}tr.this td{font-weight:bold}
tr.refused td,tr.denied td{background:#fff6e5}tr.interrupted td{background:#fdecea}
.sha{font-size:.78em;word-break:break-all}.title{color:#555;font-size:.9em}
.ok{color:#17612c}.bad{color:#a11;font-weight:bold}
svg text{font-size:11px;fill:#333}svg .grid{stroke:#e3e3e3}
svg .budget{stroke:#a11;stroke-dasharray:5 4}svg .budget-label{fill:#a11}
svg .spent{fill:none;stroke:#2f6db5;stroke-width:2}svg .mark{fill:#2f6db5}
svg .spent-label{fill:#2f6db5}
.legend{font-size:.85em;color:#444}
@media print{body{margin:0;max-width:none}a{color:inherit}}
"""


def render(r: PeriodReport) -> str:
    b, pol = r.budget, r.policy
    share = float(b.spent / b.budget) if b.budget else 0.0
    counts = Counter(row.decision for row in r.rows)
    count_text = ", ".join(f"{n} {d}" for d, n in sorted(counts.items())) or "none"
    state = "current period" if b.period == r.current_period else "closed period"
    legend = "".join(
        f"<li><b>{_esc(d)}</b>: {_esc(t)}</li>" for d, t in DECISIONS.items() if d in counts
    )
    warnings = "".join(f"<p class='bad'>{_esc(w)}</p>" for w in pol.warnings)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Privacy report: {_esc(r.site_id)}, period {b.period}</title>
<style>{_CSS}</style></head><body>
<h1>Privacy report: {_esc(r.site_id)}</h1>
<p class="meta">Budget period {b.period} ({state}): {b.period_start.isoformat()} to
{b.period_end.isoformat()}. Made {r.generated.strftime("%Y-%m-%d %H:%M UTC")} from the
ledger's audit chain, with the policy {_esc(pol.source)}.</p>
{warnings}
<div class="cards">
<div class="card">budget<b>&rho; {_rho(b.budget)}</b>&epsilon; {_eps(pol, b.budget)}
at &delta; {float(pol.delta):g}</div>
<div class="card">spent<b>&rho; {_rho(b.spent)}</b>&epsilon; {_eps(pol, b.spent)}
<div class="bar"><span style="width:{min(share, 1.0) * 100:.1f}%"></span></div>
{share * 100:.0f}% of the budget</div>
<div class="card">remaining<b>&rho; {_rho(b.remaining)}</b>&epsilon;
{_eps(pol, b.remaining)}</div>
<div class="card">requests<b>{len(r.rows)}</b>{_esc(count_text)}</div>
</div>
<h2>The guarantees in words</h2>
{_guarantees(r)}
<h2>Budget over the period</h2>
{_chart(r)}
<h2>Every request in the period</h2>
{_events(r)}
<ul class="legend">{legend}</ul>
<p class="legend">&epsilon; of one cost alone is what that release would imply on its own;
costs add up in &rho;, not in &epsilon;.</p>
<h2>All periods</h2>
{_periods(r)}
<h2>Audit</h2>
{_audit(r)}
<p class="legend">To check this report: <code>outcomebench-site audit --verify</code> and
<code>outcomebench-site history --json</code> list the same entries; the SHA-256 of a
release file is <code>sha256sum release.json</code>.</p>
</body></html>
"""


def period_rows(rows: Sequence[HistoryRow], period: int) -> tuple[HistoryRow, ...]:
    return tuple(row for row in rows if row.period == period)
