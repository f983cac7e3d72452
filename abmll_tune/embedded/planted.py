"""A planted hierarchical task family: tasks whose Bayes-optimal predictions are known.

ABMLL's model of a task family is hierarchical: a global Gaussian over the adapter
weights, and each task's weights one draw from it. This module builds a family in which
that model is exactly right, from the frozen tiny backbone of the embedded suite:

* the backbone's final norm scaled by ``logit_scale`` (4: the pre-trained tiny model's
  answer-letter logits are too flat for a confident teacher, and the RMS norm caps what
  adapters can add); this sharpened backbone is written with the family (``backbone/``)
  and is the frozen model every method starts from;
* a true global adapter theta*: on every adapted projection (q, v, output, as the CPU
  configs adapt) a rank-r update Delta W* = lambda * s * B* A*, with A*, B* standard
  normal scaled by 1/sqrt(fan-in) and lambda fixed per family (``mean_scale``);
* per task i a true task adapter phi_i = Delta W* + sigma* o E_i, E_i ~ N(0, I) entrywise
  (dense, as ABMLL's weight-space Gaussian is), sigma* = ``spread`` x the RMS entry of
  that layer's Delta W* (the absolute sigma* of each layer is written to ``planted.json``);
* each task's questions are drawn from one pool of the embedded suite's (inputs,
  options), the same option words for every task (``shared_questions``, default), so
  that nothing but phi_i tells tasks apart: a model cannot learn a task's identity from
  its questions and fit it without a prior (with ``shared_questions: false`` each task
  has its own inputs and option words, as format 2 had); each label is *sampled* from
  the teacher, the backbone with W0 + phi_i, restricted to the question's options (the
  project's own prompt and answer-letter scoring).

So the teacher's probabilities are the Bayes-optimal predictions (an oracle: the best
accuracy possible, and perfectly calibrated), and ``prior_predictive`` (the teacher
averaged over fresh draws of E, knowing theta* and sigma* but not phi_i) is what the
hierarchical model predicts before seeing a task's examples (a Monte Carlo average over
``PRIOR_SAMPLES`` draws, kept in ``prior_draws.npz`` for its standard error). Written in
MetaICL's layout with the k = 1, 5 and 16 support files of every MetaICL seed and a ``splits.yaml``, so
``python -m abmll_tune.data build --split planted --splits-file DIR/splits.yaml --source
DIR --k 16 --out BUILT`` builds it and the recipes and evaluation run on it unchanged.

    python -m abmll_tune.embedded.planted --backbone outputs/tiny_backbone \\
        --tokenizer-dir outputs/data/embedded_src/tokenizer --spread 1.0 --out DIR

(then train with ``checkpointer.checkpoint_dir=DIR/backbone``.)

Everything is deterministic from ``--seed`` (and the backbone's weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from abmll_tune.data.loader import collate_mc
from abmll_tune.data.prompt import PromptTokenizer
from abmll_tune.data.records import MCExample, write_jsonl_examples
from abmll_tune.data.sources import METAICL_SEEDS, kshot_indices, metaicl_file
from abmll_tune.io import atomic_directory

FORMAT = "abmll-tune-planted"
FORMAT_VERSION = 3  # 2: K = 1 support files, prior_draws.npz; 3: shared_questions
TARGETS = ("q_proj", "v_proj", "output_proj")
RANK, ALPHA = 8, 16
SUPPORT_KS = (1, 5, 16)
PRIOR_SAMPLES = 64  # draws of E per evaluation task for the prior predictive
N_TRAIN, N_VAL, N_TEST = 40, 12, 24
EXAMPLES_PER_TASK = 200
EVAL_POOL = 32  # of an evaluation task's examples: the support pool; the rest held out
TRAIN_K, TRAIN_SEED = 16384, 100
PROMPT_LEN = 96  # longest prompt + answer (the embedded questions need about 40 tokens)
DEFAULT_MEAN_SCALE = 1.0
DEFAULT_LOGIT_SCALE = 4.0


@dataclasses.dataclass(frozen=True)
class PlantedFamily:
    """The numbers that define a family (with the backbone's weights)."""

    spread: float
    seed: int = 0
    mean_scale: float = DEFAULT_MEAN_SCALE
    logit_scale: float = DEFAULT_LOGIT_SCALE
    n_train: int = N_TRAIN
    n_val: int = N_VAL
    n_test: int = N_TEST
    examples_per_task: int = EXAMPLES_PER_TASK
    shared_questions: bool = True

    def task_names(self) -> dict[str, list[str]]:
        return {
            "train": [f"planted-train-{i:02d}" for i in range(self.n_train)],
            "validation": [f"planted-val-{i:02d}" for i in range(self.n_val)],
            "test": [f"planted-test-{i:02d}" for i in range(self.n_test)],
        }


def _generator(*parts) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:7], "big")
    return torch.Generator().manual_seed(seed)


