"""The fleet's state for `/metrics`, read from the database when Prometheus scrapes.

Devices, rollouts, gates and per-version field performance are built afresh on every
scrape, as gauge families of a registry made for that scrape, next to the process's own
counters (`fleet_server.metrics.server`). A label set that no longer exists (a version no
device runs any more, a rollout that finished) is simply not built, so it drops out of
the exposition, and Prometheus marks the series stale. Setting long-lived labelled Gauges
instead would need a clear() before every refill, and two scrapes served by concurrent
threads could then expose a half-filled gauge.

Gauges read from the database are the same whichever replica serves the scrape: aggregate
them across instances with max(), not sum(). The process counters are per replica: sum().
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from fleet_server.alerts.config import CONDITION_KINDS
from fleet_server.rollouts.gates import GateResult, Verdict
from fleet_server.rollouts.spec import RolloutCreate
from fleet_server.rollouts.states import ACTIVE_STATES, MemberState, Phase, RolloutState
from fleet_server.rollouts.watch import LiveGates
from fleet_server.services.field import VersionField, field_performance
from fleet_server.state import FleetState
from fleet_server.tables import Alert, AlertDelivery, Device, ModelVersion, Rollout, RolloutDevice

log = logging.getLogger(__name__)

# The span field performance is aggregated over. A few minutes: long enough that every
# device's 10 s windows are in, short enough that a regression shows within one or two
# scrapes, and the aggregation reads a small range of the ts index.
FIELD_WINDOW = dt.timedelta(minutes=5)

DEVICE_STATUSES = ("online", "offline", "decommissioned")
ROLLOUT_STATES = tuple(RolloutState)
# A running rollout between waves (or not yet started) has no phase: "waiting".
PHASES = ("waiting", *Phase)
GATE_STATUSES = {Verdict.PASS: "pass", Verdict.FAIL: "fail", Verdict.WAIT: "undecided"}

ROLLOUT_LABELS = ["rollout", "model", "version"]
GATE_LABELS = [*ROLLOUT_LABELS, "gate"]
VERSION_LABELS = ["model", "version"]


class _Families:
    """A collector for families already built: the scrape's snapshot of the database."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(session: Session, state: FleetState, now: dt.datetime | None = None) -> bytes:
    """The exposition for one scrape: the process's counters and the fleet's state."""
    # auto_describe: a fleet gauge named like one of the process's metrics fails loudly
    # here rather than exposing the name twice.
    scrape = CollectorRegistry(auto_describe=True)
    scrape.register(state.metrics.registry)
    families = fleet_families(
        session,
        mqtt_connected=state.publisher.connected,
        now=now,
        live_gates=state.live_gates,
    )
    scrape.register(_Families(families))
    return generate_latest(scrape)


def fleet_families(
    session: Session,
    *,
    mqtt_connected: bool,
    live_gates: LiveGates,
    now: dt.datetime | None = None,
) -> list[Metric]:
    now = now or dt.datetime.now(dt.UTC)
    return [
        *_devices(session),
        _gauge("edgefleet_models", "Model versions in the registry", _model_count(session)),
        _gauge("edgefleet_mqtt_connected", "1 while the MQTT bridge is connected", mqtt_connected),
        *_rollouts(session, live_gates),
        *_field(field_performance(session, now - FIELD_WINDOW)),
        *_alerts(session),
    ]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _model_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(ModelVersion)) or 0


# --- alerts ------------------------------------------------------------------------------------


def _alerts(session: Session) -> list[Metric]:
    """Alerts raised, by kind and whether their condition still holds, and their deliveries
    by webhook and outcome: a webhook that has been failing shows here before anyone
    notices the silence."""
    alerts = GaugeMetricFamily(
        "edgefleet_alerts",
        "Alerts raised since the server's database began, by kind and state (open: the "
        "condition still holds; closed: it cleared, or the alert was a one-off event)",
        labels=["kind", "state"],
    )
    open_ = case(
        (Alert.resolved_at.is_(None) & Alert.kind.in_(CONDITION_KINDS), "open"), else_="closed"
    )
    for kind, state, count in session.execute(
        select(Alert.kind, open_, func.count()).group_by(Alert.kind, open_)
    ):
        alerts.add_metric([kind, state], count)
    deliveries = GaugeMetricFamily(
        "edgefleet_webhook_deliveries",
        "Alert deliveries by webhook and outcome: delivered, pending (due or waiting for a "
        "retry) or given_up (every attempt failed)",
        labels=["webhook", "outcome"],
    )
    outcome = case(
        (AlertDelivery.delivered_at.is_not(None), "delivered"),
        (AlertDelivery.next_attempt_at.is_not(None), "pending"),
        else_="given_up",
    )
    counted = {
        (webhook, result): count
        for webhook, result, count in session.execute(
            select(AlertDelivery.webhook, outcome, func.count()).group_by(
                AlertDelivery.webhook, outcome
            )
        )
    }
    for webhook in sorted({webhook for webhook, _ in counted}):
        for result in ("delivered", "pending", "given_up"):
            deliveries.add_metric([webhook, result], counted.get((webhook, result), 0))
    return [alerts, deliveries]


