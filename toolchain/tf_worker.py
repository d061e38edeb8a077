"""The TensorFlow side of edge-convert, run as a child process (`python -m toolchain.tf_worker`).

TensorFlow's converter can raise, abort or crash the interpreter on a model it cannot
handle. In a child process each of those becomes a clear error in the parent instead of a
dead command, and TensorFlow's slow import stays out of `inspect`, `verify` and `bench`.

Jobs arrive as JSON lines on stdin; each gets one JSON line back on the original stdout.
Arrays travel through .npy/.npz files in a folder the parent owns.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protocol.manifest import QuantizationMode

# The representative dataset walks every sample; past this, calibration takes longer
# without moving the ranges.
MAX_CALIBRATION_SAMPLES = 1000
_CHUNK = 256


class JobError(Exception):
    """A failure to report to the parent as `kind` with a one-line message."""

    def __init__(self, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.extra = extra


@dataclass
class Source:
    path: Path
    format: str  # keras | h5 | saved_model
    workdir: Path = Path(".")
    keras_model: Any = None
    saved_model: Any = None
    # Set once the direct Keras path fails, so later modes go straight to the fallback.
    exported: Path | None = None
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)


_state: dict[str, Source] = {}


def _tf() -> Any:
    import tensorflow as tf

    return tf


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def load(job: dict[str, Any]) -> dict[str, Any]:
    path = Path(job["src"])
    fmt = job["format"]
    tf = _tf()
    source = Source(path=path, format=fmt, workdir=Path(job["workdir"]))
    try:
        if fmt == "saved_model":
            source.saved_model = tf.saved_model.load(str(path))
            inputs, outputs = _saved_model_signature(source)
        else:
            import keras

            source.keras_model = keras.models.load_model(str(path), compile=False)
            inputs, outputs = _keras_signature(source)
    except JobError:
        raise
    except Exception as exc:
        raise JobError("source", f"cannot load {path.name}: {_first_line(exc)}") from exc
    _state["source"] = source
    return {"inputs": inputs, "outputs": outputs}


def _spec(name: str, shape: Any, dtype: Any) -> dict[str, Any]:
    dims = [None if d is None else int(d) for d in shape]
    return {"name": name, "shape": dims, "dtype": _tf().as_dtype(dtype).name}


def _keras_signature(source: Source) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    model = source.keras_model
    if not hasattr(model, "inputs") or not model.inputs:
        raise JobError("source", f"{source.path.name} is a Keras model without defined inputs")
    inputs = [_spec(t.name, t.shape, t.dtype) for t in model.inputs]
    outputs = [_spec(t.name, t.shape, t.dtype) for t in model.outputs]
    source.input_names = [s["name"] for s in inputs]
    source.output_names = [s["name"] for s in outputs]
    return inputs, outputs


def _serving_fn(source: Source) -> Any:
    signatures = source.saved_model.signatures
    if "serving_default" not in signatures:
        found = ", ".join(signatures) or "none"
        raise JobError("source", f"SavedModel has no 'serving_default' signature (found: {found})")
    return signatures["serving_default"]


def _saved_model_signature(source: Source) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    fn = _serving_fn(source)
    # The TFLite converter orders a signature's tensors by name; so do we.
    in_specs = sorted(fn.structured_input_signature[1].items())
    out_specs = sorted(fn.structured_outputs.items())
    source.input_names = [name for name, _ in in_specs]
    source.output_names = [name for name, _ in out_specs]
    inputs = [_spec(n, s.shape, s.dtype) for n, s in in_specs]
    outputs = [_spec(n, s.shape, s.dtype) for n, s in out_specs]
    return inputs, outputs


def predict(job: dict[str, Any]) -> dict[str, Any]:
    source = _state["source"]
    x = np.load(job["x"], allow_pickle=False)
    chunks = [_predict_chunk(source, x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]
    outputs = [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
    np.savez(job["out"], *outputs)
    return {"outputs": len(outputs)}


def _predict_chunk(source: Source, x: np.ndarray) -> list[np.ndarray]:
    if source.keras_model is not None:
        result = source.keras_model(x, training=False)
        results = result if isinstance(result, list | tuple) else [result]
        return [np.asarray(r, dtype=np.float32) for r in results]
    fn = _serving_fn(source)
    out = fn(**{source.input_names[0]: _tf().constant(x)})
    return [np.asarray(out[name], dtype=np.float32) for name in source.output_names]


def _representative(calibration: Path) -> Callable[[], Iterator[list[np.ndarray]]]:
    x = np.load(calibration, allow_pickle=False)
    if len(x) > MAX_CALIBRATION_SAMPLES:
        # A seeded subset, not the head: data sets are often sorted by class.
        picks = np.random.default_rng(0).choice(len(x), MAX_CALIBRATION_SAMPLES, replace=False)
        x = x[np.sort(picks)]

    def samples() -> Iterator[list[np.ndarray]]:
        for i in range(len(x)):
            yield [x[i : i + 1]]

    return samples


def _new_converter(source: Source, via_saved_model: bool) -> Any:
    lite = _tf().lite
    if source.format == "saved_model":
        return lite.TFLiteConverter.from_saved_model(str(source.path))
    if via_saved_model:
        if source.exported is None:
            # Inside the parent's work folder, which it removes when the command ends.
            export_dir = source.workdir / "exported_saved_model"
            source.keras_model.export(str(export_dir), verbose=False)
            source.exported = export_dir
        return lite.TFLiteConverter.from_saved_model(str(source.exported))
    return lite.TFLiteConverter.from_keras_model(source.keras_model)


def _configure(
    converter: Any, mode: QuantizationMode, calibration: Path | None, allow_tf_ops: bool
) -> None:
    """One recipe per mode; see toolchain.quantize for what each one means."""
    tf = _tf()
    ops = tf.lite.OpsSet
    builtins = ops.TFLITE_BUILTINS
    if mode is not QuantizationMode.FLOAT32:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode is QuantizationMode.FLOAT16:
        converter.target_spec.supported_types = [tf.float16]
    if mode in (QuantizationMode.INT8, QuantizationMode.INT16X8):
        assert calibration is not None
        converter.representative_dataset = _representative(calibration)
    if mode is QuantizationMode.INT8:
        builtins = ops.TFLITE_BUILTINS_INT8
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    if mode is QuantizationMode.INT16X8:
        builtins = ops.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
    converter.target_spec.supported_ops = [builtins] + ([ops.SELECT_TF_OPS] if allow_tf_ops else [])


_FLEX_LINE = re.compile(r"TF Select ops: ([^\n]+)")
_CUSTOM_LINE = re.compile(r"Custom ops: ([^\n]+)")
_NEITHER = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def _missing_ops(message: str) -> list[str]:
    found: list[str] = []
    for pattern in (_FLEX_LINE, _CUSTOM_LINE):
        for line in pattern.findall(message):
            found.extend(op.strip() for op in line.split(",") if op.strip())
    found.extend(_NEITHER.findall(message))
    return sorted(set(found))


def _converter_failure(exc: Exception) -> JobError:
    message = str(exc)
    if "ERROR_NEEDS_FLEX_OPS" in message or "TF Select ops" in message:
        return JobError("unsupported_ops", "needs TF ops", ops=_missing_ops(message))
    if "ERROR_NEEDS_CUSTOM_OPS" in message:
        return JobError("custom_ops", "needs custom ops", ops=_missing_ops(message))
    # The converter's useful line is usually the first "error:" one, not the first line.
    lines = [ln.strip() for ln in message.splitlines() if "error:" in ln]
    detail = lines[0] if lines else _first_line(exc)
    return JobError("conversion", detail[:400])


def _convert_with_fallback(source: Source, build: Callable[[bool], bytes]) -> tuple[bytes, str]:
    """Run `build(via_saved_model)`, falling back from the Keras path to a SavedModel export."""
    direct_first = source.format != "saved_model" and source.exported is None
    if direct_first:
        try:
            return build(False), "keras"
        except Exception as exc:
            failure = _converter_failure(exc)
            if failure.kind in ("unsupported_ops", "custom_ops"):
                raise failure from exc
            # from_keras_model trips over some Keras 3 models; the exported SavedModel
            # path is what TF recommends for them.
    try:
        return build(True), "saved_model"
    except JobError:
        raise
    except Exception as exc:
        raise _converter_failure(exc) from exc


def convert(job: dict[str, Any]) -> dict[str, Any]:
    source = _state["source"]
    mode = QuantizationMode(job["mode"])
    calibration = Path(job["calibration"]) if job.get("calibration") else None
    allow_tf_ops = bool(job.get("allow_tf_ops"))
    float_layers: list[str] = job.get("float_layers") or []

    def build(via_saved_model: bool) -> bytes:
        converter = _new_converter(source, via_saved_model)
        if float_layers:
            return _mixed_int8(converter, calibration, float_layers, allow_tf_ops)
        _configure(converter, mode, calibration, allow_tf_ops)
        return bytes(converter.convert())

    model, path = _convert_with_fallback(source, build)
    Path(job["out"]).write_bytes(model)
    return {"conversion_path": path}


def _debugger(converter: Any, calibration: Path | None, options: Any = None) -> Any:
    """A quantization debugger over int8 weights and activations with float I/O."""
    tf = _tf()
    assert calibration is not None
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(calibration)
    return tf.lite.experimental.QuantizationDebugger(
        converter=converter,
        debug_dataset=_representative(calibration),
        debug_options=options,
    )


def _mixed_int8(
    converter: Any, calibration: Path | None, float_layers: list[str], allow_tf_ops: bool
) -> bytes:
    tf = _tf()
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS] + (
        [tf.lite.OpsSet.SELECT_TF_OPS] if allow_tf_ops else []
    )
    converter.target_spec.supported_ops = ops
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=float_layers)
    return bytes(_debugger(converter, calibration, options).get_nondebug_quantized_model())


def layer_stats(job: dict[str, Any]) -> dict[str, Any]:
    """Per-layer int8 error (TFLite's quantization debugger), worst first."""
    source = _state["source"]
    calibration = Path(job["calibration"])

    def build(via_saved_model: bool) -> bytes:
        debugger = _debugger(_new_converter(source, via_saved_model), calibration)
        debugger.run()
        text = io.StringIO()
        debugger.layer_statistics_dump(text)
        return text.getvalue().encode()

    raw, _ = _convert_with_fallback(source, build)
    rows = list(csv.DictReader(io.StringIO(raw.decode())))
    layers = []
    for row in rows:
        scale = float(row["scale"]) or 1.0
        mse = float(row["mean_squared_error"])
        layers.append(
            {
                "op": row["op_name"],
                "tensor": row["tensor_name"],
                "num_elements": float(row["num_elements"]),
                "mean_error": float(row["mean_error"]),
                "max_abs_error": float(row["max_abs_error"]),
                "mean_squared_error": mse,
                "scale": float(row["scale"]),
                "zero_point": int(float(row["zero_point"])),
                # RMSE in units of the layer's quantization step: about 0.29 (1/sqrt(12))
                # for a layer whose only error is rounding; much more means it suffers.
                "rmse_per_scale": float(np.sqrt(mse)) / scale,
            }
        )
    layers.sort(key=lambda r: r["rmse_per_scale"], reverse=True)
    return {"layers": layers}


def ping(job: dict[str, Any]) -> dict[str, Any]:
    return {"pid": os.getpid(), "tensorflow": _tf().__version__}


HANDLERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "load": load,
    "predict": predict,
    "convert": convert,
    "layer_stats": layer_stats,
    "ping": ping,
}


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"ok": True, **HANDLERS[job["op"]](job)}
    except JobError as exc:
        return {"ok": False, "kind": exc.kind, "message": str(exc), **exc.extra}
    except Exception as exc:
        return {
            "ok": False,
            "kind": "internal",
            "message": f"{type(exc).__name__}: {_first_line(exc)}",
            "traceback": traceback.format_exc(),
        }


def main() -> None:
    # TensorFlow and Keras print to stdout; the protocol gets a private copy of it.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if line.strip():
            channel.write(json.dumps(_run_job(json.loads(line))) + "\n")


if __name__ == "__main__":
    main()
