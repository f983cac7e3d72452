"""The methods, one module each; every one runs through the same loop
(:class:`abmll_tune.meta.MetaLearner`). See :mod:`abmll_tune.methods.base` for the
interface and docs/extending.md "Adding a method" for a worked example.

==========================  =========================  ===================================
component                   name (``method: <name>``)  module
==========================  =========================  ===================================
``abmll_tune.methods.ABMLL``            ``abmll``            :mod:`abmll_tune.methods.abmll`
``abmll_tune.methods.Reptile``          ``reptile``          :mod:`abmll_tune.methods.reptile`
``abmll_tune.methods.StructuredLoRA``   ``structured_lora``  :mod:`abmll_tune.methods.structured_lora`
``abmll_tune.methods.RegularLoRA``      ``lora``             :mod:`abmll_tune.methods.lora`
``abmll_tune.methods.Pretrained``       ``pretrained``       :mod:`abmll_tune.methods.pretrained` (evaluation only)
==========================  =========================  ===================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from abmll_tune.methods.abmll import ABMLL
from abmll_tune.methods.base import (
    REGISTRY,
    Method,
    OuterLoop,
    TaskAdaptiveMethod,
    check_finite_grads,
)
from abmll_tune.methods.lora import RegularLoRA
from abmll_tune.methods.pretrained import Pretrained
from abmll_tune.methods.reptile import Reptile
from abmll_tune.methods.structured_lora import StructuredLoRA
from abmll_tune.settings import check_settings

# The built-in methods by name (a method defined elsewhere is found by its _component_).
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (ABMLL, Reptile, StructuredLoRA, RegularLoRA, Pretrained)
}


def method_class(value: Any) -> tuple[type[Method] | None, list[str]]:
    """The class a config's ``method`` names: a registered name or a ``_component_``."""
    if isinstance(value, str):
        if value in REGISTRY:
            return REGISTRY[value], []
        return None, [
            f"method: {value!r} is not a method; use one of {sorted(REGISTRY)} or a section "
            "with a _component_ (e.g. abmll_tune.methods.ABMLL)"
        ]
    if not isinstance(value, Mapping) or "_component_" not in value:
        return None, ["method: must be a method name or a mapping with a _component_ entry"]
    if value["_component_"] in REGISTRY:  # `method=reptile` on torchtune's command line
        return REGISTRY[value["_component_"]], []
    from torchtune.config._utils import _get_component_from_path

    try:
        cls = _get_component_from_path(value["_component_"])
    except Exception as err:  # noqa: BLE001 - torchtune raises InstantiationError or ImportError
        return None, [
            f"method._component_: cannot import {value['_component_']!r} ({type(err).__name__})"
        ]
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        return None, [
            f"method._component_: {value['_component_']!r} is not an abmll_tune.methods.Method"
        ]
    return cls, []


def build_method(value: Any) -> tuple[Method | None, list[str]]:
    """A method from a config's ``method`` value (a name: its defaults; a section: its
    settings, validated by :func:`abmll_tune.settings.check_settings`)."""
    cls, problems = method_class(value)
    if cls is None:
        return None, problems
    settings = {} if isinstance(value, str) else {k: v for k, v in value.items()}
    return check_settings(cls, settings, "method", ignore=("_component_",))


def method_from_saved_config(config: Mapping[str, Any]) -> Method:
    """The method of a checkpoint's saved config. Configs written before methods were
    components held the name in ``method`` and the settings at the top level."""
    value = config["method"]
    if isinstance(value, str):
        cls, problems = method_class(value)
        if cls is None:
            raise ValueError("; ".join(problems))
        from dataclasses import fields

        value = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        value["_component_"] = f"{cls.__module__}.{cls.__qualname__}"
    method, problems = build_method(value)
    if method is None:
        raise ValueError("; ".join(problems))
    return method


__all__ = [
    "ABMLL",
    "METHODS",
    "Method",
    "OuterLoop",
    "Pretrained",
    "REGISTRY",
    "RegularLoRA",
    "Reptile",
    "StructuredLoRA",
    "TaskAdaptiveMethod",
    "build_method",
    "check_finite_grads",
    "method_class",
    "method_from_saved_config",
]
