"""A strict, typed reader for YAML params: dataclasses in, clear errors out.

`parse(cls, mapping)` builds the dataclass `cls` from a nested mapping. Every key must be a field,
every field must be given, and every value must have the field's type; otherwise a
:class:`ParamsError` names the dotted key and lists the valid ones. Nothing is defaulted here: the
defaults live in ``params.yaml`` alone.

Ranges are declared next to each field, in its type: ``Annotated[int, Range(1)]`` is an integer >= 1,
``Annotated[float, Range(0, 1, high_open=True)]`` a number in [0, 1), ``Annotated[list[...], Length(5)]``
a list of exactly five items, ``Annotated[dict[...], Keys(...)]`` a mapping with exactly the keys given.
The parser checks them after the type, and every number for finiteness (no NaN, no infinity), so an
out-of-range value is a :class:`ParamsError` that names the dotted key, the value and the allowed range,
at load, before any stage does work. Rules that tie several fields together live in the dataclass's
``validate(prefix)`` hook, which the parser calls last.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin


class ParamsError(ValueError):
    """A params file that does not match the schema; the message names the key."""


class OutOfRange(ParamsError):
    """A value of the right type outside its allowed range (also NaN and infinity)."""


def _num(x: float | None, sign: str) -> str:
    if x is None:
        return f"{sign}inf"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


# ---------------------------------------------------------------------------------------- rules
@dataclasses.dataclass(frozen=True)
class Range:
    """A closed or open interval; None is unbounded on that side. `why` is appended to the message."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def describe(self) -> str:
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{_num(self.low, '-')}, {_num(self.high, '')}{right}"

    def check(self, value: Any, key: str) -> None:
        ok = isinstance(value, int) or math.isfinite(value)  # ints compare exactly, however large
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        if not ok:
            raise OutOfRange(f"params: `{key}` must be in {self.describe()}{_why(self.why)}, got {_short(value)}")


@dataclasses.dataclass(frozen=True)
class MultipleOf:
    """An integer multiple of `step`."""

    step: int
    why: str = ""

    def describe(self) -> str:
        return f"a multiple of {self.step}"

    def check(self, value: Any, key: str) -> None:
        if value % self.step:
            raise OutOfRange(f"params: `{key}` must be {self.describe()}{_why(self.why)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Length:
    """A list of exactly `exact` items, or of at least `at_least`."""

    exact: int | None = None
    at_least: int | None = None

    def describe(self) -> str:
        return f"exactly {self.exact} items" if self.exact is not None else f"at least {self.at_least} item(s)"

    def check(self, value: Sequence, key: str) -> None:
        n = len(value)
        if (self.exact is not None and n != self.exact) or (self.at_least is not None and n < self.at_least):
            raise OutOfRange(f"params: `{key}` must hold {self.describe()}, got {len(value)}: {list(value)!r}")


@dataclasses.dataclass(frozen=True)
class Increasing:
    """A list whose items strictly increase."""

    def describe(self) -> str:
        return "strictly increasing"

    def check(self, value: Sequence, key: str) -> None:
        if any(b <= a for a, b in zip(value, value[1:])):
            raise OutOfRange(f"params: `{key}` must be {self.describe()}, got {list(value)!r}")


@dataclasses.dataclass(frozen=True)
class Keys:
    """A mapping whose keys come from `names()` (a callable, so that a table elsewhere can be read lazily,
    at load). `required`: every name must be present; else any subset of them is accepted."""

    names: Callable[[], Sequence[str]]
    required: bool = True
    why: str = ""

    def describe(self) -> str:
        names = ", ".join(self.names())
        return f"exactly the keys {names}" if self.required else f"keys among {names}"

    def check(self, value: dict, key: str) -> None:
        names = list(self.names())
        for k in value:
            if k not in names:
                close = difflib.get_close_matches(str(k), names, n=1)
                hint = f" Did you mean `{key}.{close[0]}`?" if close else ""
                raise OutOfRange(
                    f"params: unknown key `{key}.{k}`.{hint} `{key}` takes {self.describe()}{_why(self.why)}"
                )
        missing = [n for n in names if n not in value] if self.required else []
        if missing:
            raise OutOfRange(
                f"params: missing key `{key}.{missing[0]}`: `{key}` takes {self.describe()}{_why(self.why)}"
            )


def _why(why: str) -> str:
    return f" ({why})" if why else ""


# ------------------------------------------------------------------------------------- converting
def _finite(value: Any) -> bool:
    """Whether a YAML number is a finite float: not NaN, not infinite, not an integer too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True  # not a number: the type check reports it
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(tp)[1])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Annotated:
        base, *rules = get_args(tp)
        if base is float and not _finite(value):  # say the allowed range with the NaN
            ranges = " and ".join(r.describe() for r in rules)
            raise OutOfRange(f"params: `{key}` must be a finite number in {ranges}, got {_short(value)}")
        converted = _convert(base, value, key)
        for rule in rules:
            rule.check(converted, key)
        return converted
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"params: `{key}` must be a mapping, got {value!r}")
        return parse(tp, value, prefix=key)
    if origin is Literal:
        if value in get_args(tp):
            return value
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _convert(arg, value, key)
            except OutOfRange:  # the right type, out of range: that is the error to report
                raise
            except ParamsError:
                pass
    elif origin is list or origin is tuple:
        if isinstance(value, list):
            items = [_convert(get_args(tp)[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _convert(get_args(tp)[1], v, f"{key}.{k}") for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not _finite(value):  # every number is finite, ranged or not
                raise OutOfRange(f"params: `{key}` must be a finite number, got {_short(value)}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported params type {tp} at {key}")
    raise ParamsError(f"params: `{key}` must be {_type_name(tp)}, got {value!r}")


def parse(cls: type, mapping: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `mapping`, strictly (see module docstring)."""
    hints = typing.get_type_hints(cls, include_extras=True)  # extras: the Annotated ranges
    fields = [f.name for f in dataclasses.fields(cls)]
    where = f"`{prefix}`" if prefix else "the top level"
    valid = ", ".join(fields)
    for key in mapping:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean `{prefix + '.' if prefix else ''}{close[0]}`?" if close else ""
            raise ParamsError(f"params: unknown key `{dotted}`.{hint} Valid keys under {where}: {valid}")
    missing = [f for f in fields if f not in mapping]
    if missing:
        dotted = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ParamsError(f"params: missing key `{dotted}`. Keys required under {where}: {valid}")
    values = {name: _convert(hints[name], mapping[name], f"{prefix}.{name}" if prefix else name) for name in fields}
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """The plain (YAML/JSON-ready) form of a parsed params object."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
