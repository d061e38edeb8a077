"""Staged rollouts: how long three waves take to reach every device, and what the server
spends on it, for fleets of 10, 100 and 1,000 simulated devices.

Each size gets a fresh Mosquitto configured by `broker-config` and a fresh
`fleet-server serve` on SQLite, its rollout controller stepping every
ROLLOUT_INTERVAL_S. The devices are enrolled through the API and simulated by a few
processes (spawned, so they share nothing with this one), each driving its paho clients
from one select loop: a simulated device speaks the real protocol over the real broker,
logged in as itself, and downloads the real artifact with its own credentials, but loads
nothing (no signature check, install or self-test).

Timed: `POST /api/v1/rollouts` to the rollout's `completed` state, and each wave from
the controller's own events. Measured on the server: the CPU time of `fleet-server serve`
and its child processes (the ingest process) over the rollout, and their resident memory.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import http.client
import math
import multiprocessing as mp
import os
import queue
import selectors
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from bench.workers import get_from
from devfleet.local import LocalFleet
from protocol.messages import (
    MESSAGE_SCHEMA_VERSION,
    Availability,
    DesiredState,
    ModelTarget,
    PayloadError,
    UpdateReport,
    UpdateState,
    decode_payload,
    encode_payload,
)
from protocol.mqtt import new_client
from protocol.topics import Topics

SIZES = (10, 100, 1_000)
MODEL_NAME = "digits"
MODEL_VERSION = "1.0.0"
# Per wave, a share of the target; the last wave takes whatever the others left.
WAVES = (10, 50, 100)
ROLLOUT_INTERVAL_S = 0.5  # EDGEFLEET_ROLLOUT_INTERVAL_S: the controller steps twice a second
POLL_S = 0.2
ROLLOUT_TIMEOUT_S = 300.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# One select loop keeps up with a few hundred mostly idle clients; beyond that, more
# processes. On two cores more would only fight the broker and the server for them.
DEVICES_PER_SWARM = 250
MAX_SWARMS = 4
DOWNLOAD_THREADS = 8  # per swarm process: concurrent downloads, each its own connection
ENROL_THREADS = 4
KEEPALIVE_S = 60
CHUNK = 64 * 1024
AGENT_VERSION = "bench-rollout"

TOPICS = Topics()
SETTLED = ("completed", "rolled_back", "paused", "aborted")


@dataclass(frozen=True)
class Device:
    device_id: str
    secret: str


@dataclass(frozen=True)
class DeviceOutcome:
    """What one simulated device did, as it saw it."""

    device_id: str
    desired: int  # desired states naming a model that it handled
    downloads: int  # its own GETs whose bytes matched the manifest's sha256 and size
    reports: int  # update reports it published
    unacked: int  # of its publishes, those the broker never acknowledged
    state: str | None  # its last report's state
    deployment_id: str | None  # and that report's deployment
    active_at: float | None  # time.time() of its `active` report
    errors: tuple[str, ...]


@dataclass(frozen=True)
class RolloutRun:
    devices: int
    wave_sizes: tuple[int, ...]
    enrol_s: float  # enrolling every device through the API, one after another
    connect_s: float  # every simulated device connected and subscribed
    state: str  # the rollout's state when it settled (or the time ran out)
    total_s: float  # POST to `completed`, as polled
    # Per wave: the previous wave's `gates_passed` event (the first: `created`) to its own.
    wave_s: tuple[float, ...]
    last_active_s: float | None  # POST to the last device's `active` report
    cpu_s: float  # the server's processes, over the rollout
    rss_bytes: int  # the server's processes together, at the end of the rollout
    peak_rss_bytes: int  # the same, at their peak during the rollout
    downloads: int  # artifact downloads the devices made and verified
    broker_cpu_s: float  # Mosquitto over the rollout, for context: it shares the cores
    devices_cpu_s: float  # the simulated devices' processes, likewise
    problems: tuple[str, ...] = ()

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_s / self.total_s if self.total_s > 0 else 0.0

    @property
    def all_active(self) -> bool:
        return self.state == "completed" and not self.problems


@dataclass(frozen=True)
class RolloutFigures:
    machine: str
    artifact_bytes: int
    runs: tuple[RolloutRun, ...]


# --- a simulated device -------------------------------------------------------------------


def fetch_artifact(target: ModelTarget, auth: tuple[str, str]) -> str | None:
    """GET the artifact as the device, on a connection of its own; None if the bytes are
    the ones the desired state names, else why not."""
    parts = urlsplit(target.artifact_url)
    if parts.scheme != "http" or parts.hostname is None:
        return f"cannot download {target.artifact_url}: plain http only"
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    digest, size = hashlib.sha256(), 0
    try:
        connection.request("GET", parts.path, headers={"Authorization": f"Basic {token}"})
        response = connection.getresponse()
        if response.status != 200:
            return f"download refused: HTTP {response.status}"
        while block := response.read(CHUNK):
            digest.update(block)
            size += len(block)
    except (OSError, http.client.HTTPException) as exc:
        return f"download interrupted: {exc}"
    finally:
        connection.close()
    if size != target.size:
        return f"downloaded {size} bytes, the desired state names {target.size}"
    if digest.hexdigest() != target.sha256:
        return "the downloaded bytes do not match the desired state's sha256"
    return None


class _SimDevice:
    """One device's MQTT client and update bookkeeping. Everything here runs on its swarm's
    loop thread, so paho is never used from two threads."""

    def __init__(self, device: Device, swarm: _Swarm) -> None:
        self.device = device
        self.swarm = swarm
        self.subscribed = False
        self.running: ModelTarget | None = None
        self.last_seq = 0
        self.msg_id = 0
        self.unacked: set[int] = set()
        self.desired = self.downloads = 0
        self.state: str | None = None
        self.deployment_id: str | None = None
        self.active_at: float | None = None
        self.errors: list[str] = []
        self.client = new_client(device.device_id, device.device_id, device.secret)
        # As the agent does: the broker announces the device offline if it vanishes.
        offline = Availability(MESSAGE_SCHEMA_VERSION, "offline", time.time(), None)
        availability = TOPICS.availability(device.device_id)
        self.client.will_set(availability, encode_payload(offline), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, c: Any, u: Any, f: Any, reason: ReasonCode, p: Any) -> None:
        if reason.is_failure:
            self.errors.append(f"connection refused: {reason}")
            return
        # Retained: a desired state published while the device was away arrives now.
        self.client.subscribe(TOPICS.desired(self.device.device_id), qos=1)
        online = Availability(MESSAGE_SCHEMA_VERSION, "online", time.time(), AGENT_VERSION)
        self._publish(TOPICS.availability(self.device.device_id), encode_payload(online), True)

    def _on_subscribe(self, c: Any, u: Any, mid: int, codes: list[ReasonCode], p: Any) -> None:
        if any(code.is_failure for code in codes):
            self.errors.append(f"subscription refused: {codes}")
        else:
            self.subscribed = True

    def _on_publish(self, c: Any, u: Any, mid: int, reason: ReasonCode, p: Any) -> None:
        self.unacked.discard(mid)
        if reason.is_failure:
            self.errors.append(f"publish refused: {reason}")

    def _on_disconnect(self, c: Any, u: Any, f: Any, reason: ReasonCode, p: Any) -> None:
        if not self.swarm.stopping:
            self.errors.append(f"disconnected: {reason}")

    def _on_message(self, c: Any, u: Any, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return  # a cleared retained message
        try:
            desired = decode_payload(DesiredState, bytes(message.payload))
        except PayloadError as exc:
            self.errors.append(f"undecodable desired state: {exc}")
            return
        # A QoS 1 redelivery, or the retained copy of one already handled.
        if desired.seq <= self.last_seq:
            return
        self.last_seq = desired.seq
        self._apply(desired)

    def _apply(self, desired: DesiredState) -> None:
        target = desired.model
        if target is None:
            self.errors.append(f"desired state {desired.seq} names no model")
            return
        self.desired += 1
        if self.running is not None and self.running.sha256 == target.sha256:
            self._report(desired, UpdateState.ACTIVE, self.running)
            return
        self._report(desired, UpdateState.DOWNLOADING, self.running)
        self.swarm.download(self, desired)

    def downloaded(self, desired: DesiredState, error: str | None) -> None:
        """The swarm calls this on its loop thread once the download is done."""
        if desired.seq != self.last_seq:
            return  # superseded while downloading, as the agent drops a stale offer
        if error is not None:
            self._report(desired, UpdateState.FAILED, self.running, error)
            return
        self.downloads += 1
        for step in (UpdateState.VERIFYING, UpdateState.INSTALLING, UpdateState.SELF_TESTING):
            self._report(desired, step, self.running)
        if desired.mode == "shadow":
            # The candidate only listens in: the model running (and reported) stays.
            self._report(desired, UpdateState.SHADOW, self.running)
            return
        self._report(desired, UpdateState.SWITCHING, self.running)
        self.running = desired.model
        self._report(desired, UpdateState.ACTIVE, self.running)

    def _report(
        self,
        desired: DesiredState,
        state: UpdateState,
        model: ModelTarget | None,
        reason: str | None = None,
    ) -> None:
        self.msg_id += 1
        report = UpdateReport(
            schema_version=MESSAGE_SCHEMA_VERSION,
            msg_id=self.msg_id,
            ts=time.time(),
            deployment_id=desired.deployment_id,
            desired_seq=desired.seq,
            state=state,
            model_name=model.name if model else None,
            model_version=model.version if model else None,
            reason=reason,
            detail=None,
        )
        self._publish(TOPICS.reports(self.device.device_id), encode_payload(report), False)
        self.state, self.deployment_id = state.value, desired.deployment_id
        if state is UpdateState.ACTIVE:
            self.active_at = report.ts

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.errors.append(f"publish on {topic} failed: {mqtt.error_string(info.rc)}")
        else:
            self.unacked.add(info.mid)

    def outcome(self) -> DeviceOutcome:
        return DeviceOutcome(
            device_id=self.device.device_id,
            desired=self.desired,
            downloads=self.downloads,
            reports=self.msg_id,
            unacked=len(self.unacked),
            state=self.state,
            deployment_id=self.deployment_id,
            active_at=self.active_at,
            errors=tuple(self.errors),
        )


# --- a swarm: one process, many devices, one select loop ----------------------------------


@dataclass(frozen=True)
class _SwarmJob:
    host: str
    port: int
    devices: tuple[Device, ...]


class _Swarm:
    """paho's manual loop over every device's socket: a thread per client would leave a
    few hundred threads taking turns on one GIL. Downloads run on a small pool, and their
    results come back to the loop thread through a queue and a wake-up socket."""

    def __init__(self, job: _SwarmJob) -> None:
        self.job = job
        self.stopping = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._done: queue.SimpleQueue[tuple[_SimDevice, DesiredState, str | None]] = (
            queue.SimpleQueue()
        )
        self._pool = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="download")
        self._last_misc = time.monotonic()
        self.devices = [_SimDevice(device, self) for device in job.devices]

    def download(self, device: _SimDevice, desired: DesiredState) -> None:
        self._pool.submit(self._download, device, desired)

    def _download(self, device: _SimDevice, desired: DesiredState) -> None:
        assert desired.model is not None
        credentials = (device.device.device_id, device.device.secret)
        try:
            error = fetch_artifact(desired.model, credentials)
        except Exception as exc:  # a bug must still end in a report, as on the agent
            error = f"{type(exc).__name__}: {exc}"
        self._done.put((device, desired, error))
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for device in self.devices:
            device.client.connect(self.job.host, self.job.port, keepalive=KEEPALIVE_S)
            sock = device.client.socket()
            if sock is None:
                raise RuntimeError(f"device {device.device.device_id} has no socket")
            self._selector.register(sock.fileno(), selectors.EVENT_READ, device)
        while not all(device.subscribed for device in self.devices):
            failed = next((d for d in self.devices if d.errors), None)
            if failed is not None:
                raise RuntimeError(f"device {failed.device.device_id}: {failed.errors[0]}")
            if time.monotonic() > deadline:
                waiting = sum(not device.subscribed for device in self.devices)
                raise RuntimeError(f"{waiting} device(s) not subscribed after {timeout:g} s")
            self.turn(0.05)

    def turn(self, timeout: float) -> None:
        # Publishes made inside paho callbacks are only queued: write them out here.
        for device in self.devices:
            if device.client.want_write():
                device.client.loop_write()
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
            else:
                key.data.client.loop_read()
        while True:
            try:
                device, desired, error = self._done.get_nowait()
            except queue.Empty:
                break
            device.downloaded(desired, error)
        if time.monotonic() - self._last_misc >= 1.0:
            self._last_misc = time.monotonic()
            for device in self.devices:
                device.client.loop_misc()

    def run(self, stop: EventType) -> list[DeviceOutcome]:
        while not stop.is_set():
            self.turn(0.05)
        # Whatever the devices sent must have reached the broker before they report.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(d.unacked for d in self.devices) and time.monotonic() < deadline:
            self.turn(0.05)
        self.stopping = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        for device in self.devices:
            device.client.disconnect()
        return [device.outcome() for device in self.devices]


def _swarm_main(job: _SwarmJob, ready: Any, stop: EventType, done: Any) -> None:
    """A swarm process: connect every device, say so, run until `stop`, send outcomes."""
    try:
        swarm = _Swarm(job)
        swarm.connect(START_TIMEOUT_S)
    except Exception as exc:
        ready.put(f"{type(exc).__name__}: {exc}")
        return
    ready.put(None)
    try:
        done.put(swarm.run(stop))
    except Exception as exc:
        done.put(f"{type(exc).__name__}: {exc}")


class _Swarms:
    """The swarm processes, connected and listening once constructed."""

    def __init__(self, host: str, port: int, devices: Sequence[Device]) -> None:
        ctx = mp.get_context("spawn")
        self._ready = ctx.Queue()
        self._done = ctx.Queue()
        self._stop = ctx.Event()
        count = min(MAX_SWARMS, math.ceil(len(devices) / DEVICES_PER_SWARM))
        self._processes = [
            ctx.Process(
                target=_swarm_main,
                args=(_SwarmJob(host, port, tuple(devices[i::count])), *self._queues()),
                daemon=True,
            )
            for i in range(count)
        ]
        for process in self._processes:
            process.start()
        try:
            for _ in self._processes:
                error = self._get(self._ready, START_TIMEOUT_S)
                if error is not None:
                    raise RuntimeError(f"a device swarm did not start: {error}")
        except BaseException:
            self.close()
            raise

    def _queues(self) -> tuple[Any, EventType, Any]:
        return self._ready, self._stop, self._done

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p.pid is not None]

    def finish(self) -> list[DeviceOutcome]:
        """Stop every device once its publishes are acknowledged; what each one did."""
        self._stop.set()
        outcomes: list[DeviceOutcome] = []
        for _ in self._processes:
            found = self._get(self._done, STOP_TIMEOUT_S + 30)
            if isinstance(found, str):
                raise RuntimeError(f"a device swarm failed: {found}")
            outcomes.extend(found)
        return outcomes

    def close(self) -> None:
        self._stop.set()
        for process in self._processes:
            process.join(10)
            if process.is_alive():
                process.terminate()
                process.join(5)

    def _get(self, source: Any, timeout: float) -> Any:
        return get_from(source, self._processes, timeout, "device swarm")


@contextlib.contextmanager
def _swarms(host: str, port: int, devices: Sequence[Device]) -> Iterator[_Swarms]:
    swarms = _Swarms(host, port, devices)
    try:
        yield swarms
    finally:
        swarms.close()


# --- the server's processes, from /proc ---------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """`fleet-server serve` and its descendants at one instant, by pid."""

    cpu_ticks: dict[int, int]
    rss_bytes: dict[int, int]
    peak_rss_bytes: dict[int, int]


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on: the command name may hold spaces."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _status_kib(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    return 0


def cpu_ticks(pids: Sequence[int]) -> dict[int, int]:
    """utime + stime of each process still there, in clock ticks."""
    ticks = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(pid)
            ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def sample_usage(pid: int) -> Usage:
    ticks = cpu_ticks([pid, *_descendants(pid)])
    rss, peak = {}, {}
    for member in ticks:
        with contextlib.suppress(OSError, ValueError):
            rss[member] = _status_kib(member, "VmRSS") * 1024
            peak[member] = _status_kib(member, "VmHWM") * 1024
    return Usage(ticks, rss, peak)


def reset_peaks(pids: Sequence[int]) -> None:
    """Start VmHWM over at the current RSS (Linux 4.0+), so the peak is the rollout's and
    not the enrolment's; left as it is where the kernel refuses."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(before: dict[int, int], after: dict[int, int]) -> float:
    # A process that started in between counts from zero; one that ended is lost.
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return ticks / os.sysconf("SC_CLK_TCK")


