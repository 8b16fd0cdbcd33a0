"""Typed conversion of plain data (YAML, JSON) into frozen dataclasses, collecting every problem as a
line that names its field ("passes[1].quantize.scheme.weights: 'int3' is not one of ...") instead of
stopping at the first. Recipes and artifact manifests are both read through it."""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Literal

from dlmc.errors import DlmcError

BAD: Any = object()
"""What build/convert return for a value they reported a problem with."""


def build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping of options, got {kind(data)}")
        return BAD
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    before = len(problems)
    for key in data:
        if key not in fields:
            known = ", ".join(fields) or "none"
            problems.append(f"{where}.{key}: unknown option (known: {known})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = convert(hints[name], data[name], f"{where}.{name}", problems)
            if value is not BAD:
                kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where}.{name}: required")
    if len(problems) > before:
        return BAD
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, DlmcError) as e:
        message = str(e)
        head = message.split(":", 1)[0].split("=", 1)[0].strip()
        problems.append(f"{where}.{message}" if head in fields else f"{where}: {message}")
        return BAD


def convert(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return convert(options[0], value, where, problems)
        for option in options:  # first option that accepts the value, silently
            result = convert(option, value, where, [])
            if result is not BAD:
                return result
        problems.append(f"{where}: {value!r} is not {' or '.join(type_name(o) for o in options)}")
        return BAD
    if origin is Literal:
        if value in args and type(value) is type(args[list(args).index(value)]):
            return value
        problems.append(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return BAD
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {kind(value)}")
            return BAD
        item = args[0]
        items = [convert(item, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return BAD if any(v is BAD for v in items) else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {kind(value)}")
            return BAD
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, problems)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not (abs(value) <= sys.float_info.max):  # inf, nan, an int float() cannot hold
            problems.append(f"{where}: expected a finite number, got {value!r}")
            return BAD
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"field type {tp!r} is not supported")  # a bug in a config class, not user input
    if not ok:
        problems.append(f"{where}: expected {type_name(tp)}, got {kind(value)} {value!r}")
        return BAD
    return value


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def kind(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "nothing",
    }.get(type(value), type(value).__name__)
