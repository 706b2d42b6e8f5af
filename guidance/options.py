"""Command-line options for each guidance method, derived from its config dataclass.

``dreamlab generate --guidance ism --ism.interval-steps 2 ...``: every scalar field of a method's
config (numbers, flags, choices) becomes ``--<method>.<field>``, with the field's docstring as
help text and the paper's default named in it; schedule fields (timestep ranges, clip values)
take a short schedule expression (:func:`parse_schedule`). Every option defaults to "unset",
so only what the user typed overrides the prior's preset and the paper's defaults
(:func:`apply_options`). Nested dataclasses other than ``TimestepSchedule`` are left to the
Python API and config files.

Hand-written parts: tyro builds the parser; field docstrings are read with ``ast`` (tyro has
no public API for that).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from functools import lru_cache
from typing import Annotated, Any, Literal

from dreamlab.guidance.common import TimestepSchedule
from dreamlab.schedules import Constant, Exponential, Linear, Piecewise, Schedule, SqrtAnneal

SCHEDULE_SYNTAX = (
    "a number (constant), linear:START,END[,BEGIN,FINISH], sqrt:START,END, exp:START,END[,FINISH] "
    "(values vs training progress 0..1)"
)

_SCALARS = (int, float, bool, str)


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after a field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def parse_schedule(text: str) -> Schedule:
    """A schedule from a short expression; ValueError with the accepted syntax otherwise.

    ``"0.5"`` -> Constant(0.5); ``"linear:0.98,0.5"`` -> Linear(0.98, 0.5);
    ``"linear:0.98,0.5,0,0.5"`` -> Linear(0.98, 0.5, begin=0, finish=0.5);
    ``"sqrt:0.98,0.02"`` -> SqrtAnneal; ``"exp:1e-3,1e-5"`` -> Exponential.
    """
    raw = text.strip().lower()
    try:
        if ":" not in raw:
            return Constant(float(raw))
        kind, _, rest = raw.partition(":")
        values = [float(v) for v in rest.split(",") if v.strip()]
        if kind == "linear" and len(values) in (2, 4):
            return Linear(*values)
        if kind == "sqrt" and len(values) == 2:
            return SqrtAnneal(*values)
        if kind == "exp" and len(values) in (2, 3) and values[0] > 0 and values[1] > 0:
            return Exponential(*values)
    except ValueError:
        pass
    raise ValueError(f"cannot read the schedule {text!r}: use {SCHEDULE_SYNTAX}")


def format_schedule(schedule: Schedule | None) -> str:
    """Inverse of :func:`parse_schedule` (Piecewise is written as its Python repr)."""
    if schedule is None:
        return "none"
    if isinstance(schedule, Constant):
        return f"{schedule.value:g}"
    if isinstance(schedule, Linear):
        tail = "" if (schedule.begin, schedule.finish) == (0.0, 1.0) else f",{schedule.begin:g},{schedule.finish:g}"
        return f"linear:{schedule.start:g},{schedule.end:g}{tail}"
    if isinstance(schedule, SqrtAnneal):
        return f"sqrt:{schedule.start:g},{schedule.end:g}"
    if isinstance(schedule, Exponential):
        return f"exp:{schedule.start:g},{schedule.end:g}" + ("" if schedule.finish == 1.0 else f",{schedule.finish:g}")
    assert isinstance(schedule, Piecewise)
    return repr(schedule)


def _is_schedule_hint(hint: Any) -> bool:
    members = set(typing.get_args(hint)) - {type(None)}
    return bool(members) and members <= set(typing.get_args(Schedule))


def _cli_kind(hint: Any) -> str | None:
    """"scalar", "schedule", "timesteps" or None (not exposed) for a config field's type hint."""
    if hint in _SCALARS or typing.get_origin(hint) is Literal:
        return "scalar"
    if hint is TimestepSchedule:
        return "timesteps"
    if _is_schedule_hint(hint) or hint in typing.get_args(Schedule):
        return "schedule"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1 and (rest[0] in _SCALARS or typing.get_origin(rest[0]) is Literal):
            return "scalar"
    return None


def _default_text(value: Any) -> str:
    if isinstance(value, TimestepSchedule):
        return f"{value.kind}, t_min {format_schedule(value.t_min)}, t_max {format_schedule(value.t_max)}"
    if value is None:
        return "unset"
    if isinstance(value, typing.get_args(Schedule)):
        return format_schedule(value)
    return repr(value)


def _flag_name(name: str) -> str:
    return name.replace("_", "-")


