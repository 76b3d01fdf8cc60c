"""The HTML report: well-formed, self-contained, escaped, and honest about suppression and
privacy, for real pipeline output and for every awkward shape a noisy benchmark can take."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from fractions import Fraction
from html.parser import HTMLParser
from typing import Any

import numpy as np
import pandas as pd
import pytest

from coordinator.estimates import estimate_all
from coordinator.pooling import Contribution, Pooled, PooledBlock, Rejection
from coordinator.publish import benchmark_document
from coordinator.report import render_report
from protocols.layout import block_layout
from protocols.release import SiteRelease
from protocols.study import Study, parse_study
from site_agent.outcomes import MISSING
from site_agent.privacy.statistics import Selection, exact_blocks

MINUS = "\u2212"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}
SVG_NS = "http://www.w3.org/2000/svg"


# ------------------------------------------------------------------------- checkers


class _TagBalance(HTMLParser):
    """Every non-void element is closed, in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: list[str] = []
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_startendtag(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes |= {name for name, _ in attrs}

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()


def _svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.DOTALL)


def _check_page(page: str) -> _TagBalance:
    """Well-formed HTML, SVGs that parse as XML and are accessible, nothing external."""
    assert page.startswith("<!DOCTYPE html>")
    parser = _TagBalance()
    parser.feed(page)
    parser.close()
    assert parser.problems == []
    assert parser.stack == [], f"unclosed: {parser.stack}"
    for svg in _svgs(page):
        root = ET.fromstring(svg)
        assert root.tag == f"{{{SVG_NS}}}svg"
        assert root.get("role") == "img"
        title = root.find(f"{{{SVG_NS}}}title")
        assert title is not None and (title.text or "").strip()
        assert root.get("aria-labelledby", "").split()[0] == title.get("id")
        for el in root.iter():
            for name, value in el.attrib.items():
                assert not re.search(r"nan|inf", value, re.IGNORECASE) or name in (
                    "id", "aria-labelledby"), f"{el.tag} {name}={value}"
    # Nothing is fetched or run: the only URL is the SVG namespace.
    assert set(re.findall(r"https?://[^\s\"'<>]*", page)) <= {SVG_NS}
    assert not {"script", "link", "img", "iframe", "object", "embed", "image", "use",
                "foreignobject"} & set(parser.tags)
    assert not {"src", "href", "xlink:href", "srcset", "style"} & parser.attributes
    assert not [a for a in parser.attributes if a.startswith("on")]
    [css] = re.findall(r"<style>(.*?)</style>", page, flags=re.DOTALL)
    assert "@import" not in css and "url(" not in css and "@font-face" not in css
    return parser


# -------------------------------------------------------------------- documents


def _estimate(value: float | None, half: float = 0.5, reason: str | None = None
              ) -> dict[str, Any]:
    if value is None:
        return {"value": None, "ci95": None, "se": None, "se_sampling": None,
                "se_noise": None, "suppressed": reason or "fewer than 20 episodes"}
    return {"value": value, "ci95": [value - half, value + half], "se": half / 1.96,
            "se_sampling": half / 3, "se_noise": half / 2.5, "suppressed": None}


