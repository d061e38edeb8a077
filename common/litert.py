"""The one place that picks a TFLite runtime and runs models on it.

Devices carry ai-edge-litert (or the older tflite-runtime); TensorFlow is only a last resort on
development machines. This module must stay importable without any of them: the runtime is
imported when a model is first loaded, never at import time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

RUNTIME_ENV = "EDGEFLEET_RUNTIME"

# Bounds the arena of the batch interpreter: activations grow linearly with the batch.
MAX_CHUNK = 256

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class _RuntimeChoice:
    key: str
    module: str
    attribute: str
    distributions: tuple[str, ...]


_RUNTIMES = (
    _RuntimeChoice(
        "ai-edge-litert", "ai_edge_litert.interpreter", "Interpreter", ("ai-edge-litert",)
    ),
    _RuntimeChoice(
        "tflite-runtime", "tflite_runtime.interpreter", "Interpreter", ("tflite-runtime",)
    ),
    _RuntimeChoice(
        "tensorflow",
        "tensorflow",
        "lite.Interpreter",
        ("tensorflow", "tensorflow-cpu", "tensorflow-aarch64", "tf-nightly"),
    ),
)
RUNTIME_KEYS = tuple(choice.key for choice in _RUNTIMES)


class RuntimeUnavailableError(ImportError):
    """No usable TFLite runtime is installed (or the one forced by EDGEFLEET_RUNTIME is not)."""


class ModelLoadError(ValueError):
    """The model is corrupt, not a TFLite flatbuffer, or needs ops this runtime lacks."""


class InputShapeError(ValueError):
    """Inputs of the wrong number, shape or a non-numeric dtype."""


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output; scale/zero_point are 0.0/0 when the tensor is not quantized."""

    name: str
    index: int
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["shape_signature"] = list(self.shape_signature)
        return data


# --- choosing the runtime -----------------------------------------------------------------


def interpreter_class(runtime: str | None = None) -> tuple[type, str]:
    """The Interpreter class and a description like "ai-edge-litert 2.3.0".

    `runtime` (one of RUNTIME_KEYS) forces a runtime, as does the EDGEFLEET_RUNTIME variable;
    the argument wins. Otherwise: ai-edge-litert, then tflite-runtime, then TensorFlow.
    """
    if runtime:
        return _load_forced(runtime, "runtime")
    forced = os.environ.get(RUNTIME_ENV, "").strip()
    if forced:
        return _load_forced(forced, RUNTIME_ENV)
    failures: list[str] = []
    for choice in _RUNTIMES:
        try:
            return _load_runtime(choice)
        except ImportError as exc:
            failures.append(f"{choice.key}: {exc}")
    raise RuntimeUnavailableError(
        "no TFLite runtime is installed: pip install ai-edge-litert "
        "(or tflite-runtime on platforms it lacks); tried " + "; ".join(failures)
    )


def _load_forced(key: str, source: str) -> tuple[type, str]:
    for choice in _RUNTIMES:
        if choice.key == key:
            try:
                return _load_runtime(choice)
            except ImportError as exc:
                raise RuntimeUnavailableError(
                    f"{source}={key} but it cannot be imported ({exc}): pip install {key}"
                ) from exc
    raise RuntimeUnavailableError(f"{source}={key} is not one of: {', '.join(RUNTIME_KEYS)}")


def _load_runtime(choice: _RuntimeChoice) -> tuple[type, str]:
    module = importlib.import_module(choice.module)
    found: Any = module
    for part in choice.attribute.split("."):
        found = getattr(found, part)
    if not isinstance(found, type):
        raise ImportError(f"{choice.module}.{choice.attribute} is not a class")
    return found, f"{choice.key} {_version(choice, module)}"


def _version(choice: _RuntimeChoice, module: Any) -> str:
    for dist in choice.distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    top = importlib.import_module(choice.module.split(".")[0])
    return str(getattr(top, "__version__", getattr(module, "__version__", "unknown")))


# --- quantization -------------------------------------------------------------------------


