"""The agent's outbox: what it has to tell the fleet server, kept on disk until the broker has it.

A Raspberry Pi loses its network (and its power) often, and MQTT QoS 1 only covers a message
once the client holds a connection. So everything bound for the server goes here first and is
removed only after the broker acknowledged it:

- durable: a `put()` that returned survives a crash or a power cut (SQLite, WAL, synchronous=FULL);
- ordered: items come back in the order they were put, so a reconnect replays history in order;
- bounded: a device offline for a week must not fill its SD card. When the bound is hit the
  *oldest telemetry* goes first (recent telemetry is worth more than old), and how many items
  went is counted so that the server can be told that a gap exists;
- update reports are never dropped: a rollout waits for each device's terminal report, so
  losing one stalls the rollout. They may push the queue past its bound; they are few.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.files import fsync_dir

# Written into the file header so that a foreign SQLite database is refused, not altered.
APPLICATION_ID = 0x45464F42  # "EFOB"
SCHEMA_VERSION = 1

_SCHEMA = """
-- AUTOINCREMENT: an id is never reused, so a late remove() after an ack can never hit a newer
-- item that happened to receive the id of one already removed.
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    droppable INTEGER NOT NULL CHECK (droppable IN (0, 1)),
    created_at REAL NOT NULL
);
-- Finding the oldest droppable item is then one index seek, however many update reports
-- sit in front of it.
CREATE INDEX IF NOT EXISTS items_droppable ON items (id) WHERE droppable = 1;
-- COUNT(*) is a full scan in SQLite; the triggers keep the count in step with every insert and
-- delete, inside the same transaction, so that checking the bound stays O(log n).
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO counters (name, value) VALUES ('items', 0), ('dropped', 0);
CREATE TRIGGER IF NOT EXISTS items_counted_in AFTER INSERT ON items
BEGIN
    UPDATE counters SET value = value + 1 WHERE name = 'items';
END;
CREATE TRIGGER IF NOT EXISTS items_counted_out AFTER DELETE ON items
BEGIN
    UPDATE counters SET value = value - 1 WHERE name = 'items';
