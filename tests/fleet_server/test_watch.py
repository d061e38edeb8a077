"""Gates shown to people and scrapers are judged at most once per max age per rollout."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from fleet_server.rollouts.gates import GateResult, Verdict
from fleet_server.rollouts.watch import LiveGates
from fleet_server.tables import Rollout, RolloutDevice


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingJudge:
    """Stands in for the controller's judge, which reads telemetry from a database."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(
        self, session: Session, rollout: Rollout, members: Sequence[RolloutDevice]
    ) -> list[GateResult]:
        self.calls.append(rollout.id)
        measured = len(self.calls) / 100
        return [GateResult("error_rate", Verdict.PASS, measured, 0.1, 10, 10, "")]


def rollout(rollout_id: int, wave: int = 0, phase: str = "active") -> Rollout:
    return Rollout(id=rollout_id, wave=wave, phase=phase)


def watching(max_age_s: float) -> tuple[LiveGates, CountingJudge, Clock]:
    judge, clock = CountingJudge(), Clock()
    return LiveGates(max_age_s, judge=judge, clock=clock), judge, clock


NO_SESSION = Session()


def test_readers_within_the_max_age_share_one_judgement() -> None:
    gates, judge, clock = watching(5.0)
    first = gates(NO_SESSION, rollout(1), [])
    clock.now += 4.9
    assert gates(NO_SESSION, rollout(1), []) is first
    assert judge.calls == [1]
    clock.now += 0.1
    assert gates(NO_SESSION, rollout(1), [])[0].measured == 0.02
    assert judge.calls == [1, 1]


def test_each_rollout_and_each_new_phase_is_judged_afresh() -> None:
    gates, judge, _ = watching(5.0)
    gates(NO_SESSION, rollout(1), [])
    gates(NO_SESSION, rollout(2), [])
    gates(NO_SESSION, rollout(1, wave=1), [])
    gates(NO_SESSION, rollout(1, wave=1, phase="shadow"), [])
    assert judge.calls == [1, 2, 1, 1]


def test_a_max_age_of_zero_judges_every_time() -> None:
    gates, judge, _ = watching(0.0)
    for _ in range(3):
        gates(NO_SESSION, rollout(1), [])
    assert judge.calls == [1, 1, 1]


def test_two_apps_never_share_a_judgement() -> None:
    one, judge_one, _ = watching(5.0)
    other, judge_other, _ = watching(5.0)
    one(NO_SESSION, rollout(1), [])
    other(NO_SESSION, rollout(1), [])
    assert (judge_one.calls, judge_other.calls) == ([1], [1])
