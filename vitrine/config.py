"""Typed configs as dataclasses, exposed on the command line without writing each flag twice.

Every job's settings are a dataclass with defaults; `add_dataclass_args` turns its fields into
`--kebab-case` flags (help text from the field's `metadata["help"]`), and `from_args` builds the
dataclass back from the parsed namespace. The dataclass stays the single source of truth, so the
CLI, the dashboard's forms and MLflow params all see the same names and defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def help_meta(text: str, **kw) -> dict:
    """Field metadata: the help text `add_dataclass_args` shows, plus e.g. `choices`."""
    return {"help": text, **kw}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional[...]; return (type, optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _groups(parser: argparse.ArgumentParser, cls: type) -> dict[str, Any]:
    """field name -> where its flag goes: an argument group per dataclass base that declares fields (a
    config grouped into sub-configs, e.g. `TrainConfig`), titled by its docstring; else the parser."""
    out: dict[str, Any] = {}
    for base in reversed(cls.__mro__[1:]):
        own = [n for n in getattr(base, "__annotations__", {}) if dataclasses.is_dataclass(base)]
        if own:
            title = base.__name__.removesuffix("Settings").lower()
            group = parser.add_argument_group(title, (base.__doc__ or "").strip().splitlines()[0] or None)
            out.update({n: group for n in own})
    return out


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    groups = _groups(parser, cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, _optional = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "help": f"{help_text} (default: {default!r})"}
        if f.metadata.get("action") == "append":
            kwargs.update(action="append", default=None, type=str)
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = default
        elif typing.get_origin(tp) in (list, tuple):
            (item_tp, *_rest) = typing.get_args(tp) or (str,)
            kwargs["type"] = item_tp
            kwargs["nargs"] = "*"
            kwargs["default"] = default
        elif typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
            kwargs["default"] = default
        else:
            kwargs["type"] = tp
            kwargs["default"] = default
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        groups.get(f.name, parser).add_argument(_flag(f.name), **kwargs)


def from_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif hasattr(ns, f.name):
            v = getattr(ns, f.name)
            if v is None and f.metadata.get("action") == "append":
                v = f.default
            if isinstance(v, list) and typing.get_origin(typing.get_type_hints(cls)[f.name]) is tuple:
                v = tuple(v)
            values[f.name] = v
    return cls(**values)  # type: ignore[call-arg]


def as_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a (nested) dataclass into MLflow-style string params."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(as_params(v, prefix=key + "."))
        else:
            out[key] = str(v)
    return out


def to_argv(obj: Any, skip: tuple[str, ...] = ()) -> list[str]:
    """Command-line arguments that `add_dataclass_args` + `from_args` turn back into `obj`.

    For starting a child process with the same settings as an argument list (never a shell string).
    Fields left at None are omitted (their default is None too)."""
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        if f.name in skip or not f.init:
            continue
        v = getattr(obj, f.name)
        if v is None:
            continue
        flag = _flag(f.name)
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, (list, tuple)):
            if f.metadata.get("action") == "append":
                for item in v:
                    argv += [flag, str(item)]
            else:
                argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv
