"""``outcomebench-site``: the clinic's command line. Exit codes: see site_agent.errors."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from protocols.codes import ErrorCode
from protocols.errors import SpecError
from site_agent import crypto, privacy_report
from site_agent.config import SiteConfig, load_site_config
from site_agent.data import Intake, IntakeCounts, default_quarantine_report, read_intake
from site_agent.errors import EXIT_HELP, ConfigError, DataError, ExitCode, refusal_exit
from site_agent.outcomes import derive_episodes
from site_agent.privacy import (
    LedgerError,
    LedgerUnusable,
    Refused,
    ReleaseEngine,
    load_engine,
    load_policy,
    load_study_request,
)
from site_agent.privacy.accounting import zcdp_to_epsilon
from site_agent.privacy.local_view import local_precision
from site_agent.report import compare, load_benchmark, write_comparison
from site_agent.summary import LOCAL_ONLY, summarize

__all__ = ["main"]

_EXAMPLES = 10


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {int(c):>3}  {h}" for c, h in EXIT_HELP.items())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="outcomebench-site",
        description="outcomebench site agent: checks the clinic's outcome export, "
        "summarises it locally and answers studies with differentially private releases.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", required=True, type=Path, help="the site's site.yaml")
        sp.add_argument("--json", action="store_true", help="print JSON instead of text")
        sp.add_argument(
            "--strict", action="store_true", help="refuse the whole file if any row is invalid"
        )
        sp.add_argument(
            "--quarantine",
            type=Path,
            default=None,
            metavar="PATH",
            help="where to write the quarantine report (CSV; default: "
            "quarantine.csv beside site.yaml). It holds raw values: keep it local.",
        )

    check = sub.add_parser(
        "check",
        help="validate the export and write the quarantine report",
        description="Validate every row of the export. Invalid rows are "
        "listed in the quarantine report with the line, field, value, "
        "reason and fix, and left out.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(check)
    check.set_defaults(run=_check)

    summary = sub.add_parser(
        "summary",
        help="exact local outcome summary (never leaves the site)",
        description=f"Outcome summary per instrument and intake band. {LOCAL_ONLY}",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common(summary)
    summary.add_argument(
        "--max-session",
        type=int,
        default=20,
        metavar="K",
        help="trajectories use sessions 1..K (default 20)",
    )
    summary.set_defaults(run=_summary)

    def sub_cmd(
        name: str,
        help_: str,
        run: Callable[[argparse.Namespace], int],
        study: bool = False,
        json_: bool = True,
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=_epilog(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.add_argument("--config", required=True, type=Path, help="the site's site.yaml")
        if study:
            sp.add_argument(
                "--study",
                required=True,
                type=Path,
                help="study.yaml (draft) or a signed study (JSON)",
            )
        if json_:
            sp.add_argument("--json", action="store_true", help="print JSON instead of text")
        sp.set_defaults(run=run)
        return sp

    sub_cmd(
        "preview",
        "show exactly what a study would release and cost; spends nothing (warns, locally, "
        "when many rows of the export are quarantined)",
        _preview,
        study=True,
    )
    rel = sub_cmd(
        "release",
        "answer a study offline: write a signed release file through "
        "the ledger (for air-gapped clinics)",
        _release,
        study=True,
    )
    rel.add_argument("--out", required=True, type=Path, help="where to write release.json")
    sub_cmd("budget", "the privacy budget: period, spent, remaining", _budget)
    sub_cmd("requests", "studies awaiting or past the privacy officer's decision", _requests)
    sub_cmd(
        "history",
        "every request from the audit chain: when, which study, decision, cost, what left",
        _history,
    )
    rep = sub_cmd(
        "period-report",
        "a printable report of a budget period for the privacy officer: the guarantees "
        "in words, the budget over time, every release and refusal (HTML)",
        _period_report,
    )
    rep.add_argument("--out", required=True, type=Path, help="where to write the HTML file")
    rep.add_argument(
        "--period",
        type=int,
        default=None,
        metavar="N",
        help="the period to report (0 = the first; default: the current one)",
    )
    for name, verb in (("approve", "approve"), ("deny", "deny")):
        sp = sub_cmd(name, f"{verb} a pending study request (manual approval)", _decide)
        sp.add_argument("request_id", metavar="REQUEST_ID")
        sp.set_defaults(approve=name == "approve")
    aud = sub_cmd("audit", "show the audit log; --verify checks its hash chain", _audit)
    aud.add_argument("--verify", action="store_true", help="verify the chain; exit 5 if broken")
    cmp_ = sub_cmd(
        "compare",
        "compare the clinic's own clients with a published benchmark (local only: nothing is sent)",
        _compare,
        json_=False,
    )
    cmp_.add_argument(
        "--benchmark",
        required=True,
        type=Path,
        metavar="BUNDLE_DIR",
        help="the signed benchmark bundle",
    )
    cmp_.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="where to write comparison.html and CSVs",
    )
    cmp_.add_argument(
        "--key",
        type=Path,
        action="append",
        default=None,
        metavar="NETWORK_PUB",
        help="network public key to verify the bundle (default: the policy's "
        "trusted_coordinator_keys)",
    )
    sub_cmd(
        "pubkey", "print the site's Ed25519 public key (PEM) for registration", _pubkey, json_=False
    )
    srv = sub_cmd(
        "serve",
        "run the local site agent service (gRPC on an owner-only Unix socket) for the "
        "Flower bridge, until SIGTERM or SIGINT; every release goes through the ledger",
        _serve,
        json_=False,
    )
    srv.add_argument(
        "--socket-group",
        default=None,
        metavar="GROUP",
        help="make the socket 0660 for GROUP (when the SuperNode runs as another user in "
        "that group); default: owner-only 0600",
    )
    srv.add_argument(
        "--socket",
        type=Path,
        default=None,
        metavar="PATH",
        help="the Unix socket to listen on (default: <state_dir>/agent.sock from the "
        "privacy policy)",
    )
    return p


def _engine(args: argparse.Namespace) -> ReleaseEngine:
    engine = load_engine(args.config)
    for note in engine.policy.warnings:
        print(f"warning: {note}", file=sys.stderr)
    return engine


def _emit(args: argparse.Namespace, doc: Any, text: Callable[[Any], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, default=str))
    else:
        text(doc)


def _refused(args: argparse.Namespace, r: Refused) -> int:
    doc = {"refused": str(r.code), "message": r.message, "detail_local_only": r.detail}
    _emit(
        args,
        doc,
        lambda d: print(
            f"REFUSED ({d['refused']}): {d['message']}"
            + (f"\n  detail (local only): {r.detail}" if r.detail else ""),
            file=sys.stderr,
        ),
    )
    return refusal_exit(r.code)


def _ledger_failed(exc: LedgerError) -> int:
    """The ledger, its anchor or the signing key is missing, unusable or does not match."""
    print(f"ledger unusable: {exc}", file=sys.stderr)
    return ExitCode.AUDIT


def _warn_quarantine(counts: IntakeCounts, config: Path) -> None:
    """On stderr, after the command's own output: a warning changes neither what the
    command prints or writes nor its exit code."""
    note = counts.warning(config)
    if note is not None:
        print(f"warning: {note}", file=sys.stderr)


def _preview(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:
        req = load_study_request(args.study)
        doc = engine.preview(req)
    except LedgerUnusable as r:
        return _ledger_failed(r.error)
    except Refused as r:
        return _refused(args, r)
    intake = None
    if doc["outcome"] in ("release", "await approval") or "what_leaves" in doc:
        # The engine's preview reads no data; the local view and warning below do, once.
        with contextlib.suppress(DataError):
            intake = read_intake(engine.site.data, engine.site.instruments)
    if "what_leaves" in doc and intake is not None:
        # Local only: the clinic's own counts beside the noise.
        with contextlib.suppress(DataError, SpecError):
            doc["local_only"] = {
                "note": "exact local counts: shown here only, never sent",
                "bands": local_precision(engine, req.study, doc["what_leaves"], intake),
            }
    _emit(args, doc, _print_preview)
    if intake is not None and doc["outcome"] in ("release", "await approval"):
        _warn_quarantine(intake.counts, args.config)
    return ExitCode.OK


def _print_local(rows: list[dict[str, Any]]) -> None:
    print("  what the noise means for this clinic's own figures (LOCAL ONLY: exact counts, "
          "never sent; +/- of this site's release alone, 95%):")
    print(f"    {'band':<8} {'episodes':>8} {'count':>9} {'intake':>9} {'change':>9} "
          f"{'rate':>9}")
    for r in rows:
        def pm(key: str, r: dict[str, Any] = r) -> str:
            return "-" if r.get(key) is None else f"+/-{r[key]:g}"

        flag = "  noise larger than the data" if r["noise_larger_than_the_data"] else ""
        print(f"    {r['band']:<8} {r['episodes_here']:>8} {pm('count_plus_minus'):>9} "
              f"{pm('mean_intake_plus_minus'):>9} {pm('mean_change_plus_minus'):>9} "
              f"{pm('rate_plus_minus'):>9}{flag}")


def _print_preview(d: dict[str, Any]) -> None:
    print(
        f"PREVIEW (nothing is spent): study {d['study_id']} {d['title']!r} at site {d['site_id']}"
    )
    print(f"  study hash {d['study_hash']}; instrument {d['instrument']}; bands {d['bands']}")
    if "what_leaves" in d:
        print("  what would leave (each value noised; +/- is the 95% noise interval, in the "
              "block's encoded units (docs/PRIVACY.md); the local view below decodes them):")
        print(f"    {'block':<22} {'family':<11} {'values':>6} {'scale':>10} {'+/-95%':>10}")
        for b in d["what_leaves"]:
            print(
                f"    {b['block']:<22} {b['family']:<11} {b['values']:>6} "
                f"{b['noise_scale']:>10} {b['plus_minus_95']:>10}"
            )
        if "local_only" in d:
            _print_local(d["local_only"]["bands"])
        c = d["cost"]
        print(
            f"  cost: rho {c['rho']:.6g} = epsilon {c['epsilon']:.4g} at delta {c['delta']:g} "
            f"(requested {c['requested']})"
        )
    b = d["budget"]
    print(
        f"  budget {b['period_start']}..{b['period_end']}: rho {b['budget_rho']:.6g}, spent "
        f"{b['spent_rho']:.6g}, remaining {b['remaining_rho']:.6g}"
        + (
            f", after this study {b['remaining_after_rho']:.6g}"
            if "remaining_after_rho" in b
            else ""
        )
    )
    outcome = d["outcome"] + (f" ({d['code']}: {d['reason']})" if "code" in d else "")
    print(f"  outcome: {outcome}")


def _write_atomically(path: Path, body: bytes) -> None:
    """Write under a fresh, unpredictable name beside ``path`` (created exclusively, so a
    planted symlink is never followed), flush it to disk, then rename over ``path``: a
    crash never leaves half a release, and nobody can redirect the write."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _release(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:
        try:
            req = load_study_request(args.study)
        except Refused as r:
            if r.code is ErrorCode.MALFORMED_STUDY:
                engine.record_malformed(channel="cli", raw=_head(args.study), detail=r.detail)
            raise
        read: list[IntakeCounts] = []
        body = engine.release(req, on_intake=read.append)
    except LedgerUnusable as r:
        return _ledger_failed(r.error)
    except Refused as r:
        return _refused(args, r)
    for counts in read:  # none when the cache answered
        _warn_quarantine(counts, args.config)
    try:
        _write_atomically(args.out, body)
    except OSError as exc:
        print(
            f"{args.out}: cannot write ({exc.strerror}); the release is cached in the "
            "ledger: run the same command again with a writable --out (no extra cost)",
            file=sys.stderr,
        )
        return ExitCode.DATA
    doc = {
        "written": str(args.out),
        "study_id": req.study.id,
        "study_hash": req.study.hash,
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    _emit(
        args,
        doc,
        lambda d: print(
            f"signed release of {d['study_id']} written to {d['written']} (sha256 {d['sha256']})"
        ),
    )
    return ExitCode.OK


def _head(path: Path, limit: int = 1 << 26) -> bytes | None:
    """A study file's bytes (at most ``limit``) to fingerprint in the audit log."""
    try:
        with path.open("rb") as fh:
            return fh.read(limit)
    except OSError:
        return None


def _budget(args: argparse.Namespace) -> int:
    engine = _engine(args)
    pol = engine.policy
    try:
        with engine.ledger() as led:
            st = led.status()
    except LedgerError as exc:
        return _ledger_failed(exc)
    doc = {
        "site_id": engine.site.site_id,
        "period": {
            "start": st.period_start.isoformat(),
            "end": st.period_end.isoformat(),
            "days": pol.period_days,
        },
        "budget": {"rho": str(st.budget), "epsilon": pol.epsilon(st.budget)},
        "spent": {"rho": str(st.spent), "epsilon": pol.epsilon(st.spent)},
        "remaining": {"rho": str(st.remaining), "epsilon": pol.epsilon(st.remaining)},
        "delta": float(pol.delta),
        "per_study_cap": {"rho": str(pol.per_study_rho), "epsilon": pol.epsilon(pol.per_study_rho)},
        "note": "the budget starts afresh each period: a policy choice, not a DP property",
    }

    def text(d: dict[str, Any]) -> None:
        print(f"site {d['site_id']}, period {d['period']['start']}..{d['period']['end']}")
        for k in ("budget", "spent", "remaining", "per_study_cap"):
            print(
                f"  {k:<14} rho {float(Fraction(d[k]['rho'])):.6g}  "
                f"(epsilon {d[k]['epsilon']:.4g} at delta {d['delta']:g})"
            )
        print(f"  note: {d['note']}")

    _emit(args, doc, text)
    return ExitCode.OK


def _requests(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:
        with engine.ledger() as led:
            rows = led.requests()
    except LedgerError as exc:
        return _ledger_failed(exc)

    def text(rs: list[dict[str, Any]]) -> None:
        if not rs:
            print("no study requests recorded")
        for r in rs:
            print(
                f"{r['request_id']}  {r['state']:<8} {r['study_id']}  {r['title']!r}  "
                f"rho {float(Fraction(r['rho'])):.6g}  since {r['created']}"
                + (f"  ({r['code']})" if r["code"] else "")
            )

    _emit(args, rows, text)
    return ExitCode.OK


def _history(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:
        with engine.ledger() as led:
            rows = led.history()
    except LedgerError as exc:
        return _ledger_failed(exc)
    delta = engine.policy.delta
    doc = [
        {k: v for k, v in dataclasses.asdict(r).items() if k != "cost"}
        | {
            "cost_rho": str(r.cost),  # exact, as the ledger keeps it
            "cost_epsilon": zcdp_to_epsilon(r.cost, delta) if r.cost > 0 else 0.0,
        }
        for r in rows
    ]

    def text(rs: list[dict[str, Any]]) -> None:
        if not rs:
            print("no study requests recorded")
        for r in rs:
            print(
                f"{r['when']}  {r['decision']:<11} {r['study_id'] or '(malformed)'}  "
                f"{r['title']!r}  rho {float(Fraction(r['cost_rho'])):.6g}"
                + (f"  ({r['code']})" if r["code"] else "")
                + (f"  sha256 {r['sha256']}" if r["sha256"] else "")
            )

    _emit(args, doc, text)
    return ExitCode.OK


def _period_report(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:  # opened unchecked, so that a broken chain is reported in the report, not hidden
        with engine.ledger(check=False) as led:
            problems = led.verify_audit()
            current = led.status()
            if args.period is not None and not 0 <= args.period <= current.period:
                print(
                    f"--period {args.period}: the ledger has periods 0 to {current.period}",
                    file=sys.stderr,
                )
                return ExitCode.USAGE
            periods = tuple(led.status(n) for n in range(current.period + 1))
            history = led.history()
            try:
                fp = crypto.fingerprint(led.signing_key())
            except LedgerError:
                fp = "missing"
    except LedgerError as exc:
        return _ledger_failed(exc)
    budget = periods[current.period if args.period is None else args.period]
    report = privacy_report.PeriodReport(
        site_id=engine.site.site_id,
        key_fingerprint=fp,
        policy=engine.policy,
        budget=budget,
        current_period=current.period,
        periods=periods,
        rows=privacy_report.period_rows(history, budget.period),
        problems=tuple(problems),
        generated=dt.datetime.now(dt.UTC),
    )
    try:
        _write_atomically(args.out, privacy_report.render(report).encode())
    except OSError as exc:
        print(f"{args.out}: cannot write ({exc.strerror})", file=sys.stderr)
        return ExitCode.DATA
    doc = {
        "written": str(args.out),
        "period": budget.period,
        "start": budget.period_start.isoformat(),
        "end": budget.period_end.isoformat(),
        "requests": len(report.rows),
        "spent_rho": str(budget.spent),
        "verified": not problems,
    }
    _emit(
        args,
        doc,
        lambda d: print(
            f"privacy report of period {d['period']} ({d['start']} to {d['end']}, "
            f"{d['requests']} requests) written to {d['written']}"
            + ("" if d["verified"] else "; the audit chain did NOT verify (see the report)")
        ),
    )
    return ExitCode.OK if not problems else ExitCode.AUDIT


def _decide(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:
        with engine.ledger() as led:
            doc = led.decide(args.request_id, args.approve)
    except KeyError:
        print(f"no request {args.request_id!r}; see `outcomebench-site requests`", file=sys.stderr)
        return ExitCode.USAGE
    except LedgerError as exc:
        return _ledger_failed(exc)
    _emit(args, doc, lambda d: print(f"request {d['request_id']} ({d['study_id']}): {d['state']}"))
    return ExitCode.OK


def _audit(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:  # opened unchecked, so that --verify can list what is wrong
        with engine.ledger(check=False) as led:
            problems = led.verify_audit() if args.verify else []
            try:
                entries = led.audit_entries()
            except LedgerError:
                if not problems:
                    raise
                entries = []  # unreadable; the problems say why
    except LedgerError as exc:
        return _ledger_failed(exc)
    doc = {
        "entries": entries,
        "verified": not problems if args.verify else None,
        "problems": problems,
    }

    def text(d: dict[str, Any]) -> None:
        for e in d["entries"]:
            print(
                f"{e['seq']:>6} {e['ts']} {e['kind']:<10} {json.dumps(e['body'], sort_keys=True)}"
            )
        if args.verify:
            print("audit chain: OK" if not problems else "audit chain: BROKEN")
            for p in problems:
                print(f"  {p}")

    _emit(args, doc, text)
    return ExitCode.AUDIT if problems else ExitCode.OK


def _compare(args: argparse.Namespace) -> int:
    cfg = load_site_config(args.config)
    keys: list[Path] = list(args.key or [])
    if not keys and cfg.privacy_policy is not None:
        keys = list(load_policy(cfg.privacy_policy).trusted_keys)
    try:
        doc = load_benchmark(args.benchmark, keys)
        comp = compare(cfg, doc)
    except SpecError as exc:
        print(str(exc), file=sys.stderr)
        return ExitCode.DATA
    files = write_comparison(args.out, comp, doc)
    print(f"{LOCAL_ONLY}\nbundle verified; comparison written: " + ", ".join(str(f) for f in files))
    return ExitCode.OK


def _pubkey(args: argparse.Namespace) -> int:
    engine = _engine(args)
    try:  # a fresh site creates its ledger, anchor and key together
        key = engine.signing_key()
    except LedgerError as exc:
        return _ledger_failed(exc)
    print(crypto.public_pem(key), end="")
    # On stderr, so that `pubkey > site.pem` still writes a clean PEM file.
    print(f"fingerprint {crypto.fingerprint(key)} (confirm it with the network out of band)",
          file=sys.stderr)
    return ExitCode.OK


def _serve(args: argparse.Namespace) -> int:
    from site_agent.service import serve  # noqa: PLC0415 - gRPC is loaded only to serve

    try:  # the service does not start on a ledger it cannot use
        serve(args.config, args.socket, args.socket_group)
    except LedgerError as exc:
        return _ledger_failed(exc)
    return ExitCode.OK


def _intake(args: argparse.Namespace) -> tuple[SiteConfig, Intake, Path, bool]:
    cfg = load_site_config(args.config)
    intake = read_intake(cfg.data, cfg.instruments)
    report = args.quarantine or default_quarantine_report(cfg.source)
    try:
        intake.quarantine.to_csv(report, index=False)
    except OSError as exc:
        raise DataError(
            str(report),
            f"cannot write the quarantine report ({exc.strerror}); "
            "pass --quarantine PATH to a writable place",
        ) from None
    refused = bool(args.strict and len(intake.quarantine))
    return cfg, intake, report, refused


def _check_doc(cfg: SiteConfig, intake: Intake, report: Path, refused: bool) -> dict[str, Any]:
    q = intake.quarantine
    return {
        "site_id": cfg.site_id,
        "scope": LOCAL_ONLY,
        "file": str(intake.path),
        "rows_read": intake.rows_read,
        "rows_valid": intake.records.n_rows,
        "rows_quarantined": intake.rows_quarantined,
        "episodes": intake.records.n_episodes,
        "problems_by_reason": dict(intake.reasons),
        "quarantine_report": str(report),
        "examples": q.head(_EXAMPLES).to_dict(orient="records"),
        "refused": refused,
    }


def _print_check(doc: dict[str, Any]) -> None:
    print(doc["scope"])
    print(f"file: {doc['file']}")
    print(
        f"rows read {doc['rows_read']}, valid {doc['rows_valid']}, quarantined "
        f"{doc['rows_quarantined']}; {doc['episodes']} episodes"
    )
    if doc["problems_by_reason"]:
        print("problems by reason:")
        for reason, n in doc["problems_by_reason"].items():
            print(f"  {n:>9}  {reason}")
        print(f"first {len(doc['examples'])} (all in {doc['quarantine_report']}):")
        for e in doc["examples"]:
            print(
                f"  {e['file']}:{e['line']} {e['field']}={e['value']!r}: {e['reason']}. "
                f"Fix: {e['fix']}"
            )
    if doc["refused"]:
        print("REFUSED (--strict): the file has invalid rows; nothing was used.")


def _check(args: argparse.Namespace) -> int:
    cfg, intake, report, refused = _intake(args)
    doc = _check_doc(cfg, intake, report, refused)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        _print_check(doc)
    if refused:
        return ExitCode.DATA
    if intake.records.n_rows == 0:
        print(f"{intake.path}: no valid rows; see {report}", file=sys.stderr)
        return ExitCode.DATA
    return ExitCode.OK


def _summary(args: argparse.Namespace) -> int:
    if args.max_session < 1:
        print("--max-session must be at least 1", file=sys.stderr)
        return ExitCode.USAGE
    cfg, intake, report, refused = _intake(args)
    if refused:
        print(
            f"{intake.path}: refused under --strict: {intake.rows_quarantined} invalid rows; "
            f"see {report}",
            file=sys.stderr,
        )
        return ExitCode.DATA
    episodes = derive_episodes(intake.records, cfg.instruments, args.max_session)
    doc = {
        "site_id": cfg.site_id,
        "scope": LOCAL_ONLY,
        "file": str(intake.path),
        "rows_valid": intake.records.n_rows,
        "rows_quarantined": intake.rows_quarantined,
        "instruments": summarize(episodes),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_summary(doc)
    _warn_quarantine(intake.counts, args.config)
    return ExitCode.OK


def _print_summary(doc: dict[str, Any]) -> None:
    print(doc["scope"])
    print(
        f"site {doc['site_id']}: {doc['rows_valid']} valid rows from {doc['file']} "
        f"({doc['rows_quarantined']} quarantined)"
    )
    head = (
        f"{'band':>8} {'episodes':>8} {'intake':>7} {'change':>7} {'sd':>6} {'ES':>6} "
        f"{'rel.imp':>7} {'rel.det':>7} {'recov':>6} {'rel.rec':>7} {'resp':>6} {'remis':>6}"
    )

    def fmt(x: Any, w: int) -> str:
        return f"{'-' if x is None else x:>{w}}"

    for ins in doc["instruments"]:
        excluded = ", ".join(f"{v} {k}" for k, v in ins["excluded"].items() if v)
        print(
            f"\n{ins['instrument']} (better: {ins['better']}, cut-off {ins['cutoff']}, "
            f"reliable change {fmt(ins['reliable_change_points'], 0)})"
            + (f"; excluded: {excluded}" if excluded else "")
        )
        print(head)
        for g in ins["groups"]:
            print(
                " ".join(
                    [
                        fmt(g["band"], 8),
                        fmt(g["episodes"], 8),
                        fmt(g["mean_intake"], 7),
                        fmt(g["mean_change"], 7),
                        fmt(g["sd_change"], 6),
                        fmt(g["effect_size"], 6),
                        fmt(g["reliably_improved"], 7),
                        fmt(g["reliably_deteriorated"], 7),
                        fmt(g["recovered"], 6),
                        fmt(g["reliably_recovered"], 7),
                        fmt(g["response"], 6),
                        fmt(g["remission"], 6),
                    ]
                )
            )
        steps = [
            f"{s['session']}: {s['mean_change']} (n {s['clients']})"
            for s in ins["groups"][0]["trajectory"]
            if s["clients"]
        ]
        print("mean change from intake by session (all intakes): " + ("; ".join(steps) or "-"))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return int(run(args))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return ExitCode.CONFIG
    except DataError as exc:
        print(str(exc), file=sys.stderr)
        return ExitCode.DATA
    except BrokenPipeError:  # the reader (e.g. `| head`) went away: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
        return ExitCode.OK
    except KeyboardInterrupt:
        return ExitCode.INTERNAL
    except Exception as exc:
        print(
            f"internal error ({exc.__class__.__name__}): this is a bug, please report it",
            file=sys.stderr,
        )
        return ExitCode.INTERNAL


if __name__ == "__main__":
    sys.exit(main())
