"""Strict decoding of JSON values into frozen dataclasses, and encoding back.

The wire contract is written as plain dataclasses so that the agent can check what it
receives without pydantic or any other dependency. Decoding is strict: unknown keys,
missing keys and wrong types are errors that name the JSON path, because a payload that
is "almost right" is how mix-and-match attacks and silent version skew get in.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")

# JSON numbers travel as IEEE doubles and 64-bit integers; a schema takes nothing else,
# so no database column or peer parser meets a value it cannot hold.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class SchemaError(ValueError):
    """A JSON value does not fit the schema; the message starts with its path (`$.a.b[2]`)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(cls: type[T], value: object, path: str = "$") -> T:
    """Build a `cls` dataclass from a JSON value, or raise SchemaError."""
    try:
        return typing.cast(T, _compiled(typing.cast(Any, cls))(value))
    except (_Mismatch, ValueError, TypeError, OverflowError):
        # Only wrong input gets here: walk it again, slowly, to say where it is wrong.
        return typing.cast(T, _decode(cls, value, path))


def compiled_decoder(cls: type[T]) -> typing.Callable[[object], T]:
    """`decode` without the error reporting: raises an unspecified exception on a
    mismatch. For hot paths that fall back to `decode` to say what was wrong."""
    return typing.cast(typing.Callable[[object], T], _compiled(typing.cast(Any, cls)))


class _Mismatch(Exception):
    """The fast path's "no": it carries no message, the slow path writes that."""


Decoder = typing.Callable[[object], Any]


