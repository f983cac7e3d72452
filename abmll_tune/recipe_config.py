"""Checks of a meta-training or evaluation config before anything is built or trained.

torchtune configs are free-form; a typo silently becomes an ignored key. The settings
classes here (:class:`RecipeSettings`, :class:`EvalRecipeSettings`), the method's own
(:mod:`abmll_tune.methods`) and the evaluation section's
(:class:`abmll_tune.evaluation.EvalSettings`) know every key, its type, default and
allowed values (:mod:`abmll_tune.settings`); the checks here report all problems of a
config at once, each naming the key and what to do, and the combinations that make no
sense.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torchtune.config._utils import _get_component_from_path

from abmll_tune.data.loader import check_visits_per_epoch
from abmll_tune.evaluation import EvalSettings
from abmll_tune.methods import Method, build_method, method_class
from abmll_tune.settings import check_settings, setting


class RecipeConfigError(ValueError):
    """One or more problems with a recipe config (each names its key)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


# torchtune recipe keys these recipes read only at one value, and why
TORCHTUNE_FIXED_VALUES = (
    ("shuffle", True, "task visits are always drawn in a seeded shuffle"),
    (
        "save_adapter_weights_only",
        True,
        "checkpoints hold the adapters and a PEFT adapter, never a merged model; merge "
        "with PEFT's merge_and_unload if you need one",
    ),
    (
        "enable_activation_offloading",
        False,
        "not supported by the meta-training recipes (enable_activation_checkpointing is)",
    ),
)

# torchtune recipe keys that do not fit meta-training, and what to use instead
TORCHTUNE_REFUSED = {
    "optimizer": "meta-learning has two optimizers: set inner_optimizer (each task's "
    "steps) and outer_optimizer (the global update); learning rates are the method's",
    "dataset": "the recipes read task-grouped data: set data (abmll_tune.data.task_data, "
    "built by python -m abmll_tune.data)",
    "optimizer_in_bwd": "not supported: every inner step needs the whole gradient (the "
    "method clips and checks it first)",
    "custom_sharded_layers": "not supported; recipes/abmll_meta_distributed shards every "
    "decoder layer (shard_base)",
}