def _hand_doc(bands: tuple[tuple[int, int], ...] = ((0, 9), (10, 27)), k: int = 4
              ) -> dict[str, Any]:
    """A minimal benchmark document in the publish schema, with a negative band."""
    band_rows, traj, fits, quantiles = [], [], [], []
    for i, (lo, hi) in enumerate(bands):
        name = f"{lo}-{hi}"
        change = -0.8 + 3.0 * i
        band_rows.append({"band": name, "lo": lo, "hi": hi, "estimates": {
            "episodes": _estimate(400.0 - 50 * i, 40.0),
            "mean_intake": _estimate((lo + hi) / 2, 0.6),
            "mean_change": _estimate(change, 0.4),
            "sd_change": _estimate(5.0, 0.3),
            "effect_size": _estimate(change / 6, 0.06),
            "reliable_improvement_rate": _estimate(0.1 + 0.2 * i, 0.05),
            "reliable_deterioration_rate": _estimate(0.08, 0.03),
            "recovery_rate": _estimate(None, reason="fewer than 20 episodes at caseness "
                                                    "(noisy count 9)"),
        }})
        for s in range(1, k + 1):
            m = change * (0.3 + 0.7 * np.log(s) / np.log(max(k, 2)))
            traj.append({"band": name, "session": s, "clients": 300.0 - 20 * s,
                         "mean_change": _estimate(float(m), 0.7),
                         "tolerance95": [float(m) - 8, float(m) + 8]})
        fits.append({"band": name, "sessions_used": k, "a": _estimate(change * 0.3, 0.5),
                     "b": _estimate(change * 0.5, 0.4)})
        for q, v in ((0.1, -6.0), (0.25, -2.0), (0.5, 1.0), (0.75, 4.0), (0.9, 7.0)):
            quantiles.append({"band": name, "quantile": q, **_estimate(v + i, 1.0)})
    return {
        "format": "outcomebench.benchmark", "version": 1,
        "created": "2026-03-04T05:06:07+00:00",
        "study": {"id": "demo", "title": "Demo benchmark", "instrument": {"id": "PHQ-9"},
                  "window": {"start": "2025-01-01", "end": "2025-12-31"}, "max_session": k,
                  "privacy": {"rho": "1/2"}},
        "study_hash": "ab" * 32,
        "instrument": {"id": "PHQ-9", "name": "Patient Health Questionnaire-9",
                       "range": [0, 27], "better": "lower", "cutoff": 10.0,
                       "reliable_change": 6.0},
        "sites": {
            "contributed": [{"site_id": f"clinic-{j}", "release_sha256": f"{j}" * 64,
                             "rho": "1/2", "epsilon": 4.326, "delta": 1e-6,
                             "max_episodes_per_client": 2} for j in range(1, 4)],
            "missing": [{"site": "clinic-9", "reason": "timeout"}],
        },
        "privacy": {"sites": 3, "unit": "client",
                    "mechanism": "discrete Gaussian (OpenDP)",
                    "epsilon_per_site_max": 4.326, "delta_per_site_max": 1e-6,
                    "rho_per_site_max": 0.5},
        "effect_size_reference_sd": _estimate(6.0, 0.5),
        "bands": band_rows,
        "quantiles": quantiles,
        "trajectory": traj,
        "trajectory_fit": fits,
        "regression": {"episodes": 700.0, "mean_intake": 12.5,
                       "intercept": _estimate(-6.4, 2.0), "slope": _estimate(0.83, 0.2),
                       "residual_sd": _estimate(4.2, 0.6)},
        "methods": "Sums with discrete Gaussian noise; pooling is post-processing.",
        "software": {"outcomebench": "9.8.7"},
    }


