"""The device's message numbers: never repeated, across restarts and threads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from edge_agent.counters import Counter, Counters
from edge_agent.update.machine import Record, load_record
from protocol.messages import UpdateState


def test_a_new_counter_starts_at_the_clock_in_milliseconds(tmp_path: Path) -> None:
    counters = Counters(tmp_path / "counters.json", clock=lambda: 1_700_000_000.5)
    assert counters.next(Counter.REPORT_MSG_ID) == 1_700_000_000_501
    assert counters.next(Counter.REPORT_MSG_ID) == 1_700_000_000_502
    # Each counter on its own, in the one file.
    assert counters.next(Counter.TELEMETRY_SEQ) == 1_700_000_000_501
    saved = json.loads((tmp_path / "counters.json").read_text())
    assert saved == {"report_msg_id": 1_700_000_000_502, "telemetry_seq": 1_700_000_000_501}


def test_numbers_go_on_after_a_restart_even_if_the_clock_went_back(tmp_path: Path) -> None:
    Counters(tmp_path / "c.json", clock=lambda: 2000.0).next(Counter.TELEMETRY_SEQ)
    again = Counters(tmp_path / "c.json", clock=lambda: 1000.0)
    assert again.next(Counter.TELEMETRY_SEQ) == 2_000_002


def test_threads_never_get_the_same_number(tmp_path: Path) -> None:
    counters = Counters(tmp_path / "c.json")
    got: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(50):
            for counter in Counter:
                value = counters.next(counter)
                if counter is Counter.REPORT_MSG_ID:
                    with lock:
                        got.append(value)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == len(set(got)) == 200
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["report_msg_id"] == max(got)


def test_an_update_record_that_numbered_reports_itself_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    path.write_text(json.dumps({"state": "active", "seq": 4, "msg_id": 1234}))
    assert load_record(path) == (Record(state=UpdateState.ACTIVE, seq=4), 1234)


def test_numbers_carry_on_above_what_an_earlier_version_gave(tmp_path: Path) -> None:
    # A device upgraded while its clock is behind (a Raspberry Pi has no clock of its own
    # before NTP answers) must not number its next report below the last one.
    counters = Counters(tmp_path / "c.json", clock=lambda: 1.0)
    counters.at_least(Counter.REPORT_MSG_ID, 1_700_000_000_000)
    assert counters.next(Counter.REPORT_MSG_ID) == 1_700_000_000_001
    counters.at_least(Counter.REPORT_MSG_ID, 5)  # never lowers it
    assert counters.next(Counter.REPORT_MSG_ID) == 1_700_000_000_002
