from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.manifest import ManifestError, manifest_to_json
from protocol.messages import (
    MAX_NESTING,
    MAX_PAYLOAD_BYTES,
    MESSAGE_SCHEMA_VERSION,
    PAYLOAD_TYPES,
    REASON_REQUIRED,
    TERMINAL_STATES,
    AccuracyWindow,
    Availability,
    DesiredState,
    HealthSample,
    InferenceStats,
    ModelTarget,
    Payload,
    PayloadError,
    ShadowStats,
    TelemetryBatch,
    UpdateReport,
    UpdateState,
    decode_payload,
    encode_payload,
)
from protocol.signing import TrustedKey, sign_manifest, verify_signature
from protocol.topics import SPEC, TopicKind, payload_type
from tests.protocol.conftest import make_manifest

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[2]

# A fixed key makes the signature, and so the golden file, deterministic.
SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
T0 = 1_790_000_000.0


def signed_manifest_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(manifest_to_json(sign_manifest(make_manifest(), SIGNING_KEY)))
    return data


def make_target(**changes: Any) -> ModelTarget:
    fields: dict[str, Any] = {
        "name": "digits",
        "version": "1.2.0",
        "sha256": "ab" * 32,
        "size": 1234,
        "artifact_url": "https://fleet.example.com/artifacts/digits/1.2.0/model.tflite",
        "manifest": signed_manifest_json(),
    }
    return ModelTarget(**{**fields, **changes})


AVAILABILITY = Availability(
    schema_version=MESSAGE_SCHEMA_VERSION, state="online", ts=T0 + 0.25, agent_version="0.1.0"
)

DESIRED = DesiredState(
    schema_version=MESSAGE_SCHEMA_VERSION,
    seq=7,
    issued_at=T0,
    expires_at=T0 + 7 * 86400,
    deployment_id="dep-42",
    mode="active",
    rollback=False,
    model=make_target(),
)

REPORT = UpdateReport(
    schema_version=MESSAGE_SCHEMA_VERSION,
    msg_id=118,
    ts=T0 + 95.5,
    deployment_id="dep-42",
    desired_seq=7,
    state=UpdateState.FAILED,
    model_name="digits",
    model_version="1.1.0",
    reason="self-test vector 0 differs from the expected output by 0.41 (atol 0.02)",
    detail={"stage": "self_testing", "vector": 0, "max_abs_error": 0.41},
)

HEALTH = HealthSample(
    ts=T0 + 60,
    cpu_percent=37.5,
    memory_percent=41.25,
    memory_rss_bytes=58_720_256,
    temperature_c=52.5,
    disk_free_bytes=12_884_901_888,
    uptime_s=86_400.0,
    agent_version="0.1.0",
)

INFERENCE = InferenceStats(
    ts=T0 + 60,
    model_name="digits",
    model_version="1.2.0",
    window_s=60.0,
    count=1200,
    errors=3,
    latency_p50_ms=0.75,
    latency_p95_ms=1.5,
    latency_p99_ms=3.25,
    mean_confidence=0.93,
    class_counts=(130, 118, 121, 117, 122, 119, 115, 120, 118, 117),
    nan_outputs=0,
    drift_score=0.08,
)

IDLE_INFERENCE = InferenceStats(
    ts=T0 + 60,
    model_name="digits",
    model_version="1.3.0-rc.1",
    window_s=60.0,
    count=0,
    errors=0,
    latency_p50_ms=None,
    latency_p95_ms=None,
    latency_p99_ms=None,
    mean_confidence=None,
    class_counts=(),
    nan_outputs=0,
    drift_score=None,
)

ACCURACY = AccuracyWindow(
    ts=T0 + 60,
    model_name="digits",
    model_version="1.2.0",
    window_s=3600.0,
    labelled=200,
    correct=194,
)

SHADOW = ShadowStats(
    ts=T0 + 60, active_version="1.2.0", candidate_version="1.3.0-rc.1", compared=1197, agreed=1180
)

TELEMETRY = TelemetryBatch(
    schema_version=MESSAGE_SCHEMA_VERSION,
    seq=3051,
    sent_at=T0 + 61.5,
    dropped=2,
    health=(HEALTH,),
    inference=(INFERENCE, IDLE_INFERENCE),
    accuracy=(ACCURACY,),
    shadow=(SHADOW,),
)

EXAMPLES: list[tuple[str, Payload]] = [
    ("availability", AVAILABILITY),
    ("desired", DESIRED),
    ("report", REPORT),
    ("telemetry", TELEMETRY),
]


