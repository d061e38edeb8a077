"""The API's request and response bodies."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import pydantic.dataclasses
from pydantic import BaseModel, ConfigDict, Field

from protocol.enrollment import EnrollmentRequest

# Past this a page is empty anyway; unbounded, a huge offset overflows SQLite's integers.
MAX_OFFSET = 2**31 - 1


@pydantic.dataclasses.dataclass(config=ConfigDict(extra="forbid"), frozen=True)
class EnrollBody(EnrollmentRequest):
    """The wire contract's request as the API takes it: an unknown field is refused."""


class DeviceRead(BaseModel):
    id: str
    name: str
    tags: list[str]
    hardware: dict[str, Any]
    status: str
    last_seen_at: dt.datetime | None
    agent_version: str | None
    model_name: str | None
    model_version: str | None
    enrolled_at: dt.datetime


class DevicePage(BaseModel):
    items: list[DeviceRead]
    total: int
    limit: int
    offset: int


class DevicePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tags: list[str] = Field(max_length=32)


class DesiredRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=128)
    version: str | None = Field(default=None, max_length=64)
    mode: Literal["active", "shadow"] = "active"
    rollback: bool = False


class DesiredRead(BaseModel):
    device_id: str
    seq: int
    model: str | None
    mode: str


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    public_key: str = Field(min_length=1, max_length=4096)


class KeyRead(BaseModel):
    name: str
    keyid: str
    public_key: str
    created_at: dt.datetime


class ModelRead(BaseModel):
    name: str
    version: str
    sha256: str
    size: int
    quantization: str
    signed_by: str
    created_at: dt.datetime
    uploaded_by: str


class ModelDetail(ModelRead):
    manifest: dict[str, Any]


class AuditRead(BaseModel):
    id: int
    ts: dt.datetime
    actor: str
    action: str
    target: str | None
    details: dict[str, Any]


class ApiTokenRead(BaseModel):
    """A token as admins see it: never the token itself, which only its holder has."""

    id: int
    name: str
    role: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class Health(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
    mqtt: Literal["connected", "disconnected", "disabled"]
