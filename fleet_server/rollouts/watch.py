"""A running rollout's gates as people and Prometheus watch them.

Judging a wave reads its devices' telemetry windows since before the rollout reached
them, which on a large wave is real work. The controller does it once per step; the
console polls every 2 s from every open page and Prometheus scrapes on its own clock, so
what they see is judged at most once per `max_age_s` per rollout and shared. One
`LiveGates` per app (in FleetState): two apps in one process never share judgements.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy.orm import Session

from fleet_server.rollouts.gates import GateResult
from fleet_server.rollouts.judge import judge
from fleet_server.tables import Rollout, RolloutDevice

Judge = Callable[[Session, Rollout, Sequence[RolloutDevice]], list[GateResult]]
_Key = tuple[int, int, str | None]  # rollout, wave, phase: a new phase is judged afresh


class LiveGates:
    def __init__(
        self,
        max_age_s: float,
        *,
        judge: Judge = judge,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_s = max_age_s
        self._judge = judge
        self._clock = clock
        self._judged: dict[_Key, tuple[float, list[GateResult]]] = {}
        self._lock = threading.Lock()

    def __call__(
        self, session: Session, rollout: Rollout, members: Sequence[RolloutDevice]
    ) -> list[GateResult]:
        """The gates of the rollout's current wave and phase, judged at most `max_age_s`
        ago (0: judged now)."""
        key = (rollout.id, rollout.wave, rollout.phase)
        now = self._clock()
        with self._lock:
            for stale in [k for k, (at, _) in self._judged.items() if now - at >= self.max_age_s]:
                del self._judged[stale]
            cached = self._judged.get(key)
        if cached is not None:
            return cached[1]
        results = self._judge(session, rollout, members)
        if self.max_age_s > 0:
            with self._lock:
                self._judged[key] = (now, results)
        return results
