"""What does ABMLL cost? Against torchtune's own LoRA recipe, and against the number of tasks.

    python bench/bench_cost.py --out bench_results/cost.json      (part of make bench)

1. Step time and peak memory of ABMLL meta-training (``recipes/abmll_meta_single_device``)
   against torchtune's ``lora_finetune_single_device`` recipe (imported from the torchtune
   wheel), same model, data, batch (2) and precision (fp32): a Llama3 with
   ``--layers`` 8B-shaped decoder layers (hidden 4096, 32 heads, 8 KV heads, MLP 14336)
   and random weights, saved as an HF checkpoint, on the embedded suite's prompts (for
   torchtune's recipe through its ``instruct_dataset``, so its prompts carry Llama3's chat
   headers, a few tokens longer). Each measurement is a fresh process; the two recipes
   alternate, ``--reps`` times. Step time: the training loop's wall time over its optimizer
   steps on a batch (ABMLL: inner steps; its outer step takes no forward pass). Memory:
   the process's peak RSS during the training loop (the CPU has no allocator
   statistics; the high-water mark is reset after setup), and its excess over torchtune's.
2. Memory and time per task against the number of meta-training tasks (10, 100, 1000)
   on the tiny backbone: ABMLL keeps one set of local adapters, so both must stay flat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    # VmHWM belongs to this process's address space; ru_maxrss would carry over the
    # parent's high-water mark across fork+exec (Linux), hiding a small worker's own peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    """Restart the high-water mark after setup, so the peak is the training loop's
    (writing 5 to clear_refs resets VmHWM on Linux); loading a checkpoint briefly holds
    the weights twice and would otherwise dominate both recipes' peaks."""
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _arch(layers: int) -> dict:
    return dict(
        vocab_size=768,
        num_layers=layers,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        intermediate_dim=14336,
        max_seq_len=256,
    )


def prepare(work: Path, layers: int) -> dict:
    from abmll_tune.data.build import BuildOptions, build_split
    from abmll_tune.data.loader import BuiltSplit
    from abmll_tune.data.prompt import LETTERS, render_prompt
    from abmll_tune.embedded.backbone import write_tiny_checkpoint
    from abmll_tune.embedded.suite import generate_suite

    if not (work / "data" / "manifest.json").is_file():
        generate_suite(work / "src")
        build_split(
            BuildOptions(split="embedded", source=str(work / "src"), out=str(work / "data")),
            progress=False,
            log=lambda *_: None,
        )
    if not (work / "backbone" / "model.safetensors").is_file():
        write_tiny_checkpoint(work / "backbone", "llama3", overwrite=True, **_arch(layers))
    rows = []
    split = BuiltSplit(work / "data")
    for task in split.train_tasks:
        for e in split.train(task):
            rows.append({"prompt": render_prompt(e), "answer": LETTERS[e.gold]})
    (work / "instruct.json").write_text(json.dumps(rows))
    return {
        "tokenizer": str(work / "src" / "tokenizer"),
        "backbone": str(work / "backbone"),
        "data": str(work / "data"),
        "instruct": str(work / "instruct.json"),
    }


