"""A rollout's vocabulary, written out once: its states and phases, the execution state of
each device in it apart from that device's install result (after hawkBit), what a
device's update report means for it, the kinds of events in its history, and the actions
an operator may take.

Pure enums and tables: no database, no clock.
"""

from __future__ import annotations

from enum import StrEnum

from protocol.messages import UpdateState


class RolloutState(StrEnum):
    RUNNING = "running"  # the controller drives it
    PAUSED = "paused"  # waits for a person
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


# Tuples, not sets: what lists them (metrics, the console) lists them in this order.
ACTIVE_STATES = (RolloutState.RUNNING, RolloutState.PAUSED)
FINAL_STATES = (RolloutState.COMPLETED, RolloutState.ROLLED_BACK, RolloutState.ABORTED)


class Phase(StrEnum):
    """Where the current wave is: its devices run the candidate in shadow, or live."""

    SHADOW = "shadow"
    ACTIVE = "active"


class WaveStatus(StrEnum):
    WAITING = "waiting"
    UNDER_WAY = "under_way"
    DONE = "done"


class MemberState(StrEnum):
    """Where one device of a rollout is: the execution state the controller keeps."""

    PENDING = "pending"  # its wave has not started
    INSTALLING = "installing"  # assigned; no terminal report yet
    SHADOW = "shadow"  # runs the candidate in shadow
    ACTIVE = "active"  # runs the candidate
    FAILED = "failed"  # reported a failure, or was decommissioned
    TIMED_OUT = "timed_out"  # no terminal report within the device timeout
    REVERTED = "reverted"  # given its previous model back by a rollback


class InstallResult(StrEnum):
    """What a device's install came to, as the install gate counts it."""

    PENDING = "pending"  # none yet: not finished, or not started
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"


# Each execution state's install result: a device that was reverted had installed.
RESULT: dict[MemberState, InstallResult] = {
    MemberState.PENDING: InstallResult.PENDING,
    MemberState.INSTALLING: InstallResult.PENDING,
    MemberState.SHADOW: InstallResult.SUCCEEDED,
    MemberState.ACTIVE: InstallResult.SUCCEEDED,
    MemberState.FAILED: InstallResult.FAILED,
    MemberState.TIMED_OUT: InstallResult.TIMED_OUT,
    MemberState.REVERTED: InstallResult.SUCCEEDED,
}

# A device's terminal report on its deployment, and the execution state it leads to.
REPORTED: dict[UpdateState, MemberState] = {
    UpdateState.ACTIVE: MemberState.ACTIVE,
    UpdateState.SHADOW: MemberState.SHADOW,
    UpdateState.FAILED: MemberState.FAILED,
    UpdateState.REJECTED: MemberState.FAILED,
    UpdateState.ROLLED_BACK: MemberState.FAILED,
}


class EventKind(StrEnum):
    """The kinds of entries in a rollout's history (and of its audit actions)."""

    CREATED = "created"
    WAVE_STARTED = "wave_started"
    WAVE_SWITCHED = "wave_switched"  # a shadow wave went live
    DEVICE_JOINED = "device_joined"
    GATES_PASSED = "gates_passed"
    GATES_FAILED = "gates_failed"
    PAUSED = "paused"
    RESUMED = "resumed"
    COMPLETED = "completed"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


class OnFailure(StrEnum):
    """What a failed gate does to a rollout."""

    PAUSE = "pause"  # wait for a person
    ROLLBACK = "rollback"  # every device it touched gets its previous model back


class Action(StrEnum):
    """What an operator may do to a rollout."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"
