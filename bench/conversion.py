"""Size, accuracy and latency of every quantization mode, relative to float32.

All modes of one model are converted, validated and timed in the same run, one after
the other, so the ratios compare like with like on a shared, noisy machine.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from toolchain.convert import Candidate, ConvertOptions, QuietProgress, convert_model

RUNS = 500
# The target for the digits model.
MAX_INT8_SIZE_RATIO = 0.30
MAX_INT8_ACCURACY_LOSS = 0.01


@dataclass(frozen=True)
class ModeRow:
    label: str
    size: int
    size_ratio: float
    accuracy: float | None
    accuracy_delta: float | None
    p50_ms: float | None
    p50_ratio: float | None
    passed: bool


@dataclass(frozen=True)
class ModelFigures:
    name: str
    rows: list[ModeRow]
    chosen: str


def measure(name: str, folder: Path) -> ModelFigures:
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        result = convert_model(
            ConvertOptions(
                src=folder / "model.keras",
                out=Path(tmp) / "bundle",
                quantize="auto",
                calibration=folder / "calibration.npz",
                evaluation=folder / "eval.npz",
                labels=folder / "labels.txt",
                name=name,
                bench_runs=RUNS,
            ),
            QuietProgress(),
        )
    assert result.chosen is not None
    base = next(c for c in result.candidates if c.label == "float32")
    return ModelFigures(name, [_row(c, base) for c in result.candidates], result.chosen.label)


def _row(c: Candidate, base: Candidate) -> ModeRow:
    v, bv = c.validation, base.validation
    accuracy = v.tflite_accuracy if v else None
    base_accuracy = bv.tflite_accuracy if bv else None
    p50 = c.bench.p50_ms if c.bench else None
    base_p50 = base.bench.p50_ms if base.bench else None
    return ModeRow(
        label=c.label,
        size=c.size,
        size_ratio=c.size / base.size,
        accuracy=accuracy,
        accuracy_delta=None
        if accuracy is None or base_accuracy is None
        else accuracy - base_accuracy,
        p50_ms=p50,
        p50_ratio=None if p50 is None or not base_p50 else p50 / base_p50,
        passed=c.passed,
    )


def _delta(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def markdown(figures: list[ModelFigures]) -> list[str]:
    lines = [
        "| model | mode | size (bytes) | size vs float32 | accuracy | Δ accuracy vs float32 "
        "| p50 latency | p50 vs float32 | within 1-point budget |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for model in figures:
        for row in model.rows:
            chosen = " (auto's choice)" if row.label == model.chosen else ""
            lines.append(
                f"| {model.name} | {row.label}{chosen} | {row.size} | {row.size_ratio:.3f} "
                f"| {_fmt(row.accuracy, '{:.4f}')} | {_fmt(row.accuracy_delta, '{:+.4f}')} "
                f"| {_fmt(row.p50_ms, '{:.4f} ms')} | {_fmt(row.p50_ratio, '{:.2f}')} "
                f"| {'yes' if row.passed else 'no'} |"
            )
    lines.append("")
    digits = next((m for m in figures if m.name == "digits"), None)
    if digits is not None:
        int8 = next(r for r in digits.rows if r.label == "int8")
        size_ok = int8.size_ratio <= MAX_INT8_SIZE_RATIO
        loss = max(0.0, -(int8.accuracy_delta or 0.0))
        loss_ok = loss <= MAX_INT8_ACCURACY_LOSS
        chosen_quantized = digits.chosen != "float32"
        lines += [
            "Targets on the digits model:",
            f"- int8 size at most {MAX_INT8_SIZE_RATIO:.2f} of float32: "
            f"{int8.size_ratio:.3f} — {'met' if size_ok else 'MISSED'}",
            f"- int8 loses at most {100 * MAX_INT8_ACCURACY_LOSS:.0f} point of accuracy: "
            f"{100 * loss:.2f} points lost — {'met' if loss_ok else 'MISSED'}",
            f"- `auto` keeps a quantized candidate within the budget: {digits.chosen} — "
            f"{'met' if chosen_quantized else 'MISSED'}",
            "",
        ]
    return lines
