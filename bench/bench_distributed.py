"""Task-parallel throughput: tasks per second with 1 and 2 processes, and the scaling efficiency.

    python bench/bench_distributed.py --out bench_results/distributed.json    (part of make bench)

Runs ``recipes/abmll_meta_distributed`` (ABMLL and Reptile, the frozen base FSDP2-sharded
and replicated: ``shard_base``) on the embedded suite and the tiny backbone with
``--nproc_per_node`` 1 and 2 (gloo on the CPU, one thread per process,
so two processes use the two cores one process leaves idle), ``--reps`` times each,
alternating, and reads the recipe's own ``train/tasks_per_second`` (time inside task
visits, all-reduces included; setup, validation and checkpoints excluded). Scaling
efficiency = throughput(2) / (2 x throughput(1)). On a GPU machine ``--device cuda
--processes 1,2,4,8`` measures the same on GPUs (one per process).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUNE = shutil.which("tune", path=str(Path(sys.executable).parent)) or "tune"


def prepare(work: Path) -> list[str]:
    from abmll_tune.embedded.suite import MODEL_VOCAB

    env = {**os.environ, "TIKTOKEN_CACHE_DIR": ""}
    data, backbone = work / "data", work / "backbone"
    if not (data / "embedded" / "manifest.json").is_file():
        py = [sys.executable, "-m", "abmll_tune.data"]
        suite = [sys.executable, "-m", "abmll_tune.embedded.suite"]
        subprocess.run([*suite, "--out", str(data / "src")], check=True, env=env)
        subprocess.run(
            [*py, "build", "--quiet", "--split", "embedded", "--source", str(data / "src")]
            + ["--out", str(data / "embedded")],
            check=True,
            env=env,
        )
    if not (backbone / "model.safetensors").is_file():
        subprocess.run(
            [sys.executable, "-m", "abmll_tune.embedded.backbone", "--out", str(backbone)]
            + ["--vocab-size", str(MODEL_VOCAB), "--max-seq-len", "256"],
            check=True,
            env=env,
        )
    tok = data / "src" / "tokenizer"
    return [
        f"tokenizer.path={tok / 'tokenizer.model'}",
        f"tokenizer.special_tokens_path={tok / 'special_tokens.json'}",
        f"checkpointer.checkpoint_dir={backbone}",
        f"data.path={data / 'embedded'}",
    ]


def throughput(
    method: str, processes: int, shard: bool, device: str, common: list[str], work: Path
) -> float:
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"{method}_{processes}_"))
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": "", "OMP_NUM_THREADS": "1"}
    cmd = [TUNE, "run", "--nproc_per_node", str(processes), "--standalone"]
    cmd += ["recipes/abmll_meta_distributed", "--config"]
    cmd += [f"configs/tiny_cpu_{method}_distributed.yaml", f"output_dir={out}", *common]
    cmd += ["epochs=2", "validation=null", "save_every_n_visits=null", f"device={device}"]
    cmd += ["keep_epoch_checkpoints=false", "log_peak_memory_stats=false"]
    cmd += [f"shard_base={str(shard).lower()}"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    values = []
    for log in sorted((out / "logs").glob("*.txt")):
        for item in log.read_text().split():
            if item.startswith("train/tasks_per_second:"):
                values.append(float(item.split(":", 1)[1]))
    shutil.rmtree(out, ignore_errors=True)
    return values[-1]  # the second epoch: warm caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_results/distributed.json"))
    parser.add_argument("--work", type=Path, default=Path("bench_results/distributed_work"))
    parser.add_argument("--methods", default="abmll,reptile")
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--shard", default="true,false", help="shard_base settings to measure (FSDP2 or replicated)"
    )
    parser.add_argument("--results", type=Path, help="also write the summary here (committed)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    common = prepare(args.work.resolve())
    counts = [int(n) for n in args.processes.split(",")]
    rows = {}
    settings = [
        (method, shard == "true")
        for method in args.methods.split(",")
        for shard in args.shard.split(",")
    ]
    for method, shard in settings:
        runs = {n: [] for n in counts}
        for _ in range(args.reps):
            for n in counts:  # alternating, so drift in the machine's load hits both alike
                runs[n].append(
                    throughput(method, n, shard, args.device, common, args.work.resolve())
                )
        base = statistics.median(runs[counts[0]])
        rows[f"{method} ({'sharded' if shard else 'replicated'} base)"] = {
            str(n): {
                "tasks_per_second": statistics.median(v),
                "runs": v,
                "scaling_efficiency": statistics.median(v) / (n / counts[0] * base),
            }
            for n, v in runs.items()
        }
    from abmll_tune.io import atomic_write_json

    report = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "methods": rows}
    atomic_write_json(args.out, report)
    if args.results:
        from abmll_tune.report import results_provenance

        command = "python bench/bench_distributed.py " + " ".join(
            f"--{k} {getattr(args, k)}" for k in ("methods", "processes", "reps", "device", "shard")
        )
        header = ["method (base)"] + [f"{n} process(es) tasks/s" for n in counts]
        header += [f"scaling efficiency at {n}" for n in counts[1:]]
        table_rows = [
            [method]
            + [f"{by_n[str(n)]['tasks_per_second']:.1f}" for n in counts]
            + [f"{by_n[str(n)]['scaling_efficiency']:.2f}" for n in counts[1:]]
            for method, by_n in rows.items()
        ]
        summary = {
            **results_provenance(command),
            "methods": rows,
            "tables": [{"title": "", "header": header, "rows": table_rows}],
        }
        atomic_write_json(args.results, summary)
    print(f"\nTask-parallel throughput ({args.device}, tiny backbone, medians of {args.reps})")
    print(f"{'method':<28}{'processes':>10}{'tasks/s':>10}{'efficiency':>12}")
    for method, by_n in rows.items():
        for n, r in by_n.items():
            print(
                f"{method:<28}{n:>10}{r['tasks_per_second']:>10.2f}{r['scaling_efficiency']:>12.2f}"
            )


if __name__ == "__main__":
    main()
