"""What the benchmarks' worker processes share: waiting on them without hanging on one
that died."""

from __future__ import annotations

import queue
import time
from collections.abc import Sequence
from multiprocessing.process import BaseProcess
from typing import Any


def get_from(source: Any, processes: Sequence[BaseProcess], timeout: float, what: str) -> Any:
    """The next item from a multiprocessing queue, or an error as soon as one of the
    processes (`what`, for the message) died without saying why."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return source.get(timeout=0.2)
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a {what} process exited with {dead[0]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"no word from the {what} processes in {timeout:g} s") from None