# --- the golden files ----------------------------------------------------------------


@pytest.mark.parametrize(("golden", "example"), EXAMPLES)
def test_payload_json_matches_the_golden_file(golden: str, example: Payload) -> None:
    """Devices in the field speak this format: a change must be deliberate (bump
    MESSAGE_SCHEMA_VERSION and update the golden file)."""
    expected = json.loads((GOLDEN / f"{golden}.json").read_bytes())
    assert json.loads(encode_payload(example)) == expected


@pytest.mark.parametrize(("golden", "example"), EXAMPLES)
def test_golden_file_decodes_to_the_example(golden: str, example: Payload) -> None:
    raw = (GOLDEN / f"{golden}.json").read_bytes()
    assert decode_payload(type(example), raw) == example


@pytest.mark.parametrize(("golden", "example"), EXAMPLES)
def test_encode_is_compact_and_round_trips(golden: str, example: Payload) -> None:
    raw = encode_payload(example)
    compact = json.dumps(json.loads(raw), separators=(",", ":"), ensure_ascii=False)
    assert raw == compact.encode("utf-8")
    assert decode_payload(type(example), raw) == example


def test_the_manifest_survives_the_wire_and_its_signature_verifies() -> None:
    received = decode_payload(DesiredState, encode_payload(DESIRED))
    assert received.model is not None
    pinned = TrustedKey.from_raw(SIGNING_KEY.public_key().public_bytes_raw())
    verify_signature(received.model.signed_manifest(), [pinned])


def test_a_manifest_changed_after_signing_decodes_but_does_not_verify() -> None:
    # Decoding checks shape and agreement; only the device's pinned keys establish trust.
    manifest = signed_manifest_json()
    manifest["manifest"]["labels"][0] = "zero"
    target = make_target(manifest=manifest)
    pinned = TrustedKey.from_raw(SIGNING_KEY.public_key().public_bytes_raw())
    with pytest.raises(ManifestError, match="does not verify"):
        verify_signature(target.signed_manifest(), [pinned])


# --- what decode_payload refuses ------------------------------------------------------

GOOD_AVAILABILITY = {"schema_version": 1, "state": "online", "ts": 1.0}


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _nested(depth: int) -> bytes:
    return b'{"schema_version": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "payload is empty"),
        (b'{"ts": "\xff"}', "not UTF-8: invalid start byte at byte 8"),
        (b"{not json", "not valid JSON: Expecting property name"),
        (b'{"schema_version": 1, "ts": NaN}', "not valid JSON: NaN is not allowed"),
        (b'{"schema_version": 1, "ts": Infinity}', "Infinity is not allowed"),
        (b'{"schema_version": 1, "ts": -Infinity}', "-Infinity is not allowed"),
        (b'{"schema_version": 1, "ts": 1e999}', "number 1e999 is out of range"),
        (b'{"schema_version": 1, "ts": 9223372036854775808}', "out of the 64-bit range"),
        (b'{"schema_version": 1, "ts": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"schema_version": 1, "schema_version": 2}', "duplicate key 'schema_version'"),
        (b'{"schema_version": 1, "agent_version": "\\ud800"}', "unpaired UTF-16 surrogate"),
        (_nested(100_000), "nested too deeply"),
        (_nested(33), "nested more than 32 levels deep"),
        (b"[]", "must be a JSON object, got array"),
        (b'"online"', "must be a JSON object, got string"),
        (b"null", "must be a JSON object, got null"),
        (b"42", "must be a JSON object, got number"),
        (_json({"state": "online", "ts": 1.0}), "has no schema_version"),
        (_json({**GOOD_AVAILABILITY, "schema_version": "1"}), "must be an integer"),
        (_json({**GOOD_AVAILABILITY, "schema_version": True}), "must be an integer"),
        (_json({**GOOD_AVAILABILITY, "schema_version": 2}), "has schema_version 2; this build"),
        (_json({**GOOD_AVAILABILITY, "schema_version": 0}), "has schema_version 0; this build"),
        (_json({**GOOD_AVAILABILITY, "state": "away"}), r"\$\.state: expected one of"),
        (_json({**GOOD_AVAILABILITY, "ts": "now"}), r"\$\.ts: expected float, got string"),
        (_json({**GOOD_AVAILABILITY, "ts": -1}), r"\$: ts must be in \[0, inf\]"),
        (_json({**GOOD_AVAILABILITY, "extra": 1}), r"\$: unknown field\(s\) extra"),
        (_json({"schema_version": 1, "state": "online"}), r"\$: missing field 'ts'"),
    ],
)
def test_decode_payload_refuses_with_one_line(raw: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message) as info:
        decode_payload(Availability, raw)
    assert str(info.value).startswith("Availability payload")
    assert "\n" not in str(info.value)


