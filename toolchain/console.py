"""What a person sees: progress on stderr, tables on stdout."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.litert import TensorInfo
from protocol.manifest import SignedManifest
from toolchain.bench import BenchResult
from toolchain.convert import Candidate, ConvertResult
from toolchain.layers import worst_layers
from toolchain.model_info import ModelInfo


class ConsoleProgress:
    """A spinner per step while it runs, a tick and its duration when it ends."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.warnings: list[str] = []

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        started = time.monotonic()
        with self.console.status(escape(text), spinner="dots"):
            yield
        elapsed = time.monotonic() - started
        self.console.print(f"[green]✓[/] {escape(text)} [dim]({elapsed:.1f}s)[/]")

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _kib(size: int) -> str:
    return f"{size / 1024:.1f} KiB"


def candidates_table(result: ConvertResult) -> Table:
    table = Table(title="Candidates", title_justify="left")
    for column in ("mode", "KiB", "×f32", "acc", "drop", "agree", "p50 ms", ""):
        table.add_column(column, justify="left" if column in ("mode", "") else "right")
    baseline = next((c.size for c in result.candidates if c.label == "float32" and c.size), None)
    for c in result.candidates:
        table.add_row(*_candidate_row(c, baseline, result))
    return table


def _candidate_row(c: Candidate, baseline: int | None, result: ConvertResult) -> list[str]:
    if c.error is not None:
        return [c.label, "-", "-", "-", "-", "-", "-", f"[red]failed[/]: {escape(c.error[:60])}"]
    v = c.validation
    ratio = f"{c.size / baseline:.2f}" if baseline else "-"
    verdict = "[green]ok[/]" if c.passed else "[red]over[/]"
    if c is result.chosen:
        verdict = "[bold green]chosen[/]"
    return [
        c.label,
        f"{c.size / 1024:.1f}",
        ratio,
        _pct(v.tflite_accuracy if v else None),
        _pct(v.accuracy_drop if v else None),
        _pct(v.top1_agreement if v else None),
        f"{c.bench.p50_ms:.3f}" if c.bench else "-",
        verdict,
    ]