# --- devices -----------------------------------------------------------------------------------


def _devices(session: Session) -> list[Metric]:
    by_status = GaugeMetricFamily("edgefleet_devices", "Devices by status", labels=["status"])
    # Not dict(result): a Result has keys(), so dict() would read it as a mapping.
    counts = {
        status: count
        for status, count in session.execute(
            select(Device.status, func.count()).group_by(Device.status)
        )
    }
    for status in sorted(set(DEVICE_STATUSES) | set(counts)):
        by_status.add_metric([status], counts.get(status, 0))
    by_model = GaugeMetricFamily(
        "edgefleet_devices_by_model",
        "Devices (not decommissioned) by the model version they last reported active",
        labels=VERSION_LABELS,
    )
    rows = session.execute(
        select(Device.model_name, Device.model_version, func.count())
        .where(Device.decommissioned_at.is_(None), Device.model_version.is_not(None))
        .group_by(Device.model_name, Device.model_version)
        .order_by(Device.model_name, Device.model_version)
    )
    for name, version, count in rows:
        by_model.add_metric([name or "", version or ""], count)
    return [by_status, by_model]


# --- rollouts ----------------------------------------------------------------------------------


def _rollouts(session: Session, live_gates: LiveGates) -> list[Metric]:
    by_state = GaugeMetricFamily("edgefleet_rollouts", "Rollouts by state", labels=["state"])
    counts = {
        state: count
        for state, count in session.execute(
            select(Rollout.state, func.count()).group_by(Rollout.state)
        )
    }
    for state in sorted(set(ROLLOUT_STATES) | set(counts)):
        by_state.add_metric([state], counts.get(state, 0))
    families = _RolloutFamilies()
    active = session.scalars(
        select(Rollout).where(Rollout.state.in_(ACTIVE_STATES)).order_by(Rollout.id)
    )
    for rollout in active:
        families.add(session, rollout, live_gates)
    return [by_state, *families.all()]