def adapted_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The frozen projections the family plants adapters on, by state-dict prefix."""
    out = {}
    for i, layer in enumerate(model.layers):
        for name in TARGETS:
            out[f"layers.{i}.attn.{name}"] = getattr(layer.attn, name)
    return out


def true_global_adapter(
    model: nn.Module, family: PlantedFamily
) -> dict[str, tuple[Tensor, Tensor]]:
    """theta*: per adapted projection the LoRA pair (A*, B*) with Delta W* = s B* A*
    (lambda folded into B*)."""
    scale = ALPHA / RANK
    pairs = {}
    for prefix, linear in adapted_linears(model).items():
        gen = _generator("theta", family.seed, prefix)
        d_out, d_in = linear.weight.shape
        a = torch.randn(RANK, d_in, generator=gen) / math.sqrt(d_in)
        b = torch.randn(d_out, RANK, generator=gen) / math.sqrt(RANK)
        pairs[prefix] = (a, b * (family.mean_scale / scale))  # s * B A = lambda * B0 A0
    return pairs


def mean_delta(pair: tuple[Tensor, Tensor]) -> Tensor:
    a, b = pair
    return (ALPHA / RANK) * b @ a


def true_sigma(theta: dict[str, tuple[Tensor, Tensor]], spread: float) -> dict[str, float]:
    """sigma* per layer: ``spread`` x the RMS entry of that layer's Delta W*."""
    return {
        prefix: spread * float(mean_delta(pair).pow(2).mean().sqrt())
        for prefix, pair in theta.items()
    }


def task_delta(
    theta: dict[str, tuple[Tensor, Tensor]], sigma: dict[str, float], family: PlantedFamily, task
) -> dict[str, Tensor]:
    """phi_i: Delta W* + sigma* o E_i, E_i drawn from the task's own seed."""
    out = {}
    for prefix, pair in theta.items():
        mean = mean_delta(pair)
        noise = torch.randn(mean.shape, generator=_generator("phi", family.seed, task, prefix))
        out[prefix] = mean + sigma[prefix] * noise
    return out


class Teacher:
    """The backbone with dense deltas added to its adapted projections."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.linears = adapted_linears(model)
        self.base = {p: lin.weight.detach().clone() for p, lin in self.linears.items()}

    @torch.no_grad()
    def set_delta(self, delta: dict[str, Tensor] | None) -> None:
        for prefix, linear in self.linears.items():
            weight = self.base[prefix] if delta is None else self.base[prefix] + delta[prefix]
            linear.weight.copy_(weight)

    @torch.no_grad()
    def probabilities(self, tokenized, batch_size: int = 64) -> np.ndarray:
        """(n, max_options) option probabilities (NaN past a question's options)."""
        from abmll_tune.evaluation import option_probabilities

        rows = []
        for start in range(0, len(tokenized), batch_size):
            batch = collate_mc(tokenized[start : start + batch_size])
            probs = option_probabilities(self.model, batch)
            rows.append(
                np.pad(
                    probs.double().numpy(),
                    ((0, 0), (0, 4 - probs.shape[1])),
                    constant_values=np.nan,
                )
            )
        return np.concatenate(rows)


def load_backbone(backbone_dir: str | Path) -> tuple[nn.Module, dict]:
    """The embedded suite's tiny Llama3 from its HF checkpoint directory, read by
    torchtune's ``FullModelHFCheckpointer`` (frozen, float32); returns (model, arch)."""
    import tempfile

    from torchtune.models.llama3 import llama3
    from torchtune.training import MODEL_KEY, FullModelHFCheckpointer

    from abmll_tune.embedded.backbone import TINY_EMBEDDED

    directory = Path(backbone_dir)
    if not (directory / "model.safetensors").is_file() or not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory}: no model.safetensors/config.json; create the backbone with "
            "`make backbone` (or python -m abmll_tune.embedded.backbone)"
        )
    with tempfile.TemporaryDirectory() as scratch:  # the checkpointer wants an output dir
        checkpointer = FullModelHFCheckpointer(
            str(directory), ["model.safetensors"], model_type="LLAMA3", output_dir=scratch
        )
        state = checkpointer.load_checkpoint()[MODEL_KEY]
    hf = checkpointer._config  # config.json, as torchtune read it
    arch = dict(
        TINY_EMBEDDED,
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        embed_dim=hf["hidden_size"],
        intermediate_dim=hf["intermediate_size"],
    )
    model = llama3(**arch)
    model.load_state_dict(state)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), arch


