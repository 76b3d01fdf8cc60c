"""The local site agent service: gRPC (``protocols/site_agent.proto``) on a Unix socket.

This process alone reads the clinic's data and owns the privacy ledger. Its clients (the
Flower bridge ClientApp, local tools) get only what may leave the site: the policy's
public limits, previews (which read no data), budget figures, signed DP releases from
the ONE :class:`~site_agent.privacy.ReleaseEngine` this server holds, and refusals as a
protocol error code with its FIXED message. Exception text and ``Refused.detail`` never
cross the socket; they are logged locally (stderr), with every request's outcome.

The socket is owner-only (0600, in a directory created 0700). ``serve`` runs until
SIGTERM or SIGINT, then reports NOT_SERVING on the standard gRPC health service, lets
running requests finish within a grace period, and removes its socket.

Startup problems (no privacy policy, an unusable socket path, another agent already
serving on it) raise :class:`~site_agent.errors.ConfigError` naming the fix; a ledger,
anchor or signing key that cannot be used raises its
:class:`~site_agent.privacy.LedgerError`, and the service does not start. The health
service says SERVING only while the ledger can be used: a call that finds it unusable
turns it NOT_SERVING at once, and a probe that opens the ledger every
``HEALTH_PROBE_SECONDS`` sets it again (so a restored ledger serves without a restart).

A release that reads an export with many quarantined rows logs a warning (locally; the
reply is the same, see :meth:`IntakeCounts.warning <site_agent.data.IntakeCounts.warning>`).
"""

from __future__ import annotations

import functools
import grp
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protocols import site_agent_pb2 as pb
from protocols import site_agent_pb2_grpc as pb_grpc
from protocols.codes import MESSAGES, ErrorCode
from protocols.errors import SpecError
from protocols.limits import (
    MAX_ENVELOPE_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    MAX_STUDY_WIRE_BYTES,
)
from protocols.release import parse_envelope
from protocols.study import SCHEMA_VERSION, Family, study_from_canonical
from site_agent.agent_client import SERVICE_NAME
from site_agent.data import IntakeCounts
from site_agent.errors import ConfigError
from site_agent.privacy import (
    LedgerError,
    LedgerUnusable,
    Refused,
    ReleaseEngine,
    StudyRequest,
    load_engine,
)

__all__ = [
    "GRACE_SECONDS",
    "HEALTH_PROBE_SECONDS",
    "SOCKET_NAME",
    "AgentServer",
    "SiteAgentService",
    "load_engine",
    "parse_study_message",
    "serve",
]

SOCKET_NAME = "agent.sock"  # default: <state_dir>/agent.sock
GRACE_SECONDS = 5.0
HEALTH_PROBE_SECONDS = 30.0  # how often the health service re-checks the ledger
WORKERS = 4  # requests run in parallel; the ledger serialises spending across processes
MAX_CONCURRENT_RPCS = 32  # beyond this, callers get RESOURCE_EXHAUSTED instead of a queue
_SUN_PATH_MAX = 107  # bytes in a Unix socket path (sockaddr_un.sun_path less its NUL)
# Requests are studies (bounded, see protocols/limits.py); replies may be releases up to
# the transport limit. gRPC refuses a larger request before any of our code runs.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
LOG_DETAIL_CHARS = 500  # a refusal's local detail is logged at most this long

log = logging.getLogger("outcomebench.site.service")

_T = TypeVar("_T")


def parse_study_message(msg: pb.StudyMessage) -> StudyRequest:
    """The request in a :class:`StudyMessage`, or ``Refused(MALFORMED_STUDY)``.

    The study must be in canonical form; a signed-study envelope, when sent, must carry
    exactly those bytes, so a signature over one study cannot vouch for another.
    """
    if len(msg.study) > MAX_STUDY_WIRE_BYTES or len(msg.envelope) > MAX_ENVELOPE_BYTES:
        raise Refused(ErrorCode.MALFORMED_STUDY, "larger than any valid study")
    try:
        study = study_from_canonical(msg.study)
        if not msg.HasField("envelope"):
            return StudyRequest(study)
        envelope = parse_envelope(msg.envelope, "study")
    except (SpecError, ValueError, TypeError, RecursionError) as exc:
        detail = str(exc) if isinstance(exc, SpecError) else exc.__class__.__name__
        raise Refused(ErrorCode.MALFORMED_STUDY, detail) from None
    if envelope.payload != msg.study:
        raise Refused(
            ErrorCode.MALFORMED_STUDY, "the envelope's signed payload is not the study sent"
        )
    return StudyRequest(study, envelope)


