"""A Mosquitto process run from a folder that `write_broker_config` wrote: what the demo,
the benchmarks and the tests start when they need a broker of their own."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from devfleet.processes import stop_process
from fleet_server.mqtt.broker_config import CONFIG_FILE, LOG_FILE

STDERR_FILE = "mosquitto.stderr"
# /usr/sbin is often missing from a non-root PATH, and that is where Debian puts it.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class MosquittoError(RuntimeError):
    """Mosquitto did not start or stop as asked; the message ends with its log's tail."""


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found is not None:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / "mosquitto"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def read_listener(config_dir: Path) -> tuple[str, int]:
    """(host, port) of the `listener` line in the folder's mosquitto.conf."""
    for line in (config_dir / CONFIG_FILE).read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "listener":
            host = parts[2] if len(parts) > 2 else "0.0.0.0"
            return host, int(parts[1])
    raise MosquittoError(f"no listener line in {config_dir / CONFIG_FILE}")


class Mosquitto:
    """One broker process; `restart` keeps the config folder, so persisted state survives."""

    def __init__(self, config_dir: Path, executable: str, *, start_timeout: float = 15.0):
        self.config_dir = config_dir
        self.executable = executable
        self.start_timeout = start_timeout
        self.host, self.port = read_listener(config_dir)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            raise MosquittoError("mosquitto is already running")
        with (self.config_dir / STDERR_FILE).open("ab") as stderr:
            self._process = subprocess.Popen(
                [self.executable, "-c", str(self.config_dir / CONFIG_FILE)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self._wait_until_listening()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, which makes Mosquitto save its persistence file; SIGKILL if it hangs."""
        if stop_process(self._process, timeout):
            raise MosquittoError(f"mosquitto ignored SIGTERM for {timeout:g} s\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, so nothing is saved since the last autosave."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 25) -> str:
        parts = []
        for name in (LOG_FILE, STDERR_FILE):
            path = self.config_dir / name
            text = path.read_text(errors="replace") if path.exists() else "(missing)"
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- {path} ---\n{tail}")
        return "\n".join(parts)

    def _wait_until_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise MosquittoError(f"mosquitto exited with code {code}\n{self.log_tail()}")
            if self._accepts_connections():
                return
            time.sleep(0.01)
        self.kill()
        raise MosquittoError(
            f"mosquitto did not listen on {self.host}:{self.port} within "
            f"{self.start_timeout:g} s\n{self.log_tail()}"
        )

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False
