"""Rollouts created (target resolved, waves planned), looked up, and their history
recorded.

The controller (`fleet_server.rollouts.controller`) drives what is created here and
carries out operators' actions; both keep all their state in the database. What people
read of a rollout is `fleet_server.rollouts.read_model`'s.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.errors import Conflict, NotFound, Rejected
from fleet_server.rollouts.gates import Reference
from fleet_server.rollouts.spec import RolloutCreate, WaveSpec
from fleet_server.rollouts.states import ACTIVE_STATES, EventKind, MemberState, RolloutState
from fleet_server.services import audit
from fleet_server.tables import (
    Device,
    DeviceTag,
    ModelVersion,
    Rollout,
    RolloutDevice,
    RolloutEvent,
    utcnow,
)


@dataclass(frozen=True)
class Plan:
    device_id: str
    wave: int
    previous_model_id: int | None


def reference_of(model: ModelVersion | None) -> Reference:
    reference = (json.loads(model.manifest_json).get("reference") or {}) if model else {}
    distribution = reference.get("class_distribution")
    return Reference(
        mean_confidence=reference.get("mean_confidence"),
        class_distribution=tuple(distribution) if distribution else None,
    )


def create(session: Session, body: RolloutCreate, actor: str) -> Rollout:
    model = session.scalar(
        select(ModelVersion).where(
            ModelVersion.name == body.model, ModelVersion.version == body.version
        )
    )
    if model is None:
        raise NotFound(f"model {body.model} {body.version} is not in the registry")
    reference = reference_of(model)
    if body.gates.max_confidence_drop is not None and reference.mean_confidence is None:
        raise Rejected("the confidence gate needs a manifest with reference.mean_confidence")
    if body.gates.max_class_shift is not None and not reference.class_distribution:
        raise Rejected("the class shift gate needs a manifest with reference.class_distribution")
    devices = _target_devices(session, body)
    if not devices:
        raise Rejected("the target matches no device")
    busy = in_other_rollouts(session, [d.id for d in devices])
    if busy:
        shown = ", ".join(sorted(busy)[:10]) + (" ..." if len(busy) > 10 else "")
        raise Conflict(f"{len(busy)} target device(s) are in another active rollout: {shown}")
    rollout = Rollout(
        model_id=model.id,
        model_name=model.name,
        model_version=model.version,
        spec=body.model_dump(mode="json"),
        state=RolloutState.RUNNING,
        wave=0,
        created_by=actor,
    )
    session.add(rollout)
    session.flush()
    previous = registry_ids(session, devices)
    plans = plan_waves(f"rollout-{rollout.id}", [d.id for d in devices], body.waves, previous)
    for plan in plans:
        session.add(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=plan.device_id,
                wave=plan.wave,
                state=MemberState.PENDING,
                previous_model_id=plan.previous_model_id,
            )
        )
    sizes = [sum(plan.wave == index for plan in plans) for index in range(len(body.waves))]
    record(
        session,
        rollout,
        EventKind.CREATED,
        f"{model.name} {model.version} to {len(devices)} device(s) in {len(sizes)} wave(s)",
        wave_sizes=sizes,
        actor=actor,
    )
    return rollout


def plan_waves(
    seed: str, device_ids: Sequence[str], waves: Sequence[WaveSpec], previous: dict[str, int | None]
) -> list[Plan]:
    """Devices in a stable pseudo-random order (so a wave is a spread of the fleet, not the
    oldest devices), cut into the waves' sizes; the last wave takes what is left."""
    order = sorted(device_ids, key=lambda d: hashlib.sha256(f"{seed}/{d}".encode()).digest())
    plans: list[Plan] = []
    start = 0
    for index, wave in enumerate(waves):
        if index == len(waves) - 1:
            size = len(order) - start
        elif wave.count is not None:
            size = wave.count
        else:
            size = max(1, math.ceil(len(order) * (wave.percent or 0) / 100))
        for device_id in order[start : start + size]:
            plans.append(Plan(device_id, index, previous.get(device_id)))
        start = min(start + size, len(order))
    return plans


def _target_devices(session: Session, body: RolloutCreate) -> list[Device]:
    query = select(Device).where(Device.decommissioned_at.is_(None))
    target = body.target
    if target.devices:
        query = query.where(Device.id.in_(target.devices))
    for tag in target.tags:
        query = query.where(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    found = list(session.scalars(query.order_by(Device.id)))
    missing = set(target.devices) - {d.id for d in found}
    if missing:
        raise Rejected(f"unknown or decommissioned device(s): {', '.join(sorted(missing)[:10])}")
    return found


def matches(rollout: Rollout, device: Device) -> bool:
    """Whether a device (one enrolled since, say) belongs to the rollout's target."""
    target = RolloutCreate.model_validate(rollout.spec).target
    if target.all:
        return True
    if target.devices:
        return device.id in target.devices
    return set(target.tags) <= {t.tag for t in device.tags}


def in_other_rollouts(session: Session, device_ids: Sequence[str]) -> set[str]:
    rows = session.scalars(
        select(RolloutDevice.device_id)
        .join(Rollout, Rollout.id == RolloutDevice.rollout_id)
        .where(Rollout.state.in_(ACTIVE_STATES), RolloutDevice.device_id.in_(device_ids))
    )
    return set(rows)


def registry_ids(session: Session, devices: Sequence[Device]) -> dict[str, int | None]:
    ids: dict[str, int | None] = {}
    for device in devices:
        ids[device.id] = None
        if device.model_name and device.model_version:
            ids[device.id] = session.scalar(
                select(ModelVersion.id).where(
                    ModelVersion.name == device.model_name,
                    ModelVersion.version == device.model_version,
                )
            )
    return ids


def record(
    session: Session,
    rollout: Rollout,
    kind: EventKind,
    message: str,
    *,
    actor: str = "controller",
    **details: Any,
) -> RolloutEvent:
    """An event in the rollout's history, and the same decision in the audit log."""
    event = RolloutEvent(
        rollout_id=rollout.id,
        kind=kind,
        wave=rollout.wave,
        message=message,
        details={"actor": actor, **details},
    )
    session.add(event)
    rollout.updated_at = utcnow()
    audit.record(session, actor, f"rollout.{kind}", f"rollout:{rollout.id}", message=message)
    return event


def get(session: Session, rollout_id: int, *, lock: bool = False) -> Rollout:
    rollout = session.get(Rollout, rollout_id, with_for_update=lock)
    if rollout is None:
        raise NotFound(f"no rollout {rollout_id}")
    return rollout


def finish(rollout: Rollout, state: RolloutState, reason: str | None) -> None:
    rollout.state = state
    rollout.reason = reason
    rollout.finished_at = dt.datetime.now(dt.UTC)
