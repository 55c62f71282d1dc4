"""Launch forms generated from the jobs' own config dataclasses, checked before anything starts.

The dataclasses (`WorldConfig`, `PipelineConfig`, `TrainConfig`) give each field its type, default,
help and choices; the real `vitrine` argument parser gives each field its flag syntax, so the
argument list built here is exactly what a user would type, and it is parsed back with that parser
before launch (a form that cannot round-trip is a bug, not a launch). Checks run in three layers,
each message attached to the field it is about:

1. parsing the text a user typed (a number where a number is due, sizes as lists, ...);
2. the config's own `problems()`, the checks its command runs itself (`vitrine train` and `vitrine
   pipeline` exit 2 naming the first; for the world, the generator's own validation), and every
   path inside the data root (`vitrine.paths.check_inside`: no `..`, nothing the dashboard's user
   could read or write elsewhere);
3. what only exists at launch time: paths that must exist (a raw source, a processed dataset, a
   checkpoint) or must not (an output without `overwrite`), and the source / dataset readers' own
   checks, run without reading any rows.

Nothing here touches Streamlit except `render`, so the checks are tested as plain functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitrine.errors import UserError

COMMANDS = ("generate", "pipeline", "train")
FORM_ERROR = "_form"  # errors that belong to no single field


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # bool | int | float | optional_int | optional_float | str | optional_str | choice | int_list | str_list | lines
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    required: bool = False

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")


@dataclass(frozen=True)
class FormSpec:
    command: str
    fields: tuple[Field, ...]
    basic: tuple[str, ...]  # shown up front; the rest under "More settings"

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


# -- building the spec ------------------------------------------------------------------------------
def _config_class(command: str) -> type:
    if command == "generate":
        from pipeline.synth.world import WorldConfig

        return WorldConfig
    if command == "pipeline":
        from pipeline.config import PipelineConfig

        return PipelineConfig
    if command == "train":
        from trainer.config import TrainConfig

        return TrainConfig
    raise KeyError(command)


@functools.lru_cache(maxsize=None)
def subcommand_parser(command: str) -> argparse.ArgumentParser:
    """The `vitrine COMMAND` parser itself (the source of truth for flag syntax). Read-only."""
    from vitrine.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _kind(tp: Any, optional: bool, meta: dict[str, Any]) -> str:
    if meta.get("action") == "append":
        return "lines"
    if "choices" in meta:
        return "choice"
    if tp is bool:
        return "bool"
    if typing.get_origin(tp) in (tuple, list):
        item = (typing.get_args(tp) or (str,))[0]
        return "int_list" if item is int else "str_list"
    if tp in (int, float):
        # An optional number left empty means "not set" (None: e.g. follow another setting).
        return ("optional_" if optional else "") + tp.__name__
    return "optional_str" if optional else "str"


BASIC = {
    "generate": ("out", "scale", "days", "users", "items", "seed", "image_format", "overwrite"),
    "pipeline": ("raw", "out", "workers", "max_behaviors", "image_size", "scheduler", "overwrite"),
    "train": ("dataset", "features", "aggregator", "epochs", "batch_size", "lr", "max_steps", "seed", "mode"),
}
# Paths that must be given even when they equal the default: the default is relative to wherever
# the job starts, the form's value is made absolute.
REQUIRED = {"generate": ("out",), "pipeline": ("raw", "out"), "train": ("dataset",)}


@functools.lru_cache(maxsize=None)
def form_spec(command: str) -> FormSpec:
    cls = _config_class(command)
    hints = typing.get_type_hints(cls)
    out: list[Field] = []
    names = set()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = _kind(tp, optional, dict(f.metadata))
        out.append(Field(f.name, kind, default, f.metadata.get("help", ""), tuple(f.metadata.get("choices", ())),
                         f.name in REQUIRED[command]))
        names.add(f.name)
    # Flags of the subcommand that are not config fields (generate's --out, --overwrite, --no-progress).
    for action in subcommand_parser(command)._actions:
        if action.dest in names or action.dest in ("help", "func") or not action.option_strings:
            continue
        kind = "bool" if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) else "str"
        help_text = (action.help or "").replace("%(default)s", str(action.default))
        out.insert(0 if action.dest == "out" else len(out),
                   Field(action.dest, kind, action.default if action.default is not None else "", help_text,
                         (), action.dest in REQUIRED[command] or bool(action.required)))
    return FormSpec(command, tuple(out), BASIC[command])


# -- 1. parsing what was typed ----------------------------------------------------------------------
def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def to_text(f: Field, value: Any) -> Any:
    """A value as its widget holds it (text for numbers, so a bad entry can be explained)."""
    if f.kind in ("bool", "choice"):
        return value
    if f.kind in ("int_list", "str_list"):
        return ", ".join(str(v) for v in value)
    if f.kind == "lines":
        return "\n".join(value)
    return "" if value is None else str(value)


def parse_value(f: Field, raw: Any) -> Any:
    """The typed value of one field; UserError with a message for the field otherwise."""
    if f.kind == "bool":
        return bool(raw)
    if f.kind == "choice":
        if raw not in f.choices:
            raise UserError(f"must be one of {', '.join(map(str, f.choices))}, got {_show(raw)}")
        return raw
    text = "" if raw is None else str(raw).strip()
    if f.kind in ("optional_int", "optional_float"):
        if not text:
            return None
        f = dataclasses.replace(f, kind=f.kind.removeprefix("optional_"))
    if f.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise UserError(f"must be a whole number, got {_show(text)}") from None
    if f.kind == "float":
        try:
            return float(text)
        except ValueError:
            raise UserError(f"must be a number, got {_show(text)}") from None
    if f.kind == "int_list":
        items = [t for t in re.split(r"[,\s]+", text) if t]
        try:
            values = tuple(int(t) for t in items)
        except ValueError:
            raise UserError(f"must be whole numbers separated by commas, e.g. 200, 80; got {_show(text)}") from None
        if any(v < 1 for v in values):
            raise UserError(f"sizes must be >= 1, got {_show(text)}")
        return values
    if f.kind == "str_list":
        return tuple(t for t in re.split(r"[,\s]+", text) if t)
    if f.kind == "lines":
        return tuple(line.strip() for line in text.splitlines() if line.strip())
    if f.kind == "optional_str":
        return text or None
    if f.required and not text:
        raise UserError("is required")
    return text


def parse(spec: FormSpec, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    values, errors = {}, {}
    for f in spec.fields:
        try:
            values[f.name] = parse_value(f, raw.get(f.name, to_text(f, f.default)))
        except UserError as exc:
            errors[f.name] = f"{f.label}: {exc}"
    return values, errors


# -- 2. + 3. checking the values ------------------------------------------------------------------
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def _attach(spec: FormSpec, exc: UserError, fallback: str = FORM_ERROR,
            among: tuple[str, ...] | None = None) -> tuple[str, str]:
    """The field a config's error message names (by its --flag, one of `among` when given), else
    `fallback`."""
    msg = str(exc)
    names = {f.name for f in spec.fields} & set(among or [f.name for f in spec.fields])
    for flag in _FLAG.findall(msg):
        name = flag.replace("-", "_")
        if name in names:
            return name, msg
    return fallback, msg


def _abs(p: str | None, cwd: Path) -> str | None:
    if not p:
        return p
    q = Path(p).expanduser()
    return str((q if q.is_absolute() else cwd / q).resolve())


PATH_FIELDS = {
    "generate": ("out",),
    "pipeline": ("raw", "out", "source", "impressions", "items", "users", "images"),
    "train": ("dataset", "trunk_weights", "run_dir", "resume"),
}


def _problems(command: str, cfg: Any) -> list[UserError]:
    """The config's own checks, the very ones its command runs (`vitrine train` and `vitrine pipeline`
    exit 2 with the first of them; the form shows each under its field)."""
    if command == "generate":
        from pipeline.synth.world import _validate  # the generator's own checks (WorldConfig has no check())

        try:
            _validate(cfg)
        except UserError as exc:
            return [exc]
        return []
    return list(cfg.problems())


def check(spec: FormSpec, values: dict[str, Any], cwd: Path,
          data_root: Path | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Layers 2 and 3: returns the values with paths made absolute, and errors by field. Every path
    must lie inside `data_root` (the dashboard's; default `vitrine.paths.data_root()`)."""
    from vitrine.paths import check_inside, data_root as default_root

    command = spec.command
    root = data_root or default_root()
    values = dict(values)
    errors: dict[str, str] = {}
    for name in PATH_FIELDS[command]:
        try:
            check_inside(values.get(name), root, f"--{name.replace('_', '-')}", cwd)
        except UserError as exc:
            errors[name] = f"{name.replace('_', ' ')}: {exc}"
            values[name] = None  # never looked at, nor passed on
    for name in PATH_FIELDS[command]:
        values[name] = _abs(values.get(name), cwd)
    cfg_values = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(_config_class(command))}}
    cfg = _config_class(command)(**cfg_values)
    for exc in _problems(command, cfg):
        k, msg = _attach(spec, exc)
        errors.setdefault(k, msg)

    def exists_error(name: str, what: str) -> None:
        p = values.get(name)
        if p and Path(p).exists() and not values.get("overwrite"):
            errors.setdefault(name, f"{name}: {what} {p} already exists; tick overwrite to replace it")

    if command == "generate":
        exists_error("out", "directory")
    elif command == "pipeline":
        exists_error("out", "output")
        for name in ("impressions", "items", "users", "images"):
            p = values.get(name)
            if p and not glob.glob(p):
                errors.setdefault(name, f"{name}: nothing at {p}")
        bad_maps = [m for m in values.get("map") or () if "=" not in m]
        if bad_maps:
            errors.setdefault("map", f"map: each line is TABLE.FIELD=COLUMN, got {', '.join(map(repr, bad_maps))}")
        if not errors:
            from pipeline.source import load_source

            try:
                load_source(Path(values["raw"]), Path(values["source"]) if values.get("source") else None,
                            values.get("map") or (), values.get("impressions"), values.get("items"),
                            values.get("users"), values.get("images"))
            except UserError as exc:
                # A message may quote a command to fix it (`vitrine generate --out RAW`): only the
                # source's own options move it off the raw directory.
                k, msg = _attach(spec, exc, fallback="raw",
                                 among=("source", "map", "impressions", "items", "users", "images"))
                errors.setdefault(k, msg)
    elif command == "train":
        if "dataset" in errors or "resume" in errors:
            pass  # a path refused above is not looked at
        elif values.get("resume"):
            if not (Path(values["resume"]) / "checkpoint.pt").is_file():
                errors["resume"] = f"resume: {values['resume']} holds no checkpoint.pt (not a run directory)"
        else:
            from trainer.dataset import open_dataset

            try:
                ds = open_dataset(values["dataset"])
            except UserError as exc:
                errors.setdefault("dataset", f"dataset: {exc}")
            else:
                if values.get("features") != "ids" and not ds.has_images:
                    errors.setdefault("features", f"features: {ds.dir} has no image store; choose ids")
            rd = values.get("run_dir")
            if rd and (Path(rd) / "checkpoint.pt").exists():
                errors.setdefault("run_dir", f"run dir: {rd} already holds a run; choose another or resume it")
        tw = values.get("trunk_weights")
        if tw and not Path(tw).is_file():
            errors.setdefault("trunk_weights", f"trunk weights: no file {tw}")
    return values, errors