def _clip(detail: str) -> str:
    """A refusal's detail for the log, cut to LOG_DETAIL_CHARS (a study's problems quote
    its values, so the log never grows by more than this per request)."""
    if len(detail) <= LOG_DETAIL_CHARS:
        return detail
    return f"{detail[:LOG_DETAIL_CHARS]}... ({len(detail) - LOG_DETAIL_CHARS} more characters)"


def _error(code: ErrorCode) -> pb.Error:
    return pb.Error(code=str(code), message=MESSAGES[code])


def _log_quarantine(study_id: str, config: Path, counts: IntakeCounts) -> None:
    note = counts.warning(config)
    if note is not None:
        log.warning("Release study %r: %s", study_id, note)


class SiteAgentService(pb_grpc.SiteAgentServicer):
    """The servicer: every study goes through the one engine it holds.

    ``ledger_failed`` is told of every call that found the ledger unusable (the server
    turns its health NOT_SERVING)."""

    def __init__(
        self,
        engine: ReleaseEngine,
        ledger_failed: Callable[[LedgerError], None] = lambda _: None,
    ) -> None:
        self.engine = engine
        self.ledger_failed = ledger_failed

    # -- the study calls: a code and a fixed message on failure, detail logged --------

    def _answer(
        self, method: str, msg: pb.StudyMessage, run: Callable[[StudyRequest], bytes]
    ) -> bytes | ErrorCode:
        started = time.monotonic()
        label = f"{len(msg.study)} bytes"
        try:
            try:
                req = parse_study_message(msg)
            except Refused as r:
                if method == "Release":  # audited like every release request
                    self.engine.record_malformed(channel="grpc", raw=msg.study, detail=r.detail)
                raise
            label = f"study {req.study.id!r} ({req.study.hash[:12]})"
            body = run(req)
        except LedgerUnusable as r:
            log.error("%s %s: refused %s: ledger unusable: %s", method, label, r.code, r.error)
            self.ledger_failed(r.error)
            return r.code
        except Refused as r:
            log.info("%s %s: refused %s: %s", method, label, r.code, _clip(r.detail) or "-")
            return r.code
        except Exception as exc:  # never its text across the socket
            log.exception("%s %s: internal error (%s)", method, label, exc.__class__.__name__)
            return ErrorCode.INTERNAL_ERROR
        log.info(
            "%s %s: ok (%d bytes, %.2f s)", method, label, len(body), time.monotonic() - started
        )
        return body

    def Preview(  # noqa: N802 - the name is the proto's
        self, request: pb.StudyMessage, context: grpc.ServicerContext
    ) -> pb.PreviewReply:
        def run(req: StudyRequest) -> bytes:
            doc = self.engine.preview(req)
            detail = doc.pop("detail", "")  # local only, like Refused.detail
            if detail:
                code, clipped = doc["code"], _clip(detail)
                log.info("Preview study %r: plan refused %s: %s", req.study.id, code, clipped)
            return json.dumps(doc, sort_keys=True, default=str).encode()

        out = self._answer("Preview", request, run)
        if isinstance(out, ErrorCode):
            return pb.PreviewReply(error=_error(out))
        return pb.PreviewReply(preview_json=out)

    def Release(  # noqa: N802 - the name is the proto's
        self, request: pb.StudyMessage, context: grpc.ServicerContext
    ) -> pb.ReleaseReply:
        def run(req: StudyRequest) -> bytes:
            warn = functools.partial(_log_quarantine, req.study.id, self.engine.site.source)
            return self.engine.release(req, on_intake=warn)

        out = self._answer("Release", request, run)
        if isinstance(out, ErrorCode):
            return pb.ReleaseReply(error=_error(out))
        return pb.ReleaseReply(release=out)

    # -- the policy and budget: nothing to refuse; an unexpected error aborts the call --

    def _plain(self, method: str, context: grpc.ServicerContext, run: Callable[[], _T]) -> _T:
        try:
            out = run()
        except LedgerError as exc:
            log.error("%s: ledger unusable: %s", method, exc)
            self.ledger_failed(exc)
            context.abort(grpc.StatusCode.INTERNAL, MESSAGES[ErrorCode.INTERNAL_ERROR])
        except Exception as exc:
            log.exception("%s: internal error (%s)", method, exc.__class__.__name__)
            context.abort(grpc.StatusCode.INTERNAL, MESSAGES[ErrorCode.INTERNAL_ERROR])
        log.info("%s: ok", method)
        return out

    def Describe(  # noqa: N802 - the name is the proto's
        self, request: pb.DescribeRequest, context: grpc.ServicerContext
    ) -> pb.DescribeReply:
        def run() -> pb.DescribeReply:
            pol = self.engine.policy
            return pb.DescribeReply(
                site_id=self.engine.site.site_id,
                instruments=sorted(pol.instruments),
                families=[str(f) for f in Family if f in pol.families],
                approval=str(pol.approval),
                per_study_rho=str(pol.per_study_rho),
                budget_rho=str(pol.budget_rho),
                period_days=pol.period_days,
                delta=str(pol.delta),
                unit="client",
                max_episodes_per_client=pol.max_episodes_per_client,
                signed_studies_required=bool(pol.trusted_keys),
                study_schema=SCHEMA_VERSION,
            )

        return self._plain("Describe", context, run)

    def Status(  # noqa: N802 - the name is the proto's
        self, request: pb.StatusRequest, context: grpc.ServicerContext
    ) -> pb.StatusReply:
        def run() -> pb.StatusReply:
            with self.engine.ledger() as led:
                st = led.status()
                pending = sum(1 for r in led.requests() if r["state"] == "pending")
            return pb.StatusReply(
                site_id=self.engine.site.site_id,
                period_start=st.period_start.isoformat(),
                period_end=st.period_end.isoformat(),
                budget_rho=str(st.budget),
                spent_rho=str(st.spent),
                remaining_rho=str(st.remaining),
                pending_requests=pending,
            )

        return self._plain("Status", context, run)


