"""Random ``kill -9`` trials: a meta-training run killed at random moments and resumed
until it finishes must end with the adapters of an uninterrupted run, bit for bit.

    python scripts/kill_trials.py --trials 10 --out outputs/kill_trials

The embedded suite and the tiny backbone are prepared as ``make data backbone`` does
(``outputs/data/embedded``, ``outputs/tiny_backbone``). Each trial runs
``tune run recipes/abmll_meta_single_device`` with ``save_every_n_visits=1`` (so kills
often land inside checkpoint writes), kills it with SIGKILL after a random delay, then
resumes (``resume_from_checkpoint=true``, or a fresh start if no checkpoint exists yet),
killing again at random until a run exits by itself. Reported per trial: kills, whether
the final adapters, validation rows and ``best`` equal the uninterrupted run's, how many
kills landed inside a checkpoint write (temporaries left in ``checkpoints/``; and of
those, how many left no ``latest/``), stale temporaries left at the end, and resume
failures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).with_name("tune"))
CONFIG = "configs/tiny_cpu_abmll.yaml"
COMMON = ["epochs=2", "save_every_n_visits=1", "validation.max_tasks=4"]


def run(out: Path, *extra: str, kill_after: float | None = None) -> tuple[str, str]:
    """Start the recipe; kill it after ``kill_after`` seconds. Returns (outcome, stderr tail)."""
    cmd = [TUNE, "run", "recipes/abmll_meta_single_device", "--config", CONFIG]
    cmd += [f"output_dir={out}", *COMMON, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TIKTOKEN_CACHE_DIR": ""}
    with open(out.parent / f"{out.name}.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.PIPE)
        try:
            _, err = proc.communicate(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            return "killed", ""
    return ("done" if proc.returncode == 0 else f"exit {proc.returncode}"), err.decode()[-500:]


def snapshot(out: Path) -> dict:
    ckpt = out / "checkpoints"
    return {
        "latest": load_file(str(ckpt / "latest" / "adapters.safetensors")),
        "best": load_file(str(ckpt / "best" / "adapters.safetensors")),
        "validation": (out / "validation.jsonl").read_text(),
        "stale": sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")),
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--out", default="outputs/kill_trials")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-delay", type=float, default=None, help="seconds (default: the run's length)"
    )
    parser.add_argument("--results", help="also write the summary here (committed)")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    start = time.perf_counter()
    outcome, err = run(root / "straight")
    assert outcome == "done", err
    length = time.perf_counter() - start
    reference = snapshot(root / "straight")
    rng = random.Random(args.seed)
    rows = []
    for trial in range(args.trials):
        out = root / f"trial_{trial}"
        kills, failures, outcome = 0, [], "killed"
        inside_writes = no_latest = 0
        while outcome != "done":
            ckpt = out / "checkpoints"
            # a checkpoint, or a replacement of one cut between its renames (resume completes it)
            resume = (ckpt / "latest" / "meta.json").is_file() or any(
                ckpt.glob(".latest.*.complete")
            )
            extra = ["resume_from_checkpoint=true" if resume else "overwrite_output_dir=true"]
            # kill within the run's length; the last attempt of a trial runs to the end
            delay = rng.uniform(2.0, args.max_delay or length) if kills < 3 else None
            outcome, err = run(out, *extra, kill_after=delay)
            if outcome == "killed":
                kills += 1
                # temporaries left behind: the kill landed inside a checkpoint write
                left = (
                    [p.name for p in ckpt.iterdir() if p.name.startswith(".")]
                    if ckpt.is_dir()
                    else []
                )
                inside_writes += bool(left)
                no_latest += bool(left) and not (ckpt / "latest").exists()
            elif outcome != "done":
                failures.append(err)
                break
        got = snapshot(out) if outcome == "done" else None
        row = {
            "trial": trial,
            "kills": kills,
            "kills_inside_writes": inside_writes,
            "kills_leaving_no_latest": no_latest,
            "identical": bool(
                got
                and same(got["latest"], reference["latest"])
                and same(got["best"], reference["best"])
                and got["validation"] == reference["validation"]
            ),
            "stale": got["stale"] if got else None,
            "resume_failures": failures,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    identical = sum(r["identical"] for r in rows)
    summary = {
        "trials": len(rows),
        "identical": identical,
        "kills": sum(r["kills"] for r in rows),
        "kills_inside_writes": sum(r["kills_inside_writes"] for r in rows),
        "kills_leaving_no_latest": sum(r["kills_leaving_no_latest"] for r in rows),
        "stale_left": sum(bool(r["stale"]) for r in rows),
        "resume_failures": sum(len(r["resume_failures"]) for r in rows),
        "uninterrupted_seconds": length,
    }
    (root / "summary.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(json.dumps(summary))
    if args.results:
        from abmll_tune.io import atomic_write_json
        from abmll_tune.report import results_provenance

        command = f"python scripts/kill_trials.py --trials {args.trials} --seed {args.seed}"
        if args.max_delay is not None:
            command += f" --max-delay {args.max_delay}"
        labels = {
            "identical": "ended with the uninterrupted run's adapters, best and validation",
            "kills": "kills (SIGKILL at random moments)",
            "kills_inside_writes": "kills inside a checkpoint write",
            "kills_leaving_no_latest": "of those, kills that left no latest/",
            "stale_left": "trials with temporaries left at the end",
            "resume_failures": "resume failures",
        }
        atomic_write_json(
            args.results,
            {
                **results_provenance(command),
                **summary,
                "tables": [
                    {
                        "title": f"{len(rows)} trials of a tiny ABMLL run (2 epochs, a "
                        "checkpoint every visit)",
                        "header": ["", "count"],
                        "rows": [[text, str(summary[key])] for key, text in labels.items()],
                    }
                ],
            },
        )
    return 0 if identical == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
