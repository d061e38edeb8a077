"""The agent's cost per inference, its memory and its start-up, on the digits model.

Per-inference cost is measured three ways in the same run, interleaved in rounds so that
the machine's noise falls on all three alike:

- bare: what a developer writes by hand on the interpreter the agent uses
  (`set_tensor`, `invoke`, `get_tensor`, quantizing and dequantizing as the model needs);
- in-process: `Predictor.predict` with the agent's telemetry observer attached, as an
  application embedding the agent calls it;
- HTTP: `POST /v1/predict` with JSON on a kept-alive connection to `edge-agent run`.

Memory and start-up come from `edge-agent run --model BUNDLE` as its own process.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import median

import numpy as np

from edge_agent.serving import FOLD_EVERY

ROUNDS = 15
# A round is as long as the Predictor's queue, so every round of the in-process path
# carries exactly one fold: a median over shorter rounds would leave the folds out.
CALLS_PER_ROUND = FOLD_EVERY
# The targets.
MAX_IN_PROCESS_RATIO = 1.10
MAX_RSS_BYTES = 80 * 1024 * 1024
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Costs:
    """One model's cost per inference on each path, in µs, and each path's ratio to bare:
    the median over rounds of the round's ratio, as a round's paths ran side by side."""

    model: str
    bare_us: float
    in_process_us: float
    in_process_ratio: float
    http_us: float | None = None  # measured for the model `edge-agent run` serves
    http_ratio: float | None = None


@dataclass(frozen=True)
class AgentFigures:
    costs: tuple[Costs, ...]  # the first is digits float32, which the targets are about
    rss_bytes: int  # VmRSS of `edge-agent run` serving the model, after answering
    peak_rss_bytes: int  # VmHWM
    first_answer_s: float  # process start to the first /v1/predict answer
    machine: str

    @property
    def target(self) -> Costs:
        return self.costs[0]


def measure(models_dir: Path) -> AgentFigures:
    from toolchain.convert import ConvertOptions, QuietProgress, convert_model, machine_description

    folder = models_dir / "digits"
    image = np.load(folder / "eval.npz")["x"][0]
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        bundles = {}
        for quantize in ("float32", "int8"):
            bundles[quantize] = Path(tmp) / f"digits-{quantize}"
            convert_model(
                ConvertOptions(
                    src=folder / "model.keras",
                    out=bundles[quantize],
                    quantize=quantize,
                    calibration=folder / "calibration.npz",
                    evaluation=folder / "eval.npz",
                    labels=folder / "labels.txt",
                    name="digits",
                    version="1.0.0",
                    bench_runs=10,
                ),
                QuietProgress(),
            )
        served, rss, peak, first = _measure_served(bundles["float32"], image)
        quantized = _in_process_costs("digits (int8)", bundles["int8"], image, {})
    return AgentFigures((served, quantized), rss, peak, first, machine_description())


def _measure_served(bundle: Path, image: np.ndarray) -> tuple[Costs, int, int, float]:
    started = time.monotonic()
    with _served(bundle) as (port, pid):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = json.dumps({"inputs": image.tolist()}).encode()
        first_answer = _first_answer(connection, body, started)

        def over_http() -> None:
            connection.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"/v1/predict answered {response.status}")

        costs = _in_process_costs("digits (float32)", bundle, image, {"http": over_http})
        rss, peak = _memory(pid)
        connection.close()
    return costs, rss, peak, first_answer


def _in_process_costs(
    name: str, bundle: Path, image: np.ndarray, more: dict[str, Callable[[], object]]
) -> Costs:
    from edge_agent.loaded_model import load_model
    from edge_agent.serving import Predictor
    from edge_agent.telemetry import TelemetryCollector

    model = load_model(bundle)
    predictor = Predictor(TelemetryCollector())
    predictor.activate(model)
    bare = _bare_call(model.runner.interpreter, image)
    # Both take the sample as the bare loop holds it: float32, with its batch axis.
    sample = image[np.newaxis].astype(np.float32)
    rounds = _interleaved({"bare": bare, "in": lambda: predictor.predict(sample), **more})
    times = {path: median(values) for path, values in rounds.items()}
    ratios = {
        path: median(t / b for t, b in zip(values, rounds["bare"], strict=True))
        for path, values in rounds.items()
    }
    return Costs(
        name,
        times["bare"],
        times["in"],
        ratios["in"],
        times.get("http"),
        ratios.get("http"),
    )


def _bare_call(interpreter: object, image: np.ndarray) -> Callable[[], object]:
    """The hand-written loop: quantize if needed, set, invoke, get, dequantize if needed."""
    details_in = interpreter.get_input_details()[0]  # type: ignore[attr-defined]
    details_out = interpreter.get_output_details()[0]  # type: ignore[attr-defined]
    scale_in, zero_in = details_in["quantization"]
    scale_out, zero_out = details_out["quantization"]
    sample = image[np.newaxis].astype(np.float32)
    set_tensor = interpreter.set_tensor  # type: ignore[attr-defined]
    invoke = interpreter.invoke  # type: ignore[attr-defined]
    get_tensor = interpreter.get_tensor  # type: ignore[attr-defined]
    index_in, index_out, dtype_in = details_in["index"], details_out["index"], details_in["dtype"]

    def call() -> object:
        x = sample if not scale_in else np.round(sample / scale_in + zero_in).astype(dtype_in)
        set_tensor(index_in, x)
        invoke()
        y = get_tensor(index_out)
        return y if not scale_out else (y.astype(np.float32) - zero_out) * scale_out

    return call


def _interleaved(calls: dict[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Each call's mean time per call in every round, in µs; rounds alternate the calls."""
    for call in calls.values():
        for _ in range(50):  # warm caches and lazy allocations
            call()
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(ROUNDS):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(CALLS_PER_ROUND):
                call()
            per_round[name].append((time.perf_counter() - start) / CALLS_PER_ROUND * 1e6)
    return per_round