def test_oversized_payload_is_refused_before_parsing() -> None:
    raw = b"{" + b" " * MAX_PAYLOAD_BYTES + b"}"
    with pytest.raises(PayloadError, match=f"is {len(raw)} bytes, over the 262144-byte limit"):
        decode_payload(Availability, raw)


def test_a_payload_of_exactly_the_limit_is_accepted() -> None:
    raw = encode_payload(AVAILABILITY)
    padded = raw[:-1] + b" " * (MAX_PAYLOAD_BYTES - len(raw)) + b"}"
    assert len(padded) == MAX_PAYLOAD_BYTES
    assert decode_payload(Availability, padded) == AVAILABILITY


def test_free_form_detail_may_nest_up_to_the_limit() -> None:
    detail: dict[str, Any] = {}
    for _ in range(MAX_NESTING - 1):
        detail = {"d": detail}
    report = dataclasses.replace(REPORT, detail=detail)
    assert decode_payload(UpdateReport, encode_payload(report)) == report
    raw = encode_payload(report).replace(b'"detail":', b'"detail":{"d":')[:-1] + b"}}"
    with pytest.raises(PayloadError, match="nested more than 32 levels deep"):
        decode_payload(UpdateReport, raw)


def test_nested_invariant_errors_name_the_path() -> None:
    data = json.loads(encode_payload(TELEMETRY))
    data["health"][0]["cpu_percent"] = 150
    with pytest.raises(PayloadError, match=r"\$\.health\[0\]: cpu_percent must be in \[0, 100\]"):
        decode_payload(TelemetryBatch, _json(data))


def test_model_target_errors_name_the_path() -> None:
    data = json.loads(encode_payload(DESIRED))
    data["model"]["version"] = "1.3.0"
    with pytest.raises(PayloadError, match=r"\$\.model: version disagree\(s\) with the signed"):
        decode_payload(DesiredState, _json(data))
    data["model"]["manifest"]["manifest"]["version"] = "1.3"
    with pytest.raises(PayloadError, match=r"\$\.model: manifest\.manifest: version '1\.3' is not"):
        decode_payload(DesiredState, _json(data))


def test_decode_payload_wants_a_payload_class() -> None:
    with pytest.raises(TypeError, match="HealthSample is not a message payload"):
        decode_payload(HealthSample, encode_payload(AVAILABILITY))  # type: ignore[type-var]


# --- what encode_payload refuses ------------------------------------------------------


def test_encode_refuses_a_payload_the_receiver_would_refuse_as_too_big() -> None:
    batch = dataclasses.replace(TELEMETRY, health=(HEALTH,) * 2000)
    with pytest.raises(PayloadError, match=r"TelemetryBatch payload is \d+ bytes, over the"):
        encode_payload(batch)