# --- the fleet: broker and server ---------------------------------------------------------


class _Server(LocalFleet):
    def broker_pid(self) -> int:
        from fleet_server.mqtt.broker_config import PID_FILE

        return int((self.data_dir / "broker" / PID_FILE).read_text().split()[0])

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.pid


@contextlib.contextmanager
def _running_server(root: Path) -> Iterator[_Server]:
    server = _Server.start(root, rollout_interval_s=ROLLOUT_INTERVAL_S)
    try:
        yield server
    finally:
        server.stop()


def _wait(check: Callable[[], bool], timeout: float, failure: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{failure} within {timeout:g} s")
        time.sleep(every)


def _enroll(server: _Server, count: int) -> list[Device]:
    import httpx

    token = server.cli("enrollment", "create", "--uses", str(count), "--tags", "bench")
    with httpx.Client(base_url=server.base, timeout=60) as client:

        def one(index: int) -> Device:
            response = client.post(
                "/api/v1/enroll", json={"token": token, "name": f"bench-{index}"}
            )
            if response.status_code != 201:
                raise RuntimeError(f"enrolment failed: {response.status_code} {response.text}")
            body = response.json()
            return Device(body["device_id"], body["secret"])

        with ThreadPoolExecutor(ENROL_THREADS) as pool:
            return list(pool.map(one, range(count)))


def _bundle(models_dir: Path, root: Path) -> tuple[Path, Path]:
    """The digits reference model converted (float32) and signed by a new key; the
    bundle folder and the public key."""
    from protocol.signing import generate_keypair
    from toolchain.convert import ConvertOptions, QuietProgress, convert_model

    folder = models_dir / MODEL_NAME
    private, public = generate_keypair(root / "keys")
    out = root / "bundle"
    convert_model(
        ConvertOptions(
            src=folder / "model.keras",
            out=out,
            calibration=folder / "calibration.npz",
            evaluation=folder / "eval.npz",
            labels=folder / "labels.txt",
            name=MODEL_NAME,
            version=MODEL_VERSION,
            signing_key=private,
            bench_runs=10,
        ),
        QuietProgress(),
    )
    return out, public


# --- one rollout --------------------------------------------------------------------------


def rollout_body() -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "version": MODEL_VERSION,
        "target": {"all": True},
        "waves": [{"percent": percent, "bake_s": 0} for percent in WAVES],
        "gates": {"max_install_failure_ratio": 0.0},
    }


