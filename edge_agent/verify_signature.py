"""A manifest's signature, checked in a short-lived child process.

The agent runs for months on devices with little memory, and checks a signature once per
update. The crypto library (`cryptography`, which bundles its own OpenSSL) is ~8 MiB
resident once imported, and an import cannot be undone: checking in-process would make
the agent carry it for good after its first update. A child process imports it, checks,
and exits, and the memory goes with it. The child also keeps the parsing of untrusted
signatures out of the process that serves.

The parent (`verify_in_child`) writes the signed manifest and the pinned keys as JSON to
the child's stdin; the child (`python -m edge_agent.verify_signature`) runs
`protocol.signing.verify_signature` and answers one JSON line on stdout, with an exit
code that says which kind of answer it is. Anything else (the child cannot start,
crashes, hangs, answers nonsense or names a key that was not asked about) is a failure,
never a pass.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from protocol.manifest import ManifestError, SignedManifest
from protocol.schema import decode, encode
from protocol.signing import TrustedKey, verify_signature

EXIT_VERIFIED = 0
# Apart from Python's own 1 (an uncaught exception) and 2 (a bad command line).
EXIT_REFUSED = 10
EXIT_BAD_REQUEST = 11
# Generous: a Raspberry Pi with a slow SD card can take seconds to start Python and
# import the library; a child that takes this long is stuck and is killed.
TIMEOUT_S = 60.0

# The folder that holds this `edge_agent` package: the child imports the same code.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class VerifierError(Exception):
    """The child gave no answer (it did not start, crashed, hung or answered nonsense)."""


def verify_in_child(
    signed: SignedManifest,
    trusted: Iterable[TrustedKey],
    *,
    timeout: float = TIMEOUT_S,
    executable: str | None = None,
) -> str:
    """The id of the trusted key whose signature verifies; ManifestError (with the same
    message as `verify_signature`) if none does, VerifierError if there was no answer."""
    keys = {k.keyid: k for k in trusted}
    request = {
        "manifest": encode(signed),
        "keys": [
            {"keyid": k.keyid, "raw": base64.b64encode(k.raw).decode("ascii")}
            for k in keys.values()
        ],
    }
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PACKAGE_ROOT, environ.get("PYTHONPATH")) if p
    )
    try:
        # -P: nothing from the current directory shadows the package.
        child = subprocess.run(
            [executable or sys.executable, "-P", "-m", __name__],
            input=json.dumps(request).encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            env=environ,
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() has killed it
        raise VerifierError(
            f"the signature check did not finish in {timeout:g} s and was stopped"
        ) from None
    except OSError as exc:
        raise VerifierError(f"the signature check could not start: {exc}") from None
    answer = _answer(child.stdout)
    if child.returncode == EXIT_REFUSED and isinstance(answer.get("refused"), str):
        raise ManifestError(answer["refused"])
    keyid = answer.get("verified")
    if child.returncode == EXIT_VERIFIED and isinstance(keyid, str):
        if keyid not in keys or keyid not in {s.keyid for s in signed.signatures}:
            raise VerifierError(f"the signature check named key {keyid[:16]}, not asked about")
        return keyid
    raise VerifierError(
        f"the signature check failed (exit {child.returncode}): {_last_line(child.stderr)}"
    )


def _answer(stdout: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(stdout)
    except (UnicodeDecodeError, ValueError):
        return {}
    return answer if isinstance(answer, dict) else {}


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "no output"


def main() -> int:
    """The child: a request on stdin, one JSON answer on stdout."""
    try:
        request = json.loads(sys.stdin.buffer.read())
        signed = decode(SignedManifest, request["manifest"])
        keys = [
            TrustedKey(str(k["keyid"]), base64.b64decode(k["raw"], validate=True))
            for k in request["keys"]
        ]
    # JSON, base64, schema and key errors are all ValueErrors.
    except (ValueError, KeyError, TypeError) as exc:
        print(f"bad request: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    try:
        signature = verify_signature(signed, keys)
    except ManifestError as exc:
        print(json.dumps({"refused": str(exc)}))
        return EXIT_REFUSED
    print(json.dumps({"verified": signature.keyid}))
    return EXIT_VERIFIED


if __name__ == "__main__":
    sys.exit(main())
