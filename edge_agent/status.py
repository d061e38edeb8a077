"""What `edge-agent status` reads from the state dir, whether or not the agent runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge_agent.config import load_credentials
from edge_agent.outbox import Outbox
from edge_agent.slots import MANIFEST, Slots
from edge_agent.update.machine import RECORD_FILE, load_record

OUTBOX_FILE = "outbox.sqlite"


def read_status(state_dir: Path) -> dict[str, Any]:
    credentials = load_credentials(state_dir)
    info: dict[str, Any] = {
        "state_dir": str(state_dir),
        "device_id": credentials.device_id if credentials else None,
        "model": None,
        "slot": None,
    }
    models = state_dir / "models"
    if models.exists():
        slots = Slots(models)
        current = slots.current_name()
        info["slot"] = current
        if current is not None:
            manifest = json.loads((slots.path(current) / MANIFEST).read_bytes())["manifest"]
            info["model"] = f"{manifest['name']} {manifest['version']}"
    record, _ = load_record(state_dir / RECORD_FILE)
    info["update_state"] = record.state.value
    info["desired_seq"] = record.seq
    info["update_reason"] = record.reason
    outbox_path = state_dir / OUTBOX_FILE
    if outbox_path.exists():
        outbox = Outbox(outbox_path)
        try:
            info["outbox_depth"] = len(outbox)
        finally:
            outbox.close()
    else:
        info["outbox_depth"] = 0
    return info
