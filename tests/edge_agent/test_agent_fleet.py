"""The agent as a device runs it: `edge-agent enroll` and `edge-agent run` as processes,
against `fleet-server serve` and a Mosquitto configured by `broker-config`, with real
digits bundles made by edge-convert."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleet_server.mqtt.broker_config import CREDENTIALS_FILE, load_server_credentials
from protocol.topics import Topics
from tests.bundles import DigitsBundles
from tests.fleet import Fleet, agent_serving, enroll_agent, eventually, running_fleet
from tests.fleet_server.device_client import DeviceClient

pytestmark = pytest.mark.slow

FAST_TELEMETRY = {"EDGE_AGENT_TELEMETRY_INTERVAL_S": "0.5"}


@pytest.fixture
def fleet(tmp_path: Path, mosquitto_executable: str, digits: DigitsBundles) -> Iterator[Fleet]:
    with running_fleet(tmp_path, mosquitto_executable) as fleet:
        for bundle in (digits.v1, digits.v2):
            fleet.upload(bundle.folder, bundle.public_key)
        yield fleet


@pytest.fixture
def sample(digits: DigitsBundles) -> tuple[list[object], int]:
    data = np.load(digits.eval_npz)
    return data["x"][0].tolist(), int(data["y"][0])


def _states(fleet: Fleet, device_id: str, seq: int) -> list[str]:
    return [state for s, state, _, _ in fleet.reports(device_id) if s == seq]


def test_an_agent_converges_on_its_desired_model_and_reports_telemetry(
    fleet: Fleet, digits: DigitsBundles, tmp_path: Path, sample: tuple[list[object], int]
) -> None:
    device_id, agent = enroll_agent(
        fleet, tmp_path / "agent", digits.v1.public_key, "lab", **FAST_TELEMETRY
    )
    agent.start()
    try:
        assert agent.serving() is None
        desired = fleet.desire(device_id, "digits", "1.0.0")
        eventually(lambda: agent.serving() == "1.0.0")
        eventually(lambda: "active" in _states(fleet, device_id, desired["seq"]))
        assert _states(fleet, device_id, desired["seq"]) == [
            "downloading",
            "verifying",
            "installing",
            "self_testing",
            "switching",
            "active",
        ]
        inputs, label = sample
        answer = agent.predict(inputs).json()
        assert (answer["model"]["version"], answer["top1"]) == ("1.0.0", label)
        eventually(lambda: fleet.device(device_id)["model_version"] == "1.0.0")
        # Telemetry: health every batch, and the inference window that saw the request.
        eventually(lambda: fleet.sql("SELECT count(*) FROM health_samples")[0][0] >= 2)
        eventually(
            lambda: (
                fleet.sql("SELECT sum(count) FROM inference_windows WHERE model_version = '1.0.0'")[
                    0
                ][0]
                == 1
            )
        )
        status = agent.status()
        assert (status["device_id"], status["model"]) == (device_id, "digits 1.0.0")
        assert status["update_state"] == "active"
    finally:
        agent.stop()
    online = fleet.device(device_id)["status"]
    assert online == "offline"  # a clean stop says so itself


def test_an_agent_takes_a_free_port_keeps_it_and_exits_clearly_when_it_is_taken(
    fleet: Fleet, digits: DigitsBundles, tmp_path: Path
) -> None:
    _, agent = enroll_agent(fleet, tmp_path / "agent", digits.v1.public_key)
    agent.start()  # --api-port 0: the agent picks the port and says which
    port = agent.api_port
    try:
        assert port != 0
        assert agent.serving() is None
    finally:
        agent.stop()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(RuntimeError, match=r"could not start: .*Address already in use"):
            agent.start()
        assert agent.wait_exit() == 2
    agent.start()
    try:
        assert agent.api_port == port
        assert agent.serving() is None
    finally:
        agent.stop()


def test_a_native_crash_leaves_every_thread_s_python_stack_in_the_log(
    fleet: Fleet, digits: DigitsBundles, tmp_path: Path
) -> None:
    _, agent = enroll_agent(fleet, tmp_path / "agent", digits.v1.public_key)
    agent.start()
    assert agent.process is not None
    agent.process.send_signal(signal.SIGSEGV)  # what a fault in the interpreter raises
    assert agent.wait_exit() == -signal.SIGSEGV
    log = agent.log_path.read_text()
    assert "Fatal Python error: Segmentation fault" in log
    assert "most recent call first" in log


def test_an_update_switches_models_and_a_downgrade_needs_a_rollback(
    fleet: Fleet, digits: DigitsBundles, tmp_path: Path, sample: tuple[list[object], int]
) -> None:
    state_dir, key = tmp_path / "agent", digits.v1.public_key
    device_id, agent = agent_serving(fleet, state_dir, key, "digits", "1.0.0")
    try:
        fleet.desire(device_id, "digits", "2.0.0")
        eventually(lambda: agent.serving() == "2.0.0")
        inputs, label = sample
        assert agent.predict(inputs).json()["top1"] == label  # the int8 model answers too
        down = fleet.desire(device_id, "digits", "1.0.0")
        eventually(lambda: "rejected" in _states(fleet, device_id, down["seq"]))
        reason = [r for s, state, _, r in fleet.reports(device_id) if s == down["seq"]][-1]
        assert "older than the running 2.0.0" in reason
        assert agent.serving() == "2.0.0"
        back = fleet.desire(device_id, "digits", "1.0.0", rollback=True)
        eventually(lambda: "active" in _states(fleet, device_id, back["seq"]))
        assert agent.serving() == "1.0.0"
    finally:
        agent.stop()


def test_telemetry_sent_while_the_broker_is_down_arrives_once_and_in_full(
    fleet: Fleet, digits: DigitsBundles, tmp_path: Path
) -> None:
    state_dir = tmp_path / "agent"
    device_id, agent = enroll_agent(
        fleet, state_dir, digits.v1.public_key, **{"EDGE_AGENT_TELEMETRY_INTERVAL_S": "0.2"}
    )
    # A known first sequence number, so a lost first batch would show too.
    (state_dir / "counters.json").write_text(json.dumps({"telemetry_seq": 1000}))
    agent.start()
    try:
        eventually(lambda: len(_telemetry_seqs(fleet, device_id)) >= 3)
        fleet.broker.stop()  # SIGTERM: Mosquitto saves its sessions and queues
        # Batches pile up on disk while the broker is away.
        piled_up = eventually(lambda: max(agent.status()["outbox_depth"] - 4, 0)) + 4
        fleet.broker.start()
        eventually(lambda: agent.status()["outbox_depth"] < 2, timeout=60)
    finally:
        agent.stop()
    last = json.loads((state_dir / "counters.json").read_text())["telemetry_seq"]
    left = agent.status()["outbox_depth"]

    def delivered() -> list[int]:
        return _telemetry_seqs(fleet, device_id)

    # What is left in the outbox may have reached the server too, unacknowledged at the stop.
    eventually(lambda: len(delivered()) >= last - 1000 - left)
    seqs = delivered()
    assert seqs == list(range(1001, 1001 + len(seqs)))  # from the first, no gap, none twice
    assert seqs[-1] >= last - left
    query = "SELECT count(*) FROM health_samples WHERE device_id = :d"
    health_rows = fleet.sql(query, d=device_id)[0][0]
    assert health_rows == len(delivered())  # each batch stored once
    assert piled_up >= 5


def _telemetry_seqs(fleet: Fleet, device_id: str) -> list[int]:
    query = "SELECT seq FROM seen_messages WHERE device_id = :d AND stream = 'telemetry'"
    return [seq for (seq,) in fleet.sql(query + " ORDER BY seq", d=device_id)]


def test_a_malformed_desired_state_is_refused_and_reported(
    fleet: Fleet, digits: DigitsBundles, tmp_path: Path
) -> None:
    state_dir, key = tmp_path / "agent", digits.v1.public_key
    device_id, agent = agent_serving(fleet, state_dir, key, "digits", "1.0.0")
    try:
        # Only the server may write a desired state; it is the one that could send garbage.
        server = load_server_credentials(fleet.data_dir / "broker" / CREDENTIALS_FILE)
        sender = DeviceClient("127.0.0.1", fleet.broker.port, server.username, server.password)
        assert sender.connect(), sender.connect_reason
        sender.publish(Topics().desired(device_id), b'{"schema_version": 1, "seq": "two"}')
        sender.close()

        def refusal() -> str | None:
            rows = [r for s, state, _, r in fleet.reports(device_id) if state == "rejected"]
            return rows[-1] if rows else None

        assert "DesiredState payload" in eventually(refusal)
        assert agent.serving() == "1.0.0"  # still serving, still listening
        fleet.desire(device_id, "digits", "2.0.0")
        eventually(lambda: agent.serving() == "2.0.0")
    finally:
        agent.stop()