def write_backbone(model: nn.Module, arch: dict, directory: Path) -> None:
    """The family's frozen backbone as an HF checkpoint (what the recipes load)."""
    from abmll_tune.models.hf_checkpoint import write_hf_checkpoint

    write_hf_checkpoint(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        directory,
        model_type="LLAMA3",
        **arch,
    )


SHARED_POOL_FACTOR = 4  # the shared pool holds this many tasks' worth of questions


def _questions(family: PlantedFamily, name: str) -> list[MCExample]:
    from abmll_tune.embedded.suite import make_lexicon, make_task

    # the embedded suite's inputs and options (its labels are replaced by the teacher's)
    if not family.shared_questions:
        return make_task(f"{family.seed}:{name}", make_lexicon(0), family.examples_per_task)
    n = family.examples_per_task
    pool = make_task(f"{family.seed}:shared", make_lexicon(0), SHARED_POOL_FACTOR * n)
    order = np.random.default_rng(
        int.from_bytes(
            hashlib.sha256(f"questions:{family.seed}:{name}".encode()).digest()[:7], "big"
        )
    ).permutation(len(pool))
    return [pool[i] for i in order[:n]]


def _sample_labels(probs: np.ndarray, rng: np.random.Generator) -> list[int]:
    labels = []
    for row in probs:
        p = row[~np.isnan(row)]
        labels.append(int(rng.choice(len(p), p=p / p.sum())))
    return labels


