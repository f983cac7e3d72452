"""The project's GPU check: one command, prepared to run unchanged the first time a GPU is lent.

    bash bench/device/run_on_device.sh                 (on a lent GPU machine: installs the kit, runs this)
    python bench/device/gpu_check.py --out bench_results/gpu_check.json          (or: make gpu-check)
    python bench/device/gpu_check.py --cpu-smoke --out /tmp/gpu_check.json        (tiny, CPU; in the tests)

Four parts, within one budget (``--budget-s``, default 480 s = 8 of a lent machine's 10
minutes a command), each written to the JSON as it finishes (a part's error is recorded
and the next part runs; SIGTERM or Ctrl-C leave the finished parts), a table at the end:

0. ``environment``: Python, torch, CUDA, the GPU, and the version and folder of every
   distribution the project imports (the kit's and the image's).
1. ``paper_step``: a Llama3-8B-shaped model with random weights (built on the meta
   device, materialised on the GPU, no download), bf16, the paper config's settings
   (batch 2 x 512 tokens, activation checkpointing, rank 8 / alpha 16 on q, v and output
   projections): peak memory and step time of torchtune's own LoRA model
   (``lora_llama3``) against ABMLL's inner step, its heaviest outer step
   (``first_order``: query-NLL gradients plus beta KL and gamma prior for all four
   pairs) and a whole task visit (K = 5 inner steps and the default outer step), with
   the default KL kernel (compiled on CUDA) and the eager one. One model resident at a
   time; LoRA measured first and last (drift). The paper reports 25.6 GB vs 23.8 GB
   (+7.6%); the targets are at most +3% memory and 1.2x time. At most 45% of the budget.
2. ``recipes``: the real recipes on the device with the paper configs' training paths
   (activation checkpointing, chunked cross-entropy, and on CUDA ``compile``): a short
   meta-training of the tiny embedded config in bf16, stopped and resumed, then few-shot
   evaluation of its checkpoint: finite losses, a checkpoint written, resume continuing it.
3. ``methods``: ABMLL, Reptile and Regular LoRA meta-trained on the tiny embedded suite
   (fp32, as the CPU demo) and evaluated few-shot on its test tasks with 3 seeds, seed by
   seed as the budget allows; SmolLM2 on cls45 instead where ``make smollm2`` and the
   cls45 data are present (they cannot travel to a lent machine).

``--cpu-smoke`` runs all of it on the CPU with tiny shapes (a 2-layer model for part 1,
the embedded suite for parts 2 and 3), so that the script cannot rot.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from abmll_tune.embedded.backbone import TINY_LLAMA3

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "v_proj", "output_proj"]
LLAMA3_8B = dict(
    vocab_size=128_256,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=4096,
    intermediate_dim=14_336,
    max_seq_len=8192,
    rope_base=500_000,
)
TINY = dict(TINY_LLAMA3, rope_base=500_000)
# ABMLL's settings in the flagship config (beta, gamma, rates, clamp): read_flagship()
PAPER_KEYS = ("beta", "gamma", "inner_lr_mean", "inner_lr_std", "outer_lr_mean", "outer_lr_std")
PAPER_KEYS += ("std_grad_clamp",)


# ----------------------------------------------------------------------- part 1


def _materialise(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Meta-device model -> random weights on ``device`` (no download, no CPU copy)."""
    from abmll_tune.modules import variational_lora_layers

    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            if p.dim() == 1:
                p.fill_(1.0)  # norms
            else:
                p.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():
        if hasattr(module, "rope_init"):
            with torch.device(device):  # its caches are created, not materialised
                module.rope_init()
        if hasattr(module, "initialize_parameters") and "lora" in type(module).__name__.lower():
            module.initialize_parameters()  # torchtune's LoRALinear
    for layer in variational_lora_layers(model).values():
        layer.initialize_parameters()
    model.to(dtype=dtype)


FLAGSHIP_CONFIG = REPO / "configs" / "llama3_8b_cls45.yaml"


def flagship_adapters() -> dict:
    """The adapter settings of the 8B flagship config (rank, alpha, the std's form, scale
    and init, KL dtype), read from the config that travels with the tree."""
    from omegaconf import OmegaConf

    model = OmegaConf.load(FLAGSHIP_CONFIG).model
    keys = ("lora_rank", "lora_alpha", "std_param", "sigma_floor", "sigma_floor_w0_fraction")
    keys += ("std_b_init_std", "kl_dtype")
    return {k: model[k] for k in keys if k in model}