@dataclass(frozen=True)
class RecipeSettings:
    """The plain (non-component) keys of the meta-training recipes."""

    output_dir: str = setting(doc="where checkpoints and logs go")
    epochs: int = setting(doc="epochs to train (what one is: `visits_per_epoch`)", minimum=1)
    seed: int = setting(0, doc="seeds adapters, task order and noise")
    device: str = setting("cpu", doc="`cpu`, `cuda`, `cuda:N`")
    dtype: str = setting("fp32", doc="model precision", choices=("fp32", "bf16"))
    adapter_dtype: str | None = setting(
        None,
        doc="adapter weights' storage precision; `fp32` under a bf16 model keeps small "
        "updates that bf16 rounds away (the 8B/7B configs); null: the model's dtype",
        choices=("fp32", "bf16"),
    )
    batch_size: int = setting(2, doc="questions per batch", minimum=1)
    inner_steps: int = setting(5, doc="K: inner steps (batches) per task visit", minimum=1)
    gradient_accumulation_steps: int = setting(1, doc="batches per inner step", minimum=1)
    task_sampling: str = setting(
        "uniform",
        doc="order of task visits: each task once per epoch, or in proportion to its size",
        choices=("uniform", "proportional"),
    )
    visits_per_epoch: int | str = setting(
        "tasks",
        doc="what an epoch is: `tasks` (one visit per training task), `data` (a pass over "
        "the training examples, each used once: the paper's epoch; docs/training.md) or a "
        "number of visits; Regular LoRA's epoch is always a pass over the pooled examples",
        minimum=1,
    )
    validate_every_n_visits: int | None = setting(
        None,
        doc="also validate every N visits within an epoch (a data epoch of a large split "
        "takes hours); best-checkpoint selection and early stopping count these too",
        minimum=1,
    )
    save_every_n_visits: int | None = setting(
        None, doc="periodic checkpoint to `checkpoints/latest`", minimum=1
    )
    keep_epoch_checkpoints: bool = setting(True, doc="also keep `checkpoints/epoch_N`")
    resume_from_checkpoint: bool = setting(False, doc="continue from `checkpoints/latest`")
    overwrite_output_dir: bool = setting(
        False,
        doc="replace the run already in `output_dir` (its checkpoints, logs and validation "
        "rows are removed first); without it such a directory is refused",
    )
    stop_after_visits: int | None = setting(None, doc="stop early (and checkpoint)", minimum=1)
    early_stopping_patience: int | None = setting(
        None,
        doc="stop when validation accuracy has not improved for this many validations "
        "(`checkpoints/best` keeps the best); null: run every epoch",
        minimum=1,
    )
    enable_activation_checkpointing: bool = setting(False, doc="recompute layers in backward")
    # torchtune's standard recipe keys, as meta-training reads them
    clip_grad_norm: float | None = setting(
        None,
        doc="(torchtune's) clip the total gradient norm of every inner and outer optimizer "
        "step to this, after the method's own clipping; null: off",
        minimum=0,
    )
    max_steps_per_epoch: int | None = setting(
        None,
        doc="(torchtune's) end an epoch after this many gradient steps, in whole visits "
        "(at least one); null: the whole epoch",
        minimum=1,
    )
    log_every_n_steps: int | None = setting(
        None,
        doc="(torchtune's) log every visit in which the gradient steps pass a multiple of "
        "this; null: `log_every_n_visits` decides",
        minimum=1,
    )
    shuffle: bool = setting(
        True, doc="(torchtune's) tasks and examples are always shuffled, seeded by `seed`"
    )
    save_adapter_weights_only: bool = setting(
        True, doc="(torchtune's) checkpoints hold the adapters (and a PEFT adapter) only"
    )
    enable_activation_offloading: bool = setting(
        False, doc="(torchtune's) not supported by these recipes: must be false"
    )
    compile: bool = setting(False, doc="torch.compile the model (torchtune's compile_model)")
    log_every_n_visits: int = setting(1, doc="metric logging interval", minimum=1)
    diagnostics_every_n_visits: int | None = setting(
        10,
        doc="every N visits (the first included), the method's measurements of the visit's "
        "first batch before its inner steps, logged with it (ABMLL: `kl_pull/...`, the share "
        "of the inner gradient that comes from beta KL; docs/method.md), and its summaries "
        "of the adapters (ABMLL: `sigma_theta/...`, a pass over every adapted weight); null: off",
        minimum=1,
    )
    log_peak_memory_stats: bool = setting(True, doc="log peak GPU memory (CPU: peak RSS)")
    peft_base_model: str | None = setting(
        None,
        doc="base_model_name_or_path of the exported PEFT adapter (default: the checkpoint_dir)",
    )
    validation: EvalSettings | None = setting(
        None, doc="few-shot validation after every epoch (and before the first); see below"
    )
    # recipes/abmll_meta_distributed only
    collective_timeout_s: float = setting(
        1800, doc="(distributed) a collective waiting longer than this fails the job", minimum=1
    )
    shard_base: bool = setting(
        True, doc="(distributed) FSDP2-shard the frozen base; false: every process holds all of it"
    )
    fsdp_cpu_offload: bool = setting(False, doc="(distributed) offload the sharded base to the CPU")
    fsdp_reshard_after_forward: bool = setting(True, doc="(distributed) FSDP2 reshard policy")

    def __post_init__(self):
        check_visits_per_epoch(self.visits_per_epoch)
        for key, wanted, why in TORCHTUNE_FIXED_VALUES:
            if getattr(self, key) != wanted:
                raise ValueError(f"{key}: must be {str(wanted).lower()}: {why}")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ValueError(
                "resume_from_checkpoint and overwrite_output_dir: a run either continues the "
                "one in output_dir or replaces it; set one"
            )


@dataclass(frozen=True)
class EvalRecipeSettings:
    """The plain keys of ``recipes/evaluate_few_shot``."""

    output_dir: str = setting(doc="where predictions.jsonl and results.json go")
    method: str | None = setting(
        None,
        doc="the trained method's name (checked against the checkpoint's); `pretrained` "
        "evaluates the base model",
    )
    adapter_checkpoint: str | None = setting(
        None, doc="a meta-training checkpoint directory or a PEFT adapter directory"
    )
    seed: int = setting(0, doc="global seed (each task's RNG is seeded by seed and task)")
    device: str = setting("cpu", doc="`cpu`, `cuda`, `cuda:N`")
    dtype: str = setting("fp32", doc="model precision", choices=("fp32", "bf16"))
    adapter_dtype: str | None = setting(
        None,
        doc="adapter weights' storage precision (as in training: `fp32` under a bf16 "
        "model); null: the model's dtype",
        choices=("fp32", "bf16"),
    )
    collective_timeout_s: float = setting(
        1800, doc="(torchrun) a collective waiting longer than this fails the job", minimum=1
    )
    evaluation: EvalSettings = setting(EvalSettings(), doc="how to adapt and score; see below")


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
    "lr_scheduler": False,  # torchtune's, over task visits (docs/training.md)
    "profiler": False,  # torchtune's setup_torch_profiler
}
EVAL_COMPONENTS = {"model": False, "tokenizer": True, "checkpointer": True, "data": True}
# Settings that must not change when resuming (bitwise-exact continuation); the method
# is compared by name (its learning rates and temperatures may change).
RESUME_INVARIANTS = (
    "method",
    "seed",
    "batch_size",
    "inner_steps",
    "gradient_accumulation_steps",
    "task_sampling",
    "visits_per_epoch",
    "model",
    "data",
)


