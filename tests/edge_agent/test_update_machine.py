"""The update machine in-process, against a real local HTTP file server and real digits
bundles: every kind of bad update is refused with a reason, and the model that was
serving keeps serving."""

from __future__ import annotations

import dataclasses
import functools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from edge_agent.counters import COUNTERS_FILE, Counters
from edge_agent.loaded_model import load_model
from edge_agent.serving import Predictor
from edge_agent.update import steps
from edge_agent.update.machine import (
    MAX_ATTEMPTS,
    Record,
    UpdateMachine,
    load_record,
    save_record,
)
from edge_agent.update.states import RESTING, TRANSITIONS, Event, next_state
from edge_agent.verify_signature import verify_in_child
from protocol.manifest import ArrayData, SignedManifest, read_manifest
from protocol.messages import DesiredState, ModelTarget, UpdateReport, UpdateState
from protocol.schema import encode
from protocol.signing import (
    TrustedKey,
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_manifest,
)
from tests.bundles import Bundle, DigitsBundles

S = UpdateState


@dataclass
class ArtifactServer:
    """Serves bytes by name, with Range; can misbehave in the ways networks do."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_first: dict[str, int] = field(default_factory=dict)  # first response stops here
    cut_always: dict[str, int] = field(default_factory=dict)
    unavailable_for: int = 0  # this many requests get a 503 first, as a restarting server's
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (name, Range)
    port: int = 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/artifacts/{name}"


def _handler(server: ArtifactServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            server.requests.append((name, self.headers.get("Range")))
            if server.unavailable_for > 0:
                server.unavailable_for -= 1
                self.send_error(503)
                return
            body = server.files.get(name)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            cut = server.cut_always.get(name) or server.cut_first.pop(name, None)
            self.wfile.write(body[start:cut] if cut is not None else body[start:])

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def artifacts() -> Iterator[ArtifactServer]:
    server = ArtifactServer()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    server.port = http.server_address[1]
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield server
    http.shutdown()
    http.server_close()


@dataclass
class Device:
    machine: UpdateMachine
    predictor: Predictor
    reports: list[UpdateReport]
    state_dir: Path

    def serving(self) -> str | None:
        return self.predictor.active.version if self.predictor.active else None

    def states(self, seq: int) -> list[UpdateState]:
        return [r.state for r in self.reports if r.desired_seq == seq]

    def reason(self, seq: int) -> str:
        return next(r.reason for r in reversed(self.reports) if r.desired_seq == seq) or ""


# Short, so that a download that keeps failing gives up within a test's time: 0.5 s, then
# 1 s between tries, and no third wait.
PATIENCE_S = 2.0


def _device(state_dir: Path, key: TrustedKey, patience_s: float = PATIENCE_S) -> Device:
    predictor = Predictor()
    reports: list[UpdateReport] = []
    machine = UpdateMachine(
        state_dir,
        predictor,
        (key,),
        ("dev-1", "secret"),
        64 << 20,
        reports.append,
        load_model,
        counters=Counters(state_dir / COUNTERS_FILE),
        download_patience_s=patience_s,
    )
    machine.boot()
    return Device(machine, predictor, reports, state_dir)


@pytest.fixture
def device(tmp_path: Path, digits: DigitsBundles) -> Device:
    return _device(tmp_path / "agent", load_public_key(digits.v1.public_key))


_SEQ = iter(range(1, 10_000))


def desired(
    bundle: Bundle,
    artifacts: ArtifactServer,
    *,
    signed: SignedManifest | None = None,
    mode: str = "active",
    rollback: bool = False,
    expires_in: float = 3600.0,
) -> DesiredState:
    signed = signed or read_manifest(bundle.folder)
    manifest = signed.manifest
    name = f"{manifest.name}-{manifest.version}.tflite"
    artifacts.files.setdefault(name, (bundle.folder / manifest.model.path).read_bytes())
    now = time.time()
    target = ModelTarget(
        manifest.name,
        manifest.version,
        manifest.model.sha256,
        manifest.model.size,
        artifacts.url(name),
        encode(signed),
    )
    return DesiredState(1, next(_SEQ), now, now + expires_in, "dep-1", mode, rollback, target)  # type: ignore[arg-type]


def _serving_v1(device: Device, digits: DigitsBundles, artifacts: ArtifactServer) -> None:
    assert device.machine.apply(desired(digits.v1, artifacts)) is S.ACTIVE
    assert device.serving() == "1.0.0"


def test_an_update_downloads_verifies_self_tests_and_switches(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    _serving_v1(device, digits, artifacts)
    update = desired(digits.v2, artifacts)
    assert device.machine.apply(update) is S.ACTIVE
    assert device.states(update.seq) == [
        S.DOWNLOADING,
        S.VERIFYING,
        S.INSTALLING,
        S.SELF_TESTING,
        S.SWITCHING,
        S.ACTIVE,
    ]
    assert device.serving() == "2.0.0"
    assert [r.model_version for r in device.reports][-1] == "2.0.0"
    # The record is on disk: a restarted agent serves what `current` points at.
    again = _device(device.state_dir, load_public_key(digits.v1.public_key))
    assert again.serving() == "2.0.0"
    assert load_record(device.state_dir / "update.json")[0].state is S.ACTIVE


def test_a_dropped_download_resumes_with_a_range_request(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    update = desired(digits.v1, artifacts)
    name = next(iter(artifacts.files))
    artifacts.cut_first[name] = 5000
    assert device.machine.apply(update) is S.ACTIVE
    assert artifacts.requests == [(name, None), (name, "bytes=5000-")]


def test_a_server_that_answers_503_for_a_while_is_waited_for(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    update = desired(digits.v1, artifacts)
    artifacts.unavailable_for = 2  # a restart: the waits of 0.5 s and 1 s ride it out
    assert device.machine.apply(update) is S.ACTIVE
    assert len(artifacts.requests) == 3
    assert device.serving() == "1.0.0"


def test_a_download_that_never_gets_through_fails_once_patience_is_spent(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    _serving_v1(device, digits, artifacts)
    update = desired(digits.v2, artifacts)
    artifacts.unavailable_for = 1_000
    started = time.monotonic()
    assert device.machine.apply(update) is S.FAILED
    # Tries at 0, 0.5 and 1.5 s; the next wait (2 s) would end past the 2 s of patience.
    assert "HTTP 503" in device.reason(update.seq)
    assert "gave up after 3 tries" in device.reason(update.seq)
    assert time.monotonic() - started < 30  # no wait beyond the patience
    assert device.serving() == "1.0.0"


def _unreachable(update: DesiredState) -> DesiredState:
    """`update` pointing at a port where nothing listens: every try is refused."""
    assert update.model is not None
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"http://127.0.0.1:{port}/artifacts/model.tflite"
    return dataclasses.replace(update, model=dataclasses.replace(update.model, artifact_url=url))


def test_a_newer_desired_state_cuts_a_retrying_download_short(
    tmp_path: Path, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    device = _device(tmp_path / "agent", load_public_key(digits.v1.public_key), patience_s=600)
    stuck = _unreachable(desired(digits.v1, artifacts))
    newer = desired(digits.v2, artifacts)
    handled = threading.Thread(target=device.machine.apply, args=(stuck,))
    handled.start()
    _until(lambda: S.DOWNLOADING in device.states(stuck.seq))
    device.machine.offer(newer)  # from the fleet, while the first waits between tries
    handled.join(timeout=30)
    assert not handled.is_alive()
    assert device.states(stuck.seq)[-1] is S.FAILED
    assert device.reason(stuck.seq) == f"superseded by desired state {newer.seq}"
    assert device.machine.apply(newer) is S.ACTIVE
    assert device.serving() == "2.0.0"


def test_stopping_during_a_retried_download_leaves_it_to_resume(
    tmp_path: Path, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    state_dir = tmp_path / "agent"
    device = _device(state_dir, load_public_key(digits.v1.public_key), patience_s=600)
    update = desired(digits.v1, artifacts)
    stuck = _unreachable(update)
    device.machine.start()
    device.machine.offer(stuck)
    _until(lambda: S.DOWNLOADING in device.states(stuck.seq))
    started = time.monotonic()
    device.machine.stop(timeout=30)
    assert time.monotonic() - started < 10  # the wait between tries was cut short
    # Not failed: the record says downloading, and the next start takes it up again.
    assert device.states(stuck.seq)[-1] is S.DOWNLOADING
    assert load_record(state_dir / "update.json")[0].state is S.DOWNLOADING
    again = _device(state_dir, load_public_key(digits.v1.public_key))
    assert again.machine.interrupted


def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("damage", "state", "reason"),
    [
        ("flip", S.FAILED, "does not match the manifest"),
        ("truncate", S.FAILED, "the download stopped at"),
        ("grow", S.FAILED, "bytes the manifest names"),
        ("missing", S.FAILED, "HTTP 404"),
    ],
)
def test_a_bad_artifact_fails_and_the_old_model_keeps_serving(
    device: Device,
    digits: DigitsBundles,
    artifacts: ArtifactServer,
    damage: str,
    state: UpdateState,
    reason: str,
) -> None:
    _serving_v1(device, digits, artifacts)
    update = desired(digits.v2, artifacts)
    assert update.model is not None
    name = update.model.artifact_url.rsplit("/", 1)[-1]
    good = artifacts.files[name]
    if damage == "flip":
        artifacts.files[name] = good[:-1] + bytes([good[-1] ^ 0xFF])
    elif damage == "truncate":
        artifacts.cut_always[name] = len(good) // 2
    elif damage == "grow":
        artifacts.files[name] = good + b"\0" * 4096
    else:
        del artifacts.files[name]
    assert device.machine.apply(update) is state
    assert reason in device.reason(update.seq)
    assert device.serving() == "1.0.0"
    assert not list((device.state_dir / "downloads").iterdir())  # nothing half-kept


def _resigned(bundle: Bundle, change: object, key_path: Path) -> SignedManifest:
    manifest = read_manifest(bundle.folder).manifest
    return sign_manifest(dataclasses.replace(manifest, **change), load_private_key(key_path))  # type: ignore[arg-type]


def test_a_manifest_changed_after_signing_is_rejected_before_any_download(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    _serving_v1(device, digits, artifacts)
    signed = read_manifest(digits.v2.folder)
    changed = SignedManifest(
        dataclasses.replace(signed.manifest, labels=tuple("abcdefghij")), signed.signatures
    )
    requests = len(artifacts.requests)
    update = desired(digits.v2, artifacts, signed=changed)
    assert device.machine.apply(update) is S.REJECTED
    assert "does not verify" in device.reason(update.seq)
    assert len(artifacts.requests) == requests
    assert device.serving() == "1.0.0"


def test_a_manifest_signed_by_an_unknown_key_is_rejected(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer, tmp_path: Path
) -> None:
    _serving_v1(device, digits, artifacts)
    private, _ = generate_keypair(tmp_path / "stranger")
    update = desired(digits.v2, artifacts, signed=_resigned(digits.v2, {}, private))
    assert device.machine.apply(update) is S.REJECTED
    assert "none of which is trusted" in device.reason(update.seq)
    assert device.serving() == "1.0.0"


def test_a_signature_check_that_gives_no_answer_fails_the_update(
    device: Device,
    digits: DigitsBundles,
    artifacts: ArtifactServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _serving_v1(device, digits, artifacts)
    # The child that checks signatures cannot start (a broken install, say): not a pass.
    unstartable = functools.partial(verify_in_child, executable=str(tmp_path / "no-python"))
    monkeypatch.setattr(steps, "verify_in_child", unstartable)
    requests = len(artifacts.requests)
    update = desired(digits.v2, artifacts)
    assert device.machine.apply(update) is S.FAILED
    assert "the signature check could not start" in device.reason(update.seq)
    assert len(artifacts.requests) == requests
    assert device.serving() == "1.0.0"


def test_a_model_that_fails_its_self_test_is_never_switched_to(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    _serving_v1(device, digits, artifacts)
    test = read_manifest(digits.v2.folder).manifest.self_test
    assert test is not None
    wrong = [
        dataclasses.replace(
            v, expected=tuple(ArrayData.from_array(1 - e.to_array()) for e in v.expected)
        )
        for v in test.vectors
    ]
    bad_test = dataclasses.replace(test, vectors=tuple(wrong))
    signed = _resigned(digits.v2, {"self_test": bad_test}, digits.v2.private_key)
    update = desired(digits.v2, artifacts, signed=signed)
    assert device.machine.apply(update) is S.FAILED
    assert "self-test vector 0" in device.reason(update.seq)
    assert device.serving() == "1.0.0"


def test_an_expired_desired_state_is_rejected(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    update = desired(digits.v1, artifacts, expires_in=0.01)
    time.sleep(0.05)  # held back on the way, say
    assert device.machine.apply(update) is S.REJECTED
    assert "expired" in device.reason(update.seq)
    assert device.serving() is None


def test_an_upgraded_agent_numbers_its_reports_above_the_ones_its_record_kept(
    tmp_path: Path, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    last = 10**15  # later than now in milliseconds: the device's clock is behind
    (state_dir / "update.json").write_text(json.dumps({"state": "idle", "msg_id": last}))
    device = _device(state_dir, load_public_key(digits.v1.public_key))
    device.machine.apply(desired(digits.v1, artifacts))
    assert [r.msg_id for r in device.reports] == list(
        range(last + 1, last + 1 + len(device.reports))
    )


def test_a_desired_state_seen_again_is_not_applied_twice(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    update = desired(digits.v1, artifacts)
    device.machine.apply(update)
    count = len(device.reports)
    assert device.machine.apply(update) is S.ACTIVE
    assert len(device.reports) == count


def test_shadow_runs_the_candidate_beside_the_active_model_then_promotes_it(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    _serving_v1(device, digits, artifacts)
    shadow = desired(digits.v2, artifacts, mode="shadow")
    assert device.machine.apply(shadow) is S.SHADOW
    assert device.serving() == "1.0.0"
    assert device.predictor.shadow is not None
    assert device.predictor.shadow.version == "2.0.0"
    image = np.load(digits.eval_npz)["x"][0]
    assert device.predictor.predict(image).model_version == "1.0.0"  # only the active answers
    requests = len(artifacts.requests)
    promote = desired(digits.v2, artifacts)
    assert device.machine.apply(promote) is S.ACTIVE
    assert device.states(promote.seq) == [S.SWITCHING, S.ACTIVE]  # installed already
    assert len(artifacts.requests) == requests
    assert device.serving() == "2.0.0"
    assert device.predictor.shadow is None


def test_every_working_state_has_a_way_out_on_failure() -> None:
    for state in UpdateState:
        if state not in RESTING or state is S.IDLE:
            assert (state, Event.FAILED) in TRANSITIONS, state
    assert next_state(S.SWITCHING, Event.FAILED) is S.ROLLING_BACK


def test_an_update_cut_off_before_its_first_step_is_taken_up_again(
    tmp_path: Path, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    update = desired(digits.v1, artifacts)
    state_dir = tmp_path / "agent"
    state_dir.mkdir()
    # What a power cut right after taking the desired state up leaves on disk.
    save_record(state_dir / "update.json", Record(S.IDLE, encode(update), update.seq))
    device = _device(state_dir, load_public_key(digits.v1.public_key))
    assert device.machine.interrupted
    device.machine.resume()
    assert device.serving() == "1.0.0"
    assert device.states(update.seq)[-1] is S.ACTIVE


def test_a_step_that_keeps_dying_fails_instead_of_looping(
    device: Device, digits: DigitsBundles, artifacts: ArtifactServer
) -> None:
    _serving_v1(device, digits, artifacts)
    update = desired(digits.v2, artifacts)
    record = Record(S.DOWNLOADING, encode(update), update.seq, attempts=MAX_ATTEMPTS)
    save_record(device.state_dir / "update.json", record)
    again = _device(device.state_dir, load_public_key(digits.v1.public_key))
    again.machine.resume()  # the fourth start of the same step
    assert again.machine.record.state is S.FAILED
    assert f"interrupted {MAX_ATTEMPTS} times" in again.reason(update.seq)
    assert again.serving() == "1.0.0"
