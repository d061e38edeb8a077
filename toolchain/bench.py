"""Latency and memory of a .tflite model, measured in a fresh process.

A fresh process makes the peak RSS the model's own (not TensorFlow's, which the converter has
already loaded into ours) and keeps a crashing kernel from taking the caller down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.litert import RUNTIME_KEYS
from toolchain.errors import ArtifactError, OptionError

WORKER_MODULE = "toolchain.bench_worker"
# The directory holding the toolchain and common packages, for a worker run from anywhere.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BenchResult:
    runs: int
    warmup: int
    threads: int | None
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float
    # Peak RSS of the whole worker; baseline is its RSS with the runtime imported, model not.
    peak_rss_bytes: int
    baseline_rss_bytes: int
    runtime: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def benchmark(
    model: Path,
    *,
    runs: int = 200,
    warmup: int = 20,
    threads: int | None = None,
    sample: Sequence[np.ndarray] | None = None,
    timeout: float = 300,
    runtime: str | None = None,
) -> BenchResult:
    """Time `runs` invokes of one batch-1 sample (real values; random when not given).

    `runtime` forces one of common.litert.RUNTIME_KEYS in the worker; by default it picks
    the way a device would.
    """
    _check_options(runs, warmup, threads, timeout, runtime)
    model = Path(model)
    if not model.is_file():
        raise ArtifactError(f"cannot benchmark {model}: no such file")
    command = [sys.executable, "-m", WORKER_MODULE, str(model.resolve())]
    command += ["--runs", str(runs), "--warmup", str(warmup)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if runtime is not None:
        command += ["--runtime", runtime]
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as scratch:
        if sample is not None:
            command += ["--sample", str(_write_sample(sample, Path(scratch)))]
        completed = _run_worker(command, model, timeout)
    return _parse_result(completed, model)


def _check_options(
    runs: int, warmup: int, threads: int | None, timeout: float, runtime: str | None
) -> None:
    if runs < 1:
        raise OptionError(f"runs must be at least 1, got {runs}")
    if warmup < 0:
        raise OptionError(f"warmup cannot be negative, got {warmup}")
    if threads is not None and threads < 1:
        raise OptionError(f"threads must be at least 1, got {threads}")
    if timeout <= 0:
        raise OptionError(f"timeout must be positive, got {timeout}")
    if runtime is not None and runtime not in RUNTIME_KEYS:
        raise OptionError(f"runtime must be one of {', '.join(RUNTIME_KEYS)}, got {runtime!r}")


def _write_sample(sample: Sequence[np.ndarray], scratch: Path) -> Path:
    path = scratch / "sample.npz"
    np.savez(path, *(np.asarray(array) for array in sample))
    return path


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{_SOURCE_ROOT}{os.pathsep}{existing}" if existing else str(_SOURCE_ROOT)
    return env


def _run_worker(
    command: list[str], model: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=_worker_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ArtifactError(f"benchmark of {model} timed out after {timeout:g} s") from exc


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _parse_result(completed: subprocess.CompletedProcess[str], model: Path) -> BenchResult:
    code = completed.returncode
    if code != 0:
        how = f"exited with status {code}" if code > 0 else f"was killed by {_signal_name(-code)}"
        detail = _last_line(completed.stderr) or "no message on stderr"
        raise ArtifactError(f"benchmark of {model} failed: the worker {how}: {detail}")
    try:
        payload = json.loads(_last_line(completed.stdout))
        return BenchResult(**payload)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ArtifactError(
            f"benchmark of {model} failed: the worker printed no result ({exc})"
        ) from exc


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
