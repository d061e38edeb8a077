"""The model manifest: what edge-convert writes beside `model.tflite`, and what a device trusts.

The manifest binds the model's bytes (sha256, size) to everything a device needs to run it
safely: tensor signature, quantization, labels, the runtime it needs, reference statistics
for drift detection and self-test vectors. The file on disk is a `SignedManifest`:

    {"manifest": {...}, "signatures": [{"keyid": ..., "algorithm": "ed25519", "value": ...}]}

Signatures cover `canonical_bytes(manifest)`; see `protocol.signing`.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np

from protocol.schema import SchemaError, decode, encode, unique_keys

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.tflite"

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


class ManifestError(ValueError):
    """A manifest that cannot be read, does not fit the schema, or does not match its model."""


class QuantizationMode(StrEnum):
    FLOAT32 = "float32"
    DYNAMIC = "dynamic"
    FLOAT16 = "float16"
    INT8 = "int8"
    INT16X8 = "int16x8"


def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """A sort key with semver precedence (a pre-release sorts before its release).

    Raises ValueError for a version that is not semver.
    """
    m = _SEMVER.match(version)
    if not m:
        raise ValueError(f"version {version!r} is not semver (MAJOR.MINOR.PATCH, e.g. 1.2.0)")
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    # Numeric identifiers sort before alphanumeric ones, and numerically among themselves.
    ids = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return (major, minor, patch, 0, ids)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"name {name!r} must be 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _check_sha256(value: str, what: str) -> None:
    if not _SHA256.match(value):
        raise ValueError(f"{what} must be 64 lowercase hex digits")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # -1 for a dimension that may vary (usually the batch)
    dtype: str  # numpy name: float32, int8, uint8, int16, ...
    scale: float = 0.0  # 0.0 when the tensor is not quantized
    zero_point: int = 0


@dataclass(frozen=True)
class ModelFile:
    path: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        _check_sha256(self.sha256, "model.sha256")
        if self.size <= 0:
            raise ValueError("model.size must be positive")
        if not _FILE_NAME.match(self.path):
            raise ValueError("model.path must be a plain file name such as model.tflite")


@dataclass(frozen=True)
class SourceInfo:
    format: Literal["keras", "h5", "saved_model"]
    sha256: str
    # Which converter entry point produced the model: Keras 3 models that
    # from_keras_model cannot handle are exported to a SavedModel first.
    conversion_path: Literal["keras", "saved_model"]

    def __post_init__(self) -> None:
        _check_sha256(self.sha256, "source.sha256")


@dataclass(frozen=True)
class Quantization:
    mode: QuantizationMode
    integer_only: bool  # every op and the model's inputs and outputs are integer
    float_layers: tuple[str, ...] = ()  # layers kept in float to meet the accuracy budget


@dataclass(frozen=True)
class ToolchainInfo:
    edgefleet: str
    tensorflow: str
    validated_with: str  # the runtime the validation and benchmark ran on


@dataclass(frozen=True)
class RuntimeRequirements:
    min_runtime_version: str | None  # as the converter records it in the flatbuffer
    ops: tuple[str, ...]
    requires_flex: bool
    flex_ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Validation:
    samples: int
    source_accuracy: float | None
    tflite_accuracy: float | None
    accuracy_drop: float | None
    top1_agreement: float | None
    max_abs_error: float
    mean_abs_error: float


@dataclass(frozen=True)
class Benchmark:
    runs: int
    threads: int | None
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput_per_s: float
    peak_rss_bytes: int
    machine: str


@dataclass(frozen=True)
class ReferenceStats:
    """What the inputs and outputs looked like on the data the model was checked on.

    A device compares its live traffic against this to detect input drift and a collapse
    of the model's confidence or class distribution.
    """

    samples: int
    granularity: Literal["feature", "channel"]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min: float
    max: float
    histogram_edges: tuple[float, ...]
    histogram_counts: tuple[int, ...]
    class_distribution: tuple[float, ...] | None = None
    mean_confidence: float | None = None

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError("reference.mean and reference.std differ in length")
        if len(self.histogram_edges) != len(self.histogram_counts) + 1:
            raise ValueError("reference.histogram_edges must have one more entry than counts")


@dataclass(frozen=True)
class ArrayData:
    """A small array in JSON: little-endian bytes in base64."""

    dtype: str
    shape: tuple[int, ...]
    data: str

    @classmethod
    def from_array(cls, array: np.ndarray) -> ArrayData:
        le = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        return cls(array.dtype.name, tuple(int(d) for d in array.shape), _b64(le.tobytes()))

    def to_array(self) -> np.ndarray:
        raw = base64.b64decode(self.data, validate=True)
        dtype = np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(raw, dtype=dtype).reshape(self.shape).astype(self.dtype)

    def __post_init__(self) -> None:
        try:
            np.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"unknown dtype {self.dtype!r}") from None


@dataclass(frozen=True)
class SelfTestVector:
    inputs: tuple[ArrayData, ...]  # real values, one per model input, batch of 1
    expected: tuple[ArrayData, ...]  # dequantized outputs, one per model output


@dataclass(frozen=True)
class SelfTest:
    """A device must reproduce `expected` within `atol + rtol * |expected|` after an update."""

    vectors: tuple[SelfTestVector, ...]
    atol: float
    rtol: float


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    name: str
    version: str
    created_at: str
    model: ModelFile
    source: SourceInfo
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quantization: Quantization
    labels: tuple[str, ...] | None
    toolchain: ToolchainInfo
    runtime: RuntimeRequirements
    validation: Validation | None
    benchmark: Benchmark | None
    reference: ReferenceStats | None
    self_test: SelfTest | None

    def __post_init__(self) -> None:
        if self.schema_version != MANIFEST_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is not supported "
                f"(this build reads {MANIFEST_SCHEMA_VERSION})"
            )
        check_name(self.name)
        semver_key(self.version)
        if not self.inputs or not self.outputs:
            raise ValueError("a model needs at least one input and one output")


@dataclass(frozen=True)
class Signature:
    keyid: str
    algorithm: Literal["ed25519"]
    value: str  # base64


@dataclass(frozen=True)
class SignedManifest:
    manifest: Manifest
    signatures: tuple[Signature, ...] = field(default=())


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def canonical_bytes(manifest: Manifest) -> bytes:
    """The exact bytes a signature covers: sorted keys, no spaces, UTF-8, no NaN.

    Floats use Python's shortest round-trip repr, so parsing the file and encoding the
    result again gives the same bytes back.
    """
    return json.dumps(
        encode(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def manifest_to_json(signed: SignedManifest) -> bytes:
    text = json.dumps(encode(signed), indent=2, sort_keys=True, allow_nan=False)
    return (text + "\n").encode("utf-8")


def parse_manifest(raw: bytes) -> SignedManifest:
    try:
        data = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=unique_keys
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    try:
        signed = decode(SignedManifest, data)
        canonical_bytes(signed.manifest)  # lone surrogates cannot be signed or verified
    except SchemaError as exc:
        raise ManifestError(f"manifest does not fit the schema: {exc}") from None
    except UnicodeEncodeError:
        raise ManifestError("manifest holds text that is not valid Unicode") from None
    return signed


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in a manifest")


def read_manifest(bundle: Path) -> SignedManifest:
    path = bundle / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_manifest(raw)
