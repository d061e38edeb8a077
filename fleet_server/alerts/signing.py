"""The webhook signature: HMAC-SHA256 over the timestamp and the exact body.

Signing the timestamp with the body lets a receiver refuse a captured request replayed
later: it checks the signature, then that the timestamp is recent.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Protocol

SIGNATURE_HEADER = "X-Edgefleet-Signature"
TIMESTAMP_HEADER = "X-Edgefleet-Timestamp"
EVENT_HEADER = "X-Edgefleet-Event"
DELIVERY_HEADER = "X-Edgefleet-Delivery"
DEFAULT_TOLERANCE_S = 300.0


class Headers(Protocol):
    """A dict, or http.server's / email's message, or anything else with items()."""

    def items(self) -> Iterable[tuple[str, str]]: ...


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value: `sha256=` and the hex HMAC of `<timestamp>.<body>`."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def verify_signature(
    secret: str | bytes,
    body: bytes,
    headers: Headers,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether a request came from a server holding `secret` within `tolerance_s` seconds.

    `body` must be the raw bytes received, before any JSON parsing."""
    key = secret.encode() if isinstance(secret, str) else secret
    found = {name.lower(): value for name, value in headers.items()}
    given = found.get(SIGNATURE_HEADER.lower())
    stamp = found.get(TIMESTAMP_HEADER.lower())
    if given is None or stamp is None or not stamp.isdigit():
        return False
    timestamp = int(stamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(signature(key, timestamp, body), given.strip())
