from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import pytest

from protocol.schema import SchemaError, decode, encode


class Color(StrEnum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    count: int
    ratio: float = 1.0


@dataclass(frozen=True)
class Outer:
    name: str
    color: Color
    inner: Inner
    items: tuple[Inner, ...]
    tags: dict[str, str]
    kind: Literal["a", "b"]
    note: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name must not be empty")


GOOD = {
    "name": "x",
    "color": "red",
    "inner": {"count": 1, "ratio": 2},
    "items": [{"count": 2}],
    "tags": {"site": "lab"},
    "kind": "a",
}


def test_decode_builds_nested_dataclasses_and_encode_round_trips() -> None:
    value = decode(Outer, GOOD)
    assert value.inner == Inner(1, 2.0)
    assert isinstance(value.inner.ratio, float)
    assert value.items == (Inner(2),)
    assert value.color is Color.RED
    assert decode(Outer, encode(value)) == value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": 3}, r"\$\.name: expected str, got integer"),
        ({"inner": {"count": True}}, r"\$\.inner\.count: expected int, got boolean"),
        ({"inner": {"count": 1.5}}, r"\$\.inner\.count: expected int, got number"),
        ({"inner": {"count": 1, "ratio": 10**400}}, r"\$\.inner\.ratio: number is too large"),
        ({"items": [{"count": 1}, {"count": "2"}]}, r"\$\.items\[1\]\.count: expected int"),
        ({"color": "green"}, r"\$\.color: expected one of \['red', 'blue'\]"),
        ({"kind": "c"}, r"\$\.kind: expected one of \['a', 'b'\]"),
        ({"tags": {"site": 1}}, r"\$\.tags\.site: expected str"),
        ({"extra": 1}, r"\$: unknown field\(s\) extra"),
        ({"items": {"count": 1}}, r"\$\.items: expected an array, got object"),
        ({"name": ""}, r"\$: name must not be empty"),
        ({"color": None}, r"\$\.color: must not be null"),
    ],
)
def test_decode_names_the_path_of_what_is_wrong(change: dict[str, object], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        decode(Outer, {**GOOD, **change})


def test_missing_required_field_is_named() -> None:
    data = dict(GOOD)
    del data["inner"]
    with pytest.raises(SchemaError, match=r"\$: missing field 'inner'"):
        decode(Outer, data)


def test_optional_field_takes_null_and_default() -> None:
    assert decode(Outer, {**GOOD, "note": None}).note is None
    assert decode(Outer, GOOD).note is None


def test_top_level_must_be_an_object() -> None:
    with pytest.raises(SchemaError, match=r"\$: expected an object, got array"):
        decode(Outer, [])
