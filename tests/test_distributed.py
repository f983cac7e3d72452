"""Task-parallel meta-training: 2 CPU processes (gloo) launched by torchrun through
`tune run --nproc_per_node`, against single-process references."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch
from helpers import REPO, TUNE
from omegaconf import OmegaConf
from safetensors.torch import load_file

from abmll_tune.data.loader import MetaTaskSampler
from abmll_tune.distributed import DistributedTaskSampler, all_reduce_mean_
from abmll_tune.modules import adapter_params_by_group, set_trainable_scope
from abmll_tune.objectives import beta_kl, gamma_prior

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TIKTOKEN_CACHE_DIR": "", "OMP_NUM_THREADS": "1"}
CONFIG = {"abmll": "configs/tiny_cpu_abmll_distributed.yaml"}
CONFIG["reptile"] = "configs/tiny_cpu_reptile_distributed.yaml"
QUICK = ["validation=null", "save_every_n_visits=null", "log_peak_memory_stats=false"]


def launch(
    processes: int,
    out: Path,
    overrides,
    *extra,
    method="abmll",
    script=None,
    timeout=300,
    quick=QUICK,
):
    """`tune run --nproc_per_node N --standalone <recipe> ...`; returns the finished process."""
    target = script or "recipes/abmll_meta_distributed"
    cmd = [TUNE, "run", "--nproc_per_node", str(processes), "--standalone", target]
    cmd += ["--config", CONFIG[method], f"output_dir={out}", *overrides, *quick, *extra]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def single_device(out: Path, overrides, *extra, capsys, quick=QUICK) -> tuple[int, str]:
    """The single-device recipe with the distributed config, in this process (a launch
    costs ~20 s of imports); returns (exit code, stderr)."""
    code, _, err = helpers.tune_run(
        "abmll_meta_single_device",
        CONFIG["abmll"],
        f"output_dir={out}",
        *overrides,
        *quick,
        *extra,
        capsys=capsys,
    )
    return code, err


def adapters(out: Path, which: str = "latest") -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / which / "adapters.safetensors"))


def visited(out: Path, rank: int) -> list[dict]:
    path = out / "logs" / f"task_visits_rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ sampler (one process)


def _sampler(
    n_tasks: int, seed: int = 0, sampling: str = "uniform", visits_per_epoch="tasks", size=4
) -> MetaTaskSampler:
    from abmll_tune.data.prompt import TokenizedExample

    def example(task: str, i: int) -> TokenizedExample:
        return TokenizedExample([1, 2, 3, 4], [-100, -100, 3, -100], [3, 5], 0, task, str(i))

    tasks = {
        f"task{t:02d}": [example(f"task{t:02d}", i) for i in range(size + t)]
        for t in range(n_tasks)
    }
    return MetaTaskSampler(
        tasks, batch_size=1, batches_per_task=2, seed=seed, task_sampling=sampling,
        visits_per_epoch=visits_per_epoch,
    )  # fmt: skip


@pytest.mark.parametrize("n_tasks, world", [(10, 2), (10, 3), (7, 7)])
def test_sampler_gives_each_rank_distinct_tasks_and_equal_steps(n_tasks, world):
    base = _sampler(n_tasks)
    shares = [DistributedTaskSampler(base, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        per_rank = [[v.task for v in s.visits(epoch)] for s in shares]
        assert {len(tasks) for tasks in per_rank} == {n_tasks // world}
        flat = [t for tasks in per_rank for t in tasks]
        assert len(set(flat)) == len(flat)  # no task twice in an epoch, across ranks
        plan = base.epoch_plan(epoch)  # outer step s: plan positions s*N .. s*N + N - 1
        for step in range(n_tasks // world):
            assert [tasks[step] for tasks in per_rank] == plan[step * world : (step + 1) * world]
    assert shares[0].dropped_per_epoch == n_tasks % world


@pytest.mark.parametrize("world", [2, 3])
def test_a_data_epoch_splits_over_ranks_without_using_an_example_twice(world):
    # tasks of 4 to 9 examples: 2 to 4 visits each, 17 in all; ranks share the plan
    base = _sampler(6, visits_per_epoch="data")
    assert len(base) == sum((4 + t) // 2 for t in range(6))
    shares = [DistributedTaskSampler(base, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        visits = [v for s in shares for v in s.visits(epoch)]
        assert len(visits) == (len(base) // world) * world
        ids = [(v.task, i) for v in visits for b in v.batches for i in b["id"]]
        assert len(ids) == len(set(ids))  # no example twice in an epoch, across ranks
        plan = base.epoch_plan(epoch)
        assert sorted(v.position for v in visits) == list(range(len(visits)))
        assert all(plan[v.position] == v.task for v in visits)


def test_sampler_resumes_and_refuses_another_world_size():
    share = DistributedTaskSampler(_sampler(10), rank=1, world_size=2)
    gen = share.visits(0)
    [next(gen) for _ in range(3)]
    state = share.state_dict()
    fresh = DistributedTaskSampler(_sampler(10), rank=1, world_size=2)
    fresh.load_state_dict(state)
    epoch, start = fresh.resume_point()
    assert (epoch, start) == (0, 3)
    rest = [(v.position, v.task) for v in fresh.visits(epoch, start)]
    assert rest == [(v.position, v.task) for v in share.visits(0, 3)]
    other = DistributedTaskSampler(_sampler(10), rank=0, world_size=5)
    with pytest.raises(ValueError, match="written by 2 processes, this run has 5"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="written by 2 processes .* same recipe and --nproc"):
        _sampler(10).load_state_dict(state)  # the single-device sampler: another task order
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        DistributedTaskSampler(_sampler(3), rank=0, world_size=4)


def test_all_reduce_is_the_identity_on_one_process():
    t = [torch.randn(3, 2), torch.randn(4)]
    before = [x.clone() for x in t]
    all_reduce_mean_(t)
    assert all(torch.equal(a, b) for a, b in zip(t, before, strict=True))


# ------------------------------------------------------------------ 2 processes


def _single_process_recipe(method: str, overrides, extra, out: Path):
    from abmll_tune.recipes.abmll_meta_single_device import MetaLearningRecipeSingleDevice

    cfg = OmegaConf.load(REPO / CONFIG[method])
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([*overrides, *QUICK, *extra]))
    cfg.output_dir = str(out)
    recipe = MetaLearningRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    return recipe, cfg


@pytest.mark.parametrize("method", ["reptile", "abmll"])
def test_one_outer_step_on_two_processes_equals_the_averaged_single_process_update(
    method, embedded_overrides, tmp_path
):
    # ABMLL with the posterior mean in the forward pass: the inner loops are deterministic,
    # so both sides must see exactly the same local adapters. ABMLL runs with the base
    # sharded by FSDP2, Reptile with the base replicated on both processes.
    extra = ["stop_after_visits=1"]
    extra += ["model.sampling=mean"] if method == "abmll" else ["shard_base=false"]
    out = tmp_path / "dist"
    result = launch(2, out, embedded_overrides, *extra, method=method)
    assert result.returncode == 0, result.stderr[-4000:]
    got = adapters(out)

    # the reference: one process adapts to the two tasks one after the other from the same
    # global adapters, then averages the two updates (docs/distributed.md)
    recipe, cfg = _single_process_recipe(method, embedded_overrides, extra, tmp_path / "ref")
    model, learner, sampler = recipe._model, recipe._learner, recipe._sampler
    globals_ = adapter_params_by_group(model, "global")
    locals_ = adapter_params_by_group(model, "local")
    theta0 = {k: p.detach().clone() for k, p in globals_.items()}
    assert set(theta0) <= set(got)
    plan = sampler.epoch_plan(0)
    phis = []
    for rank in range(2):
        visit = sampler.visit(0, rank, plan[rank])
        assert [json.loads(x)["task"] for x in (out / "logs" / f"task_visits_rank{rank}.jsonl").read_text().splitlines()] == [visit.task]  # fmt: skip
        learner.begin_task()
        for batch in visit.batches:
            learner.inner_step([batch])
        phis.append({k: p.detach().clone() for k, p in locals_.items()})
    local_name = {k: k.replace(".lora_global_", ".lora_local_") for k in theta0}
    eps = {"mean": cfg.method.outer_step_mean, "std": cfg.method.get("outer_step_std", 0.0)}
    expected = {}
    for k, t0 in theta0.items():
        delta = sum(phi[local_name[k]] - t0 for phi in phis) / 2
        expected[k] = t0 + eps["std" if ".lora_global_std_" in k else "mean"] * delta
    if (
        method == "abmll"
    ):  # then one AdamW step of the std pairs on the averaged KL + prior gradient
        grads = []
        for phi in phis:
            with torch.no_grad():
                for k, p in globals_.items():
                    p.copy_(expected[k])
                    locals_[local_name[k]].copy_(phi[local_name[k]])
            set_trainable_scope(model, "global")
            model.zero_grad(set_to_none=True)
            (
                beta_kl(model, learner.method.elbo) + gamma_prior(model, learner.method.elbo)
            ).backward()
            grads.append(
                {k: p.grad.clone() for k, p in globals_.items() if ".lora_global_std_" in k}
            )
        stds = {k: expected[k].clone().requires_grad_(True) for k in grads[0]}
        optimizer = torch.optim.AdamW(stds.values(), lr=cfg.method.outer_lr_std, weight_decay=0.0)
        for k, p in stds.items():
            p.grad = ((grads[0][k] + grads[1][k]) / 2).clamp(
                -cfg.method.std_grad_clamp, cfg.method.std_grad_clamp
            )
        optimizer.step()
        expected.update({k: p.detach() for k, p in stds.items()})
    moved = max(float((expected[k] - theta0[k]).abs().max()) for k in theta0)
    assert moved > 1e-4  # the step is not trivially zero
    for k in theta0:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_two_processes_visit_disjoint_tasks_and_resume_exactly(
    embedded_overrides, tmp_path, capsys
):
    # the base replicated (shard_base=false): what is tested is the task split and the
    # resume; the FSDP2-sharded base is tested by the outer-step test above (3x faster here).
    # 8 visits per process, 16 of the epoch's 40 tasks: a whole epoch's split is the sampler
    # tests' (above)
    full, split = tmp_path / "full", tmp_path / "split"
    overrides = [*embedded_overrides, "shard_base=false", "epochs=1", "stop_after_visits=8"]
    result = launch(2, full, overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    visits = [visited(full, r) for r in range(2)]
    tasks = [[v["task"] for v in rows] for rows in visits]
    assert len(tasks[0]) == len(tasks[1]) == 8  # 2 tasks per outer step
    assert not set(tasks[0]) & set(tasks[1]) and len(set(tasks[0] + tasks[1])) == 16
    assert [v["position"] % 2 for v in visits[1]] == [1] * 8

    stopped = launch(2, split, overrides, "stop_after_visits=3")
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    meta = json.loads((split / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["sampler"]["world_size"] == 2 and meta["progress"]["visits"] == 3
    resumed = launch(2, split, overrides, "resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = adapters(full), adapters(split)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: sampler and every rank's RNG restored
    assert [v["task"] for v in visited(split, 1)] == tasks[1]

    # the single-device recipe refuses it (its sampler would take the 2 processes' position
    # for its own and visit another order of tasks); another --nproc_per_node is refused by
    # the sampler, test_sampler_resumes_and_refuses_another_world_size
    code, err = single_device(split, overrides, "resume_from_checkpoint=true", capsys=capsys)
    assert code == 2, err[-2000:]
    assert "written by 2 processes (recipes/abmll_meta_distributed): resume with the" in err


def test_one_process_reproduces_the_single_device_recipe(embedded_overrides, tmp_path, capsys):
    extra = ["epochs=1", "stop_after_visits=6"]
    result = launch(1, tmp_path / "dist", embedded_overrides, *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    code, err = single_device(tmp_path / "single", embedded_overrides, *extra, capsys=capsys)
    assert code == 0, err[-3000:]
    a, b = adapters(tmp_path / "dist"), adapters(tmp_path / "single")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_spread_over_processes_equals_one_process(embedded_overrides, tmp_path, capsys):
    # replicated base: each of 2 processes validates every 2nd task; the reference is the
    # single-device recipe in this process (the same run: see the test above)
    extra = ["stop_after_visits=1", "shard_base=false", "validation.max_tasks=5"]
    quick = [q for q in QUICK if not q.startswith("validation")]
    result = launch(2, tmp_path / "p2", embedded_overrides, *extra, quick=quick)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "validation: 5 tasks spread over 2 processes" in result.stdout + result.stderr
    code, err = single_device(
        tmp_path / "p1", embedded_overrides, *extra, capsys=capsys, quick=quick
    )
    assert code == 0, err[-3000:]
    assert "spread over" not in err
    rows = {p: (tmp_path / f"p{p}" / "validation.jsonl").read_text().splitlines() for p in (1, 2)}
    assert json.loads(rows[2][0]) == json.loads(rows[1][0])
    assert json.loads(rows[1][0])["epoch"] == 0


def test_a_failing_rank_stops_the_whole_job_with_its_error(embedded_overrides, tmp_path):
    start = time.perf_counter()
    result = launch(
        2,
        tmp_path / "fail",
        embedded_overrides,
        "epochs=1",
        "collective_timeout_s=60",
        script="tests/distributed_scripts/failing_rank_recipe.py",
        timeout=180,
    )
    elapsed = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rank 1 of 2 failed (RuntimeError: injected failure on rank 1)" in output
    assert elapsed < 120, elapsed  # stopped by torchrun, well before the collective timeout


def test_a_collective_with_a_vanished_peer_fails_within_the_timeout(tmp_path):
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += ["tests/distributed_scripts/vanishing_peer.py", "5"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "rank 0: collective failed after" in result.stdout + result.stderr
    assert time.perf_counter() - start < 90


def test_evaluation_spreads_tasks_over_two_processes_with_the_same_results(
    embedded_overrides, tmp_path, capsys
):
    # only a checkpoint is needed: trained in this process
    trained = tmp_path / "train"
    code, err = single_device(trained, embedded_overrides, "stop_after_visits=4", capsys=capsys)
    assert code == 0, err[-3000:]
    evaluation = ["--config", "configs/tiny_cpu_eval.yaml", *embedded_overrides]
    evaluation += [
        "evaluation.seeds=[100]",
        f"adapter_checkpoint={trained / 'checkpoints' / 'latest'}",
        "evaluation.max_tasks=5",
        "evaluation.samples=[1]",  # one posterior sample: the split over ranks is tested
    ]
    # the reference: the plain single-process evaluation, in this process
    code, _, err = helpers.tune_run(
        "evaluate_few_shot", *evaluation[1:], f"output_dir={tmp_path / 'eval1'}", capsys=capsys
    )
    assert code == 0, err[-3000:]
    cmd = [TUNE, "run", "--nproc_per_node", "2", "--standalone", "recipes/evaluate_few_shot"]
    cmd += [*evaluation, f"output_dir={tmp_path / 'eval2'}"]
    result = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    results = {p: json.loads((tmp_path / f"eval{p}" / "results.json").read_text()) for p in (1, 2)}
    assert results[2]["tasks"] == results[1]["tasks"] and len(results[1]["tasks"]) == 5
    assert results[2]["metrics"] == results[1]["metrics"]
    assert (results[1]["processes"], results[2]["processes"]) == (1, 2)
    p1 = (tmp_path / "eval1" / "predictions.jsonl").read_text()
    assert p1.count("\n") > 0
    assert (tmp_path / "eval2" / "predictions.jsonl").read_text() == p1


def test_a_sharded_base_builds_and_trains_under_compile(embedded_overrides, tmp_path):
    # shard_base with compile re-read W0's variance from the DTensor shards (an
    # AssertionError at build); one process on gloo, compile traced with aot_eager
    env = {**ENV, "TORCH_COMPILE_BACKEND": "aot_eager"}
    cmd = [TUNE, "run", "--nproc_per_node", "1", "--standalone", "recipes/abmll_meta_distributed",
           "--config", CONFIG["abmll"], f"output_dir={tmp_path / 'out'}", *embedded_overrides, *QUICK,
           "shard_base=true", "compile=true", "stop_after_visits=1"]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoints" / "latest" / "adapters.safetensors").is_file()