def _prepare_socket(path: Path) -> None:
    """Create the socket's directory (0700) and remove a stale socket; refuse to touch a
    live agent's socket or anything that is not a socket."""
    where = str(path)
    if len(os.fsencode(where)) > _SUN_PATH_MAX:
        raise ConfigError(
            where,
            [
                f"{where}: a Unix socket path may have at most {_SUN_PATH_MAX} bytes; pass "
                "--socket with a shorter path"
            ],
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(
            where, [f"{where}: cannot use this place for the socket ({exc.strerror})"]
        ) from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError(
            where, [f"{where}: exists and is not a socket; remove it or pass --socket"]
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(where)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing the stale socket %s", where)
            path.unlink(missing_ok=True)
            return
        except OSError as exc:
            raise ConfigError(
                where, [f"{where}: cannot check the existing socket ({exc.strerror})"]
            ) from None
    raise ConfigError(
        where,
        [f"{where}: another site agent is serving on this socket; stop it or pass --socket"],
    )


class AgentServer:
    """The gRPC server of one site: :meth:`start`, then :meth:`stop` (from any thread)."""

    def __init__(
        self,
        engine: ReleaseEngine,
        socket_path: Path,
        *,
        workers: int = WORKERS,
        socket_group: str | None = None,
        health_probe: float = HEALTH_PROBE_SECONDS,
    ) -> None:
        self.engine = engine
        # A SuperNode running as another OS user reaches the agent through a shared group;
        # without one the socket stays owner-only.
        self.socket_group = socket_group
        self.socket_path = Path(os.path.abspath(socket_path))
        self.workers = workers
        self.health = health.HealthServicer()
        self.health_probe = health_probe
        self._server: grpc.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._serving = False
        self._serving_lock = threading.Lock()
        self._stopping = threading.Event()
        self._prober: threading.Thread | None = None

    def _set_serving(self, problem: LedgerError | None) -> None:
        """SERVING when the ledger can be used (``problem`` None), else NOT_SERVING;
        each change is logged once."""
        serving = problem is None
        with self._serving_lock:
            if serving == self._serving:
                return
            self._serving = serving
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", SERVICE_NAME):
                self.health.set(name, status)
        if problem is None:
            log.info("the ledger can be used again: health SERVING")
        else:
            log.error("ledger unusable: %s; health NOT_SERVING until it is fixed", problem)

    def _probe(self) -> None:
        """Open (and so verify) the ledger every ``health_probe`` seconds until stopped."""
        while not self._stopping.wait(self.health_probe):
            try:
                self.engine.ledger().close()
            except LedgerError as exc:
                self._set_serving(exc)
            except Exception as exc:  # a bug: the probe must go on
                log.exception("health probe: internal error (%s)", exc.__class__.__name__)
            else:
                self._set_serving(None)

    def start(self) -> None:
        # Fail closed at start: a missing, unusable or mismatched ledger, anchor or key
        # raises its LedgerError, and nothing listens.
        self.engine.ledger().close()
        _prepare_socket(self.socket_path)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="site-agent"),
            options=SERVER_OPTIONS,
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        pb_grpc.add_SiteAgentServicer_to_server(  # type: ignore[no-untyped-call]
            SiteAgentService(self.engine, ledger_failed=self._set_serving), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        where = str(self.socket_path)
        old = os.umask(0o177)  # the socket is created owner-only, never briefly open
        try:
            server.add_insecure_port(f"unix:{where}")
            server.start()
        except RuntimeError as exc:
            server.stop(None)
            raise ConfigError(where, [f"{where}: cannot listen here ({exc})"]) from None
        finally:
            os.umask(old)
        if self.socket_group is None:
            os.chmod(self.socket_path, 0o600)
        else:
            try:
                gid = grp.getgrnam(self.socket_group).gr_gid
            except KeyError:
                server.stop(None)
                raise ConfigError(
                    where, [f"--socket-group: no group {self.socket_group!r}"]
                ) from None
            # In a setgid directory of that group the socket already has it; skipping the
            # chown then lets the unit's seccomp filter (~@privileged) stay strict.
            if self.socket_path.lstat().st_gid != gid:
                os.chown(self.socket_path, -1, gid)
            os.chmod(self.socket_path, 0o660)
        st = self.socket_path.lstat()
        self._inode = (st.st_dev, st.st_ino)
        self._server = server
        with self._serving_lock:  # the ledger was just opened: serving (logged below)
            self._serving = True
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._stopping.clear()
        self._prober = threading.Thread(target=self._probe, name="site-agent-health", daemon=True)
        self._prober.start()
        log.info(
            "site %s: serving %s on unix:%s (state %s)",
            self.engine.site.site_id,
            SERVICE_NAME,
            where,
            self.engine.policy.state_dir,
        )

    def stop(self, grace: float = GRACE_SECONDS) -> None:
        """NOT_SERVING, let running requests finish within ``grace`` s, remove the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        if self._prober is not None:
            self._prober.join()
            self._prober = None
        self.health.enter_graceful_shutdown()
        server.stop(grace).wait()
        try:
            st = self.socket_path.lstat()
            if (st.st_dev, st.st_ino) == self._inode:  # only ever our own socket
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        log.info("site %s: stopped", self.engine.site.site_id)


def serve(
    config_path: Path, socket_path: Path | None = None, socket_group: str | None = None
) -> None:
    """Run the site agent service until SIGTERM or SIGINT (call from the main thread).

    ``socket_path`` defaults to ``<state_dir>/agent.sock`` from the privacy policy.
    """
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s outcomebench-site serve %(levelname)s: %(message)s",
    )
    engine = load_engine(config_path)
    for note in engine.policy.warnings:
        log.warning("%s", note)
    server = AgentServer(
        engine, socket_path or engine.policy.state_dir / SOCKET_NAME, socket_group=socket_group
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