def quantize(values: npt.ArrayLike, info: TensorInfo) -> np.ndarray:
    """Real values -> the tensor's integer dtype: round(x / scale) + zero_point, clipped."""
    return _quantizer(info)(values)


def _quantizer(info: TensorInfo) -> Callable[[npt.ArrayLike], np.ndarray]:
    """`quantize` for one tensor, its constants worked out once: it runs on every request."""
    dtype = np.dtype(info.dtype)
    # float32 keeps the hot path ~10x cheaper than float64 and holds every 8- or 16-bit code.
    work = np.dtype(np.float32 if dtype.itemsize <= 2 else np.float64)
    scale, zero_point = work.type(info.scale), work.type(info.zero_point)
    limits = np.iinfo(dtype)
    low, high = work.type(limits.min), work.type(limits.max)

    def quantize_one(values: npt.ArrayLike) -> np.ndarray:
        scaled = np.asarray(values, dtype=work) / scale
        # TFLite's kernels round half away from zero (std::round); np.round would round
        # half to even.
        scaled += np.copysign(work.type(0.5), scaled)
        np.trunc(scaled, out=scaled)
        scaled += zero_point
        # maximum and minimum: np.clip's own checks cost more than the clipping.
        np.minimum(np.maximum(scaled, low, out=scaled), high, out=scaled)
        quantized: np.ndarray = scaled.astype(dtype)
        return quantized

    return quantize_one


def dequantize(values: npt.ArrayLike, info: TensorInfo) -> FloatArray:
    """Integer tensor values -> real float32 values: (q - zero_point) * scale."""
    return _dequantizer(info)(values)


def _dequantizer(info: TensorInfo) -> Callable[[npt.ArrayLike], FloatArray]:
    zero_point, scale = np.float32(info.zero_point), np.float32(info.scale)

    def dequantize_one(values: npt.ArrayLike) -> FloatArray:
        shifted = np.asarray(values).astype(np.float32)
        shifted -= zero_point
        shifted *= scale
        return shifted

    return dequantize_one


def _is_quantized_integer(info: TensorInfo) -> bool:
    return info.quantized and np.dtype(info.dtype).kind in "iu"


def _encoder(info: TensorInfo) -> Callable[[np.ndarray], np.ndarray]:
    dtype = np.dtype(info.dtype)
    if _is_quantized_integer(info):
        return _quantizer(info)
    return lambda values: np.ascontiguousarray(values, dtype=dtype)


def _decoder(info: TensorInfo) -> Callable[[np.ndarray], np.ndarray]:
    dtype = np.dtype(info.dtype)
    if _is_quantized_integer(info):
        return _dequantizer(info)
    if dtype.kind == "f" and dtype != np.float32:
        return lambda values: values.astype(np.float32)
    # float32 already; integer outputs that are not quantized (labels, indices) keep their type.
    return lambda values: values


# --- loading ------------------------------------------------------------------------------


