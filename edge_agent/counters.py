"""The device's message numbers, kept across restarts in one small file.

The server stores each telemetry batch and update report once, by its number, so a number
must never come twice from one device: each is saved before it is used, and a counter
the file does not have yet starts at the current time in milliseconds (after a reflash,
say), above anything the device sent before.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from common.files import write_atomic

COUNTERS_FILE = "counters.json"


class Counter(StrEnum):
    TELEMETRY_SEQ = "telemetry_seq"  # TelemetryBatch.seq
    REPORT_MSG_ID = "report_msg_id"  # UpdateReport.msg_id


class Counters:
    """One file, one lock: every counter of the device goes through the same instance."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()

    def next(self, counter: Counter) -> int:
        """The counter's next number, saved before it is returned."""
        with self._lock:
            values = self._read()
            value = values.get(counter, int(self._clock() * 1000)) + 1
            values[counter] = value
            self._write(values)
            return value

    def at_least(self, counter: Counter, value: int) -> None:
        """Make the counter's next number greater than `value` (a number it gave before
        it was kept here)."""
        with self._lock:
            values = self._read()
            if values.get(counter, 0) < value:
                values[counter] = value
                self._write(values)

    def _read(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        values: dict[str, int] = json.loads(self.path.read_text(encoding="utf-8"))
        return values

    def _write(self, values: dict[str, int]) -> None:
        write_atomic(self.path, json.dumps(values, sort_keys=True).encode("utf-8"))
