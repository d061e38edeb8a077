"""MQTT payloads: what devices and the server say to each other, and how it is checked.

Every payload is a frozen dataclass whose `__post_init__` enforces its invariants, so a
value that exists is a valid message, whether it was built in Python or decoded from the
wire. `decode_payload` is the only way bytes from the broker become a message: it bounds
the size, refuses anything JSON would let through but Python or a database would choke on
(NaN, out-of-range numbers, duplicate keys, lone surrogates), and checks `schema_version`
before the schema so that a newer peer gets "unsupported version", not "unknown field".

Times are Unix seconds (UTC) as floats. docs/protocol.md describes the rules around these
payloads (dedupe, desired-state convergence, access control).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from protocol.manifest import SignedManifest, check_name, semver_key
from protocol.schema import (
    SchemaError,
    compiled_decoder,
    decode,
    encode,
    has_free_form,
    unique_keys,
)

MESSAGE_SCHEMA_VERSION = 1
MAX_PAYLOAD_BYTES = 256 * 1024
# Counters and sequence numbers end up in database columns; keep them in signed 64 bits.
MAX_INT = 2**63 - 1
# Far deeper than any message: a desired state, manifest included, is 10 levels deep.
MAX_NESTING = 32

_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
_SHA256_CHARS = frozenset("0123456789abcdef")
_LATENCY_FIELDS = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms")


class PayloadError(ValueError):
    """A payload that is not a valid message; the message is one line saying why."""


# --- field checks (each raises ValueError naming the field) ---------------------------


def _check_schema_version(value: int) -> None:
    if value != MESSAGE_SCHEMA_VERSION:
        raise ValueError(
            f"schema_version {value} is not supported (this build speaks {MESSAGE_SCHEMA_VERSION})"
        )


def _check_float(
    name: str, value: float, low: float | None = None, high: float | None = None
) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _check_time(name: str, value: float) -> None:
    _check_float(name, value, low=0.0)


def _check_duration(name: str, value: float) -> None:
    _check_float(name, value, low=0.0)
    if value == 0:
        raise ValueError(f"{name} must be positive")


def _check_int(name: str, value: int, low: int = 0) -> None:
    if not low <= value <= MAX_INT:
        raise ValueError(f"{name} must be in [{low}, 2**63-1], got {value}")


def _check_optional_float(
    name: str, value: float | None, low: float | None = None, high: float | None = None
) -> None:
    if value is not None:
        _check_float(name, value, low, high)


def _check_text(name: str, value: str | None, required: bool = False) -> None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return
    if not value.strip():
        raise ValueError(f"{name} must not be blank")


def _check_deployment_id(value: str | None) -> None:
    # Ids appear in logs, URLs and database keys: keep them short and plain.
    if value is not None and not (0 < len(value) <= 128 and set(value) <= _ID_CHARS):
        raise ValueError(
            f"deployment_id {value!r} must be 1-128 letters, digits, '.', '_', ':' or '-'"
        )


def _check_model_ref(name_field: str, name: str, version_field: str, version: str) -> None:
    try:
        check_name(name)
        semver_key(version)
    except ValueError as exc:
        raise ValueError(f"{name_field}/{version_field}: {exc}") from None


def _check_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"artifact_url {value!r} must be an absolute http(s) URL")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("artifact_url must not contain whitespace or control characters")


# --- availability -------------------------------------------------------------------


@dataclass(frozen=True)
class Availability:
    """Retained on the availability topic; the last will is the `offline` one.

    The broker publishes a last will when the device vanishes, but the device wrote it when
    it connected, so an `offline` message's `ts` is the connection time, not the loss time.
    """

    schema_version: int
    state: Literal["online", "offline"]
    ts: float
    agent_version: str | None = None

    def __post_init__(self) -> None:
        _check_schema_version(self.schema_version)
        _check_time("ts", self.ts)
        _check_text("agent_version", self.agent_version)


# --- desired state ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelTarget:
    """The model a device should run, with its signed manifest exactly as edge-convert wrote it.

    The fields beside `manifest` are there for the server's bookkeeping and the device's
    download; they must agree with the manifest, so a mismatch is refused here. That
    agreement is no proof of anything: the device trusts the model only after verifying the
    manifest's signature with its pinned keys and the downloaded bytes against it.
    """

    name: str
    version: str
    sha256: str
    size: int
    artifact_url: str
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        _check_model_ref("name", self.name, "version", self.version)
        if len(self.sha256) != 64 or not set(self.sha256) <= _SHA256_CHARS:
            raise ValueError("sha256 must be 64 lowercase hex digits")
        _check_int("size", self.size, low=1)
        _check_url(self.artifact_url)
        self._check_agrees_with_manifest(self.signed_manifest())

    def signed_manifest(self) -> SignedManifest:
        """The manifest decoded; its signatures are still to be verified by the caller."""
        signed = decode(SignedManifest, self.manifest, "manifest")
        if not signed.signatures:
            raise ValueError("manifest is not signed")
        return signed

    def _check_agrees_with_manifest(self, signed: SignedManifest) -> None:
        m = signed.manifest
        pairs = {
            "name": (self.name, m.name),
            "version": (self.version, m.version),
            "sha256": (self.sha256, m.model.sha256),
            "size": (self.size, m.model.size),
        }
        differ = [field for field, (ours, theirs) in pairs.items() if ours != theirs]
        if differ:
            raise ValueError(f"{', '.join(differ)} disagree(s) with the signed manifest")


@dataclass(frozen=True)
class DesiredState:
    """What the server wants a device to run; retained, so the latest one is always there.

    A device applies a desired state only if `seq` is higher than the last one it handled
    and it has not expired; a lower version than the running one needs `rollback`.
    """

    schema_version: int
    seq: int
    issued_at: float
    # A device refuses a desired state past its expiry, so a message that was held back or
    # left behind (a retained message from a dead server, a broker restored from a backup)
    # cannot freeze a device on an old model.
    expires_at: float
    deployment_id: str | None
    mode: Literal["active", "shadow"]
    rollback: bool  # an explicit operator rollback: the version may go down
    model: ModelTarget | None  # None: the device should run no model

    def __post_init__(self) -> None:
        _check_schema_version(self.schema_version)
        _check_int("seq", self.seq, low=1)
        _check_time("issued_at", self.issued_at)
        _check_time("expires_at", self.expires_at)
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        _check_deployment_id(self.deployment_id)
        if self.model is None and self.mode == "shadow":
            raise ValueError("mode 'shadow' needs a model to run as the candidate")
        if self.model is None and self.rollback:
            raise ValueError("rollback needs a model to roll back to")

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at


# --- update reports -----------------------------------------------------------------


class UpdateState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    SELF_TESTING = "self_testing"
    SHADOW = "shadow"
    SWITCHING = "switching"
    ACTIVE = "active"
    ROLLING_BACK = "rolling_back"
    # The candidate went live, misbehaved, and the previous model is running again. Kept
    # apart from `failed` because it is the strongest signal to halt a rollout: the model
    # passed every check before the switch and still failed on real traffic.
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"  # tried and could not finish (download, sha256, self-test, ...)
    # Refused before downloading: expired, manifest not signed by a pinned key, a downgrade
    # without `rollback`, ops the device's runtime lacks. Retrying the same state is futile.
    REJECTED = "rejected"

    @property
    def is_terminal(self) -> bool:
        """Whether the device is done with the desired state this report is about."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {UpdateState.ACTIVE, UpdateState.ROLLED_BACK, UpdateState.FAILED, UpdateState.REJECTED}
)
REASON_REQUIRED = frozenset({UpdateState.ROLLED_BACK, UpdateState.FAILED, UpdateState.REJECTED})