class _served:
    """`edge-agent run --model BUNDLE` on a free port, as a process of its own."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle

    def __enter__(self) -> tuple[int, int]:
        from devfleet.mosquitto import free_port

        self.state = tempfile.TemporaryDirectory(prefix="bench-agent-state-")
        port = free_port()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "edge_agent.cli", "run", "--model", str(self.bundle)),
                *("--api-port", str(port), "--state-dir", self.state.name),
            ],
            env={**os.environ, "EDGE_AGENT_TELEMETRY_INTERVAL_S": "60"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return port, self.process.pid

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.state.cleanup()


def _first_answer(connection: http.client.HTTPConnection, body: bytes, started: float) -> float:
    deadline = started + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            connection.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return time.monotonic() - started
        except OSError:
            connection.close()
        time.sleep(0.01)
    raise RuntimeError("edge-agent did not answer")


def _memory(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    kib = {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}
    return kib["VmRSS"] * 1024, kib["VmHWM"] * 1024


def markdown(figures: AgentFigures) -> list[str]:
    mib = 1024 * 1024
    target = figures.target
    ok_ratio = target.in_process_ratio <= MAX_IN_PROCESS_RATIO
    ok_rss = figures.rss_bytes < MAX_RSS_BYTES
    rows = []
    for costs in figures.costs:
        rows.append(f"| {costs.model} | bare interpreter | {costs.bare_us:.1f} | 1.00 |")
        rows.append(
            f"| {costs.model} | in-process API | {costs.in_process_us:.1f} "
            f"| {costs.in_process_ratio:.3f} |"
        )
        if costs.http_us is not None and costs.http_ratio is not None:
            rows.append(
                f"| {costs.model} | local HTTP API | {costs.http_us:.1f} | {costs.http_ratio:.2f} |"
            )
    return [
        "## Edge agent: cost per inference, memory, start-up",
        "",
        f"The digits model, one sample per call. Each path timed in {ROUNDS} interleaved "
        f"rounds of {CALLS_PER_ROUND} calls; µs is the median round's mean per call, and the "
        "ratio the median of the rounds' ratios to bare (the paths of one round ran side by "
        "side). Bare is the interpreter driven by hand through its public API (set_tensor, "
        "invoke, get_tensor, and for int8 the quantizing and dequantizing); in-process is "
        "`Predictor.predict` with the telemetry observer attached, its folds included (see "
        "docs/agent.md); HTTP is `POST /v1/predict` with JSON on a kept-alive connection to "
        "`edge-agent run --model`.",
        "",
        "| model | path | µs per inference | vs bare |",
        "| --- | --- | ---: | ---: |",
        *rows,
        "",
        f"- `edge-agent run` serving digits (float32): {figures.rss_bytes / mib:.1f} MiB "
        f"resident ({figures.peak_rss_bytes / mib:.1f} MiB peak).",
        f"- From process start to the first answer: {figures.first_answer_s:.2f} s.",
        "",
        "Targets (digits float32):",
        f"- in-process within {MAX_IN_PROCESS_RATIO:.2f} of bare: "
        f"{target.in_process_ratio:.3f} — {'met' if ok_ratio else 'MISSED'}",
        f"- resident memory under {MAX_RSS_BYTES // mib} MiB: "
        f"{figures.rss_bytes / mib:.1f} MiB — {'met' if ok_rss else 'MISSED'}",
        "",
        f"Measured on {figures.machine}.",
        "",
    ]
