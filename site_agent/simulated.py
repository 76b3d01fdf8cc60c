"""The ClientApp for Flower's simulation engine only (synthetic clinics on one machine).

In simulation there is no SuperNode per clinic and so no site agent service to bridge to:
virtual node ``partition-id`` answers for the ``partition-id``-th clinic under the run
config's ``sim-sites`` directory, through the same release engine, policy and ledger.
The bridge/agent boundary of a real deployment does not exist here, which is why this
app is never the project's deployed ClientApp (that is :mod:`site_agent.bridge`).
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from protocols.codes import ErrorCode
from protocols.errors import SpecError
from protocols.release import parse_envelope
from protocols.study import study_from_canonical
from site_agent.bridge import Reply, _refusal, study_record
from site_agent.privacy import Refused, StudyRequest, load_engine

__all__ = ["app"]

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = ClientApp()


def answer(content: RecordDict, sites: Path, partition: int) -> Reply:
    configs = sorted(sites.glob("*/site.yaml"))
    if not 0 <= partition < len(configs):
        return _refusal(ErrorCode.INVALID_DATA.value, "")
    config = configs[partition]
    site_id = config.parent.name
    try:
        canonical, envelope = study_record(content)
        req = StudyRequest(study_from_canonical(canonical),
                           None if envelope is None else parse_envelope(envelope, "study"))
    except (KeyError, TypeError, SpecError):
        return _refusal(ErrorCode.MALFORMED_STUDY.value, site_id)
    try:
        engine = load_engine(config)
        body = engine.release(req)
    except Refused as r:  # only the release refuses: the engine exists
        return _refusal(r.code.value, engine.site.site_id)
    except Exception:  # a code, never the text
        return _refusal(ErrorCode.INTERNAL_ERROR.value, site_id)
    return {"status": "ok", "release": body, "site_id": engine.site.site_id}


@app.query("study")
def study(msg: Message, context: Context) -> Message:
    reply = answer(msg.content, Path(str(context.run_config.get("sim-sites", ""))),
                   int(context.node_config.get("partition-id", -1)))
    return Message(RecordDict({"reply": ConfigRecord(reply)}), reply_to=msg)
