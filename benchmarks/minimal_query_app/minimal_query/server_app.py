"""The minimal ServerApp: one ``query`` message to every online node, wait for the
replies, fail unless every node answered.

Run config (see pyproject.toml): ``timeout`` for the replies; ``min-nodes`` and
``wait-timeout`` wait until that many nodes are online (as coordinator/app.py does);
``poll-s`` 0 uses ``grid.send_and_receive`` (Flower's own loop, 3 s polling in
deployment), otherwise push + pull every ``poll-s`` seconds; ``out`` (if set) is a JSON
file for the round record (nodes asked, replies, errors, duration_s).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = ServerApp()


def _ask(grid: Grid, messages: list[Message], timeout: float, poll_s: float) -> list[Message]:
    if poll_s <= 0:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = {mid for mid in grid.push_messages(messages) if mid}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
        if pending:
            time.sleep(poll_s)
    return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    timeout = float(cfg.get("timeout", 60.0))
    min_nodes = int(cfg.get("min-nodes", 0))
    wait_timeout = float(cfg.get("wait-timeout", 30.0))
    poll_s = float(cfg.get("poll-s", 0.0))
    out = str(cfg.get("out", ""))
    start = time.monotonic()
    nodes = list(grid.get_node_ids())
    while len(nodes) < min_nodes and time.monotonic() - start < wait_timeout:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    messages = [
        Message(
            RecordDict({"query": ConfigRecord({"ping": 1})}),
            dst_node_id=node,
            message_type="query",
            ttl=timeout + 30,
        )
        for node in nodes
    ]
    replies = _ask(grid, messages, timeout, poll_s) if nodes else []
    errors = sum(1 for r in replies if r.has_error())
    record = {
        "asked": len(nodes),
        "replies": len(replies),
        "errors": errors,
        "duration_s": round(time.monotonic() - start, 3),
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record) + "\n")
    if not nodes or len(replies) - errors < len(nodes):
        raise RuntimeError(f"minimal query round incomplete: {record}")