@dataclass(frozen=True)
class UpdateReport:
    """A device's progress on a desired state. `msg_id` dedupes QoS 1 redeliveries."""

    schema_version: int
    msg_id: int
    ts: float
    deployment_id: str | None
    desired_seq: int  # the desired state this is about; 0 before the device handled any
    state: UpdateState
    model_name: str | None  # the model running now (after a failure: the previous one)
    model_version: str | None
    reason: str | None
    detail: dict[str, Any] | None

    def __post_init__(self) -> None:
        _check_schema_version(self.schema_version)
        _check_int("msg_id", self.msg_id, low=1)
        _check_time("ts", self.ts)
        _check_deployment_id(self.deployment_id)
        _check_int("desired_seq", self.desired_seq)
        if (self.model_name is None) != (self.model_version is None):
            raise ValueError("model_name and model_version go together (both or neither)")
        if self.model_name is not None and self.model_version is not None:
            _check_model_ref("model_name", self.model_name, "model_version", self.model_version)
        required = self.state in REASON_REQUIRED
        _check_text(f"reason (state {self.state.value})", self.reason, required=required)


# --- telemetry ----------------------------------------------------------------------


@dataclass(frozen=True)
class HealthSample:
    ts: float
    cpu_percent: float  # system-wide, so at most 100 however many cores
    memory_percent: float
    memory_rss_bytes: int  # the agent's own resident memory
    temperature_c: float | None  # None where the board has no sensor
    disk_free_bytes: int
    uptime_s: float
    agent_version: str

    def __post_init__(self) -> None:
        _check_time("ts", self.ts)
        _check_float("cpu_percent", self.cpu_percent, 0.0, 100.0)
        _check_float("memory_percent", self.memory_percent, 0.0, 100.0)
        _check_int("memory_rss_bytes", self.memory_rss_bytes)
        _check_optional_float("temperature_c", self.temperature_c, low=-273.15)
        _check_int("disk_free_bytes", self.disk_free_bytes)
        _check_float("uptime_s", self.uptime_s, low=0.0)
        _check_text("agent_version", self.agent_version, required=True)


@dataclass(frozen=True)
class InferenceStats:
    """One model's inference over a window of `window_s` seconds ending at `ts`."""

    ts: float
    model_name: str
    model_version: str
    window_s: float
    count: int  # inferences attempted, including failed ones
    errors: int
    latency_p50_ms: float | None  # None exactly when count == 0
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    mean_confidence: float | None  # top-1 probability; None for models without one
    class_counts: tuple[int, ...]  # top-1 class of each successful inference
    nan_outputs: int  # inferences whose output held NaN or infinity
    drift_score: float | None  # distance of the inputs from the manifest's reference stats

    def __post_init__(self) -> None:
        _check_time("ts", self.ts)
        _check_model_ref("model_name", self.model_name, "model_version", self.model_version)
        _check_duration("window_s", self.window_s)
        for name in ("count", "errors", "nan_outputs"):
            _check_int(name, getattr(self, name))
        if self.errors > self.count or self.nan_outputs > self.count:
            raise ValueError("errors and nan_outputs cannot exceed count")
        self._check_latencies()
        if self.count == 0 and self.mean_confidence is not None:
            raise ValueError("mean_confidence must be null when count is 0")
        _check_optional_float("mean_confidence", self.mean_confidence, 0.0, 1.0)
        if self.class_counts and min(self.class_counts) < 0:
            i = next(i for i, n in enumerate(self.class_counts) if n < 0)
            _check_int(f"class_counts[{i}]", self.class_counts[i])
        if sum(self.class_counts) > self.count:
            raise ValueError("class_counts add up to more than count")
        _check_optional_float("drift_score", self.drift_score, low=0.0)

    def _check_latencies(self) -> None:
        latencies = (self.latency_p50_ms, self.latency_p95_ms, self.latency_p99_ms)
        if self.count == 0:
            if any(v is not None for v in latencies):
                raise ValueError("latencies must be null when count is 0")
            return
        present = [v for v in latencies if v is not None]
        if len(present) != len(latencies):
            raise ValueError("latencies are required when count > 0")
        for name, v in zip(_LATENCY_FIELDS, present, strict=True):
            _check_float(name, v, low=0.0)
        if not present[0] <= present[1] <= present[2]:
            raise ValueError("latencies must satisfy p50 <= p95 <= p99")