@dataclass(frozen=True)
class _Rolled:
    rollout_id: int
    state: str
    started_at: float  # time.time() just before the POST
    seconds: float
    before: Usage
    after: Usage
    others: dict[str, float]  # CPU seconds of the other processes watched, by label


def _roll_out(server: _Server, others: dict[str, list[int]]) -> _Rolled:
    import httpx

    others_before = {label: cpu_ticks(pids) for label, pids in others.items()}
    before = sample_usage(server.pid)
    reset_peaks(list(before.cpu_ticks))
    with httpx.Client(base_url=server.base, headers=server.admin, timeout=30) as client:
        started_at, start = time.time(), time.monotonic()
        response = client.post("/api/v1/rollouts", json=rollout_body())
        if response.status_code != 201:
            raise RuntimeError(f"the rollout was refused: {response.text}")
        rollout_id = int(response.json()["id"])
        # The list, not the rollout's own page: that one weighs every gate of the wave on
        # each call, which would load the server with the benchmark's own polling.
        state = "running"
        while state not in SETTLED and time.monotonic() - start < ROLLOUT_TIMEOUT_S:
            time.sleep(POLL_S)
            listed = client.get("/api/v1/rollouts").json()
            state = next(r["state"] for r in listed if r["id"] == rollout_id)
        seconds = time.monotonic() - start
    after = sample_usage(server.pid)
    spent = {
        label: cpu_seconds(others_before[label], cpu_ticks(pids)) for label, pids in others.items()
    }
    return _Rolled(rollout_id, state, started_at, seconds, before, after, spent)


