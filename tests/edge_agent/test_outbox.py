"""The outbox against real SQLite files: order, the bound, durability, threads, bad files."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edge_agent.outbox import DROP_OLDEST_SQL, Outbox, OutboxError, OutboxItem

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite"


@pytest.fixture
def outbox(path: Path) -> Iterator[Outbox]:
    box = Outbox(path)
    yield box
    box.close()


def payloads(items: list[OutboxItem]) -> list[bytes]:
    return [item.payload for item in items]


# --- order ---------------------------------------------------------------------------------


def test_peek_returns_items_in_put_order_with_increasing_ids(outbox: Outbox) -> None:
    ids = [outbox.put(f"telemetry/{i}", b"p%d" % i) for i in range(20)]

    items = outbox.peek(100)

    assert [item.id for item in items] == ids
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert [item.topic for item in items] == [f"telemetry/{i}" for i in range(20)]
    assert payloads(items) == [b"p%d" % i for i in range(20)]


def test_peek_limit_returns_the_oldest_and_leaves_them_queued(outbox: Outbox) -> None:
    for i in range(10):
        outbox.put("t", b"p%d" % i)

    assert payloads(outbox.peek(3)) == [b"p0", b"p1", b"p2"]
    assert payloads(outbox.peek(3)) == [b"p0", b"p1", b"p2"]
    assert outbox.peek(0) == []
    assert len(outbox) == 10


def test_remove_takes_out_exactly_the_given_ids_and_order_continues(outbox: Outbox) -> None:
    for i in range(6):
        outbox.put("t", b"p%d" % i)
    first = outbox.peek(2)

    outbox.remove(item.id for item in first)

    assert payloads(outbox.peek(10)) == [b"p2", b"p3", b"p4", b"p5"]
    assert len(outbox) == 4


def test_ids_are_never_reused_after_the_queue_empties(outbox: Outbox) -> None:
    # A late remove() of an acknowledged id must not be able to hit a newer item.
    old = outbox.put("t", b"old")
    outbox.remove([old])

    new = outbox.put("t", b"new")
    outbox.remove([old])

    assert new > old
    assert payloads(outbox.peek(10)) == [b"new"]


def test_put_records_fields_as_given(outbox: Outbox) -> None:
    outbox.put("telemetry/batch", b"\x00\xffbinary", droppable=True)
    outbox.put("update/report", b"{}", droppable=False)

    telemetry, report = outbox.peek(10)

    assert (telemetry.topic, telemetry.payload, telemetry.droppable) == (
        "telemetry/batch",
        b"\x00\xffbinary",
        True,
    )
    assert (report.topic, report.payload, report.droppable) == ("update/report", b"{}", False)
    assert isinstance(telemetry.created_at, float)
    assert isinstance(report.created_at, float)


# --- the bound -----------------------------------------------------------------------------


def test_bound_is_enforced_by_dropping_the_oldest_droppable_and_counting_them(path: Path) -> None:
    box = Outbox(path, max_items=5)
    try:
        for i in range(12):
            box.put("telemetry", b"p%d" % i)

        assert len(box) == 5
        assert payloads(box.peek(100)) == [b"p7", b"p8", b"p9", b"p10", b"p11"]
        assert box.take_dropped() == 7
    finally:
        box.close()


def test_non_droppable_items_are_never_dropped_even_past_the_bound(path: Path) -> None:
    box = Outbox(path, max_items=3)
    try:
        box.put("update/report", b"r0", droppable=False)
        box.put("telemetry", b"t0")
        box.put("telemetry", b"t1")
        for i in range(1, 6):
            box.put("update/report", b"r%d" % i, droppable=False)
        box.put("telemetry", b"t2")

        items = box.peek(100)

        # Every report is still there, in order, and past the bound; the telemetry went, the
        # newest included since nothing droppable was older.
        assert payloads(items) == [b"r0", b"r1", b"r2", b"r3", b"r4", b"r5"]
        assert all(not item.droppable for item in items)
        assert len(box) == 6
        assert box.take_dropped() == 3
    finally:
        box.close()


def test_bound_drops_telemetry_behind_older_reports_first(path: Path) -> None:
    box = Outbox(path, max_items=3)
    try:
        box.put("update/report", b"r0", droppable=False)
        box.put("telemetry", b"t0")
        box.put("telemetry", b"t1")
        box.put("telemetry", b"t2")

        assert payloads(box.peek(10)) == [b"r0", b"t1", b"t2"]
        assert box.take_dropped() == 1
    finally:
        box.close()


def test_reopening_with_a_smaller_bound_trims_on_the_next_put(path: Path) -> None:
    box = Outbox(path, max_items=100)
    for i in range(10):
        box.put("t", b"p%d" % i)
    box.close()

    box = Outbox(path, max_items=4)
    try:
        box.put("t", b"p10")

        assert payloads(box.peek(10)) == [b"p7", b"p8", b"p9", b"p10"]
        assert box.take_dropped() == 7
    finally:
        box.close()


def test_dropping_finds_the_oldest_droppable_through_its_index(outbox: Outbox, path: Path) -> None:
    # The O(log n) promise: the drop query reads the partial index of droppable items (stopping
    # at LIMIT), never the whole table.
    outbox.put("t", b"p")
    db = sqlite3.connect(path)
    try:
        plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {DROP_OLDEST_SQL}", (1,))]
    finally:
        db.close()

    # SQLite 3.40 says "USING INDEX", 3.50 (TensorFlow's, when it was imported first)
    # "USING COVERING INDEX": both read the index alone.
    index_scans = (
        "SCAN items USING INDEX items_droppable",
        "SCAN items USING COVERING INDEX items_droppable",
    )
    assert any(step in index_scans for step in plan), plan
    assert "SCAN items" not in plan, plan  # a full table scan


# --- the dropped counter -------------------------------------------------------------------


def test_take_dropped_returns_the_count_then_resets_to_zero(path: Path) -> None:
    box = Outbox(path, max_items=2)
    try:
        for i in range(5):
            box.put("t", b"p%d" % i)

        assert box.take_dropped() == 3
        assert box.take_dropped() == 0

        box.put("t", b"p5")
        assert box.take_dropped() == 1
    finally:
        box.close()


def test_take_dropped_count_and_reset_persist_across_close_and_reopen(path: Path) -> None:
    box = Outbox(path, max_items=2)
    for i in range(6):
        box.put("t", b"p%d" % i)
    box.close()

    box = Outbox(path, max_items=2)
    assert box.take_dropped() == 4
    box.close()

    box = Outbox(path, max_items=2)
    try:
        assert box.take_dropped() == 0
    finally:
        box.close()


# --- durability ----------------------------------------------------------------------------


def test_contents_survive_close_and_reopen(path: Path) -> None:
    box = Outbox(path)
    box.put("telemetry", b"t0")
    gone = box.put("telemetry", b"t1")
    box.put("update/report", b"r0", droppable=False)
    box.remove([gone])
    before = box.peek(10)
    box.close()

    box = Outbox(path)
    try:
        assert box.peek(10) == before
        assert len(box) == 2
        later = box.put("telemetry", b"t2")
        assert later > before[-1].id
    finally:
        box.close()


def test_put_survives_the_process_being_killed_right_after_it_returns(path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from edge_agent.outbox import Outbox

        box = Outbox(Path(sys.argv[1]))
        box.put("telemetry", b"before")
        item_id = box.put("update/report", b"the last words", droppable=False)
        print(item_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    item_id = int(child.stdout)

    box = Outbox(path)
    try:
        items = box.peek(10)
        assert payloads(items) == [b"before", b"the last words"]
        assert items[-1].id == item_id
        assert items[-1].droppable is False
    finally:
        box.close()


# --- remove --------------------------------------------------------------------------------


def test_remove_of_unknown_ids_is_harmless(outbox: Outbox) -> None:
    kept = [outbox.put("t", b"p%d" % i) for i in range(3)]

    outbox.remove([max(kept) + 1, max(kept) + 1000, -5])
    outbox.remove([])
    outbox.remove([kept[0]])
    outbox.remove([kept[0]])  # a second ack of the same message

    assert [item.id for item in outbox.peek(10)] == kept[1:]
    assert len(outbox) == 2
    assert outbox.take_dropped() == 0


# --- threads -------------------------------------------------------------------------------


def test_threads_putting_while_one_drains_lose_nothing_and_duplicate_nothing(path: Path) -> None:
    producers, per_producer = 6, 300
    box = Outbox(path, max_items=producers * per_producer)
    start = threading.Barrier(producers + 1)
    producers_done = threading.Event()

    def produce(producer: int) -> list[int]:
        start.wait()
        return [box.put(f"t/{producer}", b"%d:%d" % (producer, i)) for i in range(per_producer)]

    def drain() -> list[OutboxItem]:
        seen: list[OutboxItem] = []
        start.wait()
        while True:
            # Read before peeking: if the producers had finished before an empty peek, the
            # queue is truly drained.
            finished = producers_done.is_set()
            batch = box.peek(50)
            if not batch:
                if finished:
                    return seen
                continue
            seen.extend(batch)
            box.remove(item.id for item in batch)

    try:
        with ThreadPoolExecutor(max_workers=producers + 1) as pool:
            drained = pool.submit(drain)
            produced = [pool.submit(produce, p) for p in range(producers)]
            put_ids = [future.result() for future in produced]
            producers_done.set()
            seen = drained.result()

        seen_ids = [item.id for item in seen]
        # Nothing lost, nothing twice, and the drain saw one global order.
        assert len(seen_ids) == len(set(seen_ids)) == producers * per_producer
        assert seen_ids == sorted(seen_ids)
        assert set(seen_ids) == {item_id for ids in put_ids for item_id in ids}
        assert sorted(payloads(seen)) == sorted(
            b"%d:%d" % (p, i) for p in range(producers) for i in range(per_producer)
        )
        # Each producer's own items came out in the order it put them.
        for p in range(producers):
            mine = [item.payload for item in seen if item.topic == f"t/{p}"]
            assert mine == [b"%d:%d" % (p, i) for i in range(per_producer)]
        assert len(box) == 0
        assert box.take_dropped() == 0
    finally:
        box.close()


# --- bad input and bad files ---------------------------------------------------------------


def test_payload_that_is_not_bytes_raises_type_error(outbox: Outbox) -> None:
    with pytest.raises(TypeError, match="payload must be bytes"):
        outbox.put("t", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="payload must be bytes"):
        outbox.put("t", bytearray(b"x"))  # type: ignore[arg-type]

    assert len(outbox) == 0


def test_negative_peek_limit_raises_value_error(outbox: Outbox) -> None:
    # SQLite would read LIMIT -1 as "everything".
    outbox.put("t", b"p")

    with pytest.raises(ValueError, match="limit"):
        outbox.peek(-1)


def test_max_items_below_one_raises_value_error(path: Path) -> None:
    with pytest.raises(ValueError, match="max_items"):
        Outbox(path, max_items=0)


def test_non_sqlite_file_raises_outbox_error_naming_the_path_and_is_left_as_it_was(
    path: Path,
) -> None:
    original = b"these are someone's notes, not a database\n" * 200
    path.write_bytes(original)

    with pytest.raises(OutboxError) as raised:
        Outbox(path)

    assert str(path) in str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert path.read_bytes() == original


def test_damaged_outbox_raises_outbox_error_naming_the_path_and_is_left_as_it_was(
    path: Path,
) -> None:
    box = Outbox(path)
    for i in range(50):
        box.put("t", b"p%d" % i * 20)
    box.close()
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    # Page 1 (the header and schema) stays readable; the pages holding the items do not.
    data[page_size:] = b"\xa5" * (len(data) - page_size)
    damaged = bytes(data)
    path.write_bytes(damaged)

    with pytest.raises(OutboxError) as raised:
        Outbox(path)

    assert str(path) in str(raised.value)
    assert path.read_bytes() == damaged


def test_foreign_sqlite_database_raises_outbox_error_and_is_left_as_it_was(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE items (name TEXT)")
    db.execute("INSERT INTO items VALUES ('precious')")
    db.commit()
    db.close()
    original = path.read_bytes()

    with pytest.raises(OutboxError, match="not an outbox") as raised:
        Outbox(path)

    assert str(path) in str(raised.value)
    assert path.read_bytes() == original


def test_the_dropped_count_is_taken_by_the_message_that_reports_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite", max_items=3)
    for n in range(5):
        box.put("t", b"%d" % n)  # two are dropped
    seen: list[int] = []

    def report(dropped: int) -> bytes:
        seen.append(dropped)
        return b"dropped=%d" % dropped

    box.put_counting_dropped("t", report)  # its own insert drops one more, counted anew
    box.put_counting_dropped("t", report)
    assert seen == [2, 1]
    assert [item.payload for item in box.peek(10)][-2:] == [b"dropped=2", b"dropped=1"]
    box.close()
    # Each count restarted with the report that took it; the second report's own insert
    # dropped one more, which waits, on disk, for the next report.
    assert Outbox(tmp_path / "outbox.sqlite", max_items=3).take_dropped() == 1
