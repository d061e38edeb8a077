"""Posting alerts to webhooks: the body, the headers, one POST, and a webhook's due
deliveries one after another with retries and exponential backoff."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from fleet_server.alerts.config import WebhookConfig
from fleet_server.alerts.detect import iso
from fleet_server.alerts.signing import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    signature,
)
from fleet_server.alerts.store import Claimed, claim_next, record_outcome
from fleet_server.db import transaction
from fleet_server.settings import Settings

log = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]
USER_AGENT = "edgefleet-alerts/0.1"
# Deliveries to one webhook per round: the rest wait for the next round, so one round
# cannot run for ever on a backlog.
ROUND_LIMIT = 100
# Of the receiver's answer, enough to say what went wrong.
ERROR_BODY_BYTES = 200


def body_of(claimed: Claimed, server: str) -> bytes:
    """The JSON body, the same bytes on every attempt (the timestamp header changes)."""
    document: dict[str, Any] = {
        "id": claimed.event_id,
        "kind": claimed.kind,
        "raised_at": iso(claimed.raised_at),
        "server": server,
        "summary": claimed.summary,
        "data": claimed.data,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def headers_for(
    webhook: WebhookConfig, claimed: Claimed, body: bytes, timestamp: int
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: claimed.kind,
        DELIVERY_HEADER: claimed.event_id,
        TIMESTAMP_HEADER: str(timestamp),
        "X-Edgefleet-Attempt": str(claimed.attempt),
    }
    secret = webhook.secret_bytes()
    if secret is not None:
        headers[SIGNATURE_HEADER] = signature(secret, timestamp, body)
    return headers


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirected POST becomes a GET without its body (or an error), and following one
    # would let the receiver point the server elsewhere: a redirect is a failed attempt.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> str | None:
    """One POST; None when the receiver answered 2xx, else what went wrong. Never says the
    URL, which may be the credential. `timeout_s` bounds the connection and each read."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            response.read(ERROR_BODY_BYTES)
            return None
    except urllib.error.HTTPError as error:
        detail = _snippet(error)
        return f"HTTP {error.code}" + (f": {detail}" if detail else "")
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, TimeoutError):
            return f"timed out after {timeout_s:g} s"
        return f"connection failed: {reason}"
    except TimeoutError:
        return f"timed out after {timeout_s:g} s"
    except (OSError, http.client.HTTPException, ValueError) as error:
        return f"{type(error).__name__}: {error}"


def _snippet(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read(ERROR_BODY_BYTES)
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        error.close()
    return " ".join(raw.decode("utf-8", "replace").split())


def retry_delay(attempt: int, settings: Settings) -> dt.timedelta:
    """After the n-th failed attempt: backoff, doubling, capped."""
    seconds = settings.webhook_backoff_s * 2 ** min(attempt - 1, 32)
    return dt.timedelta(seconds=min(seconds, settings.webhook_max_backoff_s))


def lease(settings: Settings) -> dt.timedelta:
    # Longer than any attempt should take (connect, send, read), so that no other replica
    # retries a delivery while it is still being posted.
    return dt.timedelta(seconds=max(60.0, 4 * settings.webhook_timeout_s))


def deliver_due(
    sessions: sessionmaker[Session],
    webhook: WebhookConfig,
    settings: Settings,
    clock: Clock,
    limit: int = ROUND_LIMIT,
    stopping: threading.Event | None = None,
) -> int:
    """Post `webhook`'s due deliveries, oldest first; the number delivered. Stops at the
    first failure (a receiver that is down is tried once per round, not once per alert)
    and when `stopping` is set.
    No transaction is open while posting, so a slow receiver holds no database lock."""
    delivered = 0
    server = settings.resolved_public_url()
    for _ in range(limit):
        if stopping is not None and stopping.is_set():
            break
        with transaction(sessions) as session:
            claimed = claim_next(session, webhook.label, clock(), lease(settings))
        if claimed is None:
            break
        body = body_of(claimed, server)
        # The wall clock, not `clock`: receivers check the timestamp against theirs.
        stamp = int(time.time())
        error = post(
            webhook.url,
            body,
            headers_for(webhook, claimed, body, stamp),
            settings.webhook_timeout_s,
        )
        now = clock()
        retry_at = None
        if error is not None and claimed.attempt < settings.webhook_max_attempts:
            retry_at = now + retry_delay(claimed.attempt, settings)
        with transaction(sessions) as session:
            record_outcome(session, claimed, error, now, retry_at)
        if error is None:
            delivered += 1
            continue
        if retry_at is None:
            log.warning(
                "webhook %s: gave up on %s %s after %d attempt(s): %s",
                webhook.label,
                claimed.kind,
                claimed.event_id,
                claimed.attempt,
                error,
            )
        else:
            log.info(
                "webhook %s: attempt %d of %s %s failed (%s); next at %s",
                webhook.label,
                claimed.attempt,
                claimed.kind,
                claimed.event_id,
                error,
                retry_at.isoformat(),
            )
        break
    return delivered
