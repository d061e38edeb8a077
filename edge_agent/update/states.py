"""The update machine's transitions, in one table.

States are the wire contract's `UpdateState`, so what the device reports is exactly where it
is. Every step's outcome is an event; any (state, event) pair missing from the table is a
bug, and `next_state` says so instead of guessing.
"""

from __future__ import annotations

from enum import StrEnum

from protocol.messages import UpdateState as S


class Event(StrEnum):
    DESIRED = "desired"  # a new desired state passed the checks that need no download
    REFUSED = "refused"  # ... or did not: expired, untrusted, a downgrade, an unknown op
    ALREADY_RUNNING = "already_running"  # the desired model is the one serving
    ALREADY_INSTALLED = "already_installed"  # a shadow candidate to promote: no download
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    INSTALLED = "installed"
    PASSED = "passed"  # self-test reproduced the manifest's vectors
    SHADOWING = "shadowing"  # passed, and the desired state asks for shadow mode
    SWITCHED = "switched"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"  # a step could not finish; the previous model keeps serving
    UNLOAD = "unload"  # the desired state wants no model


TRANSITIONS: dict[tuple[S, Event], S] = {
    (S.IDLE, Event.DESIRED): S.DOWNLOADING,
    (S.IDLE, Event.REFUSED): S.REJECTED,
    (S.IDLE, Event.ALREADY_RUNNING): S.ACTIVE,
    (S.IDLE, Event.ALREADY_INSTALLED): S.SWITCHING,
    (S.IDLE, Event.UNLOAD): S.SWITCHING,
    (S.IDLE, Event.FAILED): S.FAILED,  # the checks themselves kept crashing the agent
    (S.DOWNLOADING, Event.DOWNLOADED): S.VERIFYING,
    (S.DOWNLOADING, Event.FAILED): S.FAILED,
    (S.VERIFYING, Event.VERIFIED): S.INSTALLING,
    (S.VERIFYING, Event.FAILED): S.FAILED,
    (S.INSTALLING, Event.INSTALLED): S.SELF_TESTING,
    (S.INSTALLING, Event.FAILED): S.FAILED,
    (S.SELF_TESTING, Event.PASSED): S.SWITCHING,
    (S.SELF_TESTING, Event.SHADOWING): S.SHADOW,
    (S.SELF_TESTING, Event.FAILED): S.FAILED,
    (S.SWITCHING, Event.SWITCHED): S.ACTIVE,
    # The new model would not load or answer after the switch: back to the previous one.
    (S.SWITCHING, Event.FAILED): S.ROLLING_BACK,
    (S.ROLLING_BACK, Event.ROLLED_BACK): S.ROLLED_BACK,
    # Not even the previous model loads (its files are gone): nothing serves, and says so.
    (S.ROLLING_BACK, Event.FAILED): S.FAILED,
}

# Where the machine rests until the next desired state.
RESTING = frozenset({S.IDLE, S.ACTIVE, S.SHADOW, S.FAILED, S.REJECTED, S.ROLLED_BACK})


class TransitionError(RuntimeError):
    pass


def next_state(state: S, event: Event) -> S:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no transition from {state.value} on {event.value}") from None
