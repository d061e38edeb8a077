"""Stopping a child process the way a service manager does."""

from __future__ import annotations

import signal
import subprocess


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> bool:
    """SIGTERM, then SIGKILL if it has not gone within `timeout`; True when it took the
    SIGKILL. Nothing to do for no process or one that already ended."""
    if process is None or process.poll() is not None:
        return False
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True
    return False
