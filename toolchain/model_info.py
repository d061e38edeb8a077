"""What a .tflite file holds, read from the flatbuffer itself.

No interpreter is involved, so this works for models the runtime cannot load (Flex ops, custom
ops) and costs no arena allocation.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.litert import TensorInfo
from toolchain.errors import ArtifactError

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
MIN_RUNTIME_KEY = "min_runtime_version"
FLEX_PREFIX = "Flex"

# TensorType enum -> numpy dtype name; types numpy lacks keep the schema's name in lower case.
_DTYPE_NAMES = {
    "FLOAT32": "float32",
    "FLOAT16": "float16",
    "FLOAT64": "float64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "BOOL": "bool",
    "STRING": "bytes",
    "COMPLEX64": "complex64",
    "COMPLEX128": "complex128",
}


@dataclass(frozen=True)
class ModelInfo:
    size_bytes: int
    sha256: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    ops: dict[str, int]
    min_runtime_version: str | None
    flex_ops: list[str]
    custom_ops: list[str]
    # Tensor name -> number of channels, for every tensor quantized per channel (weights).
    per_channel: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "inputs": [info.to_dict() for info in self.inputs],
            "outputs": [info.to_dict() for info in self.outputs],
            "ops": dict(self.ops),
            "min_runtime_version": self.min_runtime_version,
            "flex_ops": list(self.flex_ops),
            "custom_ops": list(self.custom_ops),
            "per_channel": dict(self.per_channel),
        }


def read_model_info(model: bytes | Path) -> ModelInfo:
    """Parse a .tflite flatbuffer; ArtifactError if it is not one, is empty or is truncated."""
    buf, where = _read_bytes(model)
    _check_identifier(buf, where)
    schema = _schema()
    try:
        root = schema.Model.GetRootAs(buf, 0)
        info = _parse(schema, root, buf)
    except (IndexError, struct.error, ValueError, UnicodeDecodeError, TypeError) as exc:
        raise ArtifactError(
            f"{where} is a truncated or corrupt TFLite flatbuffer ({len(buf)} bytes): {exc}"
        ) from exc
    return info


def _read_bytes(model: bytes | Path) -> tuple[bytes, str]:
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model), "model"
    path = Path(model)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _check_identifier(buf: bytes, where: str) -> None:
    if not buf:
        raise ArtifactError(f"{where} is empty, not a TFLite model")
    if len(buf) < 8 or buf[4:8] != FILE_IDENTIFIER:
        raise ArtifactError(f"{where} is not a TFLite flatbuffer (no TFL3 identifier)")


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as exc:
        raise ArtifactError(
            f"reading .tflite files needs ai-edge-litert (pip install ai-edge-litert): {exc}"
        ) from exc
    return schema_py_generated


def _parse(schema: Any, root: Any, buf: bytes) -> ModelInfo:
    if root.Version() != SCHEMA_VERSION:
        raise ValueError(f"schema version {root.Version()}, expected {SCHEMA_VERSION}")
    if root.SubgraphsLength() < 1:
        raise ValueError("the model has no subgraphs")
    # Touching every buffer is what catches a file cut short: weights sit at the end.
    _check_buffers(root, len(buf))
    op_names, custom_names = _operator_names(schema, root)
    ops, per_channel = _count_ops_and_channels(root, op_names)
    type_names = _type_names(schema)
    graph = root.Subgraphs(0)
    inputs = [_tensor(graph, graph.Inputs(i), type_names) for i in range(graph.InputsLength())]
    outputs = [_tensor(graph, graph.Outputs(i), type_names) for i in range(graph.OutputsLength())]
    used = set(ops)
    return ModelInfo(
        size_bytes=len(buf),
        sha256=hashlib.sha256(buf).hexdigest(),
        inputs=inputs,
        outputs=outputs,
        ops=dict(sorted(ops.items())),
        min_runtime_version=_min_runtime_version(root, buf),
        flex_ops=sorted(name for name in used if name.startswith(FLEX_PREFIX)),
        custom_ops=sorted(name for name in custom_names & used if not _is_flex(name)),
        per_channel=per_channel,
    )


def _check_buffers(root: Any, size: int) -> None:
    for i in range(root.BuffersLength()):
        buffer = root.Buffers(i)
        offset, length = int(buffer.Offset()), int(buffer.Size())
        if offset > 1 and offset + length > size:
            raise ValueError(f"buffer {i} ends at byte {offset + length} of {size}")
        if buffer.DataLength():
            buffer.DataAsNumpy()  # raises ValueError when the data runs past the end


def _builtin_names(schema: Any) -> dict[int, str]:
    return {
        value: name
        for name, value in vars(schema.BuiltinOperator).items()
        if not name.startswith("_") and isinstance(value, int)
    }


def _builtin_code(code: Any) -> int:
    # Codes above 127 live in BuiltinCode; old files only fill the deprecated int8 field.
    return max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))


def _is_flex(name: str) -> bool:
    return name.startswith(FLEX_PREFIX)


def _operator_names(schema: Any, root: Any) -> tuple[dict[int, str], set[str]]:
    """Opcode index -> op name, and the names that are custom ops (Flex ones included)."""
    builtins = _builtin_names(schema)
    names: dict[int, str] = {}
    custom_names: set[str] = set()
    for index in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(index)
        custom = code.CustomCode()
        if custom is not None:
            names[index] = custom.decode("utf-8")
            custom_names.add(names[index])
        else:
            number = _builtin_code(code)
            names[index] = builtins.get(number, f"BUILTIN_{number}")
    return names, custom_names


def _count_ops_and_channels(
    root: Any, op_names: dict[int, str]
) -> tuple[Counter[str], dict[str, int]]:
    ops: Counter[str] = Counter()
    per_channel: dict[str, int] = {}
    for g in range(root.SubgraphsLength()):
        graph = root.Subgraphs(g)
        for o in range(graph.OperatorsLength()):
            index = int(graph.Operators(o).OpcodeIndex())
            if index not in op_names:
                raise ValueError(f"operator {o} uses opcode {index}, which the model lacks")
            ops[op_names[index]] += 1
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            channels = _scale_count(tensor)
            if channels > 1:
                per_channel[_text(tensor.Name())] = channels
    return ops, per_channel


def _scale_count(tensor: Any) -> int:
    quantization = tensor.Quantization()
    return 0 if quantization is None else int(quantization.ScaleLength())


def _type_names(schema: Any) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, value in vars(schema.TensorType).items():
        if not name.startswith("_") and isinstance(value, int):
            names[value] = _DTYPE_NAMES.get(name, name.lower())
    return names


def _tensor(graph: Any, index: int, type_names: dict[int, str]) -> TensorInfo:
    tensor = graph.Tensors(index)
    shape = tuple(int(tensor.Shape(i)) for i in range(tensor.ShapeLength()))
    signature = tuple(int(tensor.ShapeSignature(i)) for i in range(tensor.ShapeSignatureLength()))
    scale, zero_point = 0.0, 0
    quantization = tensor.Quantization()
    if quantization is not None and quantization.ScaleLength() > 0:
        # Per-channel tensors report their first channel; per_channel counts them.
        scale = float(quantization.Scale(0))
        if quantization.ZeroPointLength() > 0:
            zero_point = int(quantization.ZeroPoint(0))
    type_number = int(tensor.Type())
    return TensorInfo(
        name=_text(tensor.Name()),
        index=int(index),
        shape=shape,
        # Files without a signature have a fully static shape.
        shape_signature=signature or shape,
        dtype=type_names.get(type_number, f"type_{type_number}"),
        scale=scale,
        zero_point=zero_point,
    )


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8") if raw is not None else ""


def _min_runtime_version(root: Any, buf: bytes) -> str | None:
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if _text(entry.Name()) != MIN_RUNTIME_KEY:
            continue
        data = _buffer_bytes(root.Buffers(int(entry.Buffer())), buf)
        # The converter pads the version to 16 bytes with NULs; all NULs means "unknown".
        version = data.split(b"\x00", 1)[0].decode("ascii").strip()
        return version or None
    return None


def _buffer_bytes(buffer: Any, buf: bytes) -> bytes:
    offset = int(buffer.Offset())
    if offset > 1:
        return buf[offset : offset + int(buffer.Size())]
    if buffer.DataLength() == 0:
        return b""
    return bytes(buffer.DataAsNumpy())