END;
"""

# Kept at module level so that a test can check its query plan uses items_droppable.
DROP_OLDEST_SQL = (
    "DELETE FROM items WHERE id IN (SELECT id FROM items WHERE droppable = 1 ORDER BY id LIMIT ?)"
)


class OutboxError(ValueError):
    """The file at the outbox path is not a usable outbox (corrupt, foreign, or unreadable)."""


@dataclass(frozen=True)
class OutboxItem:
    id: int  # increasing: the sending order
    topic: str
    payload: bytes
    droppable: bool
    created_at: float  # time.time() when put


class Outbox:
    """A bounded, durable, ordered queue of MQTT messages in one SQLite file.

    Safe to share between threads. One Outbox per file: a second process writing the same file
    would work (SQLite locks) but would interleave its ids with ours.
    """

    def __init__(self, path: Path, max_items: int = 10_000) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self.path = path
        self.max_items = max_items
        self._lock = threading.Lock()
        existed = path.exists()
        try:
            # isolation_level=None: transactions are begun explicitly, so that each put() is
            # exactly one transaction and nothing is left open between calls.
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as error:
            raise OutboxError(f"cannot open outbox {path}: {error}") from error
        try:
            self._open(existed)
        except sqlite3.Error as error:
            self._db.close()
            raise OutboxError(f"cannot use {path} as an outbox: {error}") from error
        except OutboxError:
            self._db.close()
            raise

    def _open(self, existed: bool) -> None:
        db = self._db
        # Everything that only reads comes first: a file we refuse must be left exactly as it
        # was, since it may be someone's data at a mistyped path.
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        has_tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        if has_tables and application_id != APPLICATION_ID:
            raise OutboxError(f"{self.path} is an SQLite database but not an outbox")
        if application_id == APPLICATION_ID:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise OutboxError(
                    f"{self.path} is an outbox of schema version {version}; "
                    f"this agent reads version {SCHEMA_VERSION}"
                )
            # A damaged page would otherwise surface later as a failed put(), when the
            # telemetry is already lost; checking once at start-up costs one read of the file.
            problems = [row[0] for row in db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise OutboxError(f"{self.path} is corrupt: {'; '.join(problems[:3])}")

        # WAL: a put() appends to the log instead of rewriting pages, and readers do not block
        # it. In WAL mode only synchronous=FULL syncs the log on every commit; NORMAL could lose
        # the last puts on a power cut.
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        if application_id != APPLICATION_ID:
            # One transaction: a crash halfway leaves an empty file, which is created afresh.
            db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA}"
                f"PRAGMA application_id = {APPLICATION_ID};"
                f"PRAGMA user_version = {SCHEMA_VERSION};"
                "COMMIT;"
            )
            if not existed:
                # SQLite syncs the directory for the log it creates but not for the database
                # file itself; without this a power cut could lose the whole new file.
                fsync_dir(self.path.parent)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a read-then-write (take_dropped) cannot be
        # overtaken by another connection writing the same file.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            # SQLite has already rolled back by itself after some errors (a full disk); a second
            # ROLLBACK would fail and hide the error that matters.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def put(self, topic: str, payload: bytes, *, droppable: bool = True) -> int:
        """Append durably and return the item's id. May drop the oldest droppable items, the new
        one included, to keep within max_items; the returned id is then already gone."""
        _check_item(topic, payload)
        with self._lock, self._transaction() as db:
            return self._insert(db, topic, payload, droppable)

    def put_counting_dropped(self, topic: str, build: Callable[[int], bytes]) -> int:
        """Append the (droppable) payload `build(dropped)`, where `dropped` is what was dropped
        since the last such call, and restart that count, in one transaction: a crash
        between taking the count and queueing the message that reports it loses neither."""
        with self._lock, self._transaction() as db:
            dropped = _counter(db, "dropped")
            payload = build(dropped)
            _check_item(topic, payload)
            db.execute("UPDATE counters SET value = 0 WHERE name = 'dropped'")
            return self._insert(db, topic, payload, True)

    def _insert(self, db: sqlite3.Connection, topic: str, payload: bytes, droppable: bool) -> int:
        cursor = db.execute(
            "INSERT INTO items (topic, payload, droppable, created_at) VALUES (?, ?, ?, ?)",
            (topic, payload, int(droppable), time.time()),
        )
        item_id = cursor.lastrowid
        assert item_id is not None
        excess = _counter(db, "items") - self.max_items
        if excess > 0:
            # rowcount excludes the trigger's own updates: it is the items deleted.
            dropped = db.execute(DROP_OLDEST_SQL, (excess,)).rowcount
            if dropped > 0:
                db.execute(
                    "UPDATE counters SET value = value + ? WHERE name = 'dropped'", (dropped,)
                )
        return item_id

    def peek(self, limit: int) -> list[OutboxItem]:
        """The oldest items, oldest first, at most `limit`; they stay until remove()."""
        if limit < 0:
            # SQLite reads a negative LIMIT as "no limit", which would load the whole queue.
            raise ValueError(f"limit must not be negative, got {limit}")
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, droppable, created_at FROM items ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            OutboxItem(
                id=row[0], topic=row[1], payload=row[2], droppable=bool(row[3]), created_at=row[4]
            )
            for row in rows
        ]

    def remove(self, ids: Iterable[int]) -> None:
        """Delete items the broker acknowledged. Unknown ids (already removed, or dropped while
        in flight) are ignored."""
        # Materialized before taking the lock: a generator could be slow or raise halfway.
        params = [(int(item_id),) for item_id in ids]
        if not params:
            return
        with self._lock, self._transaction() as db:
            db.executemany("DELETE FROM items WHERE id = ?", params)

    def __len__(self) -> int:
        with self._lock:
            return _counter(self._db, "items")

    def take_dropped(self) -> int:
        """How many items were dropped since the last call; the counter restarts at 0."""
        # Read and reset in one transaction: a drop between the two would otherwise be lost
        # from the report, or reported twice after a crash.
        with self._lock, self._transaction() as db:
            dropped = _counter(db, "dropped")
            if dropped:
                db.execute("UPDATE counters SET value = 0 WHERE name = 'dropped'")
        return dropped

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _check_item(topic: str, payload: bytes) -> None:
    if not isinstance(topic, str):
        raise TypeError(f"topic must be str, got {type(topic).__name__}")
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")


def _counter(db: sqlite3.Connection, name: str) -> int:
    value: int = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]
    return value