def flagship_method() -> dict:
    """ABMLL's beta, gamma, learning rates and std clamp in the 8B flagship config."""
    from omegaconf import OmegaConf

    method = OmegaConf.load(FLAGSHIP_CONFIG).method
    return {k: method[k] for k in PAPER_KEYS}


def _build(kind: str, shape: dict, device, dtype, activation_checkpointing: bool):
    from torchtune import modules, training
    from torchtune.models.llama3 import lora_llama3

    from abmll_tune.models import abmll_llama3

    with training.set_default_dtype(dtype), torch.device("meta"):
        if kind == "lora":
            model = lora_llama3(TARGETS, lora_rank=8, lora_alpha=16, **shape)
        else:  # the flagship config's adapters (docs/method.md, "Leaving the stationary point")
            # "abmll": the default (auto: one compiled kernel per KL chunk on CUDA);
            # "abmll_eager": the eager in-place kernel, for the before/after ratio
            kernel = "eager" if kind == "abmll_eager" else "auto"
            model = abmll_llama3(TARGETS, **flagship_adapters(), kl_kernel=kernel, **shape)
    _materialise(model, device, dtype)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if activation_checkpointing:
        training.set_activation_checkpointing(
            model, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
        )
    return model


def _batch(shape: dict, batch: int, tokens: int, device) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (batch, tokens), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    return {
        "tokens": ids.to(device),
        "labels": labels.to(device),
        "answer_positions": torch.full((batch,), tokens - 2, dtype=torch.long).to(device),
    }


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _steppers(kind: str, model, batch: dict, inner_steps: int):
    """name -> a function running one step of that kind on ``model``."""
    from abmll_tune.data.loader import TaskVisit
    from abmll_tune.meta import MetaLearner
    from abmll_tune.methods import ABMLL
    from abmll_tune.objectives import answer_nll

    adamw = lambda groups: torch.optim.AdamW(groups, weight_decay=0.0)  # noqa: E731
    if kind == "lora":
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)

        def lora_step():
            answer_nll(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return {"lora_step": lora_step}
    inner = MetaLearner(model, ABMLL(**flagship_method()), adamw, adamw, inner_steps=inner_steps)
    first_order = MetaLearner(
        model, ABMLL(**flagship_method(), outer_grad="first_order"), adamw, adamw, inner_steps=1
    )
    visit = TaskVisit(0, 0, "gpu-check", [batch] * inner_steps)
    suffix = "_eager_kl" if kind == "abmll_eager" else ""
    return {
        f"abmll_inner_step{suffix}": lambda: inner.inner_step([batch]),
        f"abmll_first_order_outer_step{suffix}": lambda: first_order.outer_step([batch]),
        f"abmll_task_visit{suffix}": lambda: inner.train_task(visit),
    }


def _timed(steps: dict, repeats: int, device, deadline: float) -> dict[str, list[float]]:
    """Alternating timed runs of ``steps`` (name -> function), at most ``repeats`` each,
    fewer (at least one) when ``deadline`` comes first."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(repeats):
        if rep and time.perf_counter() > deadline:
            break
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def paper_step(
    device,
    dtype,
    shape: dict,
    tokens: int,
    repeats: int,
    inner_steps: int,
    deadline: float,
    kinds: tuple[str, ...] = ("lora", "abmll", "abmll_eager", "lora"),
) -> dict:
    """Part 1: peak memory and step time of LoRA vs ABMLL steps, one model resident at a
    time (an 8B model is 16 GB in bf16: three at once would not be what a run holds).

    Each model is built, its steps warmed up (the first step's time kept: it holds the
    KL kernel's compilation), its peak memory taken over one more step, then its steps
    timed alternating. LoRA is measured first and again last: the two agree unless the
    device drifted during the part (``lora_drift``)."""
    batch = _batch(shape, 2, tokens, device)
    out: dict = {"shape": shape, "batch": [2, tokens], "dtype": str(dtype), "device": str(device)}
    memory, first_step, times = {}, {}, {}
    for i, kind in enumerate(kinds):
        if i and time.perf_counter() > deadline:
            out["skipped"] = list(kinds[i:])
            break
        again = kind in kinds[:i]
        print(f"[gpu_check] part 1: {kind}{' again' if again else ''}", flush=True)
        model = _build(kind, shape, device, dtype, activation_checkpointing=True)
        steps = _steppers(kind, model, batch, inner_steps)
        if again:
            steps = {f"{name}_again": step for name, step in steps.items()}
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()  # warm-up: optimizer states exist, kernels compiled
            _sync(device)
            first_step[name] = time.perf_counter() - start
            _reset_peak(device)
            step()
            _sync(device)
            memory[name] = _peak_bytes(device)
        # each kind gets its share of the time left to the part
        share = (deadline - time.perf_counter()) / max(1, len(kinds) - i)
        times.update(_timed(steps, repeats, device, time.perf_counter() + share))
        # every reference to the model goes (the loop's `step` closure held it: two 16 GB
        # models resident at once at 8B)
        del model, steps
        step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(
            f"[gpu_check] part 1: {kind} done, "
            + ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in times.items()),
            flush=True,
        )
    out["peak_memory_gib"] = {k: None if v is None else v / 2**30 for k, v in memory.items()}
    out["first_step_seconds"] = first_step
    out["repeats"] = {k: len(v) for k, v in times.items()}
    # the first timed run is dropped where there are enough (allocator and clocks settling)
    median = {k: statistics.median(v[1:] if len(v) > 2 else v) for k, v in times.items()}
    out["seconds"] = median
    out["min_seconds"] = {k: min(v) for k, v in times.items()}
    if "lora_step" not in median:
        return out
    lora = median["lora_step"]
    if "lora_step_again" in median:
        out["lora_drift"] = median["lora_step_again"] / lora
    if memory.get("lora_step"):
        out["memory_ratio"] = {
            k: v / memory["lora_step"]
            for k, v in memory.items()
            if not k.startswith("lora_step") and v is not None
        }
    out["time_ratio"] = {}
    for suffix in ("", "_eager_kl"):
        if f"abmll_inner_step{suffix}" not in median:
            continue
        out["time_ratio"].update(
            {
                f"inner_step{suffix}": median[f"abmll_inner_step{suffix}"] / lora,
                f"first_order_outer_step{suffix}": median[f"abmll_first_order_outer_step{suffix}"]
                / lora,
                f"task_visit_per_step{suffix}": median[f"abmll_task_visit{suffix}"]
                / (inner_steps * lora),
            }
        )
    return out


# ----------------------------------------------------------------------- parts 2 and 3


def _tune(
    recipe: str, config: str, overrides: list[str], log: Path, deadline: float
) -> tuple[int, float]:
    """One ``tune run`` in a subprocess, stopped (exit 124) if it would pass ``deadline``."""
    from abmll_tune.sweep import recipe_module, tune_command

    env = {**os.environ, "TIKTOKEN_CACHE_DIR": ""}
    start = time.perf_counter()
    cmd = [*tune_command(), "run", recipe_module(recipe), "--config", config, *overrides]
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        try:
            code = subprocess.run(
                cmd,
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, deadline - start),
            ).returncode
        except subprocess.TimeoutExpired:
            f.write("[gpu_check] stopped: the budget ran out\n")
            code = 124
    return code, time.perf_counter() - start


def _embedded(work: Path, pretrain_steps: int = 200) -> list[str]:
    """The embedded suite, its split and a briefly pre-trained tiny backbone under ``work``
    (the CPU smoke checks the path, not the accuracy: it pre-trains for fewer steps)."""
    from abmll_tune.data.build import BuildOptions, build_split
    from abmll_tune.embedded.backbone import write_tiny_checkpoint
    from abmll_tune.embedded.suite import generate_suite, llama3_tokenizer

    generate_suite(work / "src")
    build_split(
        BuildOptions(split="embedded", source=str(work / "src"), out=str(work / "split")),
        progress=False,
        log=lambda *_: None,
    )
    tok = work / "src" / "tokenizer"
    write_tiny_checkpoint(
        work / "backbone",
        vocab_size=768,
        max_seq_len=256,
        pretrain_steps=pretrain_steps,
        tokenizer=llama3_tokenizer(tok),
    )
    return [
        f"tokenizer.path={tok / 'tokenizer.model'}",
        f"tokenizer.special_tokens_path={tok / 'special_tokens.json'}",
        f"checkpointer.checkpoint_dir={work / 'backbone'}",
        f"data.path={work / 'split'}",
    ]


def _finite_nll(run: Path) -> bool:
    import re

    text = "".join(p.read_text() for p in (run / "logs").glob("*.txt"))
    values = [float(v) for v in re.findall(r"(?:^|\s)nll:(\S+)", text)]
    return bool(values) and all(v == v and abs(v) < 1e6 for v in values)


# The paper configs' training paths (configs/llama3_8b_*.yaml: activation checkpointing,
# torchtune's chunked cross-entropy; compile is the recipes' option for them), applied to
# the tiny config on the device. The CPU smoke leaves compile out (minutes of inductor on
# two cores; tests/test_training_paths.py checks it on the CPU).
PAPER_PATHS = [
    "enable_activation_checkpointing=true",
    "loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss",
]


def recipes_on_device(
    device: str, dtype: str, work: Path, common: list[str], log: Path, deadline: float
) -> dict:
    """Part 2: meta-train, stop, resume, evaluate: the real recipes on ``device`` with the
    paper configs' training paths."""
    run = work / "recipe_run"
    paths = [*PAPER_PATHS, *(["compile=true"] if device == "cuda" else [])]
    train = [f"output_dir={run}", f"device={device}", f"dtype={dtype}", "epochs=1", *paths]
    train += ["validation.max_tasks=2", "save_every_n_visits=2", *common]
    first, t1 = _tune(
        "abmll_meta_single_device",
        "configs/tiny_cpu_abmll.yaml",
        [*train, "stop_after_visits=4"],
        log,
        deadline,
    )
    latest = run / "checkpoints" / "latest"
    written = (latest / "adapters.safetensors").is_file()
    meta = json.loads((latest / "meta.json").read_text()) if written else {}
    resumed, t2 = _tune(
        "abmll_meta_single_device",
        "configs/tiny_cpu_abmll.yaml",
        [*train, "stop_after_visits=8", "resume_from_checkpoint=true"],
        log,
        deadline,
    )
    after = json.loads((latest / "meta.json").read_text()) if written else {}
    evaluated, t3 = _tune(
        "evaluate_few_shot",
        "configs/tiny_cpu_eval.yaml",
        [
            f"output_dir={work / 'recipe_eval'}",
            f"adapter_checkpoint={latest}",
            f"device={device}",
            f"dtype={dtype}",
            "evaluation.seeds=[100]",
            "evaluation.max_tasks=2",
            *common,
        ],
        log,
        deadline,
    )
    results = work / "recipe_eval" / "results.json"
    ok = (
        first == 0
        and resumed == 0
        and evaluated == 0
        and written
        and _finite_nll(run)
        and meta.get("progress", {}).get("visits") == 4
        and after.get("progress", {}).get("visits") == 8
        and results.is_file()
    )
    accuracy = None
    if results.is_file():
        metrics = json.loads(results.read_text())["metrics"]
        accuracy = next(iter(metrics.values()))["summary"]["accuracy"]["mean"]
    return {
        "ok": ok,
        "paths": paths,
        "exit_codes": [first, resumed, evaluated],
        "seconds": [t1, t2, t3],
        "checkpoint_visits": [
            meta.get("progress", {}).get("visits"),
            after.get("progress", {}).get("visits"),
        ],
        "eval_accuracy": accuracy,
    }


METHODS_COMPARED = ("abmll", "reptile", "lora")


def _config_name(prefix: str, method: str) -> str:
    """tiny_cpu_abmll, ...; smollm2_135m_cls45 (ABMLL), smollm2_135m_cls45_reptile, ..."""
    if prefix == "tiny_cpu":
        return f"{prefix}_{method}"
    return prefix if method == "abmll" else f"{prefix}_{method}"


def method_comparison(
    device: str,
    dtype: str,
    prefix: str,
    common: list[str],
    work: Path,
    log: Path,
    deadline: float,
    seeds: list[int],
    visits: int,
    eval_tasks: int | None,
    methods: tuple[str, ...] = METHODS_COMPARED,
) -> dict:
    """Part 3: ABMLL, Reptile, Regular LoRA, ``seeds`` each, as far as the deadline allows
    (seed by seed, so that what finishes is whole seeds of every method first)."""
    rows, skipped = [], []
    for seed in seeds:
        for method in methods:
            if time.perf_counter() > deadline:
                skipped.append(f"{method} seed {seed}")
                continue
            run = work / f"{method}_seed{seed}"
            config = f"configs/{_config_name(prefix, method)}.yaml"
            code, seconds = _tune(
                "abmll_meta_single_device",
                config,
                [
                    f"output_dir={run}",
                    f"device={device}",
                    f"dtype={dtype}",
                    f"seed={seed}",
                    f"stop_after_visits={visits}",
                    "~validation",
                    *common,
                ],
                log,
                deadline,
            )
            row = {"method": method, "seed": seed, "train_exit": code, "train_seconds": seconds}
            if code == 0:
                evaluation = [
                    f"output_dir={run / 'eval'}",
                    "~method",  # from the checkpoint
                    f"adapter_checkpoint={run / 'checkpoints' / 'latest'}",
                    f"device={device}",
                    f"dtype={dtype}",
                    "evaluation.seeds=[100,13,21]",
                    "evaluation.samples=[1]",
                    *common,
                ]
                if eval_tasks:
                    evaluation.append(f"evaluation.max_tasks={eval_tasks}")
                code, seconds = _tune(
                    "evaluate_few_shot", f"configs/{prefix}_eval.yaml", evaluation, log, deadline
                )
                row.update(eval_exit=code, eval_seconds=seconds)
                results = run / "eval" / "results.json"
                if results.is_file():
                    data = json.loads(results.read_text())
                    summary = data["metrics"][f"{data['default_variant']}@0"]["summary"]
                    row.update({m: summary[m]["mean"] for m in ("accuracy", "ece", "nll")})
            rows.append(row)
    return {"visits_per_run": visits, "runs": rows, "skipped": skipped}


def _distributions() -> list[str]:
    """This project and every distribution it and torchtune require (extras left out):
    what the kit or the image must provide, so what every run reports."""
    import importlib.metadata as metadata

    names = ["abmll-tune", "torch"]
    for dist in ("abmll-tune", "torchtune"):
        try:
            requires = metadata.requires(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" not in req:
                name = re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0].lower().replace("_", "-")
                if name not in names:
                    names.append(name)
    return names


def environment(device: torch.device) -> dict:
    """Python, torch, the device and every distribution the project imports (version and
    folder): what a lent machine's image and the kit actually gave this run."""
    import importlib.metadata as metadata

    import torchtune

    import abmll_tune

    versions = {}
    for name in _distributions():
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    package = Path(abmll_tune.__file__).resolve().parent
    env = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "versions": versions,
        "abmll_tune_from": str(package),
        # the check must run the installed package (abmll_tune.recipes exists only there)
        "abmll_tune_is_checkout": package == REPO / "abmll_tune",
        "torchtune_from": str(Path(torchtune.__file__).resolve().parent),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            device_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
        )
        env["inductor"] = inductor_probe(device)
    return env


def inductor_probe(device: torch.device) -> dict:
    """Can this image compile with inductor (a C compiler, triton, a writable cache)?
    The KL's compiled kernel falls back to eager when it cannot, silently but for one
    warning: recorded here before parts 1 and 2 rely on it."""
    import importlib.metadata as metadata

    probe: dict = {"cc": shutil.which("cc") or shutil.which("gcc")}
    try:
        probe["triton"] = metadata.version("triton")
    except metadata.PackageNotFoundError:
        probe["triton"] = None
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or tempfile.gettempdir()
    probe["cache_dir"], probe["cache_writable"] = cache, os.access(cache, os.W_OK)
    start = time.perf_counter()
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="inductor")
        x = torch.randn(64, device=device)
        torch.testing.assert_close(fn(x), torch.sin(x) * 2 + 1)
        probe["ok"], probe["error"] = True, None
    except Exception as error:  # noqa: BLE001 - what failed is the finding
        probe["ok"], probe["error"] = False, f"{type(error).__name__}: {str(error)[:500]}"
    probe["seconds"] = time.perf_counter() - start
    print(f"[gpu_check] inductor probe: {'ok' if probe['ok'] else probe['error']}", flush=True)
    return probe


