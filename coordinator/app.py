"""The Flower ServerApp: one study round over the deployment (or simulation) engine.

Run config (``[tool.flwr.app.config]`` in pyproject.toml, overridable with ``flwr run
--run-config``): ``study`` (path to study.yaml or a signed study), ``keys`` (registered
site keys), ``out`` (a new bundle directory), ``signing-key`` (the network's publication
key), ``timeout`` (seconds to wait for replies), ``wait-for-nodes`` and ``wait-timeout``
(wait until that many nodes are online). A round record ``<out>.round.json`` says which
sites contributed and why every other node did not; below the study's ``min_sites`` the
run fails (QuorumNotReached) and nothing is published. Each reply is verified on its own: a
malformed or lying release is listed with its reason and the round goes on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator import crypto
from coordinator.estimates import estimate_all
from coordinator.pooling import QuorumNotReached, pool, require_quorum, site_keys
from coordinator.publish import benchmark_document, write_bundle
from coordinator.rounds import NodeReply, RoundResult, run_round
from coordinator.study import load_study
from protocols.release import parse_envelope

__all__ = ["FlowerTransport", "app", "run_study"]

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

MESSAGE_TYPE = "query.study"


class FlowerTransport:
    """The round's transport over a Flower Grid: replies are attributed by the id of the
    message they answer, never by what the reply claims about itself."""

    def __init__(self, grid: Grid, poll_s: float = 0.5) -> None:
        self.grid = grid
        self.poll_s = poll_s

    def node_ids(self) -> Sequence[int]:
        return list(self.grid.get_node_ids())

    def ask(
        self, node_ids: Sequence[int], study: bytes, envelope: bytes | None, timeout: float
    ) -> Mapping[int, NodeReply]:
        record: dict[str, Any] = {"canonical": study}
        if envelope is not None:
            record["envelope"] = envelope
        messages = [
            Message(
                RecordDict({"study": ConfigRecord(record)}),
                dst_node_id=node,
                message_type=MESSAGE_TYPE,
                ttl=timeout + 30,
            )
            for node in node_ids
        ]
        ids = list(self.grid.push_messages(messages))
        pending = {mid: node for mid, node in zip(ids, node_ids, strict=True) if mid}
        replies: dict[int, NodeReply] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    replies[node] = _decode(node, reply)
            if pending:
                time.sleep(self.poll_s)
        return replies


def _decode(node: int, reply: Message) -> NodeReply:
    if reply.has_error():
        # Errors made by the SuperLink (e.g. the node went away) name their code only.
        return NodeReply(
            node_id=node,
            transport_error=f"node unavailable or failed (Flower error code {reply.error.code})",
        )
    try:
        rec = reply.content["reply"]
        site = str(rec.get("site_id", ""))
        if rec.get("status") == "ok":
            release = rec["release"]
            if not isinstance(release, bytes):
                raise TypeError("release")
            return NodeReply(node_id=node, site_id=site, release=release)
        return NodeReply(node_id=node, site_id=site, code=str(rec.get("code", "")))
    except (KeyError, TypeError, ValueError):
        return NodeReply(node_id=node, transport_error="malformed reply")


def run_study(transport: FlowerTransport | Any, cfg: Mapping[str, Any]) -> RoundResult:
    """The round, then pooling and publication. Raises QuorumNotReached below quorum,
    after writing the round record."""
    study_path = Path(str(cfg["study"]))
    study = load_study(study_path)
    text = study_path.read_text(encoding="utf-8")
    envelope = text.encode() if '"outcomebench.signed-study"' in text else None
    if envelope is not None:
        parse_envelope(envelope, "study")  # fail here, not at the sites, if it is broken
    keys = site_keys(Path(str(cfg["keys"])))
    out = Path(str(cfg["out"]))
    result = run_round(
        transport,
        study,
        envelope,
        keys,
        timeout=float(cfg.get("timeout", 60)),
        wait_for=int(cfg.get("wait-for-nodes", 0)),
        wait_timeout=float(cfg.get("wait-timeout", 0)),
    )
    record = {
        "study_id": study.id,
        "study_hash": study.hash,
        "asked": result.asked,
        "contributed": [c.site_id for c in result.contributions],
        "missing": [{"source": r.source, "reason": r.reason} for r in result.missing],
        "min_sites": study.min_sites,
        "duration_s": round(result.duration_s, 3),
        "published": False,
    }
    try:
        require_quorum(study, result.contributions)
    except QuorumNotReached:
        _write_record(out, record)
        raise
    pooled = pool(study, result.contributions)
    doc = benchmark_document(pooled, estimate_all(pooled), result.missing)
    write_bundle(out, doc, crypto.load_private(Path(str(cfg["signing-key"]))))
    _write_record(out, record | {"published": True, "bundle": str(out)})
    return result


def _write_record(out: Path, record: Mapping[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.round.json").write_text(json.dumps(record, indent=1) + "\n")


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_study(FlowerTransport(grid), dict(context.run_config))