def _tensor_info(details: dict[str, Any]) -> TensorInfo:
    params = details.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float64)
    zero_points = np.asarray(params.get("zero_points", []), dtype=np.int64)
    # Per-channel inputs/outputs are rare; the first channel's parameters are the best we have.
    scale = float(scales[0]) if scales.size else 0.0
    zero_point = int(zero_points[0]) if zero_points.size else 0
    shape = tuple(int(d) for d in details["shape"])
    signature = details.get("shape_signature")
    return TensorInfo(
        name=str(details["name"]),
        index=int(details["index"]),
        shape=shape,
        shape_signature=tuple(int(d) for d in signature) if signature is not None else shape,
        dtype=np.dtype(details["dtype"]).name,
        scale=scale,
        zero_point=zero_point,
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe_load_failure(exc: Exception, runtime: str) -> str:
    message = _one_line(str(exc))
    if "Select TensorFlow op" in message or "Flex" in message:
        names = sorted(set(re.findall(r"\b(Flex\w+)", message)))
        which = f": {', '.join(names)}" if names else ""
        return f"model needs TF Select (Flex) ops that {runtime} does not carry{which}"
    custom = re.search(r"unresolved custom op: (\w+)", message)
    if custom:
        return f"model needs custom op {custom.group(1)} that {runtime} does not carry"
    builtin = re.search(r"builtin opcode '(\w+)' version '(\d+)'", message)
    if builtin:
        return (
            f"model needs builtin op {builtin.group(1)} version {builtin.group(2)} "
            f"that {runtime} does not carry (the runtime is older than the converter)"
        )
    if "not a valid Flatbuffer" in message:
        return "model is corrupt: not a valid TFLite flatbuffer"
    return f"cannot load model with {runtime}: {message}"


def _check_header(header: bytes, where: str) -> None:
    if not header:
        raise ModelLoadError(f"{where} is empty, not a TFLite model")
    if len(header) < 8 or header[4:8] != b"TFL3":
        raise ModelLoadError(f"{where} is not a TFLite flatbuffer (no TFL3 identifier)")


def _read_header(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(8)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc


class ModelRunner:
    """Runs a TFLite model on real (float) values, quantizing and dequantizing at the edges."""

    def __init__(
        self, model: bytes | Path, *, threads: int | None = None, runtime: str | None = None
    ) -> None:
        """`runtime` forces one of RUNTIME_KEYS, e.g. "tensorflow" for a model with Flex ops;
        the `runtime` attribute then describes the one in use ("ai-edge-litert 2.3.0")."""
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self._cls, self.runtime = interpreter_class(runtime)
        self._threads = threads
        # A path is handed to the runtime as a path so that it can mmap the weights.
        self._content: bytes | None = None
        self._path: Path | None = None
        if isinstance(model, bytes | bytearray | memoryview):
            self._content = bytes(model)
            _check_header(self._content[:8], "model")
        else:
            self._path = Path(model)
            _check_header(_read_header(self._path), f"model file {self._path}")

        self._interpreter: Any = self._new_interpreter()
        self.inputs: list[TensorInfo] = [
            _tensor_info(d) for d in self._interpreter.get_input_details()
        ]
        self.outputs: list[TensorInfo] = [
            _tensor_info(d) for d in self._interpreter.get_output_details()
        ]
        self._encoders = [_encoder(info) for info in self.inputs]
        self._decoders = [_decoder(info) for info in self.outputs]
        self._input_indices = [info.index for info in self.inputs]
        self._output_indices = [info.index for info in self.outputs]
        self._input_ranks = [len(info.shape) for info in self.inputs]
        # One input and one output that need no encoding or decoding: `run` skips both.
        self._plain = (
            len(self.inputs) == len(self.outputs) == 1
            and not _is_quantized_integer(self.inputs[0])
            and not _is_quantized_integer(self.outputs[0])
            and np.dtype(self.outputs[0].dtype) in (np.float32, np.int32, np.int64, np.uint8)
        )

        # predict() runs batches on a second interpreter so invoke_once never has to resize back.
        self._batch_interpreter: Any = None
        self._batch_size = 0
        self._can_batch = bool(self.inputs) and all(
            info.shape_signature[:1] == (-1,) for info in self.inputs
        )

    @property
    def interpreter(self) -> Any:
        """The batch-1 interpreter, for callers that time invoke() alone (the benchmark)."""
        return self._interpreter

    def _new_interpreter(self) -> Any:
        kwargs: dict[str, Any] = {}
        if self._threads is not None:
            kwargs["num_threads"] = self._threads
        if self._content is not None:
            kwargs["model_content"] = self._content
        else:
            kwargs["model_path"] = str(self._path)
        try:
            with warnings.catch_warnings():
                # TensorFlow's interpreter is chosen on purpose (Flex ops, or nothing else).
                warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter")
                interpreter = self._cls(**kwargs)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(_describe_load_failure(exc, self.runtime)) from exc
        return interpreter

    # --- the hot path: one sample ---

    def set_inputs(self, inputs: Sequence[np.ndarray]) -> None:
        """Quantize one sample (batch 1, real values) into the batch-1 interpreter's inputs."""
        if len(inputs) != len(self.inputs):
            raise InputShapeError(f"model takes {len(self.inputs)} input(s), got {len(inputs)}")
        interpreter = self._interpreter
        for position, values in enumerate(inputs):
            array = np.asarray(values)
            if array.ndim + 1 == self._input_ranks[position]:
                array = array[np.newaxis]
            if array.dtype.kind not in "biuf":
                raise self._input_error(position, array, self.inputs[position].shape)
            try:
                interpreter.set_tensor(
                    self._input_indices[position], self._encoders[position](array)
                )
            except (ValueError, TypeError) as exc:
                raise self._input_error(position, array, self.inputs[position].shape) from exc

    def run(self, arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        """The serving hot path: one sample as `edge_agent.serving` prepares it (batch 1,
        real values in the input's dtype, or float32 where it is quantized), so nothing is
        checked again; returns one array per output, batch 1."""
        interpreter = self._interpreter
        for index, encode, array in zip(self._input_indices, self._encoders, arrays, strict=True):
            interpreter.set_tensor(index, encode(array))
        interpreter.invoke()
        return tuple(
            decode(interpreter.get_tensor(index))
            for decode, index in zip(self._decoders, self._output_indices, strict=True)
        )

    def hot_path(self) -> Callable[[Sequence[np.ndarray]], tuple[np.ndarray, ...]]:
        """`run`, specialised for this model once: with everything it needs bound, and for
        one input and one output that need no encoding, on the native interpreter itself.

        Every runtime's Interpreter wraps the same native class (`_interpreter`). The Python
        layer adds only a check for numpy views into the interpreter's buffers, which this
        runner never makes; on a small model that layer costs a few percent of an inference.
        The native object is looked up per call: holding it would fail that very check.
        """
        interpreter = self._interpreter
        native = getattr(interpreter, "_interpreter", None)
        wrapped = all(
            callable(getattr(native, name, None)) for name in ("SetTensor", "Invoke", "GetTensor")
        )
        if not wrapped or len(self.inputs) != 1 or len(self.outputs) != 1:
            return self.run
        [input_index], [output_index] = self._input_indices, self._output_indices
        if self._plain:

            def run(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
                native = interpreter._interpreter
                native.SetTensor(input_index, arrays[0])
                native.Invoke()
                return (native.GetTensor(output_index, 0),)

            return run
        [encode], [decode] = self._encoders, self._decoders

        def run_coded(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
            native = interpreter._interpreter
            native.SetTensor(input_index, encode(arrays[0]))
            native.Invoke()
            return (decode(native.GetTensor(output_index, 0)),)

        return run_coded

    def invoke_once(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one sample (batch 1, real values); returns one array per output, batch 1."""
        self.set_inputs(inputs)
        interpreter = self._interpreter
        interpreter.invoke()
        return [
            decode(interpreter.get_tensor(index))
            for decode, index in zip(self._decoders, self._output_indices, strict=True)
        ]

    # --- batches ---

    def predict(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run a batch: one (N, *input_shape[1:]) array of real values per model input."""
        arrays = self._check_batch(inputs)
        count = arrays[0].shape[0] if arrays else 1
        if count == 0:
            return [
                self._decoders[i](np.zeros((0, *info.shape[1:]), dtype=np.dtype(info.dtype)))
                for i, info in enumerate(self.outputs)
            ]
        if self._can_batch and count > 1:
            try:
                return self._predict_batched(arrays, count)
            except (ValueError, RuntimeError):
                # The signature promised a dynamic batch but some op disagrees; stop trying.
                self._can_batch = False
                self._batch_interpreter = None
        return self._predict_looped(arrays, count)

    def _check_batch(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise InputShapeError(f"model takes {len(self.inputs)} input(s), got {len(inputs)}")
        arrays: list[np.ndarray] = []
        for position, (values, info) in enumerate(zip(inputs, self.inputs, strict=True)):
            array = np.asarray(values)
            expected: tuple[int | str, ...] = ("N", *info.shape[1:])
            if array.dtype.kind not in "biuf":
                raise self._input_error(position, array, expected)
            if not info.shape or array.shape[1:] != info.shape[1:] or array.ndim != len(info.shape):
                raise self._input_error(position, array, expected)
            if arrays and array.shape[0] != arrays[0].shape[0]:
                raise InputShapeError(
                    f"inputs disagree on the batch size: input 0 has {arrays[0].shape[0]}, "
                    f"input {position} has {array.shape[0]}"
                )
            arrays.append(array)
        return arrays

    def _input_error(
        self, position: int, array: np.ndarray, expected: Sequence[int | str]
    ) -> InputShapeError:
        info = self.inputs[position]
        if array.dtype.kind not in "biuf":
            return InputShapeError(
                f"input {position} ({info.name}) must be numeric, got dtype {array.dtype}"
            )
        return InputShapeError(
            f"input {position} ({info.name}) expects shape {_format_shape(expected)}, "
            f"got {_format_shape(array.shape)}"
        )

    def _predict_batched(self, arrays: list[np.ndarray], count: int) -> list[np.ndarray]:
        # Equal chunks, so a repeated N always maps to the same interpreter size.
        chunks = math.ceil(count / MAX_CHUNK)
        size = math.ceil(count / chunks)
        interpreter = self._batch_interpreter_for(size)
        return self._run_chunks(interpreter, arrays, count, size)

    def _batch_interpreter_for(self, size: int) -> Any:
        if self._batch_interpreter is None:
            self._batch_interpreter = self._new_interpreter()
            self._batch_size = self.inputs[0].shape[0]
        interpreter = self._batch_interpreter
        if self._batch_size != size:
            self._batch_size = 0
            for info in self.inputs:
                interpreter.resize_tensor_input(info.index, [size, *info.shape[1:]], strict=True)
            interpreter.allocate_tensors()
            self._batch_size = size
        return interpreter

    def _predict_looped(self, arrays: list[np.ndarray], count: int) -> list[np.ndarray]:
        # The model's own batch (almost always 1) is the step; the tail is padded.
        step = max(self.inputs[0].shape[0], 1) if self.inputs else 1
        return self._run_chunks(self._interpreter, arrays, count, step)

    def _run_chunks(
        self, interpreter: Any, arrays: list[np.ndarray], count: int, size: int
    ) -> list[np.ndarray]:
        pieces: list[list[np.ndarray]] = [[] for _ in self.outputs]
        for start in range(0, count, size):
            # Encoding chunk by chunk keeps a large batch from being copied whole.
            for index, encode, array in zip(
                self._input_indices, self._encoders, arrays, strict=True
            ):
                chunk = encode(array[start : start + size])
                interpreter.set_tensor(index, _padded(chunk, size))
            interpreter.invoke()
            for position, index in enumerate(self._output_indices):
                result = interpreter.get_tensor(index)
                if size == 1 and (result.ndim == 0 or result.shape[0] != 1):
                    # An output without a batch axis: one sample at a time gives it one.
                    result = result[np.newaxis]
                elif result.ndim == 0 or result.shape[0] != size:
                    raise RuntimeError(
                        f"output {position} has batch {result.shape[:1]}, expected {size}"
                    )
                pieces[position].append(result[: min(size, count - start)])
        return [
            decode(np.concatenate(parts, axis=0))
            for decode, parts in zip(self._decoders, pieces, strict=True)
        ]


def _padded(chunk: np.ndarray, size: int) -> np.ndarray:
    missing = size - chunk.shape[0]
    if missing == 0:
        return np.ascontiguousarray(chunk)
    filler = np.zeros((missing, *chunk.shape[1:]), dtype=chunk.dtype)
    return np.concatenate([chunk, filler], axis=0)


def _format_shape(shape: Sequence[int | str]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + (",)" if len(shape) == 1 else ")")
