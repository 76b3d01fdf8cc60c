"""The Flower ClientApp: a bridge that holds no data and no keys.

Flower ships this code from the coordinator, and open-source Flower cannot restrict
which app a SuperNode runs, so nothing here may read data or keys. The bridge forwards
the study to the local site agent service (its Unix socket named in the SuperNode's own
node config as ``agent-socket``) and replies with the signed release or a protocol error
code. Exception text never goes into a reply.
"""

from __future__ import annotations

import os

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from protocols.codes import MESSAGES, ErrorCode
from site_agent.agent_client import AgentClient

__all__ = ["app"]

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = ClientApp()

Reply = dict[str, int | float | str | bytes | bool | list[int] | list[float] | list[str]
             | list[bytes] | list[bool]]


def _refusal(code: str, site_id: str) -> Reply:
    known = {c.value for c in ErrorCode}
    code = code if code in known else ErrorCode.INTERNAL_ERROR.value
    return {"status": "refused", "code": code, "message": MESSAGES[ErrorCode(code)],
            "site_id": site_id}


def study_record(content: RecordDict) -> tuple[bytes, bytes | None]:
    """The study's canonical bytes and its signed envelope (if any) from a ``query.study``
    message; KeyError or TypeError when the message is not shaped so."""
    record = content["study"]
    canonical = record["canonical"]
    envelope = record.get("envelope")
    if not isinstance(canonical, bytes) or not isinstance(envelope, bytes | None):
        raise TypeError("study")
    return canonical, envelope


def answer(content: RecordDict, node_config: dict[str, bool | float | int | str]) -> Reply:
    """The reply record for one study message (the whole bridge, without Flower)."""
    socket = str(node_config.get("agent-socket", ""))
    site_id = str(node_config.get("site-id", ""))
    try:
        canonical, envelope = study_record(content)
    except (KeyError, TypeError):
        return _refusal(ErrorCode.MALFORMED_STUDY.value, site_id)
    try:
        result = AgentClient(socket).release(canonical, envelope)
    except Exception:  # the agent is down or unreachable: a code, never its text
        return _refusal(ErrorCode.INTERNAL_ERROR.value, site_id)
    if isinstance(result, bytes):
        return {"status": "ok", "release": result, "site_id": site_id}
    return _refusal(result.code, site_id)


@app.query("study")
def study(msg: Message, context: Context) -> Message:
    reply = answer(msg.content, dict(context.node_config))
    return Message(RecordDict({"reply": ConfigRecord(reply)}), reply_to=msg)
