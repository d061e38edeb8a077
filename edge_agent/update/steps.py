"""The update's steps, each a function that does one thing or raises StepError saying why.

They know nothing of states or persistence (machine.py does): each can be run again after
a power cut and ends the same way.
"""

from __future__ import annotations

import base64
import http.client
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.litert import ModelLoadError
from edge_agent.loaded_model import LoadedModel
from edge_agent.verify_signature import VerifierError, verify_in_child
from protocol.manifest import Manifest, ManifestError, semver_key
from protocol.messages import DesiredState, ModelTarget
from protocol.signing import TrustedKey, verify_model_file

CHUNK = 1 << 16
TIMEOUT_S = 30.0
# Request timeout and too many requests; with every 5xx, answers that may change on retry.
TRANSIENT_HTTP = frozenset({408, 429})


class StepError(Exception):
    """A step failed; the message is the reason reported to the fleet."""


class Refused(StepError):
    """The desired state is refused before any download (`rejected`)."""


class Interrupted(StepError):
    """The download stopped part-way; trying again resumes where it stopped."""


@dataclass(frozen=True)
class Running:
    """What serves now, for the checks that compare against it."""

    name: str
    version: str
    sha256: str


def check_desired(
    desired: DesiredState, running: Running | None, keys: tuple[TrustedKey, ...], now: float
) -> None:
    """The checks that need no download; raises Refused."""
    if desired.is_expired(now):
        raise Refused(f"the desired state expired at {desired.expires_at:.0f}")
    if desired.model is None:
        return
    signed = desired.model.signed_manifest()
    if not keys:
        raise Refused("no trusted publisher keys are pinned in agent.toml (trusted_keys)")
    try:
        # In a child process, so that the serving process never loads the crypto library
        # (~8 MiB resident with its own OpenSSL, kept for good once imported, for a check
        # made once per update) nor parses untrusted signatures: see verify_signature.py.
        verify_in_child(signed, keys)
    except ManifestError as exc:
        raise Refused(str(exc)) from None
    except VerifierError as exc:
        # No answer is not a pass; nor is it the publisher's fault: failed, not rejected.
        raise StepError(str(exc)) from None
    manifest = signed.manifest
    if manifest.runtime.requires_flex:
        ops = ", ".join(manifest.runtime.flex_ops) or "TensorFlow ops"
        raise Refused(f"the model needs {ops} (Flex), which this runtime does not have")
    if (
        running is not None
        and running.name == manifest.name
        and not desired.rollback
        and semver_key(manifest.version) < semver_key(running.version)
    ):
        raise Refused(
            f"{manifest.version} is older than the running {running.version}; "
            "only an operator rollback may go down"
        )


def download(target: ModelTarget, dest: Path, auth: tuple[str, str], max_bytes: int) -> None:
    """Fetch the artifact into `dest`, resuming a partial `dest` with an HTTP Range."""
    limit = min(target.size, max_bytes)
    if target.size > max_bytes:
        raise StepError(f"the model is {target.size} bytes, over this device's {max_bytes}")
    have = dest.stat().st_size if dest.exists() else 0
    if have > limit:
        dest.unlink()
        have = 0
    if have == target.size:
        return
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(
        target.artifact_url, headers={"Authorization": f"Basic {token}"}
    )
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        # ModelTarget admits only http(s) URLs.
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            if have and response.status != 206:
                have = 0  # the server sent the whole file: start over
            with dest.open("r+b" if have else "wb") as out:
                out.seek(have)
                out.truncate()
                received = have
                while block := response.read(CHUNK):
                    received += len(block)
                    if received > limit:
                        raise StepError(
                            f"the download exceeds the {limit} bytes the manifest names"
                        )
                    out.write(block)
    except urllib.error.HTTPError as exc:
        if exc.code in TRANSIENT_HTTP or exc.code >= 500:
            # The server (or a proxy before it) is busy or restarting: worth another try.
            raise Interrupted(f"download interrupted: HTTP {exc.code} {exc.reason}") from None
        raise StepError(f"download refused: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Interrupted(f"download interrupted: {reason}") from None
    if received != target.size:
        raise Interrupted(f"the download stopped at {received} of {target.size} bytes")


def verify(manifest: Manifest, model_file: Path) -> None:
    """The downloaded bytes against the manifest whose signature `check_desired` verified:
    hashlib only, so this stays in-process."""
    try:
        verify_model_file(manifest, model_file)
    except ManifestError as exc:
        raise StepError(str(exc)) from None


def self_test(model: LoadedModel) -> None:
    """The manifest's vectors must come out of this device's runtime within tolerance."""
    test = model.manifest.self_test
    if test is None or not test.vectors:
        raise StepError("the manifest has no self-test vectors")
    for n, vector in enumerate(test.vectors):
        inputs = [a.to_array() for a in vector.inputs]
        try:
            outputs = model.runner.invoke_once(inputs)
        except (ValueError, RuntimeError) as exc:
            raise StepError(f"self-test vector {n} could not run: {exc}") from None
        for k, (got, expected) in enumerate(zip(outputs, vector.expected, strict=False)):
            want = expected.to_array().astype(np.float64)
            have = np.asarray(got, dtype=np.float64).reshape(want.shape)
            if not np.all(np.isfinite(have)):
                raise StepError(f"self-test vector {n}, output {k}: NaN or infinity")
            error = np.abs(have - want)
            bound = test.atol + test.rtol * np.abs(want)
            if np.any(error > bound):
                worst = float(np.max(error - bound))
                raise StepError(
                    f"self-test vector {n}, output {k} is off by {worst:.3g} beyond "
                    f"atol {test.atol:g} + rtol {test.rtol:g}"
                )


def load_error(exc: Exception) -> StepError:
    if isinstance(exc, ManifestError | ModelLoadError):
        return StepError(str(exc))
    return StepError(f"{type(exc).__name__}: {exc}")