def generate_family(
    family: PlantedFamily,
    backbone_dir: str | Path,
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    prior_samples: int = PRIOR_SAMPLES,
    progress: bool = False,
) -> dict:
    """Write the family (see the module docstring); returns its summary."""
    from safetensors.torch import save_file

    from abmll_tune.embedded.suite import llama3_tokenizer

    if not family.spread >= 0:
        raise ValueError(f"spread must be >= 0, got {family.spread}")
    backbone, arch = load_backbone(backbone_dir)
    with torch.no_grad():
        backbone.norm.scale.mul_(family.logit_scale)
    teacher = Teacher(backbone)
    prompt = PromptTokenizer(llama3_tokenizer(tokenizer_dir), max_seq_len=PROMPT_LEN)
    theta = true_global_adapter(teacher.model, family)
    sigma = true_sigma(theta, family.spread)
    names = family.task_names()
    eval_names = names["validation"] + names["test"]
    tasks: dict[str, list[MCExample]] = {}
    oracle: list[dict] = []
    prior_draws: list[np.ndarray] = []  # per evaluation task, (n, 4, prior_samples)
    prior_ids: list[str] = []
    iterator = [n for part in names.values() for n in part]
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"planted family (spread {family.spread})")
    summary = {"oracle_accuracy": [], "global_teacher_agreement": [], "backbone_agreement": []}
    for name in iterator:
        questions = [
            dataclasses.replace(q, task=name, id=f"{name}:{i}")
            for i, q in enumerate(_questions(family, name))
        ]
        tokenized = [prompt(q) for q in questions]
        if any(t is None for t in tokenized):
            raise RuntimeError(f"a question of {name} is longer than {PROMPT_LEN} tokens")
        teacher.set_delta(task_delta(theta, sigma, family, name))
        probs = teacher.probabilities(tokenized)
        rng = np.random.default_rng(
            int.from_bytes(
                hashlib.sha256(f"labels:{family.seed}:{name}".encode()).digest()[:7], "big"
            )
        )
        labels = _sample_labels(probs, rng)
        tasks[name] = [
            dataclasses.replace(q, output=q.options[y])
            for q, y in zip(questions, labels, strict=True)
        ]
        if name in eval_names:
            best = np.nanargmax(probs, axis=1)
            summary["oracle_accuracy"].append(float(np.mean(best == np.array(labels))))
            references = {}
            teacher.set_delta({p: mean_delta(pair) for p, pair in theta.items()})
            references["global_teacher"] = teacher.probabilities(tokenized)
            teacher.set_delta(None)
            references["backbone"] = teacher.probabilities(tokenized)
            draws = []
            for j in range(prior_samples):  # fresh tasks' adapters: the prior predictive
                teacher.set_delta(task_delta(theta, sigma, family, f"{name}#prior{j}"))
                draws.append(teacher.probabilities(tokenized))
            draws = np.stack(draws, axis=-1)  # (n, 4, draws)
            references["prior_predictive"] = draws.mean(axis=-1)
            prior_draws.append(draws.astype(np.float32))
            prior_ids.extend(q.id for q in tasks[name])
            summary["global_teacher_agreement"].append(
                float(np.mean(np.nanargmax(references["global_teacher"], 1) == best))
            )
            summary["backbone_agreement"].append(
                float(np.mean(np.nanargmax(references["backbone"], 1) == best))
            )
            for i, q in enumerate(tasks[name]):
                n = len(q.options)
                oracle.append(
                    {
                        "task": name,
                        "id": q.id,
                        "gold": labels[i],
                        "oracle": probs[i, :n].tolist(),
                        **{k: v[i, :n].tolist() for k, v in references.items()},
                    }
                )
    teacher.set_delta(None)
    stats = {k: float(np.mean(v)) for k, v in summary.items()}
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "family": dataclasses.asdict(family),
        "targets": list(TARGETS),
        "rank": RANK,
        "alpha": ALPHA,
        "sigma_star": sigma,
        "mean_delta_rms": {
            p: float(mean_delta(pair).pow(2).mean().sqrt()) for p, pair in theta.items()
        },
        "support_ks": list(SUPPORT_KS),
        "prior_samples": prior_samples,
        "backbone": "backbone/ (the source backbone with its final norm scaled by logit_scale)",
        "evaluation_tasks": stats,
    }

    def write(tmp: Path) -> None:
        teacher.set_delta(None)
        write_backbone(teacher.model, arch, tmp / "backbone")
        for name in names["train"]:
            write_jsonl_examples(
                tmp / metaicl_file(name, TRAIN_K, TRAIN_SEED, "train"), tasks[name]
            )
        for name in eval_names:
            pool, heldout = tasks[name][:EVAL_POOL], tasks[name][EVAL_POOL:]
            for seed in METAICL_SEEDS:
                for k in SUPPORT_KS:
                    order = kshot_indices(len(pool), 2 * k, seed)
                    write_jsonl_examples(
                        tmp / metaicl_file(name, k, seed, "train"), [pool[i] for i in order[:k]]
                    )
                    write_jsonl_examples(
                        tmp / metaicl_file(name, k, seed, "dev"),
                        [pool[i] for i in order[k : 2 * k]],
                    )
                    write_jsonl_examples(tmp / metaicl_file(name, k, seed, "test"), heldout)
        (tmp / "splits.yaml").write_text(splits_yaml(family), encoding="utf-8")
        np.savez_compressed(
            tmp / "prior_draws.npz",
            ids=np.array(prior_ids),
            probs=np.concatenate(prior_draws) if prior_draws else np.zeros((0, 4, 0)),
        )
        (tmp / "oracle.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in oracle), encoding="utf-8"
        )
        flat = {}
        for prefix, (a, b) in theta.items():
            flat[f"{prefix}.lora_a"], flat[f"{prefix}.lora_b"] = a.contiguous(), b.contiguous()
        save_file(flat, str(tmp / "theta_star.safetensors"), metadata={"format": FORMAT})
        (tmp / "planted.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    with atomic_directory(out) as tmp:
        write(tmp)
    return meta


def splits_yaml(family: PlantedFamily) -> str:
    names = family.task_names()
    lines = [
        "# The planted family's tasks and split (written by abmll_tune.embedded.planted).",
        "tasks:",
    ]
    for part in names.values():
        for name in part:
            lines.append(
                f"  {name}: {{kind: cls, source: planted, license: CC0-1.0 (generated by abmll-tune)}}"
            )
    lines += ["splits:", "  planted:"]
    for part, key in (("train", "train"), ("validation", "validation"), ("test", "test")):
        lines.append(f"    {key}: [{', '.join(names[part])}]")
    return "\n".join(lines) + "\n"


def planted_scores(
    probs: np.ndarray, gold: np.ndarray, oracle: np.ndarray, prior: np.ndarray
) -> dict:
    """Metrics against the sampled labels; exactly, without label noise: the excess NLL
    E_x KL(oracle || method) and the function-space distance to the truth before
    adaptation, E_x KL(prior predictive || method)."""
    from abmll_tune.metrics import all_metrics, mean_categorical_kl

    m = all_metrics(probs, gold)
    m["excess_nll"] = mean_categorical_kl(oracle, probs)
    m["kl_from_prior"] = mean_categorical_kl(prior, probs)
    return m


def read_oracle(directory: str | Path) -> dict[str, dict]:
    """The family's ``oracle.jsonl`` by example id."""
    rows = (json.loads(line) for line in Path(directory, "oracle.jsonl").read_text().splitlines())
    return {row["id"]: row for row in rows}


def read_prior_draws(directory: str | Path, ids: Sequence[str]) -> np.ndarray:
    """The prior predictive's Monte Carlo draws for ``ids``: (len(ids), 4, draws), NaN past
    a question's options (each draw: the teacher with a fresh task adapter phi ~ N(theta*,
    sigma*^2))."""
    with np.load(Path(directory) / "prior_draws.npz") as f:
        index = {str(i): n for n, i in enumerate(f["ids"])}
        probs = f["probs"]
    missing = [i for i in ids if i not in index]
    if missing:
        raise KeyError(f"{directory}: no prior draws for {len(missing)} ids, e.g. {missing[0]}")
    return probs[[index[i] for i in ids]].astype(np.float64)


def support_examples(directory: str | Path, task: str, k: int, seed: int) -> list[dict]:
    """The K-shot support set a family wrote for an evaluation task and MetaICL seed: its
    JSON records (``id``, ``options``, ``output``...), in the file's order."""
    path = Path(directory) / metaicl_file(task, k, seed, "train")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def posterior_predictive(
    draws: np.ndarray, support_draws: np.ndarray, support_gold: Sequence[int]
) -> tuple[np.ndarray, float]:
    """The Bayes posterior predictive after a task's support examples, from the family's
    stored prior draws: each draw j of the task's adapter phi_j ~ N(theta*, sigma*^2) is
    weighed by its likelihood of the support answers, w_j ∝ prod_s p_j(y_s) (importance
    sampling with the prior as proposal), and the held-out predictions are sum_j w_j p_j.

    ``draws``: (n, options, J) held-out probabilities per draw; ``support_draws``: (K,
    options, J), the support questions' under the same draws; ``support_gold``: their
    answers. Returns the (n, options) predictive and the weights' effective sample size
    1 / sum w_j^2 (near 1: the J draws are too few for K examples' information). With no
    support examples this is the prior predictive.
    """
    log_w = np.zeros(draws.shape[-1])
    for row, gold in zip(support_draws, support_gold, strict=True):
        log_w += np.log(np.maximum(row[gold], 1e-300))
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    return np.einsum("noj,j->no", draws, w), float(1.0 / np.square(w).sum())


def jackknife(draws: np.ndarray, statistic) -> tuple[float, float]:
    """``statistic`` of the draws' mean over the last axis, and its Monte Carlo standard
    error by the delete-one jackknife over draws (Efron & Stein): how much the figure
    would move with another set of draws."""
    n = draws.shape[-1]
    full = float(statistic(draws.mean(axis=-1)))
    if n < 2:
        return full, float("nan")
    total = draws.sum(axis=-1)
    loo = np.array([statistic((total - draws[..., j]) / (n - 1)) for j in range(n)])
    return full, float(np.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2)))