def _table(report: dict) -> str:
    lines = []
    env = report.get("environment")
    if env and "versions" in env:
        lines.append(
            f"environment: python {env['python']}, torch {env['torch']} (cuda {env['cuda']}), "
            f"{env.get('device_name', 'cpu')}; abmll_tune from {env['abmll_tune_from']}"
        )
        probe = env.get("inductor")
        if probe:
            lines.append(
                f"inductor: {'ok' if probe['ok'] else 'FAILED ' + str(probe['error'])} "
                f"({probe['seconds']:.1f} s; cc {probe['cc']}, triton {probe['triton']}, "
                f"cache {probe['cache_dir']} {'writable' if probe['cache_writable'] else 'NOT writable'})"
            )
    step = report.get("paper_step")
    if step and "seconds" in step:
        lines.append(f"paper step ({step['device']}, {step['dtype']}, batch {step['batch']}):")
        lines.append(f"  {'':<38} {'median ms':>10} {'min ms':>9} {'first ms':>10} {'peak':>10}")
        for name, seconds in step["seconds"].items():
            gib = step["peak_memory_gib"].get(name)
            mem = f"{gib:6.2f} GiB" if gib is not None else "       n/a"
            lines.append(
                f"  {name:<38} {seconds * 1000:10.1f} {step['min_seconds'][name] * 1000:9.1f} "
                f"{step['first_step_seconds'][name] * 1000:10.1f} {mem}"
            )
        if step.get("time_ratio"):
            lines.append(
                "  time ratios to LoRA: "
                + ", ".join(f"{k} {v:.3f}x" for k, v in step["time_ratio"].items())
            )
        if "memory_ratio" in step:
            lines.append(
                "  memory ratios to LoRA: "
                + ", ".join(f"{k} {v:.3f}x" for k, v in step["memory_ratio"].items())
            )
        if "lora_drift" in step:
            lines.append(f"  LoRA measured again last: {step['lora_drift']:.3f}x the first")
    rec = report.get("recipes")
    if rec and "ok" in rec:
        lines.append(
            f"recipes: {'ok' if rec['ok'] else 'FAILED'} (paths {' '.join(rec['paths'])}; exit codes {rec['exit_codes']}, visits {rec['checkpoint_visits']}, eval accuracy {rec['eval_accuracy']})"
        )
    methods = report.get("methods")
    if isinstance(methods, dict) and methods.get("runs"):
        lines.append(f"methods ({methods['visits_per_run']} visits per run):")
        for r in methods["runs"]:
            acc = r.get("accuracy")
            lines.append(
                f"  {r['method']:<8} seed {r['seed']}: "
                + (
                    f"accuracy {acc:.3f}, ECE {r['ece']:.3f}, NLL {r['nll']:.3f}"
                    if acc is not None
                    else f"exit {r.get('train_exit')}/{r.get('eval_exit')}"
                )
            )
        if methods["skipped"]:
            lines.append(f"  skipped (budget): {', '.join(methods['skipped'])}")
    elif isinstance(methods, str):
        lines.append(f"methods: {methods}")
    for part in PARTS:
        if isinstance(report.get(part), dict) and "error" in report[part]:
            lines.append(f"{part}: ERROR {report[part]['error']}")
    if report.get("interrupted"):
        lines.append(f"interrupted ({report['interrupted']}): the parts above are what finished")
    return "\n".join(lines)


