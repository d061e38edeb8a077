"""Secrets the server hands out: API tokens, enrolment tokens and device secrets.

All are 256 random bits, so the server stores a sha256 of each (a slow password hash
buys nothing against guessing 2^256); comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import IntEnum

API_TOKEN_PREFIX = "efa_"
ENROLLMENT_TOKEN_PREFIX = "efe_"


class Role(IntEnum):
    """Ordered: each role may do what the ones below it may."""

    viewer = 1
    operator = 2
    admin = 3


def new_secret(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(secret_hash(secret), stored_hash)


def new_device_id() -> str:
    return "dev-" + secrets.token_hex(6)