def test_encode_refuses_nan_in_free_form_detail() -> None:
    report = dataclasses.replace(REPORT, detail={"error": float("nan")})
    with pytest.raises(PayloadError, match=r"UpdateReport cannot be encoded: .*not JSON compliant"):
        encode_payload(report)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"reason": "bad \ud800"}, "UpdateReport payload holds an unpaired UTF-16 surrogate"),
        ({"detail": {"n": 2**64}}, "UpdateReport payload holds an integer outside 64 bits"),
        ({"detail": {"n": float("inf")}}, "UpdateReport cannot be encoded"),
    ],
)
def test_encode_refuses_free_form_values_the_receiver_would_refuse(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(PayloadError, match=message):
        encode_payload(dataclasses.replace(REPORT, **changes))


def test_encode_refuses_deep_nesting() -> None:
    detail: dict[str, Any] = {}
    for _ in range(MAX_NESTING):
        detail = {"d": detail}
    with pytest.raises(PayloadError, match="nested more than 32 levels deep"):
        encode_payload(dataclasses.replace(REPORT, detail=detail))
    for _ in range(5000):
        detail = {"d": detail}
    with pytest.raises(PayloadError, match="nested too deeply"):
        encode_payload(dataclasses.replace(REPORT, detail=detail))


def test_encode_wants_a_payload() -> None:
    with pytest.raises(TypeError, match="ShadowStats is not a message payload"):
        encode_payload(SHADOW)  # type: ignore[arg-type]


def test_non_ascii_text_is_utf8_not_escaped() -> None:
    report = dataclasses.replace(REPORT, reason="température trop élevée")
    raw = encode_payload(report)
    assert "température".encode() in raw
    assert decode_payload(UpdateReport, raw) == report


# --- invariants -----------------------------------------------------------------------


def _target_dict(**changes: Any) -> dict[str, Any]:
    assert DESIRED.model is not None
    return {**dataclasses.asdict(DESIRED.model), **changes}


INVARIANTS: list[tuple[object, dict[str, Any], str]] = [
    (AVAILABILITY, {"schema_version": 2}, "schema_version 2 is not supported"),
    (AVAILABILITY, {"ts": -0.5}, r"ts must be in \[0, inf\]"),
    (AVAILABILITY, {"ts": float("nan")}, "ts must be a finite number"),
    (AVAILABILITY, {"ts": float("inf")}, "ts must be a finite number"),
    (AVAILABILITY, {"agent_version": " "}, "agent_version must not be blank"),
    (DESIRED, {"schema_version": 0}, "schema_version 0 is not supported"),
    (DESIRED, {"seq": 0}, r"seq must be in \[1, 2\*\*63-1\]"),
    (DESIRED, {"seq": 2**63}, r"seq must be in \[1, 2\*\*63-1\]"),
    (DESIRED, {"issued_at": -1.0}, "issued_at must be in"),
    (DESIRED, {"expires_at": T0}, "expires_at must be after issued_at"),
    (DESIRED, {"expires_at": T0 - 1}, "expires_at must be after issued_at"),
    (DESIRED, {"deployment_id": ""}, "deployment_id '' must be 1-128"),
    (DESIRED, {"deployment_id": "dep/42"}, "deployment_id 'dep/42' must be"),
    (DESIRED, {"deployment_id": "d" * 129}, "must be 1-128"),
    (DESIRED, {"model": None, "mode": "shadow"}, "mode 'shadow' needs a model"),
    (DESIRED, {"model": None, "rollback": True}, "rollback needs a model"),
    (REPORT, {"schema_version": 3}, "schema_version 3 is not supported"),
    (REPORT, {"msg_id": 0}, "msg_id must be in"),
    (REPORT, {"desired_seq": -1}, r"desired_seq must be in \[0,"),
    (REPORT, {"ts": float("-inf")}, "ts must be a finite number"),
    (REPORT, {"deployment_id": "a b"}, "deployment_id 'a b' must be"),
    (REPORT, {"model_version": None}, "model_name and model_version go together"),
    (REPORT, {"model_name": None}, "model_name and model_version go together"),
    (REPORT, {"model_version": "1.1"}, "model_name/model_version: .*not semver"),
    (REPORT, {"model_name": "../x"}, "model_name/model_version: name '../x' must be"),
    (REPORT, {"reason": None}, r"reason \(state failed\) is required"),
    (REPORT, {"reason": "  "}, r"reason \(state failed\) must not be blank"),
    (REPORT, {"state": UpdateState.REJECTED, "reason": None}, r"state rejected\) is required"),
    (REPORT, {"state": UpdateState.ROLLED_BACK, "reason": None}, r"rolled_back\) is required"),
    (HEALTH, {"ts": -1.0}, "ts must be in"),
    (HEALTH, {"cpu_percent": 100.5}, r"cpu_percent must be in \[0, 100\], got 100.5"),
    (HEALTH, {"cpu_percent": -1.0}, r"cpu_percent must be in \[0, 100\]"),
    (HEALTH, {"memory_percent": 101.0}, r"memory_percent must be in \[0, 100\]"),
    (HEALTH, {"memory_rss_bytes": -1}, "memory_rss_bytes must be in"),
    (HEALTH, {"temperature_c": -300.0}, r"temperature_c must be in \[-273.15, inf\]"),
    (HEALTH, {"temperature_c": float("nan")}, "temperature_c must be a finite number"),
    (HEALTH, {"disk_free_bytes": -5}, "disk_free_bytes must be in"),
    (HEALTH, {"uptime_s": -1.0}, "uptime_s must be in"),
    (HEALTH, {"agent_version": ""}, "agent_version must not be blank"),
    (INFERENCE, {"ts": float("nan")}, "ts must be a finite number"),
    (INFERENCE, {"model_version": "latest"}, "not semver"),
    (INFERENCE, {"model_name": ""}, "name '' must be"),
    (INFERENCE, {"window_s": 0.0}, "window_s must be positive"),
    (INFERENCE, {"window_s": -60.0}, "window_s must be in"),
    (INFERENCE, {"count": -1}, "count must be in"),
    (INFERENCE, {"errors": -1}, "errors must be in"),
    (INFERENCE, {"nan_outputs": -1}, "nan_outputs must be in"),
    (INFERENCE, {"errors": 1201}, "errors and nan_outputs cannot exceed count"),
    (INFERENCE, {"nan_outputs": 1201}, "errors and nan_outputs cannot exceed count"),
    (INFERENCE, {"latency_p99_ms": None}, "latencies are required when count > 0"),
    (INFERENCE, {"latency_p50_ms": -0.1}, "latency_p50_ms must be in"),
    (INFERENCE, {"latency_p95_ms": float("inf")}, "latency_p95_ms must be a finite number"),
    (INFERENCE, {"latency_p95_ms": 5.0}, "p50 <= p95 <= p99"),
    (INFERENCE, {"latency_p50_ms": 2.0}, "p50 <= p95 <= p99"),
    (INFERENCE, {"mean_confidence": 1.5}, r"mean_confidence must be in \[0, 1\]"),
    (INFERENCE, {"class_counts": (1, -1)}, r"class_counts\[1\] must be in"),
    (INFERENCE, {"class_counts": (1000, 201)}, "class_counts add up to more than count"),
    (INFERENCE, {"drift_score": -0.1}, "drift_score must be in"),
    (IDLE_INFERENCE, {"latency_p50_ms": 1.0}, "latencies must be null when count is 0"),
    (IDLE_INFERENCE, {"mean_confidence": 0.5}, "mean_confidence must be null when count is 0"),
    (ACCURACY, {"ts": -2.0}, "ts must be in"),
    (ACCURACY, {"model_version": "v1"}, "not semver"),
    (ACCURACY, {"window_s": 0.0}, "window_s must be positive"),
    (ACCURACY, {"labelled": -1}, "labelled must be in"),
    (ACCURACY, {"correct": -1}, "correct must be in"),
    (ACCURACY, {"correct": 201}, "correct cannot exceed labelled"),
    (SHADOW, {"ts": float("nan")}, "ts must be a finite number"),
    (SHADOW, {"active_version": "1"}, "active_version: .*not semver"),
    (SHADOW, {"candidate_version": "next"}, "candidate_version: .*not semver"),
    (SHADOW, {"compared": -1}, "compared must be in"),
    (SHADOW, {"agreed": -1}, "agreed must be in"),
    (SHADOW, {"agreed": 1198}, "agreed cannot exceed compared"),
    (TELEMETRY, {"schema_version": 2}, "schema_version 2 is not supported"),
    (TELEMETRY, {"seq": 0}, "seq must be in"),
    (TELEMETRY, {"sent_at": -1.0}, "sent_at must be in"),
    (TELEMETRY, {"dropped": -1}, "dropped must be in"),
]


@pytest.mark.parametrize(
    ("example", "changes", "message"),
    INVARIANTS,
    ids=[f"{type(e).__name__}-{'-'.join(c)}" for e, c, _ in INVARIANTS],
)
def test_invariants(example: object, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(example, **changes)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "../digits"}, "name/version: name '../digits' must be"),
        ({"version": "1.2"}, "name/version: .*not semver"),
        ({"sha256": "AB" * 32}, "sha256 must be 64 lowercase hex digits"),
        ({"sha256": "ab" * 31}, "sha256 must be 64 lowercase hex digits"),
        ({"size": 0}, r"size must be in \[1,"),
        ({"artifact_url": "/artifacts/digits"}, "must be an absolute http"),
        ({"artifact_url": "ftp://host/model"}, "must be an absolute http"),
        ({"artifact_url": "https:///model"}, "must be an absolute http"),
        ({"artifact_url": "https://host/a b"}, "must not contain whitespace"),
        ({"size": 1235}, r"size disagree\(s\) with the signed manifest"),
        ({"name": "other", "sha256": "cd" * 32}, "name, sha256 disagree"),
        ({"manifest": {}}, r"manifest: missing field 'manifest'"),
        ({"manifest": {"manifest": {}, "signatures": [], "x": 1}}, r"unknown field\(s\) x"),
    ],
)
def test_model_target_invariants(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_target(**changes)


def test_model_target_needs_a_signed_manifest() -> None:
    manifest = signed_manifest_json()
    manifest["signatures"] = []
    with pytest.raises(ValueError, match="manifest is not signed"):
        make_target(manifest=manifest)


def test_desired_state_may_ask_for_no_model() -> None:
    none = dataclasses.replace(DESIRED, model=None)
    assert decode_payload(DesiredState, encode_payload(none)).model is None


def test_desired_state_expiry() -> None:
    assert not DESIRED.is_expired(DESIRED.expires_at - 0.001)
    assert DESIRED.is_expired(DESIRED.expires_at)


def test_a_shadow_rollback_desired_state_is_valid() -> None:
    assert dataclasses.replace(DESIRED, mode="shadow", rollback=True).mode == "shadow"


def test_terminal_and_reason_states() -> None:
    assert {s for s in UpdateState if s.is_terminal} == TERMINAL_STATES
    assert {s.value for s in TERMINAL_STATES} == {"active", "rolled_back", "failed", "rejected"}
    assert TERMINAL_STATES - {UpdateState.ACTIVE} == REASON_REQUIRED
    assert not UpdateState.SHADOW.is_terminal


def test_an_idle_report_needs_no_model_and_no_deployment() -> None:
    idle = UpdateReport(1, 1, T0, None, 0, UpdateState.IDLE, None, None, None, None)
    assert decode_payload(UpdateReport, encode_payload(idle)) == idle


def test_report_state_is_decoded_as_the_enum() -> None:
    report = decode_payload(UpdateReport, encode_payload(REPORT))
    assert report.state is UpdateState.FAILED


def test_optional_agent_version_may_be_left_out() -> None:
    assert decode_payload(Availability, _json(GOOD_AVAILABILITY)).agent_version is None


# --- topic kinds and payloads -------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        (TopicKind.AVAILABILITY, Availability),
        (TopicKind.DESIRED, DesiredState),
        (TopicKind.REPORTS, UpdateReport),
        (TopicKind.TELEMETRY, TelemetryBatch),
    ],
)
def test_payload_type_follows_the_spec_table(kind: TopicKind, cls: type) -> None:
    assert payload_type(kind) is cls is SPEC[kind].payload
    assert payload_type(TopicKind(kind.value)) is cls