def _pipeline_doc(sizes: tuple[int, ...] = (400, 300, 200, 12), k: int = 6) -> dict[str, Any]:
    """A document from the real pooling, estimation and publication code: pooled blocks
    summed from simulated episodes with a known noise variance (no OpenDP run needed)."""
    study: Study = parse_study({
        "id": "pipeline", "title": "Pipeline <demo>", "instrument": "PHQ-9",
        "window": {"start": "2025-01-01", "end": "2025-12-31"},
        "bands": [[0, 9], [10, 14], [15, 19], [20, 27]],
        "families": ["counts", "change", "categories", "trajectory", "histogram"],
        "max_session": k, "privacy": {"rho": 1}})
    layout = block_layout(study)
    rng = np.random.default_rng(20260101)
    frames, trajectories, bands = [], [], []
    for i, ((lo, hi), n) in enumerate(zip(study.bands, sizes, strict=True)):
        intake = rng.integers(lo, hi + 1, n)
        change = np.clip(np.rint(0.5 * (intake - 8) + rng.normal(0, 5, n)), intake - 27, intake)
        final = (intake - change).astype(int)
        improved, case = change >= 6, intake >= 10
        recovered = case & (final < 10)
        frames.append(pd.DataFrame({
            "intake": intake, "final": final, "change": change.astype(int),
            "reliable": np.where(improved, 1, np.where(change <= -6, -1, 0)),
            "case_start": case, "recovered": recovered,
            "reliably_recovered": recovered & improved,
            "response": (intake > 0) & (2 * change >= intake), "remission": final < 10,
        }))
        sessions = rng.integers(2, k + 1, n)
        traj = np.full((n, k), MISSING, dtype=np.int32)
        for s in range(1, k + 1):
            here = sessions >= s
            traj[here, s - 1] = intake[here] - np.rint(
                change[here] * np.log(s) / np.log(sessions[here]))
        trajectories.append(traj)
        bands.append(np.full(n, i))
    sel = Selection(table=pd.concat(frames, ignore_index=True),
                    trajectory=np.concatenate(trajectories), band=np.concatenate(bands),
                    window_applied=True, counts={})
    values = {name: v.reshape(-1) for name, v in exact_blocks(sel, study).items()}
    # Noise of a rho-1 study over five sites: 5 (sensitivity^2 / (2 rho share)), share 1/4.
    blocks = {b.name: PooledBlock(spec=b, values=values[b.name].reshape(
                  b.n_bands, b.width).astype(float),
                  noise_var=np.full((b.n_bands, b.width), 5 * b.sensitivity_sq / 0.5))
              for b in layout}
    contributions = tuple(
        Contribution(site_id=f"clinic-{j}", sha256=f"{j:x}" * 64, release=SiteRelease(
            study_id=study.id, study_hash=study.hash, site_id=f"clinic-{j}",
            created="2025-12-31T00:00:00+00:00", blocks=(), rho=Fraction(1),
            epsilon=7.766, delta=1e-6, unit="client", max_episodes_per_client=1,
            mechanism="discrete Gaussian (OpenDP)", window_applied=True, versions={}))
        for j in range(1, 6))
    pooled = Pooled(study=study, contributions=contributions, blocks=blocks)
    doc = benchmark_document(pooled, estimate_all(pooled),
                             [Rejection("clinic-6", "signature is not clinic-6's key")],
                             created=dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
    loaded: dict[str, Any] = json.loads(json.dumps(doc))  # exactly what benchmark.json holds
    return loaded


# ------------------------------------------------------------------------ tests


def test_pipeline_document_renders_complete_and_self_contained() -> None:
    doc = _pipeline_doc()
    page = render_report(doc)
    parser = _check_page(page)
    assert len(_svgs(page)) == 3  # expected change, rates, trajectories
    assert "Pipeline &lt;demo&gt;" in page and "(pipeline)" in page
    assert doc["study_hash"] in page
    for band in ("0\u20139", "10\u201314", "15\u201319", "20\u201327"):
        assert f"Intake {band}" in page
    # the last band has 12 episodes: its ratios are suppressed, with the reason
    assert "suppressed: fewer than 20 episodes (noisy count 12)" in page
    # rates are percentages
    rate = doc["bands"][0]["estimates"]["reliable_improvement_rate"]["value"]
    assert f"{rate * 100:.1f}%" in page
    assert "severity-adjusted expected change = intercept + slope \u00d7 intake" in page
    assert doc["methods"] in page
    assert "outcomebench " + doc["software"]["outcomebench"] in page
    assert {"table", "figure", "svg", "footer"} <= set(parser.tags)


def test_malicious_values_are_escaped() -> None:
    doc = _hand_doc()
    evil = "<script>alert(1)</script>"
    doc["study"]["title"] = evil
    doc["study"]["id"] = '"><img src=x onerror=alert(1)>'
    doc["sites"]["missing"] = [{"site": "<b>x</b>", "reason": "<iframe src=//evil>"}]
    doc["sites"]["contributed"][0]["site_id"] = "<svg onload=alert(1)>"
    doc["bands"][0]["band"] = "<i>band</i>"
    doc["bands"][1]["estimates"]["mean_change"]["suppressed"] = "<script>bad()</script>"
    doc["trajectory"][0]["band"] = "</svg><script>x()</script>"
    doc["methods"] = "<style>body{display:none}</style>"
    doc["software"] = {"<b>": "</footer>"}
    page = render_report(doc)
    _check_page(page)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;iframe src=//evil&gt;" in page
    assert page.count("<style>") == 1


def test_privacy_statement_states_the_numbers() -> None:
    page = render_report(_hand_doc())
    statement = page[page.index('id="privacy"'):page.index('id="change"')]
    assert "3 sites contributed" in statement
    assert "&rho; = 0.5" in statement
    assert "&epsilon; = 4.33" in statement
    assert "&delta; = 10<sup>\u22126</sup>" in statement
    assert "discrete Gaussian (OpenDP)" in statement
    assert "unit of privacy is the <strong>client</strong>" in statement
    assert "at most 2 episodes per client" in statement
    assert "post-processing" in statement and "no additional privacy" in statement
    assert "1 site did not contribute" in statement
    assert "clinic-9</span>: timeout" in statement
    assert "The study asked each site for &rho; = 1/2" in statement
    for j in range(1, 4):
        assert f"clinic-{j}" in statement and f"{j}" * 64 in statement


def test_privacy_statement_without_sites_or_missing_ones() -> None:
    doc = _hand_doc()
    doc["sites"] = {"contributed": [], "missing": []}
    doc["privacy"] = {"sites": 0, "unit": "client", "mechanism": None,
                      "epsilon_per_site_max": None, "delta_per_site_max": None,
                      "rho_per_site_max": None}
    page = render_report(doc)
    _check_page(page)
    assert "No site contributed a release" in page
    assert "No site release was missing or rejected" in page


def test_infinite_epsilon_is_explained() -> None:
    doc = _hand_doc()
    doc["privacy"]["epsilon_per_site_max"] = None
    page = render_report(doc)
    assert "&epsilon; not finite" in page


def test_estimates_table_shows_values_intervals_and_suppressed_reasons() -> None:
    page = render_report(_hand_doc())
    tables = page[page.index('id="estimates"'):page.index('id="trajectory"')]
    assert tables.count("<table>") == 2
    # a negative change with its interval, minus signs typeset
    assert f"{MINUS}0.80" in tables and f"{MINUS}1.20 to {MINUS}0.40" in tables
    assert "10.0%" in tables and "5.0% to 15.0%" in tables  # rates as percentages
    assert tables.count("suppressed: fewer than 20 episodes at caseness (noisy count 9)") == 2


def test_band_plot_marks_suppressed_bands() -> None:
    doc = _hand_doc()
    doc["bands"][1]["estimates"]["mean_change"] = _estimate(None, reason="too noisy")
    page = render_report(doc)
    change_svg = _svgs(page)[0]
    assert "Expected change by intake band" in change_svg
    assert "suppressed" in change_svg and "too noisy" in change_svg
    assert change_svg.count("<circle") == 1


def test_trajectory_gaps_split_lines_and_fit_is_drawn() -> None:
    doc = _hand_doc(k=6)
    rows = [r for r in doc["trajectory"] if r["band"] == "0-9"]
    rows[2]["mean_change"] = _estimate(None, reason="the DP noise is too large")
    rows[2]["tolerance95"] = None
    traj = _svgs(render_report(doc))[2]
    assert "Change from intake by session" in traj
    # band 0-9: sessions 1-2 and 4-6 are two lines; band 10-27 is one
    assert traj.count("<polyline") == 3
    assert traj.count('stroke-dasharray="6 4"') == 1 + 2  # the legend and two fits
    doc["trajectory_fit"][0]["a"] = _estimate(None, reason="fewer than 3 sessions")
    page = render_report(doc)
    assert _svgs(page)[2].count('stroke-dasharray="6 4"') == 1 + 1
    assert "suppressed: fewer than 3 sessions" in page


def _single_band(doc: dict[str, Any]) -> None:
    for key in ("bands", "trajectory_fit"):
        doc[key] = doc[key][:1]
    doc["trajectory"] = [r for r in doc["trajectory"] if r["band"] == "0-9"]
    doc["quantiles"] = [r for r in doc["quantiles"] if r["band"] == "0-9"]


def _one_session(doc: dict[str, Any]) -> None:
    doc["trajectory"] = [r for r in doc["trajectory"] if r["session"] == 1]
    doc["study"]["max_session"] = 1
    for fit in doc["trajectory_fit"]:
        fit["a"] = fit["b"] = _estimate(None, reason="fewer than 3 sessions")


def _all_suppressed(doc: dict[str, Any]) -> None:
    gone = _estimate(None, reason="fewer than 20 episodes (noisy count -4)")
    for band in doc["bands"]:
        band["estimates"] = dict.fromkeys(band["estimates"], gone)
    for row in doc["trajectory"]:
        row["mean_change"], row["tolerance95"] = gone, None
    for fit in doc["trajectory_fit"]:
        fit["a"] = fit["b"] = gone
    doc["quantiles"] = [{**r, **gone} for r in doc["quantiles"]]
    doc["regression"] = {k: gone for k in ("intercept", "slope", "residual_sd")}
    doc["effect_size_reference_sd"] = gone


def _band_without_data(doc: dict[str, Any]) -> None:
    doc["bands"][1]["estimates"] = {}
    doc["trajectory"] = [r for r in doc["trajectory"] if r["band"] == "0-9"]
    doc["trajectory_fit"] = doc["trajectory_fit"][:1]
    doc["quantiles"] = [r for r in doc["quantiles"] if r["band"] == "0-9"]


def _all_negative(doc: dict[str, Any]) -> None:
    for band in doc["bands"]:
        band["estimates"]["mean_change"] = _estimate(-3.5, 0.8)
        band["estimates"]["reliable_improvement_rate"] = _estimate(0.0, 0.0)
    for row in doc["trajectory"]:
        row["mean_change"] = _estimate(-2.0 - row["session"], 0.5)
        row["tolerance95"] = [-12.0, 3.0]


def _families_absent(doc: dict[str, Any]) -> None:
    doc.update(bands=[], trajectory=[], trajectory_fit=[], quantiles=[], regression={})


def _junk(doc: dict[str, Any]) -> None:
    doc["bands"][0]["estimates"]["mean_change"] = {"value": "abc", "ci95": [None, 1]}
    doc["bands"][1]["estimates"]["sd_change"] = {"value": 2.0, "ci95": None}
    doc["trajectory"][0]["tolerance95"] = [1.0]
    doc["trajectory"][1]["session"] = "x"
    doc["trajectory"][2]["mean_change"] = None
    doc["quantiles"][0]["quantile"] = None
    del doc["instrument"], doc["privacy"], doc["software"], doc["effect_size_reference_sd"]


def _many_bands(doc: dict[str, Any]) -> None:
    doc.update(_hand_doc(bands=tuple((3 * i, 3 * i + 2) for i in range(9)), k=20))


def _flat(doc: dict[str, Any]) -> None:
    for row in doc["trajectory"]:
        row["mean_change"] = _estimate(0.0, 0.0)
        row["tolerance95"] = [0.0, 0.0]
    for band in doc["bands"]:
        band["estimates"]["mean_change"] = _estimate(0.0, 0.0)


EDGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "single band": _single_band, "one session": _one_session,
    "all suppressed": _all_suppressed, "band without data": _band_without_data,
    "all negative": _all_negative, "families absent": _families_absent,
    "junk values": _junk, "many bands, many sessions": _many_bands, "flat zero": _flat,
}