def _events(server: _Server, rollout_id: int) -> list[dict[str, Any]]:
    import httpx

    response = httpx.get(
        f"{server.base}/api/v1/rollouts/{rollout_id}", headers=server.admin, timeout=60
    )
    response.raise_for_status()
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def wave_seconds(events: Sequence[dict[str, Any]], waves: int) -> tuple[float, ...]:
    """Each wave from the previous one's `gates_passed` (the first from `created`) to its
    own. Not from its `wave_started`: that event is stamped when the step that assigns
    the wave's devices commits, and that step is the wave's work too."""

    def first(kind: str, wave: int | None = None) -> dt.datetime | None:
        found = (e["ts"] for e in events if e["kind"] == kind and wave in (None, e["wave"]))
        ts = next(found, None)
        return None if ts is None else dt.datetime.fromisoformat(ts)

    seconds = []
    since = first("created")
    for wave in range(waves):
        passed = first("gates_passed", wave)
        if since is None or passed is None:
            break
        seconds.append((passed - since).total_seconds())
        since = passed
    return tuple(seconds)


def check_outcomes(
    outcomes: Sequence[DeviceOutcome], members: Sequence[tuple[Any, ...]]
) -> list[str]:
    """Every device active on the deployment its rollout row names, having handled one
    desired state and downloaded once, with one `active` report for it in the database.
    `members`: (device_id, state, deployment_id, active reports stored for it)."""
    rows = {row[0]: row for row in members}
    problems = []
    if len(rows) != len(outcomes) or set(rows) != {o.device_id for o in outcomes}:
        problems.append(f"the rollout holds {len(rows)} device(s), {len(outcomes)} were simulated")
    for outcome in outcomes:
        row = rows.get(outcome.device_id)
        name = outcome.device_id
        if outcome.errors:
            problems.append(f"{name}: {outcome.errors[0]}")
        elif row is None:
            problems.append(f"{name}: not in the rollout")
        elif outcome.state != "active" or outcome.deployment_id != row[2]:
            problems.append(f"{name}: last reported {outcome.state} for {outcome.deployment_id}")
        elif (outcome.desired, outcome.downloads) != (1, 1):
            problems.append(f"{name}: {outcome.desired} desired states, {outcome.downloads} GETs")
        elif outcome.unacked:
            problems.append(f"{name}: {outcome.unacked} publishes never acknowledged")
        elif row[1] != "active":
            problems.append(f"{name}: the server has it {row[1]}")
        elif row[3] != 1:
            problems.append(f"{name}: the server stored {row[3]} active reports for {row[2]}")
    return problems