@lru_cache(maxsize=None)
def options_type(method: str, config_cls: type) -> type:
    """The dataclass tyro turns into ``--<method>.<field>`` flags for ``config_cls``."""
    import tyro

    docs = field_docs(config_cls)
    defaults = config_cls()
    hints = typing.get_type_hints(config_cls)
    fields: list[tuple[str, Any, Any]] = []
    for f in dataclasses.fields(config_cls):
        kind = _cli_kind(hints[f.name])
        if kind is None:
            continue
        doc = docs.get(f.name, "")
        paper = _default_text(getattr(defaults, f.name))
        if kind == "scalar":
            hint = hints[f.name]
            base = hint if typing.get_origin(hint) not in (typing.Union, types.UnionType) else next(
                a for a in typing.get_args(hint) if a is not type(None)
            )
            help_text = f"{doc} (paper default: {paper})"
            fields.append((f.name, Annotated[base | None, tyro.conf.arg(help=help_text)], None))
        elif kind == "schedule":
            help_text = f"{doc} Accepts {SCHEDULE_SYNTAX}, or 'none' where allowed. (paper default: {paper})"
            fields.append((f.name, Annotated[str | None, tyro.conf.arg(help=help_text)], None))
        else:  # TimestepSchedule: its two ends as schedules, and its kind
            for end in ("t_min", "t_max"):
                help_text = (
                    f"{doc} {'Lower' if end == 't_min' else 'Upper'} end of the timestep range as a fraction "
                    f"of the training steps; {SCHEDULE_SYNTAX}. (paper default: {paper})"
                )
                fields.append((f"{f.name}_{end}", Annotated[str | None, tyro.conf.arg(help=help_text)], None))
            fields.append(
                (
                    f"{f.name}_kind",
                    Annotated[
                        Literal["uniform", "anneal"] | None,
                        tyro.conf.arg(help=f"Timestep sampling: uniform in the range, or DreamGaussian's anneal. (paper default: {paper})"),
                    ],
                    None,
                )
            )
    made = dataclasses.make_dataclass(
        f"{method.upper()}Options", [(name, hint, dataclasses.field(default=default)) for name, hint, default in fields]
    )
    made.__doc__ = (config_cls.__doc__ or f"Options of {method}.").strip()
    return made


def apply_options(cfg: Any, options: Any) -> Any:
    """``cfg`` with every option the user set (not None) applied. ValueError for bad schedules."""
    if options is None:
        return cfg
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    timesteps: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if value is None:
            continue
        match = re.fullmatch(r"(.+)_(t_min|t_max|kind)", f.name)
        if match and hints.get(match.group(1)) is TimestepSchedule:
            part = match.group(2)
            timesteps.setdefault(match.group(1), {})[part] = value if part == "kind" else parse_schedule(value)
            continue
        kind = _cli_kind(hints[f.name])
        if kind == "schedule":
            if value.strip().lower() == "none":
                if type(None) not in typing.get_args(hints[f.name]):
                    raise ValueError(f"--{_flag_name(f.name)} cannot be 'none'")
                changes[f.name] = None
            else:
                changes[f.name] = parse_schedule(value)
        else:
            changes[f.name] = value
    for name, parts in timesteps.items():
        changes[name] = dataclasses.replace(getattr(cfg, name), **parts)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _option_base_type(hint: Any) -> Any:
    """The non-None member of an options field's ``Annotated[X | None, ...]`` hint."""
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    return next(a for a in typing.get_args(hint) if a is not type(None))


def _convert_option(name: str, base: Any, text: str) -> Any:
    if typing.get_origin(base) is Literal:
        choices = [str(c) for c in typing.get_args(base)]
        if text not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
        return text
    if base is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {text!r}")
    if base in (int, float):
        try:
            return base(text)
        except ValueError:
            raise ValueError(f"{name} must be {'an integer' if base is int else 'a number'}, got {text!r}") from None
    return text  # str, and schedules (read by apply_options)


def options_from_text(method: str, config_cls: type, text: str) -> Any:
    """The method's options (``options_type``) from ``"name=value"`` pairs separated by spaces,
    commas or new lines (names with ``_`` or ``-``, as in ``--<method>.<name>``): the web UI's
    way to set what the CLI sets with flags. ValueError naming the known options otherwise."""
    options_cls = options_type(method, config_cls)
    hints = typing.get_type_hints(options_cls, include_extras=True)
    values: dict[str, Any] = {}
    for token in re.split(r"[\s,]+", (text or "").strip()):
        if not token:
            continue
        name, sep, value = token.partition("=")
        key = name.strip().lstrip("-").replace("-", "_")
        if key.startswith(f"{method}."):
            key = key[len(method) + 1:]
        if not sep or not value.strip():
            raise ValueError(f"write {method} options as name=value, got {token!r}")
        if key not in hints:
            known = ", ".join(_flag_name(n) for n in hints) or "none"
            raise ValueError(f"{method} has no option {name!r}; its options: {known}")
        values[key] = _convert_option(_flag_name(key), _option_base_type(hints[key]), value.strip())
    return options_cls(**values)


def options_help(method: str, config_cls: type) -> str:
    """Markdown list of the method's options with their help texts (the CLI's ``--help``)."""
    options_cls = options_type(method, config_cls)
    lines = []
    for f in dataclasses.fields(options_cls):
        hint = typing.get_type_hints(options_cls, include_extras=True)[f.name]
        meta = typing.get_args(hint)[1:] if typing.get_origin(hint) is Annotated else ()
        help_text = next((getattr(m, "help", None) for m in meta if getattr(m, "help", None)), "")
        lines.append(f"- `{_flag_name(f.name)}`: {help_text}")
    return "\n".join(lines) or "(no options)"