def std_floors(directory: str | Path, model_config: dict) -> dict[str, float]:
    """c per adapted layer for a model config on the family's backbone: the config's
    ``sigma_floor_w0_fraction`` x RMS(W0) (population std), or its ``sigma_floor``."""
    from abmll_tune.modules.variational_lora import DEFAULT_SIGMA_FLOOR

    fraction = model_config.get("sigma_floor_w0_fraction")
    backbone = load_backbone(Path(directory) / "backbone")[0] if fraction is not None else None
    out = {}
    for prefix in read_family(directory)["sigma_star"]:
        if fraction is None:
            out[prefix] = float(model_config.get("sigma_floor", DEFAULT_SIGMA_FLOOR))
        else:
            w0 = adapted_linears(backbone)[prefix].weight.detach().double()
            out[prefix] = fraction * float(w0.var(unbiased=False).sqrt())
    return out


def truth_adapters(
    directory: str | Path, adapters: dict[str, Tensor], model_config: dict
) -> dict[str, Tensor]:
    """ABMLL adapters that *know* the family: ``adapters`` (an ABMLL checkpoint's
    ``adapters.safetensors``, rank and alpha as the family's) with the global and local
    means set to theta* and the stds to sigma* (one constant per layer), so that sampling
    the global Gaussian is drawing a fresh task of the family. The sanity check of the
    planted benchmark: this model before adaptation is the prior predictive.

    The std pairs hold sigma = f(s B A; c) = sigma*: a rank-1 product s B A = f^-1(sigma*)
    everywhere, for ``std_param`` exp (log(sigma*/c)) or softabs (sqrt(sigma*^2 - c^2)),
    with c the config's floor (``sigma_floor_w0_fraction`` x RMS(W0) of the family's
    backbone, or ``sigma_floor``)."""
    from safetensors.torch import load_file

    meta = read_family(directory)
    if model_config["lora_rank"] != meta["rank"] or model_config["lora_alpha"] != meta["alpha"]:
        raise ValueError(
            f"rank/alpha {model_config['lora_rank']}/{model_config['lora_alpha']} in the "
            f"checkpoint, {meta['rank']}/{meta['alpha']} in the family"
        )
    theta = load_file(str(Path(directory) / "theta_star.safetensors"))
    floors = std_floors(directory, model_config)
    scale = meta["alpha"] / meta["rank"]
    out = dict(adapters)
    for prefix, sigma_star in meta["sigma_star"].items():
        floor = floors[prefix]
        form = model_config.get("std_param", "softabs")
        if form == "exp":
            level = math.log(sigma_star / floor)
        elif form == "softabs" and sigma_star > floor:
            level = math.sqrt(sigma_star**2 - floor**2)
        else:
            raise ValueError(
                f"{prefix}: cannot set sigma = {sigma_star:.3g} with {form}, c = {floor:.3g}"
            )
        for scope in ("global", "local"):
            a = out[f"{prefix}.lora_{scope}_mean_a.weight"]
            out[f"{prefix}.lora_{scope}_mean_a.weight"] = (
                theta[f"{prefix}.lora_a"].to(a.dtype).clone()
            )
            out[f"{prefix}.lora_{scope}_mean_b.weight"] = (
                theta[f"{prefix}.lora_b"].to(a.dtype).clone()
            )
            std_a = torch.zeros_like(out[f"{prefix}.lora_{scope}_std_a.weight"])
            std_b = torch.zeros_like(out[f"{prefix}.lora_{scope}_std_b.weight"])
            std_a[0] = 1.0
            std_b[:, 0] = level / scale
            out[f"{prefix}.lora_{scope}_std_a.weight"] = std_a
            out[f"{prefix}.lora_{scope}_std_b.weight"] = std_b
    return out