def _members(server: _Server, rollout_id: int) -> list[tuple[Any, ...]]:
    return server.sql(
        "SELECT rd.device_id, rd.state, rd.deployment_id, "
        "(SELECT COUNT(*) FROM update_reports ur WHERE ur.device_id = rd.device_id "
        "AND ur.deployment_id = rd.deployment_id AND ur.state = 'active') "
        "FROM rollout_devices rd WHERE rd.rollout_id = :r",
        r=rollout_id,
    )


def measure_one(
    root: Path, bundle: Path, public_key: Path, devices: int, progress: Callable[[str], None]
) -> RolloutRun:
    with _running_server(root) as server:
        start = time.monotonic()
        fleet = _enroll(server, devices)
        enrol_s = time.monotonic() - start
        server.upload(bundle, public_key)
        start = time.monotonic()
        with _swarms(server.broker.host, server.broker.port, fleet) as swarms:
            connect_s = time.monotonic() - start
            # Every `online` stored first, so the rollout's figures hold the rollout only.
            online = "SELECT COUNT(*) FROM devices WHERE status = 'online'"
            _wait(lambda: server.sql(online)[0][0] == devices, START_TIMEOUT_S, "not online")
            progress(f"{devices} devices: enrolled in {enrol_s:.1f} s, rolling out")
            rolled = _roll_out(server, {"broker": [server.broker_pid()], "devices": swarms.pids})
            outcomes = swarms.finish()
        events = _events(server, rolled.rollout_id)
        problems = check_outcomes(outcomes, _members(server, rolled.rollout_id))
    created = next((e for e in events if e["kind"] == "created"), None)
    active = [o.active_at for o in outcomes if o.active_at is not None]
    return RolloutRun(
        devices=devices,
        wave_sizes=tuple(created["details"]["wave_sizes"]) if created else (),
        enrol_s=enrol_s,
        connect_s=connect_s,
        state=rolled.state,
        total_s=rolled.seconds,
        wave_s=wave_seconds(events, len(WAVES)),
        last_active_s=max(active) - rolled.started_at if active else None,
        cpu_s=cpu_seconds(rolled.before.cpu_ticks, rolled.after.cpu_ticks),
        rss_bytes=sum(rolled.after.rss_bytes.values()),
        peak_rss_bytes=sum(rolled.after.peak_rss_bytes.values()),
        downloads=sum(o.downloads for o in outcomes),
        broker_cpu_s=rolled.others["broker"],
        devices_cpu_s=rolled.others["devices"],
        problems=tuple(problems),
    )


