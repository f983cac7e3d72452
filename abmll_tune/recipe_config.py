"""Checks of a meta-training config before anything is built or trained.

torchtune configs are free-form; a typo silently becomes an ignored key. This module
knows every key of the meta-training recipes, its type, default and allowed values, and
the combinations that make no sense, and reports all problems at once, each naming
the key and what to do.
"""

from __future__ import annotations

import difflib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

from abmll_tune.meta import METHODS, OUTER_GRADS, OUTER_UPDATES, MetaConfig
from abmll_tune.objectives import ELBOWeights


class RecipeConfigError(ValueError):
    """One or more problems with a recipe config (each names its key)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Key:
    types: tuple[type, ...]
    default: Any = None
    required: bool = False
    choices: tuple | None = None
    minimum: float | None = None
    nullable: bool = False
    doc: str = ""


NUM = (int, float)
# Plain (non-component) keys of the meta-training recipes.
SCHEMA: dict[str, Key] = {
    "output_dir": Key((str,), required=True, doc="where checkpoints and logs go"),
    "method": Key((str,), required=True, choices=METHODS),
    "seed": Key((int,), 0),
    "device": Key((str,), "cpu"),
    "dtype": Key((str,), "fp32", choices=("fp32", "bf16")),
    "epochs": Key((int,), required=True, minimum=1),
    "batch_size": Key((int,), 2, minimum=1),
    "inner_steps": Key((int,), 5, minimum=1, doc="K: inner steps (batches) per task"),
    "gradient_accumulation_steps": Key((int,), 1, minimum=1),
    "task_sampling": Key((str,), "uniform", choices=("uniform", "proportional")),
    "local_init": Key((str,), "global", choices=("global", "persistent")),
    "inner_optimizer_reset": Key((str,), None, choices=("per_task", "never"), nullable=True),
    "inner_lr_mean": Key(NUM, 1e-4, minimum=0),
    "inner_lr_std": Key(NUM, 1e-4, minimum=0),
    "outer_grad": Key((str,), "reptile", choices=OUTER_GRADS),
    "outer_update": Key((str,), "interpolate", choices=OUTER_UPDATES),
    "outer_step_mean": Key(NUM, 0.1, minimum=0),
    "outer_step_std": Key(NUM, 0.1, minimum=0),
    "outer_lr_mean": Key(NUM, 1e-4, minimum=0),
    "outer_lr_std": Key(NUM, 1e-4, minimum=0),
    "beta": Key(NUM, 5e-10, minimum=0),
    "gamma": Key(NUM, 1e-6, minimum=0),
    "beta_only": Key((bool,), False),
    "prior_mu_var": Key((str, int, float), "pretrained"),
    "a0": Key(NUM, 1.0, minimum=0),
    "b0": Key(NUM, 0.01, minimum=0),
    "std_grad_clamp": Key(NUM, None, minimum=0, nullable=True),
    "train_samples": Key((int,), 1, minimum=1),
    "save_every_n_visits": Key((int,), None, minimum=1, nullable=True),
    "keep_epoch_checkpoints": Key((bool,), True),
    "resume_from_checkpoint": Key((bool,), False),
    "stop_after_visits": Key(
        (int,), None, minimum=1, nullable=True, doc="stop early (and checkpoint)"
    ),
    "enable_activation_checkpointing": Key((bool,), False),
    "compile": Key((bool,), False),
    "log_every_n_visits": Key((int,), 1, minimum=1),
    "peft_base_model": Key(
        (str,),
        None,
        nullable=True,
        doc="base_model_name_or_path of the exported PEFT adapter (default: the checkpoint_dir)",
    ),
    # recipes/abmll_meta_distributed only
    "collective_timeout_s": Key(
        NUM, 1800, minimum=1, doc="a collective waiting longer than this fails the job"
    ),
    "shard_base": Key(
        (bool,), True, doc="FSDP2-shard the frozen base; false: every process holds all of it"
    ),
    "fsdp_cpu_offload": Key((bool,), False),
    "fsdp_reshard_after_forward": Key((bool,), True),
    "log_peak_memory_stats": Key((bool,), True),
    "validation": Key(
        (dict,),
        None,
        nullable=True,
        doc="few-shot validation after every epoch (and before the first)",
    ),
}
# Component sections (``_component_`` + arguments), required or not.
COMPONENTS = {
    "model": True,
    "tokenizer": True,
    "checkpointer": True,
    "data": True,
    "inner_optimizer": True,
    "outer_optimizer": False,
    "loss": False,
    "metric_logger": False,
}
# Settings that must not change when resuming (bitwise-exact continuation).
RESUME_INVARIANTS = (
    "method",
    "seed",
    "batch_size",
    "inner_steps",
    "gradient_accumulation_steps",
    "task_sampling",
    "model",
    "data",
)


# Arguments the recipes pass to a component themselves (not written in the config).
PASSED_BY_RECIPE = {
    "data": {"tokenizer"},
    "inner_optimizer": {"params"},
    "outer_optimizer": {"params"},
}
# Path arguments of the checkpointer and tokenizer that must exist before anything is built.
_FILE_ARGS = ("path", "merges_file", "special_tokens_path", "tokenizer_json_path")


def accepted_arguments(component) -> set[str] | None:
    """Keyword arguments ``component`` accepts, or None when it cannot tell (``**kwargs``).

    The project's builders declare the names their ``**kwargs`` take in
    ``accepted_kwargs`` (torchtune's architecture arguments plus the adapter options)."""
    try:
        signature = inspect.signature(component)
    except (TypeError, ValueError):
        return None
    named = {
        n
        for n, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        extra = getattr(component, "accepted_kwargs", None)
        return None if extra is None else named | set(extra)
    return named


def check_component_sections(cfg: DictConfig, components: dict[str, bool]) -> list[str]:
    """Problems of the component sections ``{name: required}``: missing, not importable,
    unknown arguments, files that do not exist (nothing is instantiated)."""
    problems = []
    for name, required in components.items():
        if name not in cfg or cfg[name] is None:
            if required:
                problems.append(f"{name}: missing required section (with a _component_)")
            continue
        section = cfg[name]
        if not isinstance(section, DictConfig) or "_component_" not in section:
            problems.append(f"{name}: must be a mapping with a _component_ entry")
            continue
        try:
            component = _get_component_from_path(section._component_)
        except Exception as err:  # noqa: BLE001 - torchtune raises InstantiationError or ImportError
            problems.append(
                f"{name}._component_: cannot import {section._component_!r} ({type(err).__name__})"
            )
            continue
        problems += component_problems(name, section, component)
    return problems


def component_problems(name: str, section: DictConfig, component) -> list[str]:
    """Arguments of a component section that its component does not take."""
    problems = []
    accepted = accepted_arguments(component)
    if accepted is None:
        return problems
    accepted -= PASSED_BY_RECIPE.get(name, set())
    for key in (k for k in section if k != "_component_"):
        if key not in accepted:
            close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"{name}.{key}: {section[key]!r} is not an argument of "
                f"{section._component_}{hint}; remove it or fix its name"
            )
    return problems


def check_input_files(cfg: DictConfig) -> None:
    """The base checkpoint and tokenizer files a config names exist (checked by the recipes
    before anything is built; a config alone may name files of another machine)."""
    problems = []
    section = cfg.get("checkpointer")
    if isinstance(section, DictConfig) and "checkpoint_dir" in section:
        directory = Path(str(section.checkpoint_dir))
        if not directory.is_dir():
            problems.append(
                f"checkpointer.checkpoint_dir: {str(directory)!r} is not a directory; point it "
                "at the base model's checkpoint (see the config's Prepare line)"
            )
        else:
            files = section.get("checkpoint_files")
            names = (
                list(files) if isinstance(files, (list, tuple)) or OmegaConf.is_list(files) else []
            )
            for file in names:
                if not (directory / str(file)).is_file():
                    problems.append(
                        f"checkpointer.checkpoint_files: {str(file)!r} is not in {directory}; "
                        "list the checkpoint's .safetensors files"
                    )
    section = cfg.get("tokenizer")
    for key in _FILE_ARGS if isinstance(section, DictConfig) else ():
        value = section.get(key)
        if isinstance(value, str) and not Path(value).exists():
            problems.append(
                f"tokenizer.{key}: {value!r} does not exist; point it at the model's "
                "tokenizer file (see the config's Prepare line)"
            )
    if problems:
        raise RecipeConfigError(problems)


def _type_ok(value, key: Key) -> bool:
    if value is None:
        return key.nullable
    if isinstance(value, bool) and bool not in key.types:
        return False  # YAML true is not a number
    return isinstance(value, key.types)


def check_recipe_config(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``; return the plain settings with defaults filled in."""
    problems: list[str] = []
    known = set(SCHEMA) | set(COMPONENTS)
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                f"{key}: unknown key{hint}; the keys are listed in abmll_tune/recipe_config.py"
            )
    problems += check_component_sections(cfg, COMPONENTS)
    settings: dict[str, Any] = {}
    plain = OmegaConf.to_container(cfg, resolve=True)
    for name, key in SCHEMA.items():
        if name not in cfg:
            if key.required:
                problems.append(f"{name}: missing required key ({key.doc or 'no default'})")
            settings[name] = key.default
            continue
        value = plain[name]
        if not _type_ok(value, key):
            want = " or ".join(t.__name__ for t in key.types) + (" or null" if key.nullable else "")
            problems.append(f"{name}: expected {want}, got {type(value).__name__} {value!r}")
            continue
        if key.choices is not None and value is not None and value not in key.choices:
            problems.append(f"{name}: {value!r} is not one of {list(key.choices)}")
            continue
        if key.minimum is not None and value is not None and value < key.minimum:
            problems.append(f"{name}: must be >= {key.minimum}, got {value}")
            continue
        settings[name] = value
    if isinstance(settings.get("prior_mu_var"), str) and settings["prior_mu_var"] not in (
        "pretrained",
        "sigma_floor",
    ):
        problems.append(
            f"prior_mu_var: {settings['prior_mu_var']!r} must be 'pretrained', 'sigma_floor' or a number"
        )
    if settings.get("validation") is not None:
        from abmll_tune.evaluation import eval_settings

        try:
            settings["validation"] = eval_settings(settings["validation"], part="validation")
        except (ValueError, TypeError) as err:
            problems.append(f"validation: {err}")
    if not problems:
        problems += _combination_problems(cfg, settings)
    if problems:
        raise RecipeConfigError(problems)
    return settings


def _combination_problems(cfg: DictConfig, s: dict) -> list[str]:
    problems = []
    method = s["method"]
    model = cfg.model
    variational = model.get("variational", True)
    sampling = model.get("sampling", "local")
    if method == "abmll" and not variational:
        problems.append("model.variational: ABMLL needs the std pairs; set model.variational: true")
    if method != "abmll":
        if variational:
            problems.append(
                f"model.variational: method {method!r} has no variance adapters; set model.variational: false"
            )
        if sampling != "mean":
            problems.append(
                f"model.sampling: {sampling!r} needs variance adapters, which method {method!r} has "
                "none of; set model.sampling: mean"
            )
    needs_outer = method == "abmll" or (method == "reptile" and s["outer_update"] == "optimizer")
    if needs_outer and "outer_optimizer" not in cfg:
        problems.append(
            f"outer_optimizer: method {method!r} with these settings needs an outer_optimizer section"
        )
    if s["device"] == "cpu" and s["dtype"] == "bf16":
        problems.append(
            "dtype: bf16 on the CPU is about 30x slower than fp32; use dtype: fp32 there"
        )
    if method == "lora" and s["inner_steps"] != 1:
        problems.append(
            "inner_steps: Regular LoRA takes one step per pooled batch; set inner_steps: 1"
        )
    return problems


def meta_config(settings: dict) -> MetaConfig:
    """The library's loop settings from validated recipe settings."""
    return MetaConfig(
        method=settings["method"],
        inner_steps=settings["inner_steps"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        local_init=settings["local_init"],
        inner_optimizer_reset=settings["inner_optimizer_reset"],
        inner_lr_mean=float(settings["inner_lr_mean"]),
        inner_lr_std=float(settings["inner_lr_std"]),
        outer_grad=settings["outer_grad"],
        outer_update=settings["outer_update"],
        outer_step_mean=float(settings["outer_step_mean"]),
        outer_step_std=float(settings["outer_step_std"]),
        outer_lr_mean=float(settings["outer_lr_mean"]),
        outer_lr_std=float(settings["outer_lr_std"]),
        std_grad_clamp=None
        if settings["std_grad_clamp"] is None
        else float(settings["std_grad_clamp"]),
        train_samples=settings["train_samples"],
        elbo=ELBOWeights(
            beta=float(settings["beta"]),
            gamma=float(settings["gamma"]),
            prior_mu_var=settings["prior_mu_var"],
            a0=float(settings["a0"]),
            b0=float(settings["b0"]),
            beta_only=settings["beta_only"],
        ),
    )


def check_output_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` can be created or written, without writing anything yet (a run
    that fails its checks leaves no trace), or say what is wrong."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RecipeConfigError([f"output_dir: {path} exists and is not a directory"])
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeConfigError(
            [
                f"output_dir: {path} is not writable ({existing} is read-only); choose another output_dir"
            ]
        )
    return path