def read_family(directory: str | Path) -> dict:
    """``planted.json``, checked for its format and version."""
    path = Path(directory) / "planted.json"
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a planted family of format {FORMAT} v{FORMAT_VERSION}")
    return meta


def results_tables(summary: dict) -> str:
    """The tables of the planted benchmark (docs/benchmarks.md), from its committed summary
    (``docs/results/planted.json``, written by ``bench/bench_planted.py --results``)."""

    def pm(pair) -> str:
        if pair is None:
            return "n/a"
        mean, se = pair
        return f"{mean:+.3f} ± {se:.3f}" if se is not None else f"{mean:+.3f}"

    def num(pair) -> str:
        return (
            "n/a"
            if pair is None
            else f"{pair[0]:.3f}" + (f" ± {pair[1]:.3f}" if pair[1] is not None else "")
        )

    spreads = summary["spreads"]
    lines = [
        f"Measured {summary['date']} at commit {str(summary['commit'])[:10]}, "
        f"{summary['seeds']} paired seeds ({summary['machine']}): `{summary['command']}`.",
        "",
        "| spread | RMS σ_θ/σ*, paper's reading (`reptile`) | RMS σ_θ/σ*, `marginal_likelihood` "
        "| KL(pp ‖ ·) before adaptation: truth / Pretrained / Reptile / ABMLL / ABMLL-EB "
        "| MC noise floor |",
        "|---|---|---|---|---|",
    ]
    for spread, entry in spreads.items():
        ratio, kl = entry["sigma_ratio"], entry["kl_pp_k0"]
        names = ("truth", "pretrained", "reptile", "abmll", "abmll_eb")
        floor = entry.get("kl_pp_k0_noise_floor")
        lines.append(
            f"| {spread} | {ratio.get('reptile', float('nan')):.3g} "
            f"| {ratio.get('marginal_likelihood', float('nan')):.3g} | "
            + " / ".join(num(kl.get(n)) for n in names)
            + f" | {'n/a' if floor is None else f'{floor:.3f}'} |"
        )
    lines += [
        "",
        "| spread | K | ABMLL − Reptile: accuracy | NLL | ABMLL-EB − Reptile: accuracy | NLL "
        "| Bayes − truth: NLL |",
        "|---|---|---|---|---|---|---|",
    ]
    for spread, entry in spreads.items():
        for k, pairs in sorted(entry["paired"].items(), key=lambda kv: int(kv[0])):
            a = pairs.get("abmll_minus_reptile", {})
            b = pairs.get("abmll_eb_minus_reptile", {})
            c = pairs.get("bayes_minus_truth", {})
            lines.append(
                f"| {spread} | {k} | {pm(a.get('accuracy'))} | {pm(a.get('nll'))} "
                f"| {pm(b.get('accuracy'))} | {pm(b.get('nll'))} | {pm(c.get('nll'))} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", required=True, help="the tiny backbone's HF checkpoint dir")
    parser.add_argument("--tokenizer-dir", required=True, help="the embedded suite's tokenizer/")
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically)")
    parser.add_argument(
        "--spread", type=float, required=True, help="sigma* / RMS entry of Delta W*"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean-scale", type=float, default=DEFAULT_MEAN_SCALE)
    parser.add_argument("--logit-scale", type=float, default=DEFAULT_LOGIT_SCALE)
    parser.add_argument(
        "--own-questions",
        action="store_true",
        help="each task its own inputs and option words (format 2's family), not one shared pool",
    )
    args = parser.parse_args(argv)
    family = PlantedFamily(
        spread=args.spread,
        seed=args.seed,
        mean_scale=args.mean_scale,
        logit_scale=args.logit_scale,
        shared_questions=not args.own_questions,
    )
    meta = generate_family(family, args.backbone, args.tokenizer_dir, args.out, progress=True)
    print(json.dumps(meta["evaluation_tasks"]))


if __name__ == "__main__":
    main()
