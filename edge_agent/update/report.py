"""What the device tells the server about an update: one UpdateReport, however it came
about (a step of the machine, or a desired state refused before it got there)."""

from __future__ import annotations

from edge_agent.loaded_model import LoadedModel
from protocol.messages import MESSAGE_SCHEMA_VERSION, DesiredState, UpdateReport, UpdateState


def update_report(
    msg_id: int,
    ts: float,
    state: UpdateState,
    reason: str | None,
    *,
    desired: DesiredState | None,
    active: LoadedModel | None,
) -> UpdateReport:
    """A report on `desired` (None: one that could not be read, so seq 0 and no
    deployment), naming the model serving now (after a failure: the previous one)."""
    return UpdateReport(
        schema_version=MESSAGE_SCHEMA_VERSION,
        msg_id=msg_id,
        ts=ts,
        deployment_id=desired.deployment_id if desired else None,
        desired_seq=desired.seq if desired else 0,
        state=state,
        model_name=active.name if active else None,
        model_version=active.version if active else None,
        reason=reason,
        detail=None,
    )
