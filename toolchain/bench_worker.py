"""Times one model in a process of its own: `python -m toolchain.bench_worker MODEL ...`.

Prints one JSON object on stdout. Imports stay light (numpy and the TFLite runtime, never
TensorFlow) so the memory figures belong to the model rather than to the tooling.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from common.litert import (
    InputShapeError,
    ModelLoadError,
    ModelRunner,
    RuntimeUnavailableError,
    TensorInfo,
    interpreter_class,
)

EXIT_FAILED = 2


def sample_key(position: int) -> str:
    """The .npz key holding the sample for model input `position` (np.savez's positional name)."""
    return f"arr_{position}"


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_now_bytes() -> int:
    """Current resident set size; the peak so far where /proc is missing."""
    return _status_bytes("VmRSS:") or peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's own high-water mark.

    Not ru_maxrss: Linux folds the parent's high-water mark into it across exec (and
    subprocess spawns with vfork), so a large parent inflates a small worker's figure.
    VmHWM belongs to the address space exec created.
    """
    hwm = _status_bytes("VmHWM:")
    if hwm is not None:
        return hwm
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def random_sample(inputs: Sequence[TensorInfo], seed: int = 0) -> list[np.ndarray]:
    """One batch-1 sample of real values per input, within what each input can represent."""
    rng = np.random.default_rng(seed)
    return [_random_input(info, rng) for info in inputs]


def _random_input(info: TensorInfo, rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(info.dtype)
    shape = info.shape
    if dtype.kind in "iu" and info.quantized:
        limits = np.iinfo(dtype)
        low = (limits.min - info.zero_point) * info.scale
        high = (limits.max - info.zero_point) * info.scale
        return rng.uniform(low, high, size=shape).astype(np.float32)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        # Plain integers are mostly indices (token ids, classes): 0 and 1 are valid for any table.
        return rng.integers(0, 2, size=shape).astype(dtype)
    return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)


def load_sample(path: Path, count: int) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        missing = [sample_key(i) for i in range(count) if sample_key(i) not in archive]
        if missing:
            raise ValueError(f"sample {path} lacks {', '.join(missing)}")
        return [np.asarray(archive[sample_key(i)]) for i in range(count)]


def time_invokes(interpreter: Any, count: int) -> np.ndarray:
    """Nanoseconds per invoke(), nothing else inside the timed region."""
    durations = np.empty(count, dtype=np.int64)
    clock = time.perf_counter_ns
    invoke = interpreter.invoke
    # A collection landing inside the timed region would show up as a fake outlier.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(count):
            start = clock()
            invoke()
            durations[i] = clock() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return durations


def summarize(durations_ns: np.ndarray) -> dict[str, float]:
    millis = durations_ns.astype(np.float64) / 1e6
    p50, p90, p99 = (float(v) for v in np.percentile(millis, [50, 90, 99]))
    mean = float(millis.mean())
    return {
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "mean_ms": mean,
        "throughput_per_s": 1000.0 / mean if mean > 0 else 0.0,
    }


def run(
    model: Path,
    *,
    runs: int,
    warmup: int,
    threads: int | None,
    sample: Path | None,
    runtime: str | None = None,
) -> dict[str, Any]:
    # Import the runtime first so the baseline holds everything but the model itself.
    interpreter_class(runtime)
    baseline = rss_now_bytes()
    runner = ModelRunner(model, threads=threads, runtime=runtime)
    inputs = (
        load_sample(sample, len(runner.inputs))
        if sample is not None
        else random_sample(runner.inputs)
    )
    runner.set_inputs(inputs)
    durations = time_invokes(runner.interpreter, warmup + runs)[warmup:]
    return {
        "runs": runs,
        "warmup": warmup,
        "threads": threads,
        **summarize(durations),
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "runtime": runner.runtime,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--runs", type=int, default=200)
@click.option("--warmup", type=int, default=20)
@click.option("--threads", type=int, default=None)
@click.option("--sample", type=click.Path(path_type=Path), default=None)
@click.option("--runtime", default=None, help="Force one of common.litert.RUNTIME_KEYS.")
def main(
    model: Path,
    *,
    runs: int,
    warmup: int,
    threads: int | None,
    sample: Path | None,
    runtime: str | None,
) -> None:
    try:
        result = run(
            model, runs=runs, warmup=warmup, threads=threads, sample=sample, runtime=runtime
        )
    except (ModelLoadError, InputShapeError, RuntimeUnavailableError, OSError, ValueError) as exc:
        # The parent reports our last stderr line, so it must carry the whole reason.
        print(f"bench_worker: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
