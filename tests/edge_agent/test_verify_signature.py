"""The signature check in a child process: the same answers as `verify_signature`
in-process, and no answer (a child that does not start, crashes or hangs) is never a pass."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.verify_signature import (
    EXIT_BAD_REQUEST,
    VerifierError,
    verify_in_child,
)
from protocol.manifest import ManifestError, SignedManifest, read_manifest
from protocol.schema import encode
from protocol.signing import (
    TrustedKey,
    generate_keypair,
    load_public_key,
    verify_signature,
)
from tests.bundles import DigitsBundles


@pytest.fixture
def signed(digits: DigitsBundles) -> SignedManifest:
    return read_manifest(digits.v1.folder)


@pytest.fixture
def pinned(digits: DigitsBundles) -> TrustedKey:
    return load_public_key(digits.v1.public_key)


def _refusal_in_process(signed: SignedManifest, keys: list[TrustedKey]) -> str:
    with pytest.raises(ManifestError) as caught:
        verify_signature(signed, keys)
    return str(caught.value)


def test_a_good_bundle_passes(signed: SignedManifest, pinned: TrustedKey, tmp_path: Path) -> None:
    _, other = generate_keypair(tmp_path / "other")
    keyid = verify_in_child(signed, [load_public_key(other), pinned])
    assert keyid == pinned.keyid == verify_signature(signed, [pinned]).keyid


def _tampered(signed: SignedManifest) -> SignedManifest:
    labels = ("changed after signing", *(signed.manifest.labels or ())[1:])
    return SignedManifest(dataclasses.replace(signed.manifest, labels=labels), signed.signatures)


@pytest.mark.parametrize("case", ["tampered", "untrusted", "unsigned", "no keys"])
def test_refusals_read_exactly_as_in_process(
    case: str, signed: SignedManifest, pinned: TrustedKey, tmp_path: Path
) -> None:
    keys = [pinned]
    if case == "tampered":
        signed = _tampered(signed)
    elif case == "untrusted":
        _, other = generate_keypair(tmp_path / "other")
        keys = [load_public_key(other)]
    elif case == "unsigned":
        signed = SignedManifest(signed.manifest)
    else:
        keys = []
    expected = _refusal_in_process(signed, keys)
    with pytest.raises(ManifestError) as caught:
        verify_in_child(signed, keys)
    assert str(caught.value) == expected
    assert {
        "tampered": "does not verify",
        "untrusted": "none of which is trusted",
        "unsigned": "not signed",
        "no keys": "none of which is trusted",
    }[case] in expected


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("exit 0", "failed (exit 0): no output"),  # "success" without an answer
        ("echo 'Traceback...' >&2; exit 1", "failed (exit 1): Traceback..."),
        ("kill -9 $$", "failed (exit -9)"),
        ("echo '{\"refused\": 3}'; exit 10", "failed (exit 10)"),
        # A pass that names a key nobody asked about is no pass.
        (f"echo '{json.dumps({'verified': 'ab' * 32})}'", "named key abababab"),
    ],
)
def test_a_child_without_a_proper_answer_fails_closed(
    body: str, message: str, signed: SignedManifest, pinned: TrustedKey, tmp_path: Path
) -> None:
    with pytest.raises(VerifierError, match=re.escape(message)):
        verify_in_child(signed, [pinned], executable=_script(tmp_path, body))


def test_a_child_that_cannot_start_fails_closed(
    signed: SignedManifest, pinned: TrustedKey, tmp_path: Path
) -> None:
    with pytest.raises(VerifierError, match="the signature check could not start"):
        verify_in_child(signed, [pinned], executable=str(tmp_path / "no-such-python"))


def test_a_child_that_hangs_is_killed_and_fails_closed(
    signed: SignedManifest, pinned: TrustedKey, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    executable = _script(tmp_path, f"echo $$ > {pid_file}; exec sleep 30")
    with pytest.raises(VerifierError, match=r"did not finish in 0\.5 s"):
        verify_in_child(signed, [pinned], executable=executable, timeout=0.5)
    # Killed and reaped, not left running (nor a zombie) beside the agent.
    assert not Path(f"/proc/{int(pid_file.read_text())}").exists()


def test_the_child_refuses_a_request_that_pairs_a_key_with_another_id(
    signed: SignedManifest, pinned: TrustedKey, tmp_path: Path
) -> None:
    # Run the child directly, as the parent never would.
    _, other = generate_keypair(tmp_path / "other")
    raw = base64.b64encode(pinned.raw).decode()
    forged = {"keyid": load_public_key(other).keyid, "raw": raw}
    request = {"manifest": encode(signed), "keys": [forged]}
    child = subprocess.run(
        [sys.executable, "-m", "edge_agent.verify_signature"],
        input=json.dumps(request).encode(),
        capture_output=True,
        check=False,
    )
    assert child.returncode == EXIT_BAD_REQUEST
    assert child.stdout == b""
    assert b"is not the sha256 of the key" in child.stderr
    # ... and takes the same request with the key's own id.
    request["keys"] = [{"keyid": pinned.keyid, "raw": raw}]
    child = subprocess.run(
        [sys.executable, "-m", "edge_agent.verify_signature"],
        input=json.dumps(request).encode(),
        capture_output=True,
        check=False,
    )
    assert (child.returncode, json.loads(child.stdout)) == (0, {"verified": pinned.keyid})