PARTS = ("environment", "paper_step", "recipes", "methods")


def _write(report: dict, out: Path) -> None:
    """The report so far, atomically: a run stopped at any point leaves whole parts."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out)


def _part(report: dict, name: str, out: Path, run) -> None:
    """Run one part; its result, or its error and traceback, goes into the report, which is
    written at once. An error ends only its own part; an interrupt ends the check."""
    start = time.perf_counter()
    try:
        report[name] = run()
    except Exception as error:  # noqa: BLE001 - recorded, and the next part still runs
        report[name] = {
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()[-4000:],
        }
    finally:
        report.setdefault("part_seconds", {})[name] = time.perf_counter() - start
        _write(report, out)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument(
        "--budget-s", type=float, default=480.0, help="seconds for the whole check (default 8 min)"
    )
    parser.add_argument("--smollm2-dir", default="outputs/smollm2_135m_hf")
    parser.add_argument("--cls45-dir", default="data/cls45_cpu")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--embedded",
        nargs=3,
        metavar=("SUITE", "SPLIT", "BACKBONE"),
        help="reuse an embedded suite, its built split and a tiny backbone",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget_s
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        parser.exit(
            2, "error: no CUDA device; run with --cpu-smoke to check the script on the CPU\n"
        )
    # a timeout's SIGTERM ends the check like Ctrl-C: the finished parts stay in the JSON
    signal.signal(signal.SIGTERM, _interrupt)
    device = torch.device("cpu" if smoke else "cuda")
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "mode": "cpu-smoke" if smoke else "gpu",
        "device_name": "cpu" if smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "budget_s": args.budget_s,
    }
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    log = work / "recipes.log"
    out = Path(args.out)
    dtype = "fp32" if smoke else "bf16"
    try:
        _part(report, "environment", out, lambda: environment(device))
        # part 1 may take at most 45% of the budget (its compilation time is not known ahead)
        _part(
            report,
            "paper_step",
            out,
            lambda: paper_step(
                device,
                torch.float32 if smoke else torch.bfloat16,
                TINY if smoke else LLAMA3_8B,
                tokens=32 if smoke else 512,
                repeats=3 if smoke else 6,
                inner_steps=2 if smoke else 5,
                deadline=start + 0.45 * args.budget_s,
            ),
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.embedded:
            suite, split, backbone = (Path(p).resolve() for p in args.embedded)
            tok = suite / "tokenizer"
            common = [
                f"tokenizer.path={tok / 'tokenizer.model'}",
                f"tokenizer.special_tokens_path={tok / 'special_tokens.json'}",
                f"checkpointer.checkpoint_dir={backbone}",
                f"data.path={split}",
            ]
        else:
            common = _embedded(work / "embedded", pretrain_steps=20 if smoke else 200)
        _part(
            report,
            "recipes",
            out,
            lambda: recipes_on_device(device.type, dtype, work, common, log, deadline),
        )
        smollm2 = Path(args.smollm2_dir) / "model.safetensors"
        cls45 = Path(args.cls45_dir) / "manifest.json"
        # (device, dtype, config prefix, overrides, seeds, visits, evaluation tasks, methods)
        if smoke:  # the same code path on the embedded suite (two methods: the test's time)
            plan = ("cpu", "fp32", "tiny_cpu", common, [0], 2, 2, ("abmll", "lora"))
        elif smollm2.is_file() and cls45.is_file():
            remaining = deadline - time.perf_counter()
            visits = max(4, int(remaining / 9 / 3))  # about 3 s per visit and evaluation share
            smol = [f"data.path={Path(args.cls45_dir).resolve()}"]
            plan = ("cuda", "bf16", "smollm2_135m_cls45", smol, [0, 1, 2], visits, None)
            plan += (METHODS_COMPARED,)
        else:  # the tiny suite in fp32 (the CPU demo's numbers), seeds as the budget allows
            plan = ("cuda", "fp32", "tiny_cpu", common, [0, 1, 2], 80, None, METHODS_COMPARED)
        device_name, dtype_name, prefix, overrides, seeds, visits, tasks, names = plan
        methods = lambda: method_comparison(  # noqa: E731
            device_name, dtype_name, prefix, overrides, work / "methods", log, deadline,
            seeds, visits, tasks, methods=names,
        )  # fmt: skip
        _part(report, "methods", out, methods)
    except KeyboardInterrupt as stop:
        report["interrupted"] = str(stop) or "SIGINT"
    finally:
        report["seconds"] = time.perf_counter() - start
        if log.is_file():
            report["recipes_log_tail"] = log.read_text()[-4000:]
            shutil.copy(log, out.with_name(out.stem + "_recipes.log"))
        _write(report, out)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(_table(report))
    print(f"wrote {out} in {report['seconds']:.0f} s")
    return 0 if _passed(report) else 1


BUDGET_CUT = 124  # _tune's exit status for a run stopped at the deadline


def _cut(run: dict) -> bool:
    """A part-3 run stopped by the budget (not by an error)."""
    return BUDGET_CUT in (run.get("train_exit"), run.get("eval_exit"))


def _passed(report: dict) -> bool:
    """Every part ran without an error, the recipes ran, and every part-3 run either
    finished or was cut by the budget (what a short budget does, not a failure), at least
    one of them finished."""
    methods = report.get("methods")
    if report.get("interrupted") or not all(
        isinstance(report.get(p), dict) and "error" not in report[p] for p in PARTS
    ):
        return False
    runs = methods["runs"]
    finished = [r for r in runs if r.get("eval_exit") == 0]
    return (
        report["recipes"]["ok"]
        and bool(finished)
        and all(r.get("eval_exit") == 0 or _cut(r) for r in runs)
    )


if __name__ == "__main__":
    sys.exit(main())
