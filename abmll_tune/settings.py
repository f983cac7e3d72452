"""Typed settings: one dataclass per config section is the single source of truth.

A settings class is a dataclass whose fields are declared with :func:`setting`
(default, allowed values, minimum, one line of documentation). From it come

* validation of a config section (:func:`check_settings`): unknown keys (with a
  "did you mean"), wrong types, values out of range, all problems at once, each
  naming its key;
* the defaults a recipe fills in (the dataclass's own);
* the docs' settings tables (:func:`settings_table`; ``python -m
  abmll_tune.settings_tables`` rewrites them between their markers and a test
  fails when they drift).

The recipes' top-level keys (:class:`abmll_tune.recipe_config.RecipeSettings`), every
method's settings (:mod:`abmll_tune.methods`) and the evaluation section
(:class:`abmll_tune.evaluation.EvalSettings`) are such classes.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

_MISSING = dataclasses.MISSING


def setting(
    default: Any = _MISSING,
    *,
    doc: str,
    choices: tuple | None = None,
    minimum: float | None = None,
) -> Any:
    """A dataclass field with its documentation and constraints (no default: required)."""
    metadata = {"doc": doc, "choices": choices, "minimum": minimum}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple (immutable) as a setting's default")
    return dataclasses.field(default=default, metadata=metadata)


def _hint_matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_hint_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_hint_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:  # YAML writes 1.0 as 1; true is not a number
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, Mapping)
    return isinstance(value, hint)


def _hint_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_hint_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_hint_name(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """Lists become tuples (frozen settings), ints become floats where a float is wanted."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for h in typing.get_args(hint):
            if _hint_matches(value, h):
                return _coerce(value, h)
    if origin is tuple:
        return tuple(value)
    if hint is float and isinstance(value, int):
        return float(value)
    return value


def _nested_class(hint: Any):
    for h in typing.get_args(hint) or (hint,):
        if dataclasses.is_dataclass(h):
            return h
    return None


def check_settings(
    cls: type, values: Mapping[str, Any], section: str = "", *, ignore: tuple[str, ...] = ()
) -> tuple[Any, list[str]]:
    """Validate ``values`` against settings class ``cls``; returns ``(instance, problems)``.

    ``instance`` is None when there are problems. ``section`` prefixes every key in the
    messages (``method.beta``); keys in ``ignore`` are not settings of ``cls`` but are
    allowed (a component's ``_component_``). Nested settings classes are checked too.
    """
    prefix = f"{section}." if section else ""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems: list[str] = []
    for key in values:
        if key not in fields and key not in ignore:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"{prefix}{key}: unknown key{hint}; {cls.__name__}'s settings are "
                f"{', '.join(fields)} (tables in docs/training.md and docs/evaluation.md)"
            )
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in values:
            if field.default is _MISSING and field.default_factory is _MISSING:
                problems.append(f"{prefix}{name}: missing required key ({field.metadata['doc']})")
            continue
        value, hint = values[name], hints[name]
        if not _hint_matches(value, hint):
            problems.append(
                f"{prefix}{name}: expected {_hint_name(hint)}, got {type(value).__name__} {value!r}"
            )
            continue
        nested = _nested_class(hint)
        if nested is not None and value is not None:
            value, nested_problems = check_settings(nested, value, f"{prefix}{name}")
            problems += nested_problems
            kwargs[name] = value
            continue
        choices, minimum = field.metadata.get("choices"), field.metadata.get("minimum")
        if choices is not None and value is not None and value not in choices:
            problems.append(f"{prefix}{name}: {value!r} is not one of {list(choices)}")
            continue
        if minimum is not None and isinstance(value, (int, float)) and value < minimum:
            problems.append(f"{prefix}{name}: must be >= {minimum}, got {value}")
            continue
        kwargs[name] = _coerce(value, hint)
    if problems:
        return None, problems
    try:
        return cls(**kwargs), []
    except (ValueError, TypeError) as err:  # the class's own cross-field checks
        return None, [f"{section or cls.__name__}: {err}"]


def _default_text(field: dataclasses.Field) -> str:
    if field.default is _MISSING:
        return "required"
    value = field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def settings_table(cls: type) -> str:
    """The Markdown table of ``cls``'s settings (key, default, documentation)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        if not field.init or "doc" not in field.metadata:
            continue
        doc = field.metadata["doc"]
        if field.metadata.get("choices"):
            doc += "; one of " + ", ".join(f"`{c}`" for c in field.metadata["choices"])
        rows.append(f"| `{field.name}` | {_default_text(field)} | {doc} |")
    return "\n".join(rows)
