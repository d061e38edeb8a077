"""benchmark() in a worker process: sane numbers, and one-line errors when the worker fails.

Absolute speeds are never asserted: the machines running these tests are shared and noisy.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.common.test_litert import convert_both, dense_data, dense_model
from toolchain import bench
from toolchain.bench import BenchResult, benchmark
from toolchain.errors import ArtifactError, OptionError


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    converted = convert_both(dense_model(), dense_data())
    folder = tmp_path_factory.mktemp("bench-models")
    paths = {"float32": folder / "dense-f32.tflite", "int8": folder / "dense-int8.tflite"}
    paths["float32"].write_bytes(converted.float32)
    paths["int8"].write_bytes(converted.int8)
    return paths


def _assert_sane(result: BenchResult) -> None:
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.mean_ms > 0
    assert result.throughput_per_s == pytest.approx(1000.0 / result.mean_ms)
    assert result.peak_rss_bytes >= result.baseline_rss_bytes > 0
    assert result.runtime


def test_a_tiny_model_benchmarks_with_sane_numbers(models: dict[str, Path]) -> None:
    result = benchmark(models["float32"], runs=40, warmup=5)
    assert (result.runs, result.warmup, result.threads) == (40, 5, None)
    _assert_sane(result)
    assert json.loads(json.dumps(result.to_dict())) == result.to_dict()


def test_peak_memory_is_the_workers_own_not_its_parents(models: dict[str, Path]) -> None:
    """Linux folds a parent's RSS high-water mark into the child's ru_maxrss across exec."""
    alone = benchmark(models["float32"], runs=5, warmup=0)
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB, touched, in this process only
    crowded = benchmark(models["float32"], runs=5, warmup=0)
    assert ballast.sum() > 0
    assert crowded.peak_rss_bytes < alone.peak_rss_bytes + 100 * 2**20


def test_a_given_sample_and_thread_count(models: dict[str, Path]) -> None:
    sample = [dense_data()[:1]]
    result = benchmark(models["int8"], runs=25, warmup=0, threads=1, sample=sample)
    assert (result.runs, result.warmup, result.threads) == (25, 0, 1)
    _assert_sane(result)


def test_the_runtime_can_be_forced(models: dict[str, Path]) -> None:
    result = benchmark(models["float32"], runs=5, warmup=0, runtime="ai-edge-litert")
    assert result.runtime.startswith("ai-edge-litert ")


def test_a_corrupt_model_raises_artifact_error(tmp_path: Path) -> None:
    model = tmp_path / "corrupt.tflite"
    model.write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="no TFL3 identifier") as caught:
        benchmark(model, runs=5, warmup=0)
    assert "\n" not in str(caught.value)


def test_a_truncated_model_raises_artifact_error(models: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "cut.tflite"
    model.write_bytes(models["float32"].read_bytes()[:300])
    with pytest.raises(ArtifactError, match="exited with status"):
        benchmark(model, runs=5, warmup=0)


def test_a_sample_of_the_wrong_shape_raises_artifact_error(models: dict[str, Path]) -> None:
    with pytest.raises(ArtifactError, match=r"expects shape \(1, 8\), got \(1, 3\)"):
        benchmark(models["float32"], runs=5, sample=[np.zeros((1, 3), np.float32)])


def test_a_missing_model_raises_artifact_error(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such file"):
        benchmark(tmp_path / "absent.tflite")


@pytest.mark.parametrize(
    "options",
    [{"runs": 0}, {"warmup": -1}, {"threads": 0}, {"timeout": 0}, {"runtime": "onnx"}],
)
def test_options_of_the_wrong_form(models: dict[str, Path], options: dict[str, Any]) -> None:
    with pytest.raises(OptionError):
        benchmark(models["float32"], **options)


def _fake_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, body: str) -> None:
    """Stand a script in for the worker, to see how benchmark() copes with its failures."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(bench, "WORKER_MODULE", name)


def test_a_worker_killed_by_a_signal_raises_artifact_error(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = """
        import os, signal, sys
        print("kernel blew up", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)
    """
    _fake_worker(monkeypatch, tmp_path, "crashing_worker", body)
    with pytest.raises(ArtifactError, match="killed by SIGSEGV: kernel blew up"):
        benchmark(models["float32"], runs=5)


def test_a_hung_worker_times_out(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_worker(monkeypatch, tmp_path, "hanging_worker", "import time\ntime.sleep(60)\n")
    with pytest.raises(ArtifactError, match="timed out after 1 s"):
        benchmark(models["float32"], runs=5, timeout=1)


def test_a_worker_printing_no_result_raises_artifact_error(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_worker(monkeypatch, tmp_path, "silent_worker", "print('hello')\n")
    with pytest.raises(ArtifactError, match="printed no result"):
        benchmark(models["float32"], runs=5)