@pytest.mark.parametrize("edit", EDGES.values(), ids=EDGES.keys())
def test_edge_cases_render_well_formed(edit: Callable[[dict[str, Any]], None]) -> None:
    doc = copy.deepcopy(_hand_doc())
    edit(doc)
    page = render_report(doc)
    _check_page(page)


def test_edge_case_details() -> None:
    doc = _hand_doc()
    _single_band(doc)
    assert len(_svgs(render_report(doc))) == 3

    doc = _hand_doc()
    _one_session(doc)
    traj = _svgs(render_report(doc))[2]
    assert traj.count("<polyline") == 0 and traj.count("<circle") >= 2  # points, no lines
    assert "1 of 1 review points estimated" in traj

    doc = _hand_doc()
    _all_suppressed(doc)
    page = render_report(doc)
    assert "No estimates: all sessions suppressed" in page
    assert "<circle" not in _svgs(page)[0]
    assert page.count("suppressed: fewer than 20 episodes (noisy count \u22124)") == 0
    assert "suppressed: fewer than 20 episodes (noisy count -4)" in page

    doc = _hand_doc()
    _band_without_data(doc)
    page = render_report(doc)
    assert "No estimates: no data for this band" in page
    assert "no estimates</td>" in page

    doc = _hand_doc()
    _all_negative(doc)
    change = _svgs(render_report(doc))[0]
    assert f"{MINUS}3.50" in change

    doc = _hand_doc()
    _families_absent(doc)
    page = render_report(doc)
    assert "<svg" not in page
    assert "did not ask for trajectories" in page and "did not ask for the regression" in page


def test_regression_formula_with_numbers() -> None:
    page = render_report(_hand_doc())
    section = page[page.index('id="regression"'):page.index('id="methods"')]
    assert f"= {MINUS}6.40 + 0.830 \u00d7 PHQ-9 intake score" in section
    assert "700 episodes" in section and "Residual SD" in section
