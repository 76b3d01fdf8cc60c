"""One study round over a transport: send the study to every online node, wait with a
timeout, attribute replies by message id, verify and pool what came back, and record
why every other node did not contribute. Each reply is verified on its own
(coordinator/pooling.py verify_release never raises), so one malformed or lying release
is a line in ``missing``, not the end of the round. Flower stays in coordinator/app.py; this module
only sees the small :class:`Transport` interface, with an in-memory twin for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from coordinator.pooling import Contribution, Rejection, verify_release
from protocols.codes import ErrorCode
from protocols.study import Study

__all__ = ["NodeReply", "RoundResult", "Transport", "run_round", "verify_reply"]


@dataclass(frozen=True, slots=True)
class NodeReply:
    """What came back from one node: a signed release, or a refusal code, or a failure
    of the transport itself (``transport_error``)."""

    node_id: int
    site_id: str = ""
    release: bytes | None = None
    code: str | None = None
    transport_error: str | None = None


class Transport(Protocol):
    def node_ids(self) -> Sequence[int]: ...

    def ask(
        self, node_ids: Sequence[int], study: bytes, envelope: bytes | None, timeout: float
    ) -> Mapping[int, NodeReply]:
        """Send the study to ``node_ids``; the replies that arrived within ``timeout``."""
        ...


@dataclass(frozen=True, slots=True)
class RoundResult:
    contributions: tuple[Contribution, ...]
    missing: tuple[Rejection, ...]
    asked: int
    duration_s: float
    notes: tuple[str, ...] = field(default=())


def verify_reply(
    reply: NodeReply, study: Study, keys: Mapping[str, Path]
) -> Contribution | Rejection:
    # The reply's own claim of who it is: shown, bounded, never used to attribute it.
    who = f"node {reply.node_id}" + (f" ({reply.site_id[:64]})" if reply.site_id else "")
    if reply.transport_error is not None:
        return Rejection(who, reply.transport_error)
    if reply.release is None:
        code = reply.code if reply.code in set(ErrorCode) else "unknown refusal code"
        return Rejection(who, f"refused: {code}")
    result = verify_release(reply.release, study, keys)
    return Rejection(who, result) if isinstance(result, str) else result


def run_round(
    transport: Transport,
    study: Study,
    envelope: bytes | None,
    keys: Mapping[str, Path],
    *,
    timeout: float,
    wait_for: int = 0,
    wait_timeout: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
) -> RoundResult:
    """Ask every online node once; verify, deduplicate and attribute the replies."""
    start = time.monotonic()
    nodes = list(transport.node_ids())
    while len(nodes) < wait_for and time.monotonic() - start < wait_timeout:
        sleep(1.0)
        nodes = list(transport.node_ids())
    replies = transport.ask(nodes, study.canonical_bytes(), envelope, timeout) if nodes else {}
    accepted: list[Contribution] = []
    missing: list[Rejection] = []
    seen: dict[str, int] = {}
    for node in nodes:
        reply = replies.get(node)
        if reply is None:
            missing.append(Rejection(f"node {node}", f"no reply within {timeout:g} s (timeout)"))
            continue
        result = verify_reply(reply, study, keys)
        if isinstance(result, Rejection):
            missing.append(result)
        elif result.site_id in seen:
            missing.append(
                Rejection(
                    f"node {node} ({result.site_id})",
                    f"site already counted from node {seen[result.site_id]}",
                )
            )
        else:
            seen[result.site_id] = node
            accepted.append(result)
    return RoundResult(
        contributions=tuple(accepted),
        missing=tuple(missing),
        asked=len(nodes),
        duration_s=time.monotonic() - start,
    )
