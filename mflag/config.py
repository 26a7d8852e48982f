"""A strict, typed reader for YAML params: dataclasses in, clear errors out.

`parse(cls, mapping)` builds the dataclass `cls` from a nested mapping. Every key must be a field,
every field must be given, and every value must have the field's type; otherwise a
:class:`ParamsError` names the dotted key and lists the valid ones. Nothing is defaulted here: the
defaults live in ``params.yaml`` alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ParamsError(ValueError):
    """A params file that does not match the schema; the message names the key."""


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = get_origin(tp)
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
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported params type {tp} at {key}")
    raise ParamsError(f"params: `{key}` must be {_type_name(tp)}, got {value!r}")


def parse(cls: type, mapping: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `mapping`, strictly (see module docstring)."""
    hints = typing.get_type_hints(cls)
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
