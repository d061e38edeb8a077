"""What a rollout request says, checked at the API edge and stored as accepted."""

from __future__ import annotations

import pydantic.dataclasses
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleet_server.rollouts.gates import Gates
from fleet_server.rollouts.states import OnFailure

MAX_WAVES = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RolloutTarget(_Strict):
    """Exactly one of: devices carrying every one of `tags`, the listed `devices`, `all`."""

    tags: list[str] = Field(default_factory=list, max_length=32)
    devices: list[str] = Field(default_factory=list, max_length=100_000)
    all: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> RolloutTarget:
        kinds = sum((bool(self.tags), bool(self.devices), self.all))
        if kinds != 1:
            raise ValueError("target takes exactly one of tags, devices or all")
        return self


class WaveSpec(_Strict):
    """A share of the target (`percent`) or a number of its devices (`count`); the last wave
    takes whatever devices the others left."""

    percent: float | None = Field(default=None, gt=0, le=100)
    count: int | None = Field(default=None, ge=1)
    bake_s: float = Field(default=300.0, ge=0, le=7 * 86400)
    # The devices first run the candidate in shadow; they switch once agreement passes.
    shadow_first: bool = False
    # After this wave passes, wait for a person (`resume`) before the next one.
    pause_after: bool = False

    @model_validator(mode="after")
    def _one_size(self) -> WaveSpec:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a wave takes exactly one of percent or count")
        return self


@pydantic.dataclasses.dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class GateThresholds(Gates):
    """The gates, their bounds and defaults as `Gates` defines them, taken from a request:
    an unknown gate is refused."""


class RolloutCreate(_Strict):
    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    target: RolloutTarget
    waves: list[WaveSpec] = Field(min_length=1, max_length=MAX_WAVES)
    gates: GateThresholds = Field(default_factory=GateThresholds)
    on_failure: OnFailure = OnFailure.ROLLBACK
    # A device with no terminal report this long after it was assigned counts as failed.
    device_timeout_s: float = Field(default=900.0, gt=0, le=7 * 86400)
    # A wave still short of evidence this long after its bake time ends pauses the rollout.
    evidence_timeout_s: float = Field(default=3600.0, gt=0, le=30 * 86400)

    @model_validator(mode="after")
    def _shadow_needs_agreement(self) -> RolloutCreate:
        if any(w.shadow_first for w in self.waves) and self.gates.min_shadow_agreement is None:
            raise ValueError("a shadow-first wave needs gates.min_shadow_agreement")
        return self