# -- the argument list ----------------------------------------------------------------------------
def _opt(action: argparse.Action) -> str:
    return max((o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")), key=len,
               default=action.option_strings[0])


def _item(opt: str, v: Any) -> list[str]:
    s = str(v)
    return [f"{opt}={s}"] if s.startswith("-") else [opt, s]


def to_argv(spec: FormSpec, values: dict[str, Any]) -> list[str]:
    """`[COMMAND, --flag, value, ...]` for the values that differ from the defaults (and the required ones)."""
    argv = [spec.command]
    parser = subcommand_parser(spec.command)
    by_dest = {a.dest: a for a in parser._actions if a.option_strings}
    for f in spec.fields:
        v = values.get(f.name)
        if (v == f.default and not f.required) or f.name not in by_dest:
            continue
        action = by_dest[f.name]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(_opt(action) if v else "--no-" + _opt(action)[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            if v:
                argv.append(_opt(action))
        elif isinstance(action, argparse._StoreFalseAction):
            if not v:
                argv.append(action.option_strings[0])
        elif isinstance(action, argparse._AppendAction):
            for item in v or ():
                argv += _item(_opt(action), item)
        elif action.nargs == "*":
            argv += [_opt(action), *(str(x) for x in v)]
        elif v is None or v == "":
            continue
        else:
            argv += _item(_opt(action), v)
    return argv


def roundtrip(spec: FormSpec, values: dict[str, Any], argv: list[str]) -> None:
    """Parse `argv` with the real parser and insist it gives back `values` (a guard, not a check)."""
    from vitrine.cli import build_parser

    ns = build_parser().parse_args(argv)
    for f in spec.fields:
        got = getattr(ns, f.name, None)
        want = values.get(f.name)
        if f.kind in ("int_list", "str_list", "lines"):
            got, want = tuple(got or ()), tuple(want or ())
        if got != want:
            raise RuntimeError(f"internal: the command line gives {f.name}={got!r}, the form said {want!r}")


def prepare(command: str, raw: dict[str, Any], cwd: Path) -> tuple[list[str] | None, dict[str, str]]:
    """Everything between the form and the launch: (argv, {}) or (None, errors by field)."""
    spec = form_spec(command)
    values, errors = parse(spec, raw)
    if errors:
        return None, errors
    values, errors = check(spec, values, cwd)
    if errors:
        return None, errors
    argv = to_argv(spec, values)
    roundtrip(spec, values, argv)
    return argv, {}