@dataclass(frozen=True)
class AccuracyWindow:
    """Accuracy on the inputs that got a ground-truth label during the window."""

    ts: float
    model_name: str
    model_version: str
    window_s: float
    labelled: int
    correct: int

    def __post_init__(self) -> None:
        _check_time("ts", self.ts)
        _check_model_ref("model_name", self.model_name, "model_version", self.model_version)
        _check_duration("window_s", self.window_s)
        _check_int("labelled", self.labelled)
        _check_int("correct", self.correct)
        if self.correct > self.labelled:
            raise ValueError("correct cannot exceed labelled")


@dataclass(frozen=True)
class ShadowStats:
    """How often a shadow candidate's top-1 agreed with the active model's."""

    ts: float
    active_version: str
    candidate_version: str
    compared: int
    agreed: int

    def __post_init__(self) -> None:
        _check_time("ts", self.ts)
        for name in ("active_version", "candidate_version"):
            try:
                semver_key(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        _check_int("compared", self.compared)
        _check_int("agreed", self.agreed)
        if self.agreed > self.compared:
            raise ValueError("agreed cannot exceed compared")


@dataclass(frozen=True)
class TelemetryBatch:
    """Everything a device measured since its last batch. `seq` dedupes redeliveries."""

    schema_version: int
    seq: int
    sent_at: float
    dropped: int  # batches the device's bounded offline queue dropped since the last one
    health: tuple[HealthSample, ...]
    inference: tuple[InferenceStats, ...]
    accuracy: tuple[AccuracyWindow, ...]
    shadow: tuple[ShadowStats, ...]

    def __post_init__(self) -> None:
        _check_schema_version(self.schema_version)
        _check_int("seq", self.seq, low=1)
        _check_time("sent_at", self.sent_at)
        _check_int("dropped", self.dropped)


# --- bytes on the wire --------------------------------------------------------------

Payload = Availability | DesiredState | UpdateReport | TelemetryBatch
# What a device publishes, so what the server ingests.
DevicePayload = Availability | UpdateReport | TelemetryBatch
PAYLOAD_TYPES: tuple[type[Payload], ...] = (
    Availability,
    DesiredState,
    UpdateReport,
    TelemetryBatch,
)
P = TypeVar("P", bound=Payload)


def encode_payload(obj: Payload) -> bytes:
    """Compact UTF-8 JSON; raises PayloadError for what `decode_payload` would refuse.

    The dataclass invariants cover the typed fields; the checks here cover the free-form
    ones (`detail`, the manifest) and the size, so that a sender learns of a problem (and
    can, say, split a telemetry batch) instead of the receiver dropping the message.
    """
    name = _payload_name(type(obj))
    try:
        data = encode(obj)
    except RecursionError:
        raise PayloadError(f"{name} payload is nested too deeply") from None
    _check_values(name, data)
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as exc:  # NaN or infinity in a free-form field
        raise PayloadError(f"{name} cannot be encoded: {exc}") from None
    raw = text.encode("utf-8")
    _check_size(name, raw)
    return raw


def decode_payload(cls: type[P], raw: bytes) -> P:
    """Check and decode one MQTT payload, or raise PayloadError saying why not."""
    name = _payload_name(cls)
    if cls in _FULLY_TYPED and b"\\u" not in raw:
        message = _decode_typed(cls, raw)
        if message is not None:
            return message
    data = _parse_json(name, raw)
    if not isinstance(data, dict):
        raise PayloadError(f"{name} payload must be a JSON object, got {_json_kind(data)}")
    _check_wire_version(name, data)
    try:
        return decode(cls, data)
    except SchemaError as exc:
        raise PayloadError(f"{name} payload does not fit the schema: {exc}") from None


def _decode_typed(cls: type[P], raw: bytes) -> P | None:
    """The telemetry fast path, for payloads the schema describes to the last value.

    There the schema already refuses what the careful path's number hooks and value walk
    look for (integers beyond 64 bits, infinities, nesting deeper than the schema, and,
    with no `\\u` escape in the text, unpaired surrogates), so only plain parsing is
    left. It answers only "yes": on any doubt the careful path runs and says why not.
    """
    if len(raw) > MAX_PAYLOAD_BYTES:
        return None
    try:
        text = raw.decode("utf-8")  # json.loads would also take UTF-16 and UTF-32
        data = _TYPED_JSON.decode(text)
        if type(data) is not dict or data.get("schema_version") != MESSAGE_SCHEMA_VERSION:
            return None
        return compiled_decoder(cls)(data)
    except Exception:
        return None


def _payload_name(cls: type) -> str:
    if cls not in PAYLOAD_TYPES:
        raise TypeError(f"{cls.__name__} is not a message payload")
    return cls.__name__


def _check_size(name: str, raw: bytes) -> None:
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadError(
            f"{name} payload is {len(raw)} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit"
        )


def _parse_json(name: str, raw: bytes) -> object:
    _check_size(name, raw)
    if not raw:
        # What a subscriber sees when a retained message is cleared.
        raise PayloadError(f"{name} payload is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(
            f"{name} payload is not UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        data = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
            object_pairs_hook=unique_keys,
        )
    except RecursionError:
        raise PayloadError(f"{name} payload is nested too deeply") from None
    except ValueError as exc:
        raise PayloadError(f"{name} payload is not valid JSON: {exc}") from None
    _check_values(name, data)
    return data


def _refuse_constant(token: str) -> float:
    raise ValueError(f"{token} is not allowed")


def _parse_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e999 parses as infinity without passing parse_constant
        raise ValueError(f"number {token[:32]} is out of range")
    return value


def _parse_int(token: str) -> int:
    value = int(token)
    if not -MAX_INT - 1 <= value <= MAX_INT:
        raise ValueError(f"integer {token[:32]} is out of the 64-bit range")
    return value


def _check_values(name: str, data: object) -> None:
    # Free-form parts (`detail`, the manifest) are walked here, iteratively, because code
    # that later walks them recursively (encode, a database driver) would fail on them.
    # (When decoding, _parse_int has already bounded integers, before a huge one could
    # overflow a float field in the schema decoder.)
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_NESTING:
            raise PayloadError(f"{name} payload is nested more than {MAX_NESTING} levels deep")
        if isinstance(item, str):
            _check_utf8(name, item)
        elif isinstance(item, int) and not -MAX_INT - 1 <= item <= MAX_INT:
            raise PayloadError(f"{name} payload holds an integer outside 64 bits")
        elif isinstance(item, dict):
            stack.extend((key, depth + 1) for key in item)
            stack.extend((value, depth + 1) for value in item.values())
        elif isinstance(item, list):
            stack.extend((value, depth + 1) for value in item)


def _check_utf8(name: str, text: str) -> None:
    # JSON can escape half a UTF-16 pair ("\ud800"); such a string cannot be stored as UTF-8.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(f"{name} payload holds an unpaired UTF-16 surrogate") from None


def _check_wire_version(name: str, data: dict[str, Any]) -> None:
    if "schema_version" not in data:
        raise PayloadError(f"{name} payload has no schema_version")
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise PayloadError(f"{name} payload's schema_version must be an integer")
    if version != MESSAGE_SCHEMA_VERSION:
        raise PayloadError(
            f"{name} payload has schema_version {version}; "
            f"this build speaks {MESSAGE_SCHEMA_VERSION}"
        )


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return kinds.get(type(value), type(value).__name__)


__all__ = [
    "MAX_INT",
    "MAX_NESTING",
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_SCHEMA_VERSION",
    "PAYLOAD_TYPES",
    "REASON_REQUIRED",
    "TERMINAL_STATES",
    "AccuracyWindow",
    "Availability",
    "DesiredState",
    "DevicePayload",
    "HealthSample",
    "InferenceStats",
    "ModelTarget",
    "Payload",
    "PayloadError",
    "ShadowStats",
    "TelemetryBatch",
    "UpdateReport",
    "UpdateState",
    "decode_payload",
    "encode_payload",
]

_TYPED_JSON = json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=unique_keys)
# Decided once: which payloads may take `_decode_typed`.
_FULLY_TYPED = frozenset(cls for cls in PAYLOAD_TYPES if not has_free_form(cls))
