"""Drives a desired state through the transition table, saving where it is before each step.

The record (`update.json`) is written atomically before a step's side effects begin, so
after a power cut at any point the agent knows which step was under way and runs it again
(every step can be repeated) or, past MAX_ATTEMPTS, gives up into `failed` or a rollback:
a crash loop cannot brick the device. Every transition is reported, and every desired
state ends in a terminal report.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common.files import write_atomic
from edge_agent.counters import Counter, Counters
from edge_agent.loaded_model import LoadedModel
from edge_agent.serving import Predictor
from edge_agent.slots import MANIFEST, Slots
from edge_agent.update.report import update_report
from edge_agent.update.states import RESTING, Event, next_state
from edge_agent.update.steps import (
    Interrupted,
    Refused,
    Running,
    StepError,
    check_desired,
    download,
    load_error,
    self_test,
    verify,
)
from protocol.manifest import manifest_to_json
from protocol.messages import (
    DesiredState,
    ModelTarget,
    UpdateReport,
    UpdateState,
)
from protocol.schema import decode, encode
from protocol.signing import TrustedKey

log = logging.getLogger("edge_agent.update")

RECORD_FILE = "update.json"
MAX_ATTEMPTS = 3
# A download cut off (a flaky link, a server restarting behind it, an HTTP 5xx) is tried
# again, each try resuming where the last stopped, with waits doubling from
# DOWNLOAD_BACKOFF_S up to DOWNLOAD_BACKOFF_MAX_S, for up to `download_patience_s`
# (agent.toml, 5 minutes by default). A server restart is ridden out; a dead one fails
# the update well within the fleet's device timeout (15 minutes by default).
DOWNLOAD_BACKOFF_S = 0.5
DOWNLOAD_BACKOFF_MAX_S = 30.0
# Fault injection for the crash tests: "<state>:before" kills the agent right after it
# saved `state` (before the step runs), "<state>:after" once the step is done (before the
# next state is saved). SIGKILL, as a power cut: no cleanup runs.
FAULT_ENV = "EDGE_AGENT_FAULT"

S = UpdateState


@dataclass(frozen=True)
class Record:
    state: UpdateState = S.IDLE
    desired: dict[str, Any] | None = None  # the desired state being handled, as received
    seq: int = 0  # the highest desired-state seq taken up
    attempts: int = 0  # starts of the current step; reset on each transition
    previous_slot: str | None = None  # what served before the switch: the rollback target
    candidate_slot: str | None = None
    reason: str | None = None


def load_record(path: Path) -> tuple[Record, int]:
    """The saved record, and the last report number an earlier version kept in it (0 if
    none): reports are numbered in counters.json now, which must carry on above it."""
    if not path.exists():
        return Record(), 0
    data = json.loads(path.read_text(encoding="utf-8"))
    data["state"] = UpdateState(data["state"])
    last_msg_id = int(data.pop("msg_id", 0))
    return Record(**data), last_msg_id


def save_record(path: Path, record: Record) -> None:
    data = asdict(record)
    data["state"] = record.state.value
    write_atomic(path, json.dumps(data, sort_keys=True).encode("utf-8"))


class Stopping(BaseException):
    """The agent is stopping: the update stops where it is, unreported, and the saved
    record makes the next start run the step again. A BaseException, so that the
    machine's every-error-is-reported handling lets it through."""


Reporter = Callable[[UpdateReport], None]
Loader = Callable[[Path], LoadedModel]


