from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.schema import SchemaError, compiled_decoder, decode, encode
from protocol.schema import _decode as decode_slowly


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
        ({"inner": {"count": 1, "ratio": 10**400}}, r"\$\.inner\.ratio: integer is outside"),
        ({"inner": {"count": 2**63}}, r"\$\.inner\.count: integer is outside the 64-bit range"),
        ({"inner": {"count": -(2**63) - 1}}, r"\$\.inner\.count: integer is outside"),
        ({"inner": {"count": 1, "ratio": math.inf}}, r"\$\.inner\.ratio: expected a finite"),
        ({"inner": {"count": 1, "ratio": math.nan}}, r"\$\.inner\.ratio: expected a finite"),
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


# --- the generated fast decoder accepts exactly what the reporting decoder accepts -------


@dataclass(frozen=True)
class Scalars:
    b: bool
    i: int
    f: float
    s: str
    maybe_i: int | None
    maybe_f: float | None
    ints: tuple[int, ...]
    floats: list[float]
    inner: Inner | None = None
    extra: int = 0


SCALARS = {
    "b": True,
    "i": 1,
    "f": 1.5,
    "s": "x",
    "maybe_i": None,
    "maybe_f": 2,
    "ints": [1, 2],
    "floats": [0.5, 3],
    "inner": {"count": 1},
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1])
    | st.floats()
    | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["count", "ratio", "x"]), children, max_size=3)
    ),
    max_leaves=6,
)


def _outcome(decoder: Callable[[], object]) -> tuple[bool, object]:
    try:
        return True, decoder()
    except Exception:
        return False, None


TRICKY: list[object] = [
    *(None, True, 0, -1, 1.5, -0.0, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 10**400),
    *(math.inf, -math.inf, math.nan, "", "x", [], [1, 2**63], [1.5, math.inf], {}),
    {"count": 1},
]


def _agree(data: dict[str, object]) -> None:
    fast = _outcome(lambda: compiled_decoder(Scalars)(data))
    slow = _outcome(lambda: decode_slowly(Scalars, data, "$"))
    assert fast == slow, data
    if slow[0]:
        assert decode(Scalars, data) == slow[1]


@pytest.mark.parametrize("field", [*SCALARS, "extra", "unknown"])
def test_the_fast_decoder_agrees_on_every_tricky_value(field: str) -> None:
    for value in TRICKY:
        _agree({**SCALARS, field: value})
    _agree({k: v for k, v in SCALARS.items() if k != field})


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    field=st.sampled_from([*SCALARS, "extra", "unknown"]),
    value=json_values,
    drop=st.booleans(),
)
def test_the_fast_decoder_agrees_with_the_reporting_decoder(
    field: str, value: object, drop: bool
) -> None:
    data = {**SCALARS, field: value}
    if drop:
        del data[field]
    _agree(data)