def measure(
    models_dir: Path,
    *,
    sizes: Sequence[int] = SIZES,
    progress: Callable[[str], None] = lambda _: None,
) -> RolloutFigures:
    from toolchain.convert import machine_description

    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        root = Path(tmp)
        progress("converting and signing the digits model")
        bundle, public_key = _bundle(models_dir, root)
        artifact_bytes = (bundle / "model.tflite").stat().st_size
        runs = tuple(
            measure_one(root / f"fleet-{size}", bundle, public_key, size, progress)
            for size in sizes
        )
    return RolloutFigures(machine_description(), artifact_bytes, runs)


# --- BENCHMARKS.md ------------------------------------------------------------------------


def _row(run: RolloutRun) -> str:
    mib = 1024 * 1024
    waves = " / ".join(f"{s:.2f}" for s in run.wave_s) or "-"
    return (
        f"| {run.devices} | {run.total_s:.2f} | {waves} | {run.cpu_s:.2f} "
        f"| {run.cpu_percent:.0f} % | {run.rss_bytes / mib:.1f} ({run.peak_rss_bytes / mib:.1f}) "
        f"| {'yes' if run.all_active else 'no'} |"
    )


def _notes(run: RolloutRun) -> list[str]:
    sizes = " / ".join(str(size) for size in run.wave_sizes) or "?"
    last = "-" if run.last_active_s is None else f"{run.last_active_s:.2f} s"
    lines = [
        f"- {run.devices} devices: waves of {sizes}; enrolled in {run.enrol_s:.1f} s "
        f"({run.devices / run.enrol_s:.0f} a second), connected and subscribed in "
        f"{run.connect_s:.1f} s; {run.downloads} downloads verified; the last `active` "
        f"report {last} after the POST; the rollout ended `{run.state}`. Meanwhile "
        f"Mosquitto used {run.broker_cpu_s:.2f} CPU seconds and the simulated devices "
        f"{run.devices_cpu_s:.2f}."
    ]
    if run.problems:
        shown = "; ".join(run.problems[:3])
        more = f" (and {len(run.problems) - 3} more)" if len(run.problems) > 3 else ""
        lines.append(f"- {run.devices} devices, NOT all active: {shown}{more}")
    return lines