def test_every_payload_type_has_a_topic() -> None:
    assert {spec.payload for spec in SPEC.values()} == set(PAYLOAD_TYPES)


def test_payload_type_and_decode_compose() -> None:
    message = decode_payload(payload_type(TopicKind.REPORTS), encode_payload(REPORT))
    assert message == REPORT


# --- the device's dependencies ----------------------------------------------------------


def test_the_protocol_imports_nothing_a_device_does_not_have() -> None:
    code = (
        "import sys, protocol.messages, protocol.topics\n"
        "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    forbidden = {"pydantic", "paho", "fastapi", "starlette", "sqlalchemy", "tensorflow", "keras"}
    assert "protocol" in out
    assert forbidden.isdisjoint(out)


# --- telemetry's fast path refuses what the careful path refuses, with its words ----------


def _telemetry_text() -> str:
    return encode_payload(TELEMETRY).decode("utf-8")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_telemetry_text().replace('"cpu_percent":', '"cpu_percent":1e999,"x":', 1), "1e999"),
        (
            _telemetry_text().replace('"seq":3051', '"seq":3051,"seq":3052', 1),
            "duplicate key 'seq'",
        ),
        (
            _telemetry_text().replace('"errors":', '"errors":9223372036854775808,"y":', 1),
            "out of the 64-bit range",
        ),
        (
            _telemetry_text().replace('"agent_version":"', '"agent_version":"\\ud800', 1),
            "unpaired UTF-16 surrogate",
        ),
        (_telemetry_text().replace('"dropped":2', '"dropped":NaN', 1), "NaN is not allowed"),
    ],
)
def test_telemetry_is_refused_as_the_careful_path_says(raw: str, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        decode_payload(TelemetryBatch, raw.encode("utf-8"))


def test_telemetry_with_escapes_decodes_and_other_encodings_do_not() -> None:
    escaped = _telemetry_text().replace('"agent_version":"', '"agent_version":"\\u00e9', 1)
    decoded = decode_payload(TelemetryBatch, escaped.encode("utf-8"))
    assert decoded.health[0].agent_version == "é" + HEALTH.agent_version
    with pytest.raises(PayloadError, match="not UTF-8"):
        decode_payload(TelemetryBatch, _telemetry_text().encode("utf-16"))
