"""`edge-convert convert`: source model in, validated, benchmarked, signed bundle out.

The order of work is chosen so that every mistake the user can make fails before the slow
part: options and keys first, then the source model's signature, then the data checked
against it, and only then conversions. Nothing is written to `--out` until the end, and
then all at once.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.files import write_atomic
from common.litert import (
    InputShapeError,
    ModelLoadError,
    ModelRunner,
    RuntimeUnavailableError,
    TensorInfo,
)
from protocol.manifest import (
    MANIFEST_SCHEMA_VERSION,
    MODEL_FILE,
    Benchmark,
    Manifest,
    ModelFile,
    Quantization,
    QuantizationMode,
    RuntimeRequirements,
    SignedManifest,
    SourceInfo,
    TensorSpec,
    ToolchainInfo,
    Validation,
    check_name,
    semver_key,
)
from protocol.signing import SigningKeyError, file_sha256, load_private_key, sign_manifest
from toolchain import datasets
from toolchain.bench import BenchResult, benchmark
from toolchain.bundle import check_out_dir, write_bundle
from toolchain.errors import (
    AccuracyGateError,
    ArtifactError,
    ConversionError,
    DataError,
    OptionError,
    SourceModelError,
    UnsupportedOpsError,
)
from toolchain.layers import layer_report_csv
from toolchain.model_info import ModelInfo, read_model_info
from toolchain.quantize import AUTO, RECIPES
from toolchain.reference import reference_stats, self_test, self_test_tolerance
from toolchain.source import detect_format, source_sha256
from toolchain.tf_client import TFWorker, WorkerCrashError, WorkerJobError
from toolchain.tf_worker import MAX_CALIBRATION_SAMPLES
from toolchain.validate import GateResult, accuracy_gate, align_outputs, compare

Objective = Literal["size", "latency"]
# "The few layers that lose most": past three, the model is no longer an int8 model.
MAX_FLOAT_LAYERS = 3
# Reference statistics cover the whole calibration set up to this many samples.
REFERENCE_SAMPLES = 10_000


class Progress(Protocol):
    warnings: list[str]

    def step(self, text: str) -> AbstractContextManager[None]: ...

    def warn(self, text: str) -> None: ...


class QuietProgress:
    """For library use and tests: warnings are collected, steps pass silently."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        yield

    def warn(self, text: str) -> None:
        self.warnings.append(text)


@dataclass(frozen=True)
class ConvertOptions:
    src: Path
    out: Path
    quantize: str = QuantizationMode.FLOAT32.value
    calibration: Path | None = None
    evaluation: Path | None = None
    max_accuracy_drop: float = 0.01
    name: str | None = None
    version: str = "0.1.0"
    labels: Path | None = None
    signing_key: Path | None = None
    allow_tf_ops: bool = False
    objective: Objective = "size"
    require_integer: bool = False
    layer_report: Path | None = None
    bench_runs: int = 100
    threads: int | None = None
    force: bool = False
    debug: bool = False


@dataclass
class Candidate:
    mode: QuantizationMode
    float_layers: tuple[str, ...] = ()
    path: Path | None = None
    size: int = 0
    conversion_path: str = ""
    info: ModelInfo | None = None
    validation: Validation | None = None
    gate: GateResult | None = None
    bench: BenchResult | None = None
    error: str | None = None
    # False for a Flex model on a machine whose runtimes lack the Flex delegate.
    runnable: bool = True

    @property
    def label(self) -> str:
        if self.float_layers:
            return f"{self.mode.value}+{len(self.float_layers)} float"
        return self.mode.value

    @property
    def integer_only(self) -> bool:
        return RECIPES[self.mode].integer_only and not self.float_layers

    @property
    def passed(self) -> bool:
        return self.error is None and (self.gate is None or self.gate.passed)