def markdown(figures: RolloutFigures) -> list[str]:
    shares = ", ".join(f"{p} %" for p in WAVES[:-1])
    return [
        "## Rollouts: three waves to every device",
        "",
        "Each size has a fresh Mosquitto configured by `broker-config` and a fresh "
        "`fleet-server serve` on SQLite, its rollout controller stepping every "
        f"{ROLLOUT_INTERVAL_S:g} s (`EDGEFLEET_ROLLOUT_INTERVAL_S`). Devices are enrolled "
        "through `POST /api/v1/enroll` and simulated, up to "
        f"{DEVICES_PER_SWARM} per process in at most {MAX_SWARMS} processes: each is a paho "
        "MQTT v5 client logged in as itself that subscribes to its desired topic and "
        "announces itself online; on a desired state it reports `downloading`, downloads "
        "the artifact itself over HTTP with its own Basic credentials (the signed digits "
        f"bundle, float32, {figures.artifact_bytes} bytes), checks its size and sha256, "
        "then reports `verifying`, `installing`, `self_testing`, `switching` and `active` "
        "at QoS 1, as `edge-agent` does, but without loading the model (no signature "
        "check, install or self-test, which run on each device in a real fleet). The "
        "rollout is `POST /api/v1/rollouts` to every device in three waves "
        f"({shares} of the fleet, then the rest; no bake time; install-failure gate at 0). "
        f"Total = POST to `completed` (polled every {POLL_S:g} s); a wave = from the "
        "previous wave's `gates_passed` event (the first: `created`) to its own, which "
        "holds the controller's wait for its next tick, assigning the wave's devices and "
        "publishing their desired states, the devices' downloads and reports, and the "
        "gate. Server CPU = user + system time of "
        "`fleet-server serve` and its child processes (the ingest process) from the POST "
        "to completion, and that as a share of the wall time (100 % = one core busy "
        "throughout); RSS = their resident memory together at completion, and their peak "
        "over the rollout. "
        "The simulated devices and the broker run on the same cores as the server. "
        "All devices active = the rollout completed and every device's last report was "
        "`active` on the deployment its wave names, after one download of its own, with "
        "the server holding it `active` and one `active` report for it.",
        "",
        "| devices | total seconds | per-wave seconds | server CPU seconds | server CPU % "
        "| server RSS MiB (peak) | all devices active |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *(_row(run) for run in figures.runs),
        "",
        *(line for run in figures.runs for line in _notes(run)),
        "",
        f"Measured on {figures.machine}.",
        "",
    ]


__all__ = [
    "DeviceOutcome",
    "RolloutFigures",
    "RolloutRun",
    "check_outcomes",
    "markdown",
    "measure",
    "wave_seconds",
]