def print_convert_summary(console: Console, result: ConvertResult) -> None:
    if len(result.candidates) > 1:
        console.print(candidates_table(result))
    chosen, manifest = result.chosen, result.manifest
    if chosen is None or manifest is None:
        return
    table = Table(title=escape(f"{manifest.name} {manifest.version}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("bundle", escape(str(result.out)))
    table.add_row("quantization", chosen.label + (" (integer only)" if chosen.integer_only else ""))
    table.add_row("size", f"{_kib(manifest.model.size)} ({manifest.model.size} bytes)")
    table.add_row("sha256", manifest.model.sha256)
    v = manifest.validation
    if v is not None:
        table.add_row(
            "accuracy",
            f"{_pct(v.tflite_accuracy)} (source {_pct(v.source_accuracy)}, "
            f"drop {_pct(v.accuracy_drop)}) on {v.samples} samples",
        )
        table.add_row("top-1 agreement", _pct(v.top1_agreement))
        table.add_row("output error", f"max {v.max_abs_error:.3g}, mean {v.mean_abs_error:.3g}")
    else:
        table.add_row("accuracy", "not validated (no --eval data)")
    b = manifest.benchmark
    if b is not None:
        table.add_row(
            "latency",
            f"p50 {b.p50_ms:.3f} ms, p99 {b.p99_ms:.3f} ms, {b.throughput_per_s:.0f}/s "
            f"(peak RSS {b.peak_rss_bytes / 2**20:.1f} MiB)",
        )
    table.add_row("conversion path", manifest.source.conversion_path)
    if manifest.runtime.requires_flex:
        table.add_row("needs Flex ops", escape(", ".join(manifest.runtime.flex_ops)))
    table.add_row("signed by", result.signed_by or "[yellow]unsigned[/]")
    if result.layers:
        table.add_row("worst int8 layers", escape("\n".join(worst_layers(result.layers))))
    console.print(table)


def candidate_json(c: Candidate) -> dict[str, Any]:
    v = c.validation
    return {
        "mode": c.mode.value,
        "label": c.label,
        "float_layers": list(c.float_layers),
        "integer_only": c.integer_only,
        "size_bytes": c.size,
        "error": c.error,
        "passed": c.passed,
        "conversion_path": c.conversion_path or None,
        "metrics": None if v is None else {k: getattr(v, k) for k in v.__dataclass_fields__},
        "gate": None if c.gate is None else {"measure": c.gate.measure, "value": c.gate.value},
        "benchmark": c.bench.to_dict() if c.bench else None,
    }


def convert_json(result: ConvertResult) -> dict[str, Any]:
    chosen, manifest = result.chosen, result.manifest
    return {
        "ok": manifest is not None,
        "out": str(result.out) if result.out else None,
        "name": manifest.name if manifest else None,
        "version": manifest.version if manifest else None,
        "mode": chosen.mode.value if chosen else None,
        "label": chosen.label if chosen else None,
        "size_bytes": manifest.model.size if manifest else None,
        "sha256": manifest.model.sha256 if manifest else None,
        "signed_by": result.signed_by,
        "metrics": candidate_json(chosen)["metrics"] if chosen else None,
        "benchmark": chosen.bench.to_dict() if chosen and chosen.bench else None,
        "max_accuracy_drop": result.max_accuracy_drop,
        "candidates": [candidate_json(c) for c in result.candidates],
        "worst_layers": worst_layers(result.layers) if result.layers else [],
        "warnings": result.warnings,
    }


def _tensor_rows(table: Table, kind: str, tensors: list[TensorInfo]) -> None:
    for t in tensors:
        quant = f"scale {t.scale:.6g}, zero point {t.zero_point}" if t.quantized else "-"
        shape = t.shape_signature or t.shape
        table.add_row(kind, escape(t.name), t.dtype, str(list(shape)), quant)


def print_model_info(
    console: Console, info: ModelInfo, signed: SignedManifest | None, path: str
) -> None:
    console.print(f"[bold]{escape(path)}[/]  {_kib(info.size_bytes)}  sha256 {info.sha256}")
    if signed is not None:
        m = signed.manifest
        keys = ", ".join(s.keyid[:16] for s in signed.signatures) or "unsigned"
        console.print(
            escape(
                f"{m.name} {m.version}, {m.quantization.mode.value}"
                f"{' (integer only)' if m.quantization.integer_only else ''}, signed by: {keys}"
            )
        )
    table = Table(show_header=True)
    for column in ("", "name", "dtype", "shape", "quantization"):
        table.add_column(column)
    _tensor_rows(table, "input", info.inputs)
    _tensor_rows(table, "output", info.outputs)
    console.print(table)
    ops = ", ".join(f"{name} x{count}" for name, count in sorted(info.ops.items()))
    console.print(f"ops: {escape(ops)}")
    console.print(f"min runtime version: {info.min_runtime_version or 'not recorded'}")
    if info.flex_ops:
        console.print(f"[yellow]needs TF Select (Flex) ops:[/] {escape(', '.join(info.flex_ops))}")
    if info.custom_ops:
        console.print(f"[yellow]custom ops:[/] {escape(', '.join(info.custom_ops))}")


def print_bench(console: Console, result: BenchResult, path: str) -> None:
    table = Table(title=escape(f"{path} on {result.runtime}"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("runs", f"{result.runs} (after {result.warmup} warm-up)")
    table.add_row("threads", str(result.threads or "runtime default"))
    table.add_row(
        "latency",
        f"p50 {result.p50_ms:.3f} ms, p90 {result.p90_ms:.3f} ms, "
        f"p99 {result.p99_ms:.3f} ms, mean {result.mean_ms:.3f} ms",
    )
    table.add_row("throughput", f"{result.throughput_per_s:.1f} inferences/s")
    table.add_row(
        "memory",
        f"peak RSS {result.peak_rss_bytes / 2**20:.1f} MiB "
        f"(process before loading: {result.baseline_rss_bytes / 2**20:.1f} MiB)",
    )
    console.print(table)