class UpdateMachine:
    def __init__(
        self,
        state_dir: Path,
        predictor: Predictor,
        keys: tuple[TrustedKey, ...],
        auth: tuple[str, str] | None,
        max_bytes: int,
        report: Reporter,
        load: Loader,
        *,
        counters: Counters,
        download_patience_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.slots = Slots(state_dir / "models")
        self._downloads = state_dir / "downloads"
        self._record_path = state_dir / RECORD_FILE
        self.record, last_msg_id = load_record(self._record_path)
        counters.at_least(Counter.REPORT_MSG_ID, last_msg_id)
        self._predictor = predictor
        self._keys = keys
        self._auth = auth
        self._max_bytes = max_bytes
        self._report = report
        self._load = load
        self._counters = counters
        self._clock = clock
        self._candidate: LoadedModel | None = None
        self._download_patience_s = download_patience_s
        self._offers: queue.Queue[DesiredState | None] = queue.Queue()
        # Wakes a download's wait between tries: a newer desired state supersedes the one
        # being handled, and a stop ends it.
        self._news = threading.Condition()
        self._newest_offer = 0
        self._stopping = False
        self._lock = threading.Lock()  # one desired state at a time
        self._record_lock = threading.RLock()
        self._thread: threading.Thread | None = None
        fault = os.environ.get(FAULT_ENV, "")
        self._fault = tuple(fault.split(":", 1)) if ":" in fault else None

    # -- lifecycle ------------------------------------------------------------------------

    def boot(self) -> None:
        """Serve what `current` points at. An interrupted update is finished (or undone)
        by `start`, on the update thread, so the local API is not kept waiting for it."""
        self.slots.discard_leftovers()
        self._serve_current()
        if self.record.state is S.SHADOW and self.record.candidate_slot:
            self._start_shadow(self.record.candidate_slot)

    @property
    def interrupted(self) -> bool:
        # IDLE with a desired state: taken up, but cut off before its first transition.
        record = self.record
        return record.state not in RESTING or (
            record.state is S.IDLE and record.desired is not None
        )

    def resume(self) -> None:
        """Run an interrupted update on from the step it was in."""
        with self._lock:
            if not self.interrupted:
                return
            self._update(attempts=self.record.attempts + 1)
            log.warning("resuming an interrupted update at %s", self.record.state.value)
            self._drive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="updates", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._news:
            self._stopping = True
            self._news.notify_all()
        self._offers.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def offer(self, desired: DesiredState) -> None:
        """A desired state from the fleet (any thread); handled in order on the worker."""
        with self._news:
            self._newest_offer = max(self._newest_offer, desired.seq)
            self._news.notify_all()
        self._offers.put(desired)

    def apply(self, desired: DesiredState) -> UpdateState:
        """Handle one desired state to its end, on the caller's thread."""
        with self._lock:
            if desired.seq <= self.record.seq:
                return self.record.state  # handled already (a retained message seen again)
            self._save(Record(state=S.IDLE, desired=encode(desired), seq=desired.seq))
            target = desired.model
            log.info(
                "desired state %d taken up: %s",
                desired.seq,
                f"{target.name} {target.version} ({desired.mode})" if target else "no model",
            )
            self._drive()
            return self.record.state

    def _worker(self) -> None:
        try:
            self.resume()
        except Stopping:
            return
        except Exception:
            log.exception("resuming the interrupted update failed")
        while (desired := self._offers.get()) is not None:
            # Only the latest matters: a newer desired state supersedes queued ones.
            while not self._offers.empty():
                newer = self._offers.get_nowait()
                if newer is None:
                    return
                desired = newer
            try:
                self.apply(desired)
            except Stopping:
                return
            except Exception:
                log.exception("handling desired state %d failed", desired.seq)

    # -- the loop -------------------------------------------------------------------------

    def _drive(self) -> None:
        """Run steps until the machine rests. The record already holds the state to run."""
        assert self.record.desired is not None
        desired = decode(DesiredState, self.record.desired)
        while True:
            state = self.record.state
            reason: str | None
            if self.record.attempts > MAX_ATTEMPTS:
                event, reason = Event.FAILED, f"{state.value} was interrupted {MAX_ATTEMPTS} times"
            else:
                self._maybe_fault(state, "before")
                event, reason = self._step(state, desired)
                self._maybe_fault(state, "after")
            following = next_state(state, event)
            if reason is None and following in (S.ROLLED_BACK, S.FAILED):
                reason = self.record.reason  # the failure that started the rollback
            self._update(state=following, attempts=0, reason=reason)
            # One line per transition: what an operator reads in the journal of a device
            # whose update did not end where the fleet expected.
            log.info(
                "desired state %d: %s -> %s%s",
                desired.seq,
                state.value,
                following.value,
                f" ({reason})" if reason else "",
            )
            self._send_report(desired, following, reason)
            if following in RESTING:
                self._cleanup_downloads()
                return

    def _step(self, state: UpdateState, desired: DesiredState) -> tuple[Event, str | None]:
        try:
            return self._run_step(state, desired), None
        except Refused as exc:
            return Event.REFUSED, str(exc)
        except StepError as exc:
            return Event.FAILED, str(exc)
        except Exception as exc:  # a bug must still end in a terminal report
            log.exception("update step %s failed", state.value)
            return Event.FAILED, str(load_error(exc))

    def _run_step(self, state: UpdateState, desired: DesiredState) -> Event:
        target = desired.model
        if state is S.IDLE:
            return self._check(desired)
        if state is S.ROLLING_BACK:
            return self._roll_back()
        if target is None:  # only switching (to no model) is left for an unload
            self._switch_to(None)
            return Event.SWITCHED
        manifest = target.signed_manifest().manifest
        download_path = self._downloads / f"{target.sha256}.tflite"
        if state is S.DOWNLOADING:
            if self._auth is None:
                raise StepError("this agent is not enrolled: no credentials to download with")
            self._downloads.mkdir(parents=True, exist_ok=True)
            self._download(desired.seq, target, download_path, self._auth)
            return Event.DOWNLOADED
        if state is S.VERIFYING:
            try:
                verify(manifest, download_path)
            except StepError:
                download_path.unlink(missing_ok=True)  # a retry downloads afresh
                raise
            return Event.VERIFIED
        if state is S.INSTALLING:
            slot = self.slots.inactive_name()
            self._update(candidate_slot=slot)
            manifest_json = manifest_to_json(target.signed_manifest())
            self.slots.install(slot, download_path, manifest.model.path, manifest_json)
            return Event.INSTALLED
        if state is S.SELF_TESTING:
            candidate = self._load_slot(self._candidate_slot())
            self_test(candidate)
            self._candidate = candidate
            if desired.mode == "shadow":
                self._predictor.set_shadow(candidate)
                return Event.SHADOWING
            return Event.PASSED
        if state is S.SWITCHING:
            self._switch_to(self._candidate_slot())
            return Event.SWITCHED
        raise StepError(f"nothing to do in state {state.value}")

    def _download(self, seq: int, target: ModelTarget, path: Path, auth: tuple[str, str]) -> None:
        """Try until the artifact is complete, waiting longer after each cut-off try, for
        up to `download_patience_s`; raises Interrupted once that is spent, StepError when a
        newer desired state arrives meanwhile, and Stopping when the agent stops."""
        started = time.monotonic()
        delay = DOWNLOAD_BACKOFF_S
        for tries in itertools.count(1):
            try:
                download(target, path, auth, self._max_bytes)
                return
            except Interrupted as exc:
                spent = time.monotonic() - started
                if spent + delay > self._download_patience_s:
                    raise Interrupted(
                        f"{exc} (gave up after {tries} tries in {spent:.0f} s)"
                    ) from None
                log.warning("%s; trying again in %g s", exc, delay)
            with self._news:
                self._news.wait_for(
                    lambda: self._stopping or self._newest_offer > seq, timeout=delay
                )
                if self._stopping:
                    raise Stopping
                if self._newest_offer > seq:
                    raise StepError(f"superseded by desired state {self._newest_offer}")
            delay = min(delay * 2, DOWNLOAD_BACKOFF_MAX_S)

    # -- steps that touch serving ---------------------------------------------------------

    def _check(self, desired: DesiredState) -> Event:
        running = self._running()
        check_desired(desired, running, self._keys, self._clock())
        if desired.model is None:
            return Event.UNLOAD if self._predictor.active is not None else Event.ALREADY_RUNNING
        if running is not None and running.sha256 == desired.model.sha256:
            self._predictor.set_shadow(None)
            return Event.ALREADY_RUNNING
        inactive = self.slots.inactive_name()
        if desired.mode == "active" and self._slot_sha256(inactive) == desired.model.sha256:
            self._update(candidate_slot=inactive)
            # A shadow candidate promoted, or the model the last update replaced: its
            # bytes, signature and self-test were checked when it was installed.
            return Event.ALREADY_INSTALLED
        self._predictor.set_shadow(None)
        return Event.DESIRED

    def _switch_to(self, slot: str | None) -> None:
        current = self.slots.current_name()
        if current != slot and self.record.previous_slot is None:
            # Saved before the link moves: after a crash in between, a rollback knows where.
            self._update(previous_slot=current)
        model = None
        if slot is not None:
            candidate = self._candidate
            fresh = candidate is None or candidate.folder != self.slots.path(slot)
            model = self._load_slot(slot) if fresh or candidate is None else candidate
            _warm(model)  # the first real request must not pay for the first invoke
        self.slots.point_current(slot)
        self._predictor.set_shadow(None)
        self._predictor.activate(model)
        self._candidate = None

    def _roll_back(self) -> Event:
        previous = self.record.previous_slot
        model = None
        if previous is not None:
            try:
                model = self._load_slot(previous)
            except StepError as exc:
                raise StepError(f"rollback failed, nothing serves: {exc}") from None
        self.slots.point_current(previous)
        self._predictor.set_shadow(None)
        self._predictor.activate(model)
        return Event.ROLLED_BACK

    def _serve_current(self) -> None:
        current = self.slots.current_name()
        if current is None:
            return
        try:
            self._predictor.activate(self._load_slot(current))
        except StepError as exc:
            # Only a bug or a failing disk gets here: the slot passed its self-test.
            log.error("the current model does not load: %s", exc)

    def _start_shadow(self, slot: str) -> None:
        try:
            self._predictor.set_shadow(self._load_slot(slot))
        except StepError as exc:
            log.error("the shadow candidate does not load: %s", exc)

    # -- helpers --------------------------------------------------------------------------

    def _running(self) -> Running | None:
        active = self._predictor.active
        if active is None:
            return None
        return Running(active.name, active.version, active.manifest.model.sha256)

    def _candidate_slot(self) -> str:
        if self.record.candidate_slot is None:
            raise StepError("no candidate slot was recorded")
        return self.record.candidate_slot

    def _load_slot(self, slot: str) -> LoadedModel:
        try:
            return self._load(self.slots.path(slot))
        except Exception as exc:
            raise load_error(exc) from None

    def _slot_sha256(self, slot: str) -> str | None:
        path = self.slots.path(slot) / MANIFEST
        try:
            return str(json.loads(path.read_bytes())["manifest"]["model"]["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save(self, record: Record) -> None:
        with self._record_lock:
            save_record(self._record_path, record)
            self.record = record

    def _update(self, **changes: Any) -> None:
        # A read-modify-write of the record: under the lock that every save takes.
        with self._record_lock:
            self._save(replace(self.record, **changes))

    def _send_report(self, desired: DesiredState, state: UpdateState, reason: str | None) -> None:
        msg_id = self._counters.next(Counter.REPORT_MSG_ID)
        report = update_report(
            msg_id, self._clock(), state, reason, desired=desired, active=self._predictor.active
        )
        try:
            self._report(report)
        except Exception:
            log.exception("could not queue the %s report", state.value)

    def _cleanup_downloads(self) -> None:
        if self._downloads.exists():
            for item in self._downloads.iterdir():
                item.unlink(missing_ok=True)

    def _maybe_fault(self, state: UpdateState, when: str) -> None:
        if self._fault == (state.value, when):
            log.warning("fault injection: killing the agent %s %s", when, state.value)
            os.kill(os.getpid(), signal.SIGKILL)


def _warm(model: LoadedModel) -> None:
    test = model.manifest.self_test
    if test is not None and test.vectors:
        model.runner.invoke_once([a.to_array() for a in test.vectors[0].inputs])
