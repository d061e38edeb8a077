"""`/metrics` on a real server and database: the fleet's state as Prometheus scrapes it,
the per-version field aggregation behind it, and the Grafana dashboard that queries it.

Telemetry and update reports go in through `write_batch`, as the ingest process stores
them; one test sends them over a real broker to check the ingest counters end to end.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from devfleet.in_process import connected_server
from fleet_server.auth import Role
from fleet_server.db import transaction
from fleet_server.metrics import fleet as fleet_metrics
from fleet_server.mqtt.ingest import Received, write_batch
from fleet_server.rollouts import controller
from fleet_server.services.field import field_performance
from fleet_server.tables import Alert, AlertDelivery, DesiredState, Rollout, RolloutDevice
from protocol.messages import (
    AccuracyWindow,
    InferenceStats,
    TelemetryBatch,
    UpdateReport,
    UpdateState,
    encode_payload,
)
from protocol.topics import Topics
from tests.bundles import Bundle
from tests.fleet_server.conftest import RunningBroker
from tests.fleet_server.device_client import WAIT, DeviceClient
from tests.fleet_server.server.conftest import Server

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "edgefleet-dashboard.json"
MODEL = "tabular"


# --- reading a scrape ------------------------------------------------------------------------


Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Scrape:
    text: str
    samples: dict[str, dict[Labels, float]]  # sample name -> label set -> value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get(name, {}).get(frozenset(labels.items()))

    def label_sets(self, name: str) -> list[dict[str, str]]:
        # Sorted by their sorted items: a frozenset's order, and so a dict made from it,
        # changes with each process's string hashing.
        return [dict(items) for items in sorted(sorted(ls) for ls in self.samples.get(name, {}))]


def parse(text: str) -> Scrape:
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return Scrape(text, samples)


def scrape(server: Server) -> Scrape:
    response = server.client.get("/metrics")
    assert response.status_code == 200, response.text
    return parse(response.text)


# --- feeding the database as the ingest process does -----------------------------------------


def enroll(server: Server, count: int, tags: list[str] | None = None) -> list[str]:
    token = server.enrollment(tags=tags or [], uses=count)
    return [server.enroll(token=token)["device_id"] for _ in range(count)]


def store(server: Server, device_id: str, *messages: UpdateReport | TelemetryBatch) -> None:
    received = dt.datetime.now(dt.UTC)
    with transaction(server.state.sessions) as session:
        result = write_batch(session, [Received(device_id, m, received) for m in messages])
    assert result.stored == len(messages)


def runs(
    server: Server,
    device_id: str,
    version: str,
    *,
    msg_id: int,
    at: float | None = None,
    deployment_id: str | None = None,
    desired_seq: int = 0,
) -> None:
    """The device reports it now runs `version` (what sets Device.model_version)."""
    report = UpdateReport(
        1,
        msg_id,
        at or time.time(),
        deployment_id,
        desired_seq,
        UpdateState.ACTIVE,
        MODEL,
        version,
        None,
        None,
    )
    store(server, device_id, report)


@dataclass(frozen=True)
class Window:
    """One inference window (and its labelled feedback) as a device reports it."""

    device_id: str
    version: str
    ago_s: float
    count: int
    errors: int
    p50_ms: float
    p95_ms: float
    confidence: float | None = None
    nan: int = 0
    labelled: int = 0
    correct: int = 0


def send(server: Server, windows: Sequence[Window], now: float, first_seq: int = 1) -> None:
    for seq, w in enumerate(windows, start=first_seq):
        at = now - w.ago_s
        inference = InferenceStats(
            at,
            MODEL,
            w.version,
            10.0,
            w.count,
            w.errors,
            w.p50_ms,
            w.p95_ms,
            w.p95_ms,
            w.confidence,
            (),
            w.nan,
            None,
        )
        accuracy = (
            (AccuracyWindow(at, MODEL, w.version, 10.0, w.labelled, w.correct),)
            if w.labelled
            else ()
        )
        store(server, w.device_id, TelemetryBatch(1, seq, at, 0, (), (inference,), accuracy, ()))


# --- field performance and devices by version -------------------------------------------------


def _fleet_windows(v1: list[str], v2: list[str]) -> list[Window]:
    windows = []
    for i, device in enumerate(v1):
        windows += [
            Window(device, "1.0.0", 30, 100 + 10 * i, i, 1.0 + i, 4.0 + i, 0.9, 0, 20, 18 - i),
            Window(device, "1.0.0", 90, 50, 1, 2.0, 6.0, 0.8, 1, 10, 9),
            # Outside the window: must not count.
            Window(device, "1.0.0", 600, 1000, 900, 90.0, 99.0, 0.1, 0, 100, 0),
        ]
    for i, device in enumerate(v2):
        windows += [
            Window(device, "2.0.0", 20, 200, 10 + i, 0.5, 1.5 + i, None),
            Window(device, "2.0.0", 700, 500, 0, 9.0, 9.0, None),
        ]
    return windows


def _expected(windows: Sequence[Window], version: str) -> dict[str, float]:
    recent = [
        w
        for w in windows
        if w.version == version and w.ago_s < fleet_metrics.FIELD_WINDOW.total_seconds()
    ]
    count = sum(w.count for w in recent)
    labelled = sum(w.labelled for w in recent)
    return {
        "devices": len({w.device_id for w in recent}),
        "predictions": count,
        "errors": sum(w.errors for w in recent),
        "error_ratio": sum(w.errors for w in recent) / count,
        "p50_s": sum(w.p50_ms * w.count for w in recent) / count / 1000,
        "p95_s": sum(w.p95_ms * w.count for w in recent) / count / 1000,
        "labelled": labelled,
        "correct": sum(w.correct for w in recent),
        "nan": sum(w.nan for w in recent),
    }


def test_metrics_aggregate_the_recent_telemetry_per_model_version(server: Server) -> None:
    v1, v2, idle = enroll(server, 3), enroll(server, 2), enroll(server, 1)
    for msg_id, device in enumerate(v1, start=1):
        runs(server, device, "1.0.0", msg_id=msg_id)
    for msg_id, device in enumerate(v2, start=1):
        runs(server, device, "2.0.0", msg_id=msg_id)
    windows = _fleet_windows(v1, v2)
    send(server, windows, time.time())

    scraped = scrape(server)

    # Telemetry marks its sender online; the device that never reported stays offline.
    assert scraped.value("edgefleet_devices", status="online") == 5
    assert scraped.value("edgefleet_devices", status="offline") == len(idle)
    assert scraped.value("edgefleet_devices", status="decommissioned") == 0
    by_model = "edgefleet_devices_by_model"
    assert scraped.value(by_model, model=MODEL, version="1.0.0") == len(v1)
    assert scraped.value(by_model, model=MODEL, version="2.0.0") == len(v2)
    assert len(scraped.label_sets(by_model)) == 2
    for version in ("1.0.0", "2.0.0"):
        want = _expected(windows, version)
        labels = {"model": MODEL, "version": version}
        assert scraped.value("edgefleet_inference_devices", **labels) == want["devices"]
        assert scraped.value("edgefleet_inference_predictions", **labels) == want["predictions"]
        assert scraped.value("edgefleet_inference_errors", **labels) == want["errors"]
        assert scraped.value("edgefleet_inference_error_ratio", **labels) == pytest.approx(
            want["error_ratio"]
        )
        assert scraped.value("edgefleet_inference_latency_p50_seconds", **labels) == (
            pytest.approx(want["p50_s"])
        )
        assert scraped.value("edgefleet_inference_latency_p95_seconds", **labels) == (
            pytest.approx(want["p95_s"])
        )
        assert scraped.value("edgefleet_inference_labelled", **labels) == want["labelled"]
        assert scraped.value("edgefleet_inference_correct", **labels) == want["correct"]
        assert scraped.value("edgefleet_inference_nan_outputs", **labels) == want["nan"]
    v1_labels = {"model": MODEL, "version": "1.0.0"}
    v1_want = _expected(windows, "1.0.0")
    assert scraped.value("edgefleet_inference_accuracy_ratio", **v1_labels) == pytest.approx(
        v1_want["correct"] / v1_want["labelled"]
    )
    # Confidence is averaged over the inferences that answered (count - errors).
    answered = [
        (w.confidence, w.count - w.errors)
        for w in windows
        if w.version == "1.0.0" and w.ago_s < 300 and w.confidence is not None
    ]
    assert scraped.value("edgefleet_inference_mean_confidence_ratio", **v1_labels) == (
        pytest.approx(sum(c * n for c, n in answered) / sum(n for _, n in answered))
    )
    # 2.0.0 had no labelled feedback and no confidence: absent, not 0.
    v2_labels = {"model": MODEL, "version": "2.0.0"}
    assert scraped.value("edgefleet_inference_accuracy_ratio", **v2_labels) is None
    assert scraped.value("edgefleet_inference_mean_confidence_ratio", **v2_labels) is None
    assert scraped.value("edgefleet_inference_labelled", **v2_labels) == 0
    assert scraped.value("edgefleet_inference_window_seconds") == 300


def test_a_version_no_device_runs_any_more_leaves_the_gauges(server: Server) -> None:
    devices = enroll(server, 3)
    for msg_id, device in enumerate(devices, start=1):
        runs(server, device, "1.0.0", msg_id=msg_id)
    now = time.time()
    send(server, [Window(d, "1.0.0", 10, 100, 0, 1.0, 2.0) for d in devices], now)
    before = scrape(server)
    assert before.label_sets("edgefleet_devices_by_model") == [{"model": MODEL, "version": "1.0.0"}]
    for device in devices[:2]:
        runs(server, device, "2.0.0", msg_id=10)
    assert scrape(server).label_sets("edgefleet_devices_by_model") == [
        {"model": MODEL, "version": "1.0.0"},
        {"model": MODEL, "version": "2.0.0"},
    ]
    runs(server, devices[2], "2.0.0", msg_id=10)
    after = scrape(server)
    assert after.label_sets("edgefleet_devices_by_model") == [{"model": MODEL, "version": "2.0.0"}]
    assert after.value("edgefleet_devices_by_model", model=MODEL, version="2.0.0") == 3
    # Its telemetry leaves the field gauges once it is older than the window.
    # (A second past it: a window stamped exactly at the edge is inside, and whether the
    # stored timestamp rounds onto the edge or past it is not this test's business.)
    later = (
        dt.datetime.fromtimestamp(now, dt.UTC)
        + fleet_metrics.FIELD_WINDOW
        + dt.timedelta(seconds=1)
    )
    with transaction(server.state.sessions) as session:
        text = fleet_metrics.render(session, server.state, now=later).decode()
    assert "edgefleet_inference_predictions" in text  # the family is still described
    assert parse(text).label_sets("edgefleet_inference_predictions") == []


# --- rollouts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutFleet:
    rollout_id: int
    admin: dict[str, str]
    wave: list[str]  # the first wave's devices, running the candidate
    secrets: list[str]  # every enrolled device's secret
    windows: list[Window]


def _start_rollout(server: Server, bundle: Bundle) -> RolloutFleet:
    """A registered model, three devices, and a rollout of it whose first wave (two
    devices) installed it and reported inference since."""
    admin = server.token(Role.admin)
    key = {"name": "publisher", "public_key": bundle.public_key.read_text()}
    assert server.client.post("/api/v1/keys", json=key, headers=admin).status_code == 201
    response = server.client.post("/api/v1/models", files=bundle.files(), headers=admin)
    assert response.status_code == 201, response.text
    token = server.enrollment(tags=["lab"], uses=3)
    enrolled = [server.enroll(token=token) for _ in range(3)]
    spec = {
        "model": MODEL,
        "version": "1.0.0",
        "target": {"tags": ["lab"]},
        "waves": [{"count": 2, "bake_s": 3600}, {"percent": 100, "bake_s": 0}],
        "gates": {"max_install_failure_ratio": 0.0, "max_error_rate": 0.05, "min_predictions": 50},
    }
    created = server.client.post("/api/v1/rollouts", json=spec, headers=admin)
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    now = time.time()
    _step(server, rollout_id, now - 120)
    with server.state.sessions() as session:
        members = list(
            session.scalars(
                select(RolloutDevice).where(
                    RolloutDevice.rollout_id == rollout_id, RolloutDevice.wave == 0
                )
            )
        )
        seqs = {m.device_id: session.get(DesiredState, m.device_id) for m in members}
        session.expunge_all()
    assert {m.state for m in members} == {"installing"}
    for member in members:
        desired = seqs[member.device_id]
        assert desired is not None
        runs(
            server,
            member.device_id,
            "1.0.0",
            msg_id=1,
            at=now - 110,
            deployment_id=member.deployment_id,
            desired_seq=desired.seq,
        )
    _step(server, rollout_id, now - 100)
    wave = [m.device_id for m in members]
    windows = [
        Window(wave[0], "1.0.0", 60, 100, 2, 1.0, 3.0, 0.9, 0, 40, 36),
        Window(wave[1], "1.0.0", 50, 80, 1, 1.5, 2.5, 0.7, 0, 10, 10),
    ]
    send(server, windows, now)
    return RolloutFleet(rollout_id, admin, wave, [e["secret"] for e in enrolled], windows)


def _step(server: Server, rollout_id: int, at: float) -> None:
    with transaction(server.state.sessions) as session:
        rollout = session.get(Rollout, rollout_id)
        assert rollout is not None
        now = dt.datetime.fromtimestamp(at, dt.UTC)
        controller.step(session, server.state.desired, rollout, now)


def test_a_running_rollout_exports_its_wave_and_gates(server: Server, bundle: Bundle) -> None:
    fleet = _start_rollout(server, bundle)
    labels = {"rollout": str(fleet.rollout_id), "model": MODEL, "version": "1.0.0"}
    scraped = scrape(server)

    assert scraped.value("edgefleet_rollouts", state="running") == 1
    assert scraped.value("edgefleet_rollouts", state="completed") == 0
    assert scraped.value("edgefleet_rollout_wave", **labels) == 1
    assert scraped.value("edgefleet_rollout_waves", **labels) == 2
    assert scraped.value("edgefleet_rollout_phase", **labels, phase="active") == 1
    assert scraped.value("edgefleet_rollout_phase", **labels, phase="shadow") == 0
    assert scraped.value("edgefleet_rollout_state", **labels, state="running") == 1
    assert scraped.value("edgefleet_rollout_wave_devices", **labels, state="active") == 2
    predictions = sum(w.count for w in fleet.windows)
    errors = sum(w.errors for w in fleet.windows)
    error_rate = {**labels, "gate": "error_rate"}
    assert scraped.value("edgefleet_rollout_gate_value", **error_rate) == pytest.approx(
        errors / predictions
    )
    assert scraped.value("edgefleet_rollout_gate_threshold", **error_rate) == 0.05
    assert scraped.value("edgefleet_rollout_gate_evidence", **error_rate) == predictions
    assert scraped.value("edgefleet_rollout_gate_evidence_needed", **error_rate) == 50
    statuses = {
        s: scraped.value("edgefleet_rollout_gate_status", **error_rate, status=s)
        for s in ("pass", "fail", "undecided")
    }
    assert statuses == {"pass": 1, "fail": 0, "undecided": 0}
    install = {**labels, "gate": "install_failure_ratio"}
    assert scraped.value("edgefleet_rollout_gate_value", **install) == 0
    assert scraped.value("edgefleet_rollout_gate_status", **install, status="pass") == 1

    path = f"/api/v1/rollouts/{fleet.rollout_id}"
    assert server.client.post(f"{path}/pause", headers=fleet.admin).status_code == 200
    paused = scrape(server)
    assert paused.value("edgefleet_rollout_state", **labels, state="paused") == 1
    assert paused.value("edgefleet_rollout_gate_threshold", **error_rate) == 0.05

    assert server.client.post(f"{path}/abort", headers=fleet.admin).status_code == 200
    aborted = scrape(server)
    assert aborted.value("edgefleet_rollouts", state="aborted") == 1
    assert aborted.value("edgefleet_rollouts", state="running") == 0
    for name in ("edgefleet_rollout_wave", "edgefleet_rollout_gate_threshold"):
        assert aborted.label_sets(name) == []


# --- the dashboard queries what is exported ---------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:([^,()]+?)\s*,\s*)?[A-Za-z_]\w*\s*\)")
_RANGES = re.compile(r"\[[^\]]*\]")
_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKENS = re.compile(r"\d[\w.]*|[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana label_values() query) selects:
    not functions, label names, label values, durations, numbers or dashboard variables.
    Names are kept whole (`_total`, `_bucket`, ...): they must match exported sample names."""
    expr = _STRINGS.sub('""', expr)
    expr = _MATCHERS.sub(" ", expr)  # label names and values, both not metrics
    expr = _LABEL_VALUES.sub(lambda m: f" {m.group(1) or ''} ", expr)
    expr = _RANGES.sub(" ", expr)
    expr = _VARIABLES.sub(" ", expr)
    expr = _GROUPING.sub(" ", expr)
    names = set()
    for token in _TOKENS.finditer(expr):
        word = token.group(0)
        if word[0].isdigit() or token.group(1) or word.lower() in _KEYWORDS:
            continue  # a number or duration, a function call, an operator
        names.add(word)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('max(edgefleet_devices{status="online"})', {"edgefleet_devices"}),
        (
            'sum by (kind) (rate(edgefleet_mqtt_messages_total{result="accepted"}'
            "[$__rate_interval]))",
            {"edgefleet_mqtt_messages_total"},
        ),
        (
            "sum(rate(a_bucket[5m])) by (le) / on (job) group_left (x) b_count offset 1h > 0.5",
            {"a_bucket", "b_count"},
        ),
        ('histogram_quantile(0.95, sum by (le) (rate(h_bucket{a="b(c)"}[1m])))', {"h_bucket"}),
        ("label_values(edgefleet_devices_by_model, model)", {"edgefleet_devices_by_model"}),
        ('label_values(m{x="y,z"}, version)', {"m"}),
        ("label_values(model)", set()),
        ('max by (rollout) (x{model=~"${model}"}) == bool 1 unless y', {"x", "y"}),
    ],
)
def test_metric_names_finds_metrics_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def dashboard_queries(dashboard: Any) -> list[str]:
    """Every panel target's `expr`, in rows and nested panels too, and every query
    variable's query."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard.get("panels", []))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


def missing_metrics(dashboard: Any, exported: Iterable[str]) -> set[str]:
    queried: set[str] = set()
    for expr in dashboard_queries(dashboard):
        queried |= metric_names(expr)
    return queried - set(exported)


def test_every_metric_the_dashboard_queries_is_exported(server: Server, bundle: Bundle) -> None:
    fleet = _start_rollout(server, bundle)
    others = enroll(server, 2)
    for msg_id, device in enumerate(others, start=1):
        runs(server, device, "0.9.0", msg_id=msg_id)
    send(server, _fleet_windows(others, []), time.time(), first_seq=100)
    add_alert(server, "device.offline", others[0], ops="given_up")
    scraped = scrape(server)
    dashboard = json.loads(DASHBOARD.read_text())

    assert dashboard["schemaVersion"] >= 36
    queried = dashboard_queries(dashboard)
    assert len(queried) >= 20
    exported = {name for name, series in scraped.samples.items() if series}
    assert missing_metrics(dashboard, exported) == set()
    # And the check bites: a panel on a metric nobody exports is caught.
    bogus = {"type": "timeseries", "targets": [{"expr": "rate(edgefleet_bogus_total[5m])"}]}
    broken = {**dashboard, "panels": [*dashboard["panels"], bogus]}
    assert missing_metrics(broken, exported) == {"edgefleet_bogus_total"}

    # Unauthenticated, so nothing in it identifies a device or grants access.
    for secret in [*fleet.wave, *others, *fleet.secrets, fleet.admin["Authorization"][7:]]:
        assert secret not in scraped.text


def add_alert(
    server: Server, kind: str, subject: str, *, resolved: bool = False, **deliveries: str
) -> None:
    """An alert as the dispatcher stores it, with a delivery per webhook in the given
    outcome: delivered, pending or given_up."""
    now = dt.datetime.now(dt.UTC)
    with transaction(server.state.sessions) as session:
        alert = Alert(
            key=f"{kind}:{subject}:1",
            event_id=f"{kind}{subject}"[:32],
            kind=kind,
            subject=subject,
            summary="test",
            data={},
            raised_at=now,
            resolved_at=now if resolved else None,
        )
        session.add(alert)
        session.flush()
        for webhook, outcome in deliveries.items():
            session.add(
                AlertDelivery(
                    alert_id=alert.id,
                    webhook=webhook,
                    attempts=1,
                    next_attempt_at=now if outcome == "pending" else None,
                    delivered_at=now if outcome == "delivered" else None,
                )
            )


def test_alerts_and_their_deliveries_are_exported(server: Server) -> None:
    add_alert(server, "device.offline", "dev-a", ops="delivered", chat="given_up")
    add_alert(server, "device.offline", "dev-b", resolved=True, ops="delivered", chat="pending")
    add_alert(server, "rollout.paused", "rollout:1", ops="delivered")
    scraped = scrape(server)
    assert scraped.value("edgefleet_alerts", kind="device.offline", state="open") == 1
    assert scraped.value("edgefleet_alerts", kind="device.offline", state="closed") == 1
    # An event is never open: it happened, and that is all.
    assert scraped.value("edgefleet_alerts", kind="rollout.paused", state="closed") == 1
    deliveries = {
        (d["webhook"], d["outcome"]): scraped.value("edgefleet_webhook_deliveries", **d)
        for d in scraped.label_sets("edgefleet_webhook_deliveries")
    }
    assert deliveries == {
        ("chat", "delivered"): 0,
        ("chat", "given_up"): 1,
        ("chat", "pending"): 1,
        ("ops", "delivered"): 3,
        ("ops", "given_up"): 0,
        ("ops", "pending"): 0,
    }


# --- the ingest counters, through a real broker and the ingest process ------------------------


@pytest.fixture
def served(broker: RunningBroker, database_url: str, tmp_path: Path) -> Iterator[Server]:
    """The server as `fleet-server serve` runs it: the bridge in its lifespan, the ingest
    in a process of its own."""
    with connected_server(
        tmp_path / "data", database_url, broker.host, broker.port, broker.config_dir, WAIT
    ) as (client, state, _):
        yield Server(client, state, state.settings)


def test_ingest_counters_count_what_the_ingest_process_handled(
    served: Server, broker: RunningBroker
) -> None:
    topics = Topics()
    enrolled = served.enroll()
    device = DeviceClient(broker.host, broker.port, enrolled["device_id"], enrolled["secret"])
    assert device.connect(), device.connect_reason
    start = scrape(served)
    assert start.value("edgefleet_mqtt_messages_total", kind="telemetry", result="accepted") == 0
    assert start.value("edgefleet_mqtt_connected") == 1
    now = time.time()
    batch = TelemetryBatch(
        1,
        1,
        now,
        0,
        (),
        (InferenceStats(now, MODEL, "1.0.0", 10.0, 40, 2, 1.0, 2.0, 3.0, None, (), 0, None),),
        (),
        (),
    )
    topic = topics.telemetry(enrolled["device_id"])
    device.publish(topic, b"{not json")
    device.publish(topic, encode_payload(batch))
    device.publish(topic, encode_payload(batch))  # a redelivery: dropped, counted

    # The three arrive in order, so once the redelivery is counted all three are handled;
    # the first one's row may still be committing (the redelivery can be recognised before
    # it is visible to another session), so the scrape also waits for its window.
    labels = {"model": MODEL, "version": "1.0.0"}
    deadline = time.monotonic() + WAIT
    scraped = scrape(served)
    while not (
        scraped.value("edgefleet_mqtt_duplicates_total", kind="all")
        and scraped.value("edgefleet_inference_predictions", **labels)
    ):
        assert time.monotonic() < deadline, "the ingest never counted the redelivery"
        time.sleep(0.05)
        scraped = scrape(served)
    device.close()
    # Accepted: decoded under the wire contract, the redelivery included (then deduplicated).
    accepted = "edgefleet_mqtt_messages_total"
    assert scraped.value(accepted, kind="telemetry", result="accepted") == 2
    assert scraped.value("edgefleet_mqtt_duplicates_total", kind="all") == 1
    invalid = "edgefleet_mqtt_invalid_payloads_total"
    assert scraped.value(invalid, kind="telemetry", reason="schema") == 1
    assert scraped.value("edgefleet_ingest_batch_messages_sum") == 3  # handed to the process
    assert scraped.value("edgefleet_inference_predictions", **labels) == 40


# --- field_performance on its own --------------------------------------------------------------


def test_field_performance_of_an_empty_fleet_is_empty(server: Server) -> None:
    with server.state.sessions() as session:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        assert field_performance(session, since) == []


def test_field_performance_without_labelled_feedback_has_no_accuracy(server: Server) -> None:
    [device] = enroll(server, 1)
    now = time.time()
    send(server, [Window(device, "1.0.0", 10, 100, 5, 1.0, 2.0, 0.5)], now)
    with server.state.sessions() as session:
        since = dt.datetime.fromtimestamp(now, dt.UTC) - dt.timedelta(minutes=5)
        [field] = field_performance(session, since)
    assert (field.model_name, field.model_version, field.devices) == (MODEL, "1.0.0", 1)
    assert (field.predictions, field.errors, field.error_rate) == (100, 5, 0.05)
    assert (field.labelled, field.correct, field.accuracy) == (0, 0, None)
    assert field.mean_confidence == pytest.approx(0.5)
