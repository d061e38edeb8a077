from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from protocol.manifest import (
    ArrayData,
    Manifest,
    ManifestError,
    SignedManifest,
    canonical_bytes,
    manifest_to_json,
    parse_manifest,
    semver_key,
)
from protocol.schema import encode
from tests.protocol.conftest import make_manifest

GOLDEN = Path(__file__).parent / "golden" / "manifest.json"


def test_manifest_json_matches_the_golden_file(manifest: Manifest) -> None:
    """The on-disk format is a contract with devices already in the field: changing it
    must be deliberate (bump schema_version and update the golden file)."""
    assert manifest_to_json(SignedManifest(manifest)).decode() == GOLDEN.read_text()


def test_parse_round_trips(manifest: Manifest) -> None:
    signed = SignedManifest(manifest)
    assert parse_manifest(manifest_to_json(signed)) == signed


def test_canonical_bytes_are_stable_through_a_json_round_trip(manifest: Manifest) -> None:
    again = parse_manifest(manifest_to_json(SignedManifest(manifest))).manifest
    assert canonical_bytes(again) == canonical_bytes(manifest)
    assert b" " not in canonical_bytes(manifest).replace(b'"', b"").split(b"created_at")[0]


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("1.0.0", True),
        ("0.1.0-rc.1+build.5", True),
        ("1.0", False),
        ("01.0.0", False),
        ("v1.0.0", False),
        ("1.0.0-", False),
    ],
)
def test_semver_validation(version: str, ok: bool) -> None:
    if ok:
        semver_key(version)
    else:
        with pytest.raises(ValueError, match="not semver"):
            semver_key(version)


def test_semver_precedence() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-beta",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.10.0",
    ]
    assert sorted(ordered, key=semver_key) == ordered


def test_array_data_round_trips_exactly() -> None:
    for array in (
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 3, 4),
        np.array([[-128, 0, 127]], dtype=np.int8),
    ):
        back = ArrayData.from_array(array).to_array()
        assert back.dtype == array.dtype
        np.testing.assert_array_equal(back, array)


def _raw(manifest: Manifest, **changes: object) -> bytes:
    data = {"manifest": {**encode(manifest), **changes}, "signatures": []}
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"manifest": {"x": NaN}}', "NaN is not allowed"),
        (b"[]", r"\$: expected an object"),
        (b'{"manifest": {}, "manifest": {}}', "duplicate key 'manifest'"),
        (b'{"manifest": {"name": "\\ud800"}, "signatures": []}', "schema|Unicode"),
    ],
)
def test_unreadable_manifest_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(raw)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": "1.2"}, "not semver"),
        ({"name": "../etc"}, "name '../etc' must be"),
        ({"schema_version": 99}, "schema_version 99 is not supported"),
        ({"model": {"path": "model.tflite", "sha256": "xyz", "size": 1}}, "64 lowercase hex"),
        ({"model": {"path": "../x", "sha256": "ab" * 32, "size": 1}}, "plain file name"),
        ({"model": {"path": "", "sha256": "ab" * 32, "size": 1}}, "plain file name"),
        ({"model": {"path": "a\\..\\b", "sha256": "ab" * 32, "size": 1}}, "plain file name"),
        ({"model": {"path": "x\x00y", "sha256": "ab" * 32, "size": 1}}, "plain file name"),
        ({"model": {"path": "~", "sha256": "ab" * 32, "size": 1}}, "plain file name"),
        ({"model": {"path": "m", "sha256": "ab" * 32, "size": 0}}, "size must be positive"),
        ({"inputs": []}, "at least one input"),
    ],
)
def test_manifest_invariants_are_checked_on_parse(
    manifest: Manifest, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(_raw(manifest, **changes))


def test_reference_stats_lengths_must_agree() -> None:
    m = make_manifest()
    ref = encode(m.reference)
    ref["std"] = [0.1]
    with pytest.raises(ManifestError, match="differ in length"):
        parse_manifest(_raw(m, reference=ref))