@dataclass
class ConvertResult:
    out: Path | None
    chosen: Candidate | None
    candidates: list[Candidate]
    manifest: Manifest | None
    max_accuracy_drop: float
    warnings: list[str] = field(default_factory=list)
    layers: list[dict[str, Any]] | None = None
    signed_by: str | None = None


@dataclass
class _Data:
    calibration: datasets.Dataset | None
    evaluation: datasets.Dataset | None
    labels: tuple[str, ...] | None
    source_outputs: list[np.ndarray] | None


@dataclass
class _Job:
    """What one conversion run has at hand, threaded through the steps below."""

    options: ConvertOptions
    workdir: Path
    worker: TFWorker
    progress: Progress
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    data: _Data
    calibration_file: Path | None = None
    layers: list[dict[str, Any]] | None = None


def convert_model(options: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Run the whole conversion. Raises an EdgeConvertError subclass on any failure."""
    progress = progress or QuietProgress()
    key = _check_options(options)
    fmt = detect_format(options.src)
    src_sha = source_sha256(options.src)
    with tempfile.TemporaryDirectory(prefix="edge-convert-") as tmp:
        workdir = Path(tmp)
        with TFWorker(workdir / "tensorflow.log", debug=options.debug) as worker:
            with progress.step(f"Loading {options.src.name} ({fmt})"):
                signature = _call(
                    worker, "load", None, src=str(options.src), format=fmt, workdir=tmp
                )
            job = _Job(
                options,
                workdir,
                worker,
                progress,
                signature["inputs"],
                signature["outputs"],
                _Data(None, None, None, None),
            )
            job.data = _load_data(job)
            candidates = _convert_candidates(job)
        result = _select(job, candidates)
        if options.layer_report is not None and job.layers is not None:
            options.layer_report.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(options.layer_report, layer_report_csv(job.layers).encode())
        chosen = result.chosen
        if chosen is None or not chosen.passed:
            raise AccuracyGateError(_gate_failure(result), result)
        manifest = _manifest(job, chosen, fmt, src_sha)
        signed = sign_manifest(manifest, key) if key else SignedManifest(manifest, ())
        assert chosen.path is not None
        with progress.step(f"Writing {options.out}"):
            write_bundle(options.out, chosen.path.read_bytes(), MODEL_FILE, signed)
    result.out = options.out
    result.manifest = manifest
    result.signed_by = signed.signatures[0].keyid if signed.signatures else None
    return result


def _check_options(options: ConvertOptions) -> Ed25519PrivateKey | None:
    """Everything that can be checked without TensorFlow, checked first."""
    try:
        semver_key(options.version)
        check_name(_model_name(options))
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    if not 0.0 <= options.max_accuracy_drop <= 1.0:
        raise OptionError("--max-accuracy-drop must be between 0 and 1 (0.01 is one point)")
    auto = options.quantize == AUTO
    modes = list(RECIPES) if auto else [QuantizationMode(options.quantize)]
    if any(RECIPES[m].needs_calibration for m in modes) and options.calibration is None:
        raise OptionError(
            f"--quantize {options.quantize} needs --calibration data "
            "(an .npz with an array x, or a folder of images)"
        )
    if auto and options.evaluation is None:
        raise OptionError("--quantize auto needs --eval data to judge the candidates")
    if options.require_integer and options.quantize not in (AUTO, QuantizationMode.INT8.value):
        raise OptionError("--require-integer goes with --quantize auto or int8")
    if options.layer_report is not None and options.quantize not in (
        AUTO,
        QuantizationMode.INT8.value,
    ):
        raise OptionError("--layer-report goes with --quantize int8 or auto")
    if options.bench_runs < 1:
        raise OptionError("--runs must be at least 1")
    check_out_dir(options.out, force=options.force)
    if options.labels is not None:
        _read_labels(options.labels)
    if options.signing_key is None:
        return None
    try:
        return load_private_key(options.signing_key)
    except SigningKeyError as exc:
        raise OptionError(str(exc)) from None


def _model_name(options: ConvertOptions) -> str:
    if options.name:
        return options.name
    stem = options.src.name.removesuffix(".keras").removesuffix(".h5") or "model"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._") or "model"


def _read_labels(path: Path) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OptionError(f"cannot read labels file {path}: {exc}") from None
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise OptionError(f"labels file {path} is empty")
    return labels


def _call(worker: TFWorker, op: str, context: str | None, **job: Any) -> dict[str, Any]:
    """A worker job, with its failures turned into errors that say what to do."""
    where = f" in mode {context}" if context else ""
    try:
        return worker.call(op, **job)
    except WorkerCrashError as exc:
        raise ConversionError(f"{exc} while running '{op}'{where}; rerun with --debug") from None
    except WorkerJobError as exc:
        if exc.kind == "unsupported_ops":
            raise UnsupportedOpsError(exc.details.get("ops", [])) from None
        if exc.kind == "custom_ops":
            ops = ", ".join(exc.details.get("ops", [])) or "unnamed"
            raise ConversionError(
                f"the model uses custom ops ({ops}) that TFLite has no kernels for"
            ) from None
        if exc.kind == "source":
            raise SourceModelError(str(exc)) from None
        raise ConversionError(f"TensorFlow's converter failed{where}: {exc}") from None


def _num_classes(outputs: list[dict[str, Any]]) -> int | None:
    """K for a (N, K) class-score output; 2 for one score per sample (a binary classifier)."""
    shape = outputs[0]["shape"]
    if len(shape) == 2 and shape[-1] and shape[-1] > 1:
        return int(shape[-1])
    if len(shape) == 1 or (len(shape) == 2 and shape[-1] == 1):
        return 2
    return None


def _load_data(job: _Job) -> _Data:
    options, progress = job.options, job.progress
    if (options.calibration or options.evaluation) and len(job.inputs) != 1:
        raise DataError(
            f"the model has {len(job.inputs)} inputs; calibration and evaluation data "
            "are supported for single-input models only"
        )
    calibration = evaluation = None
    if job.inputs and (options.calibration or options.evaluation):
        spec = job.inputs[0]
        signature = datasets.InputSignature(tuple(spec["shape"]), spec["dtype"])
        with progress.step("Checking data against the model's input signature"):
            if options.calibration:
                calibration = datasets.load_dataset(
                    options.calibration, signature, role="calibration"
                )
                for warning in datasets.calibration_warnings(calibration):
                    progress.warn(warning)
                if len(calibration.x) > MAX_CALIBRATION_SAMPLES:
                    progress.warn(
                        f"calibrating on a seeded random {MAX_CALIBRATION_SAMPLES} of the "
                        f"{len(calibration.x)} calibration samples"
                    )
            if options.evaluation:
                evaluation = datasets.load_dataset(options.evaluation, signature, role="evaluation")
            classes = _num_classes(job.outputs)
            for ds in (calibration, evaluation):
                if ds is not None and ds.y is not None and classes is not None:
                    datasets.check_labels(ds, classes)
            if calibration is not None and evaluation is not None:
                for warning in datasets.compare_ranges(calibration, evaluation):
                    progress.warn(warning)
    labels = _labels(job, calibration, evaluation)
    if calibration is not None:
        job.calibration_file = job.workdir / "calibration.npy"
        np.save(job.calibration_file, calibration.x)
    source_outputs = None
    if evaluation is not None:
        with progress.step(f"Running the source model on {len(evaluation.x)} samples"):
            np.save(job.workdir / "eval.npy", evaluation.x)
            _call(
                job.worker,
                "predict",
                None,
                x=str(job.workdir / "eval.npy"),
                out=str(job.workdir / "source.npz"),
            )
            with np.load(job.workdir / "source.npz") as archive:
                source_outputs = [archive[f"arr_{i}"] for i in range(len(archive.files))]
    return _Data(calibration, evaluation, labels, source_outputs)


def _labels(
    job: _Job, calibration: datasets.Dataset | None, evaluation: datasets.Dataset | None
) -> tuple[str, ...] | None:
    labels: tuple[str, ...] | None
    if job.options.labels is not None:
        labels = _read_labels(job.options.labels)
    else:
        found = [ds.class_names for ds in (evaluation, calibration) if ds and ds.class_names]
        labels = tuple(found[0]) if found else None
    classes = _num_classes(job.outputs)
    if labels is not None and classes is not None and len(labels) != classes:
        source = job.options.labels or "the image folders"
        raise OptionError(f"{source} names {len(labels)} classes but the model has {classes}")
    return labels


def _auto_modes(options: ConvertOptions) -> list[QuantizationMode]:
    if options.quantize != AUTO:
        return [QuantizationMode(options.quantize)]
    if options.require_integer:
        return [QuantizationMode.INT8]
    return list(RECIPES)


def _convert_candidates(job: _Job) -> list[Candidate]:
    auto = job.options.quantize == AUTO
    candidates = []
    for mode in _auto_modes(job.options):
        candidate = Candidate(mode)
        try:
            _build(job, candidate)
        except UnsupportedOpsError:
            raise  # the same for every mode: say it once
        except (ConversionError, ArtifactError) as exc:
            if not auto:
                raise
            candidate.error = str(exc)
            job.progress.warn(f"{mode.value}: {exc}")
        candidates.append(candidate)
    if job.options.layer_report is not None or (auto and _int8_missed(candidates)):
        _layer_stats(job)
    if auto and not job.options.require_integer and _int8_missed(candidates):
        candidates.extend(_float_fallbacks(job))
    return candidates


def _int8_missed(candidates: Sequence[Candidate]) -> bool:
    return any(
        c.mode is QuantizationMode.INT8 and c.error is None and not c.passed for c in candidates
    )


def _layer_stats(job: _Job) -> None:
    assert job.calibration_file is not None
    with job.progress.step("Measuring the int8 error of each layer"):
        reply = _call(job.worker, "layer_stats", "int8", calibration=str(job.calibration_file))
    job.layers = reply["layers"]


def _float_fallbacks(job: _Job) -> list[Candidate]:
    """Keep the worst layers in float, one more at a time, until int8 meets the budget."""
    assert job.layers is not None
    worst = [layer["tensor"] for layer in job.layers if layer["tensor"]][:MAX_FLOAT_LAYERS]
    tried = []
    for count in range(1, len(worst) + 1):
        candidate = Candidate(QuantizationMode.INT8, float_layers=tuple(worst[:count]))
        try:
            _build(job, candidate)
        except (ConversionError, ArtifactError) as exc:
            candidate.error = str(exc)
            job.progress.warn(f"{candidate.label}: {exc}")
        tried.append(candidate)
        if candidate.passed:
            break
    return tried


def _build(job: _Job, candidate: Candidate) -> None:
    """Convert, inspect, validate and benchmark one candidate."""
    options = job.options
    path = job.workdir / f"{candidate.label.replace(' ', '_').replace('+', '_')}.tflite"
    with job.progress.step(f"Converting: {candidate.label}"):
        reply = _call(
            job.worker,
            "convert",
            candidate.label,
            mode=candidate.mode.value,
            calibration=str(job.calibration_file) if job.calibration_file else None,
            allow_tf_ops=options.allow_tf_ops,
            float_layers=list(candidate.float_layers),
            out=str(path),
        )
    candidate.path = path
    candidate.conversion_path = reply["conversion_path"]
    candidate.info = read_model_info(path)
    candidate.size = candidate.info.size_bytes
    runtime = _runtime_for(candidate.info)
    if candidate.info.flex_ops and not _flex_runs(path):
        _unrunnable_flex(job, candidate)
        return
    if job.data.evaluation is not None and job.data.source_outputs is not None:
        with job.progress.step(f"Validating: {candidate.label}"):
            outputs = _run(path, [job.data.evaluation.x], options.threads, runtime)
            try:
                outputs = align_outputs(job.data.source_outputs, outputs)
            except ValueError as exc:
                raise DataError(f"cannot validate: {exc}") from None
            candidate.validation = compare(job.data.source_outputs, outputs, job.data.evaluation.y)
            candidate.gate = accuracy_gate(candidate.validation, options.max_accuracy_drop)
    with job.progress.step(f"Benchmarking: {candidate.label}"):
        candidate.bench = benchmark(
            path,
            runs=options.bench_runs,
            threads=options.threads,
            sample=_sample(job),
            runtime=runtime,
        )


def _flex_runs(path: Path) -> bool:
    try:
        ModelRunner(path, runtime="tensorflow")
    except (ModelLoadError, RuntimeUnavailableError):
        return False
    return True


def _unrunnable_flex(job: _Job, candidate: Candidate) -> None:
    """Flex models convert everywhere but run only where a runtime carries Flex.

    TensorFlow's own wheel stopped shipping the Flex delegate (2.20+), so on such a
    machine the model can be converted and described, not validated.
    """
    assert candidate.info is not None
    ops = ", ".join(candidate.info.flex_ops)
    if job.options.evaluation is not None:
        raise ConversionError(
            f"the model needs Flex ops ({ops}) and no runtime installed here carries the Flex "
            "delegate, so it cannot be validated; convert without --eval, or on a machine "
            "with a Flex-enabled runtime"
        )
    candidate.runnable = False
    job.progress.warn(
        f"the model needs Flex ops ({ops}); no runtime installed here carries the Flex "
        "delegate, so it was not validated, benchmarked or self-tested"
    )


def _runtime_for(info: ModelInfo) -> str | None:
    # Flex ops live only in TensorFlow's own interpreter; LiteRT's wheel does not carry them.
    return "tensorflow" if info.flex_ops else None


def _run(
    path: Path, inputs: Sequence[np.ndarray], threads: int | None, runtime: str | None
) -> list[np.ndarray]:
    try:
        return ModelRunner(path, threads=threads, runtime=runtime).predict(inputs)
    except (ModelLoadError, InputShapeError) as exc:
        raise ArtifactError(f"the converted model does not run: {exc}") from None


def _sample(job: _Job) -> list[np.ndarray] | None:
    for ds in (job.data.evaluation, job.data.calibration):
        if ds is not None:
            return [ds.x[:1]]
    return None


def _select(job: _Job, candidates: list[Candidate]) -> ConvertResult:
    result = ConvertResult(
        out=None,
        chosen=None,
        candidates=candidates,
        manifest=None,
        max_accuracy_drop=job.options.max_accuracy_drop,
        warnings=list(job.progress.warnings),
        layers=job.layers,
    )
    eligible = [
        c for c in candidates if c.passed and (c.integer_only or not job.options.require_integer)
    ]
    if job.options.quantize != AUTO:
        result.chosen = candidates[0]
        return result
    if not eligible:
        return result
    result.chosen = min(eligible, key=_ranking(job.options.objective))
    return result


def _ranking(objective: Objective) -> Callable[[Candidate], tuple[float, ...]]:
    def accuracy_loss(c: Candidate) -> float:
        gate = c.gate
        return gate.value if gate is not None and gate.value is not None else 0.0

    if objective == "latency":
        return lambda c: (c.bench.p50_ms if c.bench else float("inf"), c.size)
    return lambda c: (float(c.size), accuracy_loss(c))


def _gate_failure(result: ConvertResult) -> str:
    budget = result.max_accuracy_drop
    tried = [c for c in result.candidates if c.error is None and c.gate is not None]
    if result.chosen is not None and result.chosen.gate is not None:
        return f"{result.chosen.label}: {result.chosen.gate.describe(budget)}; no artifact written"
    if not tried:
        return "no candidate converted; no artifact written"
    best = min(tried, key=lambda c: c.gate.value if c.gate and c.gate.value is not None else 1.0)
    assert best.gate is not None
    return (
        f"no candidate meets the accuracy budget; the closest is {best.label}: "
        f"{best.gate.describe(budget)}; no artifact written"
    )


def _tensor_spec(t: TensorInfo) -> TensorSpec:
    return TensorSpec(
        name=t.name,
        shape=tuple(t.shape_signature) if t.shape_signature else tuple(t.shape),
        dtype=t.dtype,
        scale=float(t.scale),
        zero_point=int(t.zero_point),
    )


def _manifest(job: _Job, chosen: Candidate, fmt: str, src_sha: str) -> Manifest:
    options = job.options
    assert chosen.path is not None
    assert chosen.info is not None
    info = chosen.info
    sha256, size = file_sha256(chosen.path)
    outputs_spec = tuple(_tensor_spec(t) for t in info.outputs)
    runtime = _runtime_for(info)
    with job.progress.step("Recording self-test vectors and reference statistics"):
        samples = _reference_inputs(job, info)
        vectors = None
        answers = None
        if chosen.runnable:
            reference_outputs = _run(chosen.path, samples, options.threads, runtime)
            answers = reference_outputs[0]
            vectors = self_test(
                samples,
                reference_outputs,
                atol=self_test_tolerance(chosen.mode, outputs_spec, reference_outputs),
            )
        # Statistics of made-up inputs would describe nothing a device will ever see.
        has_data = job.data.calibration is not None or job.data.evaluation is not None
        stats = reference_stats(samples[0], answers) if has_data else None
    bench = chosen.bench
    return Manifest(
        schema_version=MANIFEST_SCHEMA_VERSION,
        name=_model_name(options),
        version=options.version,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        model=ModelFile(path=MODEL_FILE, sha256=sha256, size=size),
        source=SourceInfo(
            format=fmt,  # type: ignore[arg-type]
            sha256=src_sha,
            conversion_path=chosen.conversion_path,  # type: ignore[arg-type]
        ),
        inputs=tuple(_tensor_spec(t) for t in info.inputs),
        outputs=outputs_spec,
        quantization=Quantization(
            mode=chosen.mode,
            integer_only=chosen.integer_only,
            float_layers=chosen.float_layers,
        ),
        labels=job.data.labels,
        toolchain=ToolchainInfo(
            edgefleet=_version("edgefleet"),
            tensorflow=_version("tensorflow"),
            validated_with=bench.runtime if bench else "not validated",
        ),
        runtime=RuntimeRequirements(
            min_runtime_version=info.min_runtime_version,
            ops=tuple(sorted(info.ops)),
            requires_flex=bool(info.flex_ops),
            flex_ops=tuple(info.flex_ops),
        ),
        validation=chosen.validation,
        benchmark=Benchmark(
            runs=bench.runs,
            threads=bench.threads,
            p50_ms=bench.p50_ms,
            p90_ms=bench.p90_ms,
            p99_ms=bench.p99_ms,
            throughput_per_s=bench.throughput_per_s,
            peak_rss_bytes=bench.peak_rss_bytes,
            machine=machine_description(),
        )
        if bench
        else None,
        reference=stats,
        self_test=vectors,
    )


def _reference_inputs(job: _Job, info: ModelInfo) -> list[np.ndarray]:
    """Calibration data describes what the model was built for; else eval; else noise."""
    for ds in (job.data.calibration, job.data.evaluation):
        if ds is not None:
            return [ds.x[:REFERENCE_SAMPLES]]
    # No data at all: the self-test still pins the model's arithmetic on fixed inputs.
    rng = np.random.default_rng(0)
    arrays = []
    for spec in job.inputs:
        shape = [d if d else 1 for d in spec["shape"][1:]]
        if np.issubdtype(np.dtype(spec["dtype"]), np.floating):
            arrays.append(rng.standard_normal((8, *shape)).astype(spec["dtype"]))
        else:
            arrays.append(np.zeros((8, *shape), dtype=spec["dtype"]))
    return arrays


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
