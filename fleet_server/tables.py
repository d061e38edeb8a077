"""The server's tables, as SQLAlchemy 2.0 typed models. Alembic migrations create them."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from fleet_server.db import Base, StrEnumColumn
from fleet_server.rollouts.states import EventKind, MemberState, Phase, RolloutState
from protocol.messages import UpdateState


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    # Tokens are 256 random bits, so a plain sha256 is a safe verifier and cheap to check.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    uses_left: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    hardware: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    secret_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="offline", index=True)
    last_seen_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    agent_version: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64), index=True)
    enrolled_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    decommissioned_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    tags: Mapped[list[DeviceTag]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="DeviceTag.tag"
    )


class DeviceTag(Base):
    """One row per tag, so filtering by tag is an indexed join on any database."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class PublisherKey(Base):
    __tablename__ = "publisher_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    keyid: Mapped[str] = mapped_column(String(64), unique=True)
    public_key_pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    quantization: Mapped[str] = mapped_column(String(16))
    signed_by: Mapped[str] = mapped_column(String(64))
    # The signed manifest exactly as uploaded: devices verify it themselves.
    manifest_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    uploaded_by: Mapped[str] = mapped_column(String(128))


class DesiredState(Base):
    """What the server last published, retained, on a device's desired topic."""

    __tablename__ = "desired_states"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer)
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    payload_json: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SeenMessage(Base):
    """(device, stream, sequence number) of every stored QoS 1 message: redeliveries hit
    the primary key and are dropped, so each message is stored once."""

    __tablename__ = "seen_messages"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    stream: Mapped[str] = mapped_column(String(16), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class UpdateReportRow(Base):
    __tablename__ = "update_reports"
    __table_args__ = (Index("ix_update_reports_device_ts", "device_id", "ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    msg_id: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    deployment_id: Mapped[str | None] = mapped_column(String(64), index=True)
    desired_seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[UpdateState] = mapped_column(StrEnumColumn(UpdateState, 16))
    model_name: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)


class _DeviceSample:
    """The columns every telemetry table starts with; retention prunes on `ts`.

    Each table's two indexes, by (device, ts) for a device's charts and by ts for the
    fleet's recent windows, also hold the columns those pages aggregate. A week of one
    device is 60,480 rows scattered over a table written in time order by the whole
    fleet; read through a plain index each costs a page of its own, so a cold chart read
    a gigabyte. Covering, the index alone answers, its entries side by side.
    """

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64))
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class HealthRow(_DeviceSample, Base):
    __tablename__ = "health_samples"
    __table_args__ = (
        Index("ix_health_samples_ts", "ts"),
        Index(
            "ix_health_samples_device_ts",
            *("device_id", "ts", "cpu_percent", "memory_percent", "temperature_c"),
            "disk_free_bytes",
        ),
    )

    cpu_percent: Mapped[float] = mapped_column(Float)
    memory_percent: Mapped[float] = mapped_column(Float)
    memory_rss_bytes: Mapped[int] = mapped_column(BigInteger)
    temperature_c: Mapped[float | None] = mapped_column(Float)
    disk_free_bytes: Mapped[int] = mapped_column(BigInteger)
    uptime_s: Mapped[float] = mapped_column(Float)
    agent_version: Mapped[str] = mapped_column(String(64))


class InferenceRow(_DeviceSample, Base):
    __tablename__ = "inference_windows"
    __table_args__ = (
        Index(
            "ix_inference_windows_ts",
            *("ts", "model_name", "model_version", "device_id", "count", "errors"),
            *("nan_outputs", "latency_p50_ms", "latency_p95_ms", "mean_confidence"),
        ),
        Index(
            "ix_inference_windows_device_ts",
            *("device_id", "ts", "latency_p50_ms", "latency_p95_ms", "count", "drift_score"),
        ),
    )

    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    window_s: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    latency_p50_ms: Mapped[float | None] = mapped_column(Float)
    latency_p95_ms: Mapped[float | None] = mapped_column(Float)
    latency_p99_ms: Mapped[float | None] = mapped_column(Float)
    mean_confidence: Mapped[float | None] = mapped_column(Float)
    class_counts: Mapped[list[int]] = mapped_column(JSON)
    nan_outputs: Mapped[int] = mapped_column(Integer)
    drift_score: Mapped[float | None] = mapped_column(Float)


class AccuracyRow(_DeviceSample, Base):
    __tablename__ = "accuracy_windows"
    __table_args__ = (
        Index("ix_accuracy_windows_ts", "ts", "model_name", "model_version", "labelled", "correct"),
        Index("ix_accuracy_windows_device_ts", "device_id", "ts", "labelled", "correct"),
    )

    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    window_s: Mapped[float] = mapped_column(Float)
    labelled: Mapped[int] = mapped_column(Integer)
    correct: Mapped[int] = mapped_column(Integer)


class ShadowRow(_DeviceSample, Base):
    __tablename__ = "shadow_windows"
    __table_args__ = (
        Index("ix_shadow_windows_ts", "ts"),
        Index("ix_shadow_windows_device_ts", "device_id", "ts"),
    )

    active_version: Mapped[str] = mapped_column(String(64))
    candidate_version: Mapped[str] = mapped_column(String(64))
    compared: Mapped[int] = mapped_column(Integer)
    agreed: Mapped[int] = mapped_column(Integer)


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(256))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Rollout(Base):
    """A model going out to a target in waves; the controller's whole state is here, so a
    restarted server (or another replica) carries on where the last one stopped."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    # The request as accepted: target, waves, gates and what a failed gate does.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[RolloutState] = mapped_column(StrEnumColumn(RolloutState, 16), index=True)
    wave: Mapped[int] = mapped_column(Integer, default=0)  # the wave under way, from 0
    phase: Mapped[Phase | None] = mapped_column(StrEnumColumn(Phase, 8))  # within a wave
    phase_started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class RolloutDevice(Base):
    """One device of a rollout: its wave, what it ran before, and how its update went."""

    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_device_state", "device_id", "state"),)

    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    wave: Mapped[int] = mapped_column(Integer)
    # The execution state; the install result it stands for is rollouts.states.RESULT's.
    state: Mapped[MemberState] = mapped_column(StrEnumColumn(MemberState, 16))
    deployment_id: Mapped[str | None] = mapped_column(String(64), index=True)
    previous_model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    assigned_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    switched_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str | None] = mapped_column(Text)


class RolloutEvent(Base):
    """Every decision the controller or an operator took, with its numbers."""

    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[EventKind] = mapped_column(StrEnumColumn(EventKind, 32))
    wave: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Alert(Base):
    """An event worth telling someone about, raised once: `key` is unique, so a second
    replica (or a restarted server) finding the same event inserts nothing.

    A condition (a device offline, accuracy low) stays open until it clears
    (`resolved_at`); while open, it is not raised again. Events that simply happened (a
    rollout paused) are never open."""

    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_kind_subject", "kind", "subject"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(320), unique=True)
    # What receivers deduplicate on: the same in every delivery and retry of this alert.
    event_id: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(256))
    summary: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    raised_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class AlertDelivery(Base):
    """One alert to one webhook (by its name). Due while `next_attempt_at` is set and past;
    delivered when `delivered_at` is set; given up when neither is."""

    __tablename__ = "alert_deliveries"

    alert_id: Mapped[int] = mapped_column(
        ForeignKey("alerts.id", ondelete="CASCADE"), primary_key=True
    )
    webhook: Mapped[str] = mapped_column(String(128), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
