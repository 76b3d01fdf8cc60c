"""A small typed client of the local site agent service (``outcomebench-site serve``).

The Flower bridge ClientApp uses it, so it imports only gRPC and ``protocols``: no data
code, no keys, no privacy engine. Every call opens a channel to the agent's Unix socket
and closes it again, so a client holds nothing between calls and cannot leak a channel.

    ConnectionError
    └── AgentUnavailable     the agent did not answer (not running, wrong socket,
                             permission denied, timeout); carries the gRPC status name

A refusal is not an exception: :meth:`AgentClient.release` and :meth:`AgentClient.preview`
return a :class:`Refusal` (a protocol error code and its fixed message).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from protocols import site_agent_pb2 as pb
from protocols import site_agent_pb2_grpc as pb_grpc
from protocols.codes import MESSAGES, ErrorCode
from protocols.limits import MAX_ENVELOPE_BYTES, MAX_MESSAGE_BYTES, MAX_STUDY_WIRE_BYTES

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SERVICE_NAME",
    "AgentClient",
    "AgentUnavailable",
    "Refusal",
]

SERVICE_NAME = "outcomebench.site.v1.SiteAgent"
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

_T = TypeVar("_T")


class Refusal(NamedTuple):
    """The site refused: a code from :class:`protocols.codes.ErrorCode` and its message."""

    code: str
    message: str


class AgentUnavailable(ConnectionError):
    """The site agent service did not answer; ``status`` is the gRPC status name."""

    def __init__(self, socket_path: str, status: str) -> None:
        self.socket_path = socket_path
        self.status = status
        super().__init__(
            f"the site agent at unix:{socket_path} did not answer ({status}); is "
            "`outcomebench-site serve` running, and is this the socket it listens on?"
        )


def _refusal(err: pb.Error) -> Refusal:
    known = {str(c) for c in ErrorCode}
    if err.code not in known:  # an agent of another version: never pass unknown text on
        return Refusal(str(ErrorCode.INTERNAL_ERROR), MESSAGES[ErrorCode.INTERNAL_ERROR])
    return Refusal(err.code, MESSAGES[ErrorCode(err.code)])


_NO_ANSWER = Refusal(str(ErrorCode.INTERNAL_ERROR), MESSAGES[ErrorCode.INTERNAL_ERROR])
_MALFORMED = Refusal(str(ErrorCode.MALFORMED_STUDY), MESSAGES[ErrorCode.MALFORMED_STUDY])


def _oversized(study: bytes, envelope: bytes | None) -> bool:
    """Larger than any valid study: the agent would refuse it (and its gRPC receive limit,
    MAX_REQUEST_BYTES, would cut it off first), so it is refused here as malformed."""
    return len(study) > MAX_STUDY_WIRE_BYTES or len(envelope or b"") > MAX_ENVELOPE_BYTES


class AgentClient:
    """Talks to the site agent on ``socket_path``.

    ``timeout`` bounds the quick calls (describe, preview, status, health) in seconds;
    ``release_timeout`` bounds a release, which reads the data and may take a while. A
    release that times out still completes at the site and is cached there: asking
    again returns it at no further cost.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        release_timeout: float = 300.0,
    ) -> None:
        if not os.fspath(socket_path):
            raise ValueError(
                "no socket path for the site agent; set the SuperNode's node config "
                "agent-socket to the path `outcomebench-site serve` listens on"
            )
        self.socket_path = os.path.abspath(os.fspath(socket_path))
        self.timeout = timeout
        self.release_timeout = release_timeout

    @property
    def target(self) -> str:
        return f"unix:{self.socket_path}"

    def _call(self, run: Callable[[grpc.Channel], _T]) -> _T:
        try:
            with grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS) as channel:
                return run(channel)
        except grpc.RpcError as exc:
            code = getattr(exc, "code", None)  # every RpcError gRPC raises is also a Call
            status: str = code().name if callable(code) else "UNKNOWN"
            raise AgentUnavailable(self.socket_path, status) from None

    @staticmethod
    def _stub(channel: grpc.Channel) -> pb_grpc.SiteAgentStub:
        return pb_grpc.SiteAgentStub(channel)  # type: ignore[no-untyped-call]

    def describe(self) -> pb.DescribeReply:
        """The site's public limits: allowed instruments and families, cap, budget."""

        def run(channel: grpc.Channel) -> pb.DescribeReply:
            reply: pb.DescribeReply = self._stub(channel).Describe(
                pb.DescribeRequest(), timeout=self.timeout
            )
            return reply

        return self._call(run)

    def status(self) -> pb.StatusReply:
        """The budget of the current period (spent, remaining) and pending requests."""

        def run(channel: grpc.Channel) -> pb.StatusReply:
            reply: pb.StatusReply = self._stub(channel).Status(
                pb.StatusRequest(), timeout=self.timeout
            )
            return reply

        return self._call(run)

    def preview(self, study: bytes, envelope: bytes | None = None) -> bytes | Refusal:
        """The preview document (JSON bytes) of a study, or a refusal. Spends nothing."""
        if _oversized(study, envelope):
            return _MALFORMED

        def run(channel: grpc.Channel) -> bytes | Refusal:
            reply: pb.PreviewReply = self._stub(channel).Preview(
                _study_message(study, envelope), timeout=self.timeout
            )
            which = reply.WhichOneof("result")
            if which == "preview_json":
                return reply.preview_json
            return _refusal(reply.error) if which == "error" else _NO_ANSWER

        return self._call(run)

    def release(self, study: bytes, envelope: bytes | None = None) -> bytes | Refusal:
        """Ask for a study's release: the signed release envelope (JSON bytes), exactly
        as the site's ledger cached it, or a refusal (code, fixed message)."""
        if _oversized(study, envelope):
            return _MALFORMED

        def run(channel: grpc.Channel) -> bytes | Refusal:
            reply: pb.ReleaseReply = self._stub(channel).Release(
                _study_message(study, envelope), timeout=self.release_timeout
            )
            which = reply.WhichOneof("result")
            if which == "release":
                return reply.release
            return _refusal(reply.error) if which == "error" else _NO_ANSWER

        return self._call(run)

    def health(self) -> bool:
        """True when the agent answers the standard gRPC health check with SERVING;
        False when it is shutting down, not serving, or unreachable."""

        def run(channel: grpc.Channel) -> bool:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            reply = check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=self.timeout)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        try:
            return self._call(run)
        except AgentUnavailable:
            return False


def _study_message(study: bytes, envelope: bytes | None) -> pb.StudyMessage:
    if envelope is None:
        return pb.StudyMessage(study=study)
    return pb.StudyMessage(study=study, envelope=envelope)