# Arguments the recipes pass to a component themselves (not written in the config).
PASSED_BY_RECIPE = {
    "data": {"tokenizer"},
    "inner_optimizer": {"params"},
    "outer_optimizer": {"params"},
    "lr_scheduler": {"optimizer", "num_training_steps", "last_epoch"},
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


def _split_sections(
    cfg: DictConfig, components: dict[str, bool], exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The plain keys of ``cfg`` (not component sections, not ``exclude``) as Python values."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in plain.items() if k not in components and k not in exclude}


def _unknown_key_hints(problems: list[str], method_cls: type[Method] | None) -> list[str]:
    """Point keys that are a method's settings (the layout before methods were
    components) at the method section."""
    if method_cls is None:
        return problems
    fields = {f.name for f in dataclasses.fields(method_cls)}
    out = []
    for problem in problems:
        key = problem.split(":", 1)[0]
        if "unknown key" in problem and key in fields:
            problem = (
                f"{key}: a setting of method {method_cls.name!r}; move it into the method "
                f"section (method.{key}, e.g. `method.{key}=...` on the command line)"
            )
        out.append(problem)
    return out


def _torchtune_hints(problems: list[str]) -> list[str]:
    """Say why a torchtune key that does not fit meta-training is refused."""
    out = []
    for problem in problems:
        key = problem.split(":", 1)[0]
        if "unknown key" in problem and key in TORCHTUNE_REFUSED:
            problem = f"{key}: torchtune's key does not apply here: {TORCHTUNE_REFUSED[key]}"
        elif key == "seed" and problem.endswith("NoneType None"):
            problem = (
                "seed: null (torchtune: a random seed) is not supported: a run resumes exactly "
                "and validates reproducibly only from a fixed seed; set an integer"
            )
        out.append(problem)
    return out


def check_recipe_config(cfg: DictConfig) -> tuple[RecipeSettings, Method]:
    """Validate a meta-training config; return its settings (defaults filled in) and
    its method."""
    problems: list[str] = []
    if "method" not in cfg:
        problems.append(
            "method: missing required section (e.g. method: {_component_: abmll_tune.methods.ABMLL})"
        )
        method_cls = None
        method = None
    else:
        value = cfg.method
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        method_cls, cls_problems = method_class(value)
        method, method_problems = build_method(value) if method_cls else (None, cls_problems)
        problems += method_problems
    settings, settings_problems = check_settings(
        RecipeSettings,
        _split_sections(cfg, COMPONENTS, exclude=("method",)),
        ignore=(*COMPONENTS, "method"),
    )
    problems += _torchtune_hints(_unknown_key_hints(settings_problems, method_cls))
    problems += check_component_sections(cfg, COMPONENTS)
    if not problems:
        problems += _combination_problems(cfg, settings, method)
    if problems:
        raise RecipeConfigError(problems)
    if settings.validation is not None:  # validation scores the tasks' validation parts
        settings = dataclasses.replace(
            settings, validation=dataclasses.replace(settings.validation, part="validation")
        )
    return settings, method


def check_eval_config(cfg: DictConfig) -> EvalRecipeSettings:
    """Validate an evaluation config; return its settings."""
    settings, problems = check_settings(
        EvalRecipeSettings, _split_sections(cfg, EVAL_COMPONENTS), ignore=tuple(EVAL_COMPONENTS)
    )
    problems += check_component_sections(cfg, EVAL_COMPONENTS)
    if settings is not None:
        if settings.method is not None:
            cls, method_problems = method_class(settings.method)
            problems += method_problems
        if settings.method == "pretrained" and settings.adapter_checkpoint:
            problems.append(
                "adapter_checkpoint: method pretrained evaluates the base model; drop the checkpoint"
            )
        if settings.method != "pretrained" and not settings.adapter_checkpoint:
            problems.append(
                "adapter_checkpoint: missing; give a checkpoint directory (or method=pretrained "
                "to evaluate the base model)"
            )
    if problems:
        raise RecipeConfigError(problems)
    return settings


def _combination_problems(cfg: DictConfig, s: RecipeSettings, method: Method) -> list[str]:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    problems = method.config_problems(model, s, {k for k in COMPONENTS if k in cfg})
    return problems


def config_warnings(settings: RecipeSettings) -> list[str]:
    """Settings that run but that a user most likely does not want."""
    warnings = []
    if settings.device == "cpu" and settings.dtype == "bf16":
        warnings.append(
            "dtype: bf16 on the CPU is about 30x slower than fp32; use dtype: fp32 there"
        )
    return warnings


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
