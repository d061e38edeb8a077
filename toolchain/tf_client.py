"""The parent's handle on the TensorFlow worker process (see toolchain.tf_worker)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import IO, Any

# A conversion of a large model with calibration takes minutes; past this, it is stuck.
JOB_TIMEOUT_S = 3600.0


class WorkerJobError(Exception):
    """The worker ran the job and reported a failure of `kind` (source, conversion, ...)."""

    def __init__(self, kind: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.kind = kind
        self.details = details


class WorkerCrashError(Exception):
    """The worker process died mid-job: an abort or segfault inside TensorFlow."""


class TFWorker:
    """One long-lived TensorFlow process, so its import is paid once per command."""

    def __init__(self, log_path: Path, *, debug: bool = False) -> None:
        self._log_path = log_path
        self._debug = debug
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> TFWorker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ)
        if not self._debug:
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            env.setdefault("PYTHONWARNINGS", "ignore")
        # With --debug TensorFlow's own output goes straight to the user's terminal.
        self._log = None if self._debug else self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "toolchain.tf_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        return self._proc

    def call(self, op: str, *, timeout: float = JOB_TIMEOUT_S, **job: Any) -> dict[str, Any]:
        proc = self._proc or self._start()
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"op": op, **job}) + "\n")
            proc.stdin.flush()
            # One request, one reply line: nothing is ever left in the read buffer, so
            # select() on the pipe tells the truth about whether the reply has come.
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            if not ready:
                proc.kill()
                proc.wait()
                self._proc = None
                raise WorkerCrashError(f"TensorFlow did not answer within {timeout:g} s")
            line = proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise WorkerCrashError(self._crash_reason(proc))
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok"):
            kind = reply.pop("kind")
            raise WorkerJobError(kind, reply.pop("message"), reply)
        return reply

    def _crash_reason(self, proc: subprocess.Popen[str]) -> str:
        code = proc.wait()
        self._proc = None
        if code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        last = self.last_log_line()
        return f"TensorFlow {how}" + (f"; its last words: {last}" if last else "")

    def last_log_line(self) -> str:
        try:
            lines = self._log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        meaningful = [ln for ln in lines if ln.strip() and "cuda" not in ln.lower()]
        return meaningful[-1].strip()[:300] if meaningful else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self._proc is not None:
            self._proc.send_signal(sig)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin:
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