def _peak_memory_mib(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mib()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()


def worker_torchtune(
    paths: dict, layers: int, steps: int, out_dir: str, device: str = "cpu", dtype: str = "fp32"
) -> dict:
    import importlib.util

    import torchtune
    from omegaconf import OmegaConf

    recipe_file = Path(torchtune.__file__).parents[1] / "recipes" / "lora_finetune_single_device.py"
    spec = importlib.util.spec_from_file_location("tt_lora_recipe", recipe_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = OmegaConf.create(
        {
            "output_dir": out_dir,
            "model": {
                "_component_": "torchtune.models.llama3.lora_llama3",
                "lora_attn_modules": ["q_proj", "v_proj", "output_proj"],
                "apply_lora_to_mlp": False,
                "apply_lora_to_output": False,
                "lora_rank": 8,
                "lora_alpha": 16,
                **_arch(layers),
            },
            "tokenizer": {
                "_component_": "torchtune.models.llama3.llama3_tokenizer",
                "path": f"{paths['tokenizer']}/tokenizer.model",
                "special_tokens_path": f"{paths['tokenizer']}/special_tokens.json",
                "max_seq_len": 128,
            },
            "checkpointer": {
                "_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": paths["backbone"],
                "checkpoint_files": ["model.safetensors"],
                "model_type": "LLAMA3",
                "output_dir": out_dir,
            },
            "resume_from_checkpoint": False,
            "save_adapter_weights_only": True,
            "dataset": {
                "_component_": "torchtune.datasets.instruct_dataset",
                "source": "json",
                "data_files": paths["instruct"],
                "column_map": {"input": "prompt", "output": "answer"},
                "train_on_input": False,
                "split": "train",
            },
            "seed": 0,
            "shuffle": True,
            "batch_size": 2,
            "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-3, "weight_decay": 0.0},
            "lr_scheduler": {
                "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                "num_warmup_steps": 1,
            },
            "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
            "epochs": 1,
            "max_steps_per_epoch": steps,
            "gradient_accumulation_steps": 1,
            "clip_grad_norm": None,
            "compile": False,
            "metric_logger": {
                "_component_": "torchtune.training.metric_logging.DiskLogger",
                "log_dir": f"{out_dir}/logs",
            },
            "log_every_n_steps": 1,
            "log_peak_memory_stats": False,
            "device": device,
            "dtype": dtype,
            "enable_activation_checkpointing": False,
            "enable_activation_offloading": False,
            "profiler": {
                "_component_": "torchtune.training.setup_torch_profiler",
                "enabled": False,
            },
        }
    )
    recipe = module.LoRAFinetuneRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    # the benchmark times training, not the final save
    recipe.save_checkpoint = lambda *a, **k: None
    _reset_peak(device)
    start = time.perf_counter()
    recipe.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "peak_rss_mib": _peak_memory_mib(device)}


def worker_abmll(
    paths: dict,
    layers: int,
    steps: int,
    out_dir: str,
    device: str = "cpu",
    dtype: str = "fp32",
    kl_dtype: str = "float64",
) -> dict:
    from abmll_tune.recipes.abmll_meta_single_device import MetaLearningRecipeSingleDevice
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs" / "tiny_cpu_abmll.yaml")
    visits = max(1, steps // 5)
    overrides = {
        "output_dir": out_dir,
        "epochs": 1,
        "stop_after_visits": visits,
        "validation": None,
        "save_every_n_visits": None,
        "tokenizer.path": f"{paths['tokenizer']}/tokenizer.model",
        "tokenizer.special_tokens_path": f"{paths['tokenizer']}/special_tokens.json",
        "checkpointer.checkpoint_dir": paths["backbone"],
        "data.path": paths["data"],
        "data.max_seq_len": 128,
        "device": device,
        "dtype": dtype,
        "model.kl_dtype": kl_dtype,
    }
    for key, value in {**overrides, **{f"model.{k}": v for k, v in _arch(layers).items()}}.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    recipe = MetaLearningRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    recipe.save_checkpoint = lambda *a, **k: None
    _reset_peak(device)
    start = time.perf_counter()
    recipe.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": visits * 5, "peak_rss_mib": _peak_memory_mib(device)}


def worker_scaling(paths: dict, n_tasks: int) -> dict:
    """Meta-train ABMLL on n_tasks generated tasks (20 questions each) with the tiny backbone."""
    import torch

    from abmll_tune.data.loader import MetaTaskSampler, tokenize_tasks
    from abmll_tune.data.prompt import PromptTokenizer
    from abmll_tune.embedded.backbone import TINY_EMBEDDED
    from abmll_tune.embedded.suite import llama3_tokenizer, make_lexicon, make_task
    from abmll_tune.meta import MetaLearner
    from abmll_tune.methods import ABMLL
    from abmll_tune.models import abmll_llama3

    torch.manual_seed(0)
    lexicon = make_lexicon()
    prompt = PromptTokenizer(llama3_tokenizer(paths["tokenizer"]), 64)
    tasks = tokenize_tasks(
        {f"scale-{i}": make_task(f"scale-{i}", lexicon, 20) for i in range(n_tasks)}, prompt
    )
    model = abmll_llama3(**TINY_EMBEDDED, std_b_init_std=1e-3)
    method = ABMLL(inner_lr_mean=1e-2, inner_lr_std=1e-3, std_grad_clamp=1.0, beta=1e-6)
    adamw = lambda groups: torch.optim.AdamW(groups, weight_decay=0.0)  # noqa: E731
    learner = MetaLearner(model, method, adamw, adamw)
    sampler = MetaTaskSampler(
        tasks, batch_size=2, batches_per_task=learner.batches_per_task, seed=0
    )
    after_setup = _peak_rss_mib()
    _reset_peak_rss()
    start = time.perf_counter()
    for visit in sampler.visits(0):
        learner.train_task(visit)
    seconds = time.perf_counter() - start
    return {
        "n_tasks": n_tasks,
        "seconds_per_task": seconds / n_tasks,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_after_setup_mib": after_setup,
    }


def _spawn(args: list[str]) -> dict:
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": ""}
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        sys.exit(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/cost.json"))
    parser.add_argument("--work", type=Path, default=Path("bench_results/cost_work"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--tasks", default="10,100,1000")
    parser.add_argument(
        "--device", default="cpu", help="cuda on a GPU (then peak memory is the CUDA allocator's)"
    )
    parser.add_argument("--dtype", default="fp32", help="bf16 for the paper's setting on a GPU")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kl-dtype", default="float64", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help="also write the summary here (committed)")
    args = parser.parse_args()
    if args.worker:
        paths = json.loads(args.paths)
        with tempfile.TemporaryDirectory() as tmp:
            if args.worker == "scaling":
                result = worker_scaling(paths, args.n)
            elif args.worker == "torchtune":
                result = worker_torchtune(
                    paths, args.layers, args.steps, tmp, args.device, args.dtype
                )
            else:
                result = worker_abmll(
                    paths, args.layers, args.steps, tmp, args.device, args.dtype, args.kl_dtype
                )
        print(json.dumps(result))
        return

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, args.layers)
    # ABMLL with the KL and prior in float64 (the default) and in float32 (model.kl_dtype)
    variants = (
        ("torchtune_lora", "torchtune", "float64"),
        ("abmll", "abmll", "float64"),
        ("abmll_kl_float32", "abmll", "float32"),
    )
    runs = {name: [] for name, _, _ in variants}
    for rep in range(args.reps):
        for name, worker, kl_dtype in variants:
            r = _spawn(
                [
                    "--worker",
                    worker,
                    "--kl-dtype",
                    kl_dtype,
                    "--paths",
                    json.dumps(paths),
                    "--layers",
                    str(args.layers),
                    "--steps",
                    str(args.steps),
                    "--device",
                    args.device,
                    "--dtype",
                    args.dtype,
                ]
            )
            r["seconds_per_step"] = r["seconds"] / r["steps"]
            runs[name].append(r)
            print(
                f"rep {rep + 1}: {name}: {r['seconds_per_step']:.2f} s/step, peak RSS {r['peak_rss_mib']:.0f} MiB",
                file=sys.stderr,
            )
    step = {k: statistics.median(r["seconds_per_step"] for r in v) for k, v in runs.items()}
    peak = {k: statistics.median(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    scaling = [
        _spawn(["--worker", "scaling", "--paths", json.dumps(paths), "--n", n])
        for n in args.tasks.split(",")
    ]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "model": f"Llama3 with {args.layers} 8B-shaped layers, vocab 768, random weights, {args.dtype}",
        "batch_size": 2,
        "runs": runs,
        "seconds_per_step": step,
        "time_ratio": {k: step[k] / step["torchtune_lora"] for k in step},
        "peak_rss_mib": peak,
        "extra_peak_fraction": {
            k: (peak[k] - peak["torchtune_lora"]) / peak["torchtune_lora"] for k in peak
        },
        "scaling": scaling,
    }
    from abmll_tune.io import atomic_write_json

    atomic_write_json(args.out, report)
    print(f"\n{report['model']}, batch 2, {args.reps} alternating reps (full results: {args.out})")
    print(f"{'recipe':<18}{'s/step':>8}{'x LoRA':>8}{'peak RSS MiB':>14}{'vs LoRA':>9}")
    for k in runs:
        print(
            f"{k:<18}{step[k]:>8.2f}{report['time_ratio'][k]:>8.2f}{peak[k]:>14.0f}"
            f"{100 * report['extra_peak_fraction'][k]:>+8.1f}%"
        )
    if args.results:
        from abmll_tune.report import results_provenance

        labels = {
            "torchtune_lora": "torchtune LoRA",
            "abmll": "ABMLL, KL and prior in float64 (the library default)",
            "abmll_kl_float32": "ABMLL, KL and prior in float32 (`model.kl_dtype: float32`, the shipped configs)",
        }  # fmt: skip
        cost_rows = [
            [
                labels[k],
                f"{step[k]:.2f}",
                f"{report['time_ratio'][k]:.2f}",
                f"{report['time_ratio'][k] * 5 / 6:.2f}",
                f"{peak[k]:.0f} MiB ({100 * report['extra_peak_fraction'][k]:+.1f}%)",
            ]
            for k in runs
        ]
        cost_rows[0][3] = "1.00"  # LoRA's steps are its steps
        command = "python bench/bench_cost.py " + " ".join(
            f"--{k} {getattr(args, k)}" for k in ("layers", "steps", "reps", "tasks")
        )
        summary = {
            **results_provenance(command),
            "model": report["model"],
            "time_ratio": report["time_ratio"],
            "extra_peak_fraction": report["extra_peak_fraction"],
            "seconds_per_step": step,
            "peak_rss_mib": peak,
            "scaling": scaling,
            "tables": [
                {
                    "title": f"{report['model']}, batch 2, {args.reps} alternating repetitions:",
                    "header": [
                        "recipe",
                        "s / step",
                        "x LoRA",
                        "x LoRA, steps counted as v1 (6 per task)",
                        "peak RSS while training",
                    ],  # fmt: skip
                    "rows": cost_rows,
                },
                {
                    "title": "Memory and time per task against the number of meta-training tasks "
                    "(tiny backbone, ABMLL, 20 questions per task):",
                    "header": ["tasks", "s / task", "peak RSS"],
                    "rows": [
                        [
                            str(x["n_tasks"]),
                            f"{x['seconds_per_task']:.3f}",
                            f"{x['peak_rss_mib']:.0f} MiB",
                        ]
                        for x in scaling
                    ],  # fmt: skip
                },
            ],
        }
        atomic_write_json(args.results, summary)
    print("targets: time <= 1.2x torchtune LoRA, memory flat in the number of tasks")
    print(f"{'tasks':>6}{'s/task':>10}{'peak RSS MiB':>14}")
    for s in scaling:
        print(f"{s['n_tasks']:>6}{s['seconds_per_task']:>10.3f}{s['peak_rss_mib']:>14.0f}")


if __name__ == "__main__":
    main()