class _RolloutFamilies:
    """Per running or paused rollout: where it is, and its current wave's gates as the
    controller would judge them now."""

    def __init__(self) -> None:
        self.state = GaugeMetricFamily(
            "edgefleet_rollout_state",
            "1 for the rollout's state (running or paused), 0 for the other",
            labels=[*ROLLOUT_LABELS, "state"],
        )
        self.wave = GaugeMetricFamily(
            "edgefleet_rollout_wave", "The wave under way, counting from 1", labels=ROLLOUT_LABELS
        )
        self.waves = GaugeMetricFamily(
            "edgefleet_rollout_waves", "Waves in the rollout", labels=ROLLOUT_LABELS
        )
        self.phase = GaugeMetricFamily(
            "edgefleet_rollout_phase",
            "1 for the current wave's phase (waiting, shadow, active), 0 for the others",
            labels=[*ROLLOUT_LABELS, "phase"],
        )
        self.devices = GaugeMetricFamily(
            "edgefleet_rollout_wave_devices",
            "Devices of the current wave by execution state",
            labels=[*ROLLOUT_LABELS, "state"],
        )
        self.gate_value = GaugeMetricFamily(
            "edgefleet_rollout_gate_value",
            "A gate's measured value (absent until there is anything to measure)",
            labels=GATE_LABELS,
        )
        self.gate_threshold = GaugeMetricFamily(
            "edgefleet_rollout_gate_threshold", "A gate's threshold", labels=GATE_LABELS
        )
        self.gate_status = GaugeMetricFamily(
            "edgefleet_rollout_gate_status",
            "1 for the gate's verdict (pass, fail, undecided), 0 for the others",
            labels=[*GATE_LABELS, "status"],
        )
        self.gate_evidence = GaugeMetricFamily(
            "edgefleet_rollout_gate_evidence",
            "What a gate's minimum evidence counts so far (devices, predictions, samples)",
            labels=GATE_LABELS,
        )
        self.gate_needed = GaugeMetricFamily(
            "edgefleet_rollout_gate_evidence_needed",
            "The evidence a gate needs before it decides",
            labels=GATE_LABELS,
        )

    def all(self) -> list[Metric]:
        return [
            self.state,
            self.wave,
            self.waves,
            self.phase,
            self.devices,
            self.gate_value,
            self.gate_threshold,
            self.gate_status,
            self.gate_evidence,
            self.gate_needed,
        ]

    def add(self, session: Session, rollout: Rollout, live_gates: LiveGates) -> None:
        labels = [str(rollout.id), rollout.model_name, rollout.model_version]
        for state in ACTIVE_STATES:
            self.state.add_metric([*labels, state], float(rollout.state == state))
        self.wave.add_metric(labels, rollout.wave + 1)
        spec = RolloutCreate.model_validate(rollout.spec)
        self.waves.add_metric(labels, len(spec.waves))
        phase = rollout.phase or "waiting"
        for name in PHASES:
            self.phase.add_metric([*labels, name], float(phase == name))
        members = list(
            session.scalars(
                select(RolloutDevice).where(
                    RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave == rollout.wave
                )
            )
        )
        counts: dict[MemberState, int] = {}
        for member in members:
            counts[member.state] = counts.get(member.state, 0) + 1
        for member_state, count in sorted(counts.items()):
            self.devices.add_metric([*labels, member_state], count)
        if rollout.phase is None:
            return  # no wave under way, so no gates to judge
        try:
            results = live_gates(session, rollout, members)
        except ValueError:
            # A gate that cannot be judged (a manifest without the reference it needs)
            # must not take the rest of the scrape down with it.
            log.exception("cannot judge the gates of rollout %d for /metrics", rollout.id)
            return
        for result in results:
            self._add_gate(labels, result)

    def _add_gate(self, labels: list[str], result: GateResult) -> None:
        gate = [*labels, result.gate]
        if result.measured is not None:
            self.gate_value.add_metric(gate, result.measured)
        self.gate_threshold.add_metric(gate, result.threshold)
        for verdict, status in GATE_STATUSES.items():
            self.gate_status.add_metric([*gate, status], float(result.verdict is verdict))
        self.gate_evidence.add_metric(gate, result.evidence)
        self.gate_needed.add_metric(gate, result.needed)


# --- field performance -------------------------------------------------------------------------


def _seconds(milliseconds: float | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1000.0


# name, help, and the figure of a VersionField it exports.
_FIELD: tuple[tuple[str, str, Callable[[VersionField], float | None]], ...] = (
    ("edgefleet_inference_devices", "Devices that reported inference", lambda v: v.devices),
    ("edgefleet_inference_predictions", "Inferences attempted", lambda v: v.predictions),
    ("edgefleet_inference_errors", "Inferences that failed", lambda v: v.errors),
    (
        "edgefleet_inference_error_ratio",
        "Failed inferences / inferences attempted",
        lambda v: v.error_rate,
    ),
    (
        "edgefleet_inference_latency_p50_seconds",
        "Inference latency p50 (the windows' p50 weighted by their inference counts)",
        lambda v: _seconds(v.latency_p50_ms),
    ),
    (
        "edgefleet_inference_latency_p95_seconds",
        "Inference latency p95 (the windows' p95 weighted by their inference counts)",
        lambda v: _seconds(v.latency_p95_ms),
    ),
    ("edgefleet_inference_labelled", "Predictions labelled by feedback", lambda v: v.labelled),
    ("edgefleet_inference_correct", "Labelled predictions that were right", lambda v: v.correct),
    (
        "edgefleet_inference_accuracy_ratio",
        "Correct / labelled predictions",
        lambda v: v.accuracy,
    ),
    (
        "edgefleet_inference_mean_confidence_ratio",
        "Mean top-class confidence of the inferences that answered",
        lambda v: v.mean_confidence,
    ),
    ("edgefleet_inference_nan_outputs", "NaN or infinite outputs", lambda v: v.nan_outputs),
)


def _field(versions: Sequence[VersionField]) -> list[Metric]:
    span = f"over the last {FIELD_WINDOW.total_seconds():g} s, by model version"
    families: list[Metric] = [
        _gauge(
            "edgefleet_inference_window_seconds",
            "The span the edgefleet_inference_* gauges aggregate",
            FIELD_WINDOW.total_seconds(),
        )
    ]
    for name, documentation, figure in _FIELD:
        family = GaugeMetricFamily(name, f"{documentation}, {span}", labels=VERSION_LABELS)
        for version in versions:
            value = figure(version)
            if value is not None:  # nothing to measure: absent rather than a made-up 0
                family.add_metric([version.model_name, version.model_version], value)
        families.append(family)
    return families
