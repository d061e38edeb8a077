"""Decoding and writing what devices send, in a process of its own.

paho's network thread costs about as much CPU per message as decoding and writing it
together, and in one process all three take turns on one GIL. With the writer here, the
server process only receives and acknowledges, and a second core does the rest: the ingest
rate is set by the slower half, not by the sum. One writer process (not several sharing
the subscription) keeps each device's messages in order.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing as mp
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from fleet_server.mqtt.ingest import Received, write_batch
from protocol.messages import PayloadError, decode_payload
from protocol.topics import TopicKind, device_payload_type

log = logging.getLogger("fleet_server.mqtt")

WRITE_ATTEMPTS = 3
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RawMessage:
    """A message as the network thread hands it over: checked for topic and size only."""

    device_id: str
    kind: TopicKind
    payload: bytes
    received_at: float  # time.time() on arrival


@dataclass(frozen=True)
class Refused:
    device_id: str
    kind: TopicKind
    reason: str


@dataclass
class Outcome:
    """What became of one batch; the bridge turns it into metrics, log lines and acks."""

    accepted: Counter[TopicKind] = field(default_factory=Counter)
    refused: list[Refused] = field(default_factory=list)
    duplicates: int = 0
    unknown_device: int = 0
    write_failed: int = 0  # messages dropped after WRITE_ATTEMPTS failed transactions


class IngestUnavailable(RuntimeError):
    """The writer process is gone and could not be restarted."""


def decode_batch(raw: list[RawMessage]) -> tuple[list[Received], Outcome]:
    outcome = Outcome()
    decoded = []
    for item in raw:
        try:
            message = decode_payload(device_payload_type(item.kind), item.payload)
        except PayloadError as exc:
            outcome.refused.append(Refused(item.device_id, item.kind, str(exc)))
            continue
        outcome.accepted[item.kind] += 1
        when = dt.datetime.fromtimestamp(item.received_at, dt.UTC)
        decoded.append(Received(item.device_id, message, when))
    return decoded, outcome


def process_batch(sessions: Any, raw: list[RawMessage]) -> Outcome:
    """Decode and write one batch in one transaction, retried; never raises for bad data."""
    decoded, outcome = decode_batch(raw)
    if not decoded:
        return outcome
    for attempt in range(WRITE_ATTEMPTS):
        try:
            with sessions() as session, session.begin():
                result = write_batch(session, decoded)
        except Exception:
            log.exception("writing %d messages failed (attempt %d)", len(decoded), attempt + 1)
            time.sleep(0.5 * 2**attempt)
            continue
        outcome.duplicates = result.duplicates
        outcome.unknown_device = result.unknown_device
        return outcome
    # A database that refuses a batch this often will refuse its redelivery too; dropping
    # it (counted) keeps the stream moving for every other device.
    outcome.write_failed = len(decoded)
    return outcome


def _serve(database_url: str, connection: Connection) -> None:
    """The child process: batches in, outcomes out, until the pipe closes."""
    from fleet_server.db import make_engine, make_sessions

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    engine = make_engine(database_url)
    sessions = make_sessions(engine)
    connection.send("ready")
    try:
        while True:
            try:
                batch = connection.recv()
            except EOFError:
                return  # the server is gone
            if batch is None:
                return
            connection.send(process_batch(sessions, batch))
    finally:
        engine.dispose()


class IngestProcess:
    """The server's side of the writer process, used from one thread.

    Batches are pipelined: `submit` sends one and returns, `collect` waits for the oldest
    one's outcome. With the next batch already waiting in the pipe, the child never idles
    while the server acknowledges the last one. The child takes them in order, so each
    device's messages are stored in the order they arrived.
    """

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._context = mp.get_context("spawn")  # forking a threaded server is not safe
        self._process: Any = None
        self._connection: Connection | None = None
        self._inflight: deque[list[RawMessage]] = deque()

    def start(self) -> None:
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_serve, args=(self._database_url, child), name="edgefleet-ingest", daemon=True
        )
        process.start()
        child.close()
        try:
            started = parent.poll(START_TIMEOUT_S) and parent.recv() == "ready"
        except (EOFError, OSError):
            started = False
        if not started:
            process.kill()
            parent.close()
            raise IngestUnavailable(f"the ingest process did not start (exit {process.exitcode})")
        self._process, self._connection = process, parent

    def submit(self, batch: list[RawMessage]) -> None:
        """Send `batch` to be stored. Never raises: if the child is gone, `collect`
        restarts it and sends it everything pending again."""
        self._inflight.append(batch)
        if self._connection is None:
            return
        try:
            self._connection.send(batch)
        except OSError as exc:
            self._lost(exc)

    def ready(self) -> bool:
        """Whether `collect` would return (or recover) without waiting."""
        return self._connection is None or self._connection.poll(0)

    def collect(self) -> Outcome:
        """The oldest pending batch's outcome. A child that died is replaced and given
        every pending batch again (storage is idempotent: duplicates are recognised by
        their sequence numbers). Raises IngestUnavailable if that fails twice; what is
        pending stays pending for the next call."""
        for attempt in range(2):
            try:
                if self._connection is None:
                    self._restart()
                assert self._connection is not None
                outcome: Outcome = self._connection.recv()
            except (EOFError, OSError) as exc:
                self._lost(exc)
                if attempt:
                    raise IngestUnavailable("the ingest process keeps dying") from exc
                continue
            self._inflight.popleft()
            return outcome
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        if self._connection is not None:
            with contextlib.suppress(OSError):  # already gone
                self._connection.send(None)
        if self._process is not None:
            self._process.join(timeout)
        self._discard()

    def _restart(self) -> None:
        self.start()
        assert self._connection is not None
        for batch in self._inflight:
            self._connection.send(batch)

    def _lost(self, cause: BaseException) -> None:
        code = self._process.exitcode if self._process is not None else None
        log.error("lost the ingest process (exit %s): %r", code, cause)
        self._discard()

    def _discard(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5.0)
        if self._connection is not None:
            self._connection.close()
        self._process = self._connection = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None