@cache
def _compiled(tp: Any) -> Decoder:
    """A decoder for `tp`, with every type question answered once, not once per message.

    It accepts exactly what _decode accepts (the tests run both on the same inputs).
    """
    origin = get_origin(tp)
    if tp is Any:
        return lambda value: value
    if origin in (Union, types.UnionType):
        return _compile_union(tp)
    if origin is Literal:
        allowed = get_args(tp)

        def literal(value: object) -> object:
            if value is None or value not in allowed:
                raise _Mismatch
            return value

        return literal
    if origin in (list, tuple):
        return _compile_sequence(tp)
    if origin is dict:
        item = _compiled(get_args(tp)[1]) if get_args(tp) else _compiled(Any)

        def mapping(value: object) -> dict[str, Any]:
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise _Mismatch
            return {k: item(v) for k, v in value.items()}

        return mapping
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _compile_dataclass(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return lambda value: tp(value) if value is not None else _fail()
    return _compile_scalar(tp)


def _fail() -> typing.NoReturn:
    raise _Mismatch


def _compile_union(tp: Any) -> Decoder:
    options = [o for o in get_args(tp) if o is not type(None)]
    nullable = len(options) < len(get_args(tp))
    decoders = [_compiled(o) for o in options]

    def union(value: object) -> object:
        if value is None:
            if nullable:
                return None
            raise _Mismatch
        for decoder in decoders:
            try:
                return decoder(value)
            except (_Mismatch, ValueError, TypeError):
                continue
        raise _Mismatch

    return union


def _compile_sequence(tp: Any) -> Decoder:
    args = get_args(tp)
    is_tuple = get_origin(tp) is tuple
    if is_tuple and not (len(args) == 2 and args[1] is Ellipsis):
        fixed = [_compiled(a) for a in args]

        def fixed_tuple(value: object) -> tuple[Any, ...]:
            if not isinstance(value, list) or len(value) != len(fixed):
                raise _Mismatch
            return tuple(d(v) for d, v in zip(fixed, value, strict=True))

        return fixed_tuple
    check = _inline_check(args[0]) if args else None
    if check is not None:
        return _compile_scalar_sequence(check, is_tuple)
    item = _compiled(args[0] if args else Any)

    def sequence(value: object) -> Any:
        if not isinstance(value, list):
            raise _Mismatch
        items = [item(v) for v in value]
        return tuple(items) if is_tuple else items

    return sequence


# Scalar checks written inline into a dataclass's generated decoder: `v` is the value,
# and a statement may rebind it (ints where floats go become floats).
_INLINE_CHECKS: dict[Any, str] = {
    bool: "if type(v) is not bool: raise _Mismatch",
    str: "if type(v) is not str: raise _Mismatch",
    int: "if type(v) is not int or not INT_MIN <= v <= INT_MAX: raise _Mismatch",
    float: (
        "if type(v) is float:\n"
        "    if not isfinite(v): raise _Mismatch\n"
        "elif type(v) is int and INT_MIN <= v <= INT_MAX: v = float(v)\n"
        "else: raise _Mismatch"
    ),
}


def _inline_check(tp: Any) -> str | None:
    """Source that checks `v` against `tp`, for scalars and optional scalars; else None."""
    if tp in _INLINE_CHECKS:
        return _INLINE_CHECKS[tp]
    if get_origin(tp) in (Union, types.UnionType):
        options = [o for o in get_args(tp) if o is not type(None)]
        if len(options) == 1 and len(get_args(tp)) == 2 and options[0] in _INLINE_CHECKS:
            body = _INLINE_CHECKS[options[0]].replace("\n", "\n    ")
            return f"if v is not None:\n    {body}"
    return None


def _generated(name: str, lines: list[str], env: dict[str, Any]) -> Decoder:
    env.update(_Mismatch=_Mismatch, isfinite=math.isfinite, INT_MIN=INT_MIN, INT_MAX=INT_MAX)
    exec("\n".join(lines), env)
    decoder: Decoder = env[name]
    return decoder


def _compile_scalar_sequence(check: str, is_tuple: bool) -> Decoder:
    lines = [
        "def sequence(value):",
        "    if type(value) is not list: raise _Mismatch",
        "    out = []",
        "    for v in value:",
        *("        " + line for line in check.splitlines()),
        "        out.append(v)",
        f"    return {'tuple(out)' if is_tuple else 'out'}",
    ]
    return _generated("sequence", lines, {})


def _compile_dataclass(cls: type) -> Decoder:
    """Python source generated for `cls`, the way `dataclasses` writes `__init__`: each
    scalar field's check inline, with no call or dictionary per field (telemetry goes
    through here thousands of times a second)."""
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    env: dict[str, Any] = {
        "cls": cls,
        "known": frozenset(f.name for f in fields),
        "required": frozenset(
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ),
    }
    lines = [
        "def build(value):",
        "    if type(value) is not dict: raise _Mismatch",
        "    keys = value.keys()",
        "    if not keys <= known or not required <= keys: raise _Mismatch",
        "    kwargs = {}",
    ]
    for n, f in enumerate(fields):
        check = _inline_check(hints[f.name])
        if check is None:
            env[f"decode_{n}"] = _compiled(hints[f.name])
            check = f"v = decode_{n}(v)"
        indent = "        " if f.name in env["required"] else "            "
        if f.name not in env["required"]:
            lines.append(f"    if {f.name!r} in value:")
        lines.append(f"{indent[4:]}v = value[{f.name!r}]")
        lines += [indent[4:] + line for line in check.splitlines()]
        lines.append(f"{indent[4:]}kwargs[{f.name!r}] = v")
    lines.append("    return cls(**kwargs)")
    return _generated("build", lines, env)


def _compile_scalar(tp: Any) -> Decoder:
    if tp is bool:
        return lambda v: v if type(v) is bool else _fail()
    if tp is int:
        return lambda v: v if type(v) is int and INT_MIN <= v <= INT_MAX else _fail()
    if tp is str:
        return lambda v: v if type(v) is str else _fail()
    if tp is float:

        def real(v: object) -> float:
            if type(v) is float and math.isfinite(v):
                return v
            if type(v) is int and INT_MIN <= v <= INT_MAX:
                return float(v)
            raise _Mismatch

        return real
    raise TypeError(f"schema type {tp!r} is not supported")


def _decode(tp: Any, value: object, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _decode_union(tp, value, path)
    if value is None:
        raise SchemaError(path, "must not be null")
    if origin is Literal:
        if value not in get_args(tp):
            raise SchemaError(path, f"expected one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        return _decode_sequence(tp, value, path)
    if origin is dict:
        return _decode_mapping(tp, value, path)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = [m.value for m in tp]
            raise SchemaError(path, f"expected one of {allowed}, got {value!r}") from None
    return _decode_scalar(tp, value, path)


def _decode_union(tp: Any, value: object, path: str) -> Any:
    options = get_args(tp)
    if value is None:
        if type(None) in options:
            return None
        raise SchemaError(path, "must not be null")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _decode(option, value, path)
        except SchemaError as exc:
            errors.append(exc)
    raise errors[0]


def _decode_sequence(tp: Any, value: object, path: str) -> Any:
    if not isinstance(value, list):
        raise SchemaError(path, f"expected an array, got {_kind(value)}")
    args = get_args(tp)
    if get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise SchemaError(path, f"expected {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_decode(a, v, f"{path}[{i}]") for i, (a, v) in pairs)
    item = args[0] if args else Any
    items = [_decode(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if get_origin(tp) is tuple else items


def _decode_mapping(tp: Any, value: object, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(path, f"expected an object, got {_kind(value)}")
    _, item = get_args(tp) or (str, Any)
    out = {}
    for key, v in value.items():
        if not isinstance(key, str):
            raise SchemaError(path, "object keys must be strings")
        out[key] = _decode(item, v, f"{path}.{key}")
    return out


def _decode_dataclass(cls: type, value: object, path: str) -> Any:
    if not isinstance(value, dict):
        raise SchemaError(path, f"expected an object, got {_kind(value)}")
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise SchemaError(path, f"unknown field(s) {', '.join(unknown)}")
    kwargs = {}
    for name, field in known.items():
        if name in value:
            kwargs[name] = _decode(hints[name], value[name], f"{path}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise SchemaError(path, f"missing field {name!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        # __post_init__ checks (semver, digests, ...) report through the same path.
        raise SchemaError(path, str(exc)) from None


def _decode_scalar(tp: Any, value: object, path: str) -> Any:
    # bool is an int in Python but never in a schema; and ints are fine where floats go.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not INT_MIN <= typing.cast(int, value) <= INT_MAX:
            raise SchemaError(path, "integer is outside the 64-bit range")
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(value, int) and ok and not INT_MIN <= value <= INT_MAX:
            raise SchemaError(path, "integer is outside the 64-bit range")
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(path, f"expected a finite number, got {value}")
        if ok:
            return float(typing.cast(float, value))
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"schema type {tp!r} is not supported")
    if not ok:
        raise SchemaError(path, f"expected {tp.__name__}, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def has_free_form(tp: Any) -> bool:
    """Whether any part of `tp` is `Any`: JSON the schema does not describe."""
    if tp is Any:
        return True
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return any(has_free_form(h) for h in _hints(tp).values())
    return any(has_free_form(a) for a in get_args(tp) if a is not Ellipsis)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook that refuses duplicate keys.

    Parsers disagree on which copy of a duplicated key wins, so one signed document could
    be read two ways; refusing duplicates closes that ambiguity.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def encode(value: Any) -> Any:
    """The JSON value of a dataclass tree (enums by value, tuples as arrays)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): encode(v) for k, v in value.items()}
    return value
