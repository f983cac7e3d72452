"""Crash windows, damaged checkpoints and start-up errors, each as a user would meet it."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import helpers
import pytest
import torch
from safetensors.torch import load_file, save_file

from abmll_tune.checkpointing import CheckpointError, load_training_checkpoint
from abmll_tune.embedded.backbone import TINY_EMBEDDED
from abmll_tune.io import atomic_directory, recover_directory
from abmll_tune.models import abmll_llama3

REPO = Path(__file__).resolve().parents[1]


def tune_run(out, overrides, *extra, capsys, method="abmll", config=None):
    recipe = "abmll_meta_single_device" if method == "abmll" else "reptile_single_device"
    code, _, err = helpers.tune_run(
        recipe,
        config or f"configs/tiny_cpu_{method}.yaml",
        f"output_dir={out}",
        *overrides,
        *extra,
        capsys=capsys,
    )
    return code, err


def killed_during_replacement(target: Path, kill_at_rename: int) -> subprocess.CompletedProcess:
    """Replace ``target`` with atomic_directory in a child process that is killed
    (os._exit, no cleanup) at its ``kill_at_rename``-th os.replace (0: while building)."""
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from abmll_tune.io import atomic_directory
        real, calls = os.replace, []
        def replace(a, b):
            calls.append(a)
            if len(calls) == {kill_at_rename}:
                os._exit(9)
            return real(a, b)
        os.replace = replace
        with atomic_directory(Path({str(target)!r})) as tmp:
            (tmp / "version").write_text("new")
            if {kill_at_rename} == 0:
                os._exit(9)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("kill_at_rename, expect", [(0, "old"), (1, "old"), (2, "new")])
def test_a_kill_inside_a_directory_replacement_never_loses_the_directory(
    tmp_path, kill_at_rename, expect
):
    target = tmp_path / "latest"
    with atomic_directory(target) as tmp:
        (tmp / "version").write_text("old")
    assert killed_during_replacement(target, kill_at_rename).returncode == 9
    if kill_at_rename == 2:  # between the two renames: the old window of no directory
        assert not target.exists()
    done = recover_directory(target)
    assert (target / "version").read_text() == expect
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no stale temporaries
    assert done and recover_directory(target) == []


def test_resume_completes_an_interrupted_checkpoint_swap(embedded_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = tune_run(out, embedded_overrides, "epochs=1", "stop_after_visits=4", capsys=capsys)
    assert code == 0, err[-2000:]
    latest = out / "checkpoints" / "latest"
    before = load_file(str(latest / "adapters.safetensors"))
    # the state a kill between the two renames of the next replacement leaves
    pending = out / "checkpoints" / ".latest.abcd1234"
    latest.rename(pending)
    (out / "checkpoints" / ".latest.abcd1234.complete").touch()
    (out / "checkpoints" / ".latest.old.zzzz9999").mkdir()
    code, err = tune_run(
        out, embedded_overrides, "epochs=1", "stop_after_visits=6", "resume_from_checkpoint=true",
        capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "latest"]
    meta = json.loads((latest / "meta.json").read_text())
    assert meta["progress"]["visits"] == 6
    assert set(load_file(str(latest / "adapters.safetensors"))) == set(before)


def test_resume_without_a_checkpoint_says_what_to_do_and_writes_nothing(
    embedded_overrides, tmp_path, capsys
):
    out = tmp_path / "fresh"
    code, err = tune_run(
        out, embedded_overrides, "epochs=1", "resume_from_checkpoint=true", capsys=capsys
    )
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "start without resume_from_checkpoint" in lines[0]
    assert not out.exists()  # no logs/, no torchtune_config.yaml


def validation_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]


def test_a_stop_after_the_last_periodic_checkpoint_of_an_epoch_keeps_its_epoch_end_work(
    embedded_overrides, tmp_path, capsys
):
    # 40 training tasks: save_every_n_visits=40 checkpoints at the epoch's last visit, and
    # stop_after_visits=40 stops right there, before the epoch-end validation
    common = ["epochs=1", "save_every_n_visits=40", "validation.max_tasks=4", "inner_steps=2"]
    straight = tmp_path / "straight"
    assert tune_run(straight, embedded_overrides, *common, capsys=capsys)[0] == 0
    cut = tmp_path / "cut"
    assert tune_run(cut, embedded_overrides, *common, "stop_after_visits=40", capsys=capsys)[0] == 0
    assert [r["epoch"] for r in validation_rows(cut)] == [0]  # the epoch-end work is pending
    code, err = tune_run(
        cut, embedded_overrides, *common, "resume_from_checkpoint=true", capsys=capsys
    )
    assert code == 0, err[-2000:]
    assert validation_rows(cut) == validation_rows(straight)
    for name in ("latest", "best", "epoch_0"):
        a = load_file(str(straight / "checkpoints" / name / "adapters.safetensors"))
        b = load_file(str(cut / "checkpoints" / name / "adapters.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    meta = json.loads((cut / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["progress"]["epoch_end"] is True


@pytest.fixture(scope="module")
def checkpoint(embedded_overrides, tmp_path_factory):
    """A real ABMLL checkpoint of the tiny model (a few visits)."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    code, _, err = helpers.tune_run(
        "abmll_meta_single_device",
        "configs/tiny_cpu_abmll.yaml",
        f"output_dir={out}",
        *embedded_overrides,
        "epochs=1",
        "stop_after_visits=2",
        "validation=null",
    )
    assert code == 0, err
    return out / "checkpoints" / "latest"


def damaged_copy(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "latest"
    copy.mkdir()
    for f in checkpoint.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    return copy


def tiny_model():
    return abmll_llama3(**TINY_EMBEDDED, std_b_init_std=1e-3)


def test_a_tensor_of_the_wrong_shape_is_refused_by_name(checkpoint, tmp_path):
    copy = damaged_copy(checkpoint, tmp_path)
    tensors = load_file(str(copy / "adapters.safetensors"))
    name = next(k for k in tensors if k.endswith("q_proj.lora_local_mean_a.weight"))
    assert tensors[name].shape == (8, 64)
    tensors[name] = tensors[name][:1].clone()  # (1, 64) would broadcast into (8, 64)
    save_file(tensors, str(copy / "adapters.safetensors"))  # meta.json still says (8, 64)
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=rf"{name}: shape \[1, 64\] in the file, \[8, 64\]"):
        load_training_checkpoint(copy, model, "abmll")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # untouched


@pytest.mark.parametrize("damage", ["truncate", "drop_state", "pickle_with_code", "not_a_dict"])
def test_damaged_files_give_one_clear_error_and_never_suggest_unpickling(
    checkpoint, tmp_path, damage
):
    copy = damaged_copy(checkpoint, tmp_path)
    witness = tmp_path / "code_ran"
    if damage == "truncate":
        data = (copy / "adapters.safetensors").read_bytes()
        (copy / "adapters.safetensors").write_bytes(data[: len(data) // 2])
        match = r"adapters.safetensors: not a readable safetensors file"
    elif damage == "drop_state":
        (copy / "training_state.pt").unlink()
        match = r"training_state.pt: missing"
    elif damage == "pickle_with_code":

        class Payload:
            def __reduce__(self):
                return (Path.touch, (witness,))

        torch.save({"learner": Payload(), "rng": {}}, copy / "training_state.pt")
        match = r"training_state.pt: not a plain tensor file"
    else:
        torch.save([1, 2, 3], copy / "training_state.pt")
        match = r"training_state.pt: not an abmll-tune training state"
    with pytest.raises(CheckpointError, match=match) as info:
        load_training_checkpoint(copy, tiny_model(), "abmll")
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
    assert not witness.exists()


def test_a_damaged_checkpoint_stops_resume_and_evaluation_with_status_2(
    checkpoint, embedded_overrides, tmp_path, capsys
):
    run = tmp_path / "run"
    latest = run / "checkpoints" / "latest"
    latest.parent.mkdir(parents=True)
    latest.mkdir()
    for f in checkpoint.iterdir():
        if f.is_file():
            (latest / f.name).write_bytes(f.read_bytes())
    data = (latest / "adapters.safetensors").read_bytes()
    (latest / "adapters.safetensors").write_bytes(data[:100])
    code, err = tune_run(
        run, embedded_overrides, "epochs=1", "resume_from_checkpoint=true", capsys=capsys
    )
    assert code == 2 and "adapters.safetensors: not a readable safetensors file" in err
    assert "Traceback" not in err and not (run / "logs").exists()
    code, _, err = helpers.tune_run(
        "evaluate_few_shot",
        "configs/tiny_cpu_eval.yaml",
        f"output_dir={tmp_path / 'eval'}",
        *embedded_overrides,
        "method=abmll",
        f"adapter_checkpoint={latest}",
        capsys=capsys,
    )
    assert code == 2 and "not a readable safetensors file" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.lora_rnk=8"], "model.lora_rnk: 8 is not an argument of abmll_tune.models.abmll_llama3 (did you mean 'lora_rank'?)"),
        (["checkpointer.checkpoint_dir=/nonexistent/model"], "checkpointer.checkpoint_dir: '/nonexistent/model' is not a directory"),
        (["tokenizer.path=/nonexistent/tokenizer.model"], "tokenizer.path: '/nonexistent/tokenizer.model' does not exist"),
        (["data.max_seq_lenn=64"], "data.max_seq_lenn: 64 is not an argument of abmll_tune.data.task_data (did you mean 'max_seq_len'?)"),
    ],
)  # fmt: skip
def test_component_errors_are_one_line_exit_2_and_write_nothing(
    embedded_overrides, tmp_path, capsys, extra, message
):
    out = tmp_path / "out"
    code, err = tune_run(out, embedded_overrides, "epochs=1", *extra, capsys=capsys)
    assert code == 2, err[-2000:]
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_failing_resume_leaves_the_good_runs_config_and_logs_alone(
    checkpoint, embedded_overrides, tmp_path, capsys
):
    run = checkpoint.parent.parent
    config = (run / "torchtune_config.yaml").read_text()
    logs = sorted(p.name for p in (run / "logs").iterdir())
    code, err = tune_run(
        run, embedded_overrides, "epochs=1", "resume_from_checkpoint=true", "model.lora_rank=4",
        capsys=capsys,
    )  # fmt: skip
    assert code == 2 and "does not fit the model" in err
    assert (run / "torchtune_config.yaml").read_text() == config
    assert sorted(p.name for p in (run / "logs").iterdir()) == logs


def test_project_commands_do_not_print_torchaos_cpp_extension_notice():
    result = subprocess.run(
        [sys.executable, "-m", "abmll_tune.data", "splits"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0
    assert "cls45" in result.stdout
    assert "Skipping import of cpp extensions" not in result.stderr + result.stdout


# ------------------------------------------------------------------ one run per directory

QUICK = ("epochs=1", "stop_after_visits=2", "validation.max_tasks=1", "validation.adapt_steps=1")


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_a_run_never_overwrites_another_unless_asked(embedded_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = tune_run(out, embedded_overrides, *QUICK, capsys=capsys)
    assert code == 0, err[-2000:]
    before = _tree(out)
    code, err = tune_run(out, embedded_overrides, *QUICK, "seed=1", capsys=capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert (
        "holds another run" in lines[0] and "checkpoints/latest: epoch 0, 2 task visits" in lines[0]
    )
    for option in (
        "resume_from_checkpoint=true",
        "another output_dir",
        "overwrite_output_dir=true",
    ):
        assert option in lines[0]
    assert _tree(out) == before  # nothing written, nothing removed
    # asked explicitly: the old run's files go first, so nothing of the two is mixed
    (out / "checkpoints" / "epoch_7").mkdir()  # a stand-in for a longer old run's epochs
    (out / "checkpoints" / "epoch_7" / "meta.json").write_text("{}")
    code, err = tune_run(
        out, embedded_overrides, *QUICK, "seed=1", "overwrite_output_dir=true", capsys=capsys
    )
    assert code == 0, err[-2000:]
    assert not (out / "checkpoints" / "epoch_7").exists()
    # the new run's own logs survive the clearing (it happens before they are opened)
    assert [p.stat().st_size > 0 for p in (out / "logs").glob("log_*.txt")] == [True]
    rows = (out / "validation.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0]
    assert not (out / ".run.lock").exists()  # released at the end
    code, err = tune_run(
        out, embedded_overrides, *QUICK, "resume_from_checkpoint=true",
        "overwrite_output_dir=true", capsys=capsys,
    )  # fmt: skip
    assert code == 2 and "set one" in err


def test_a_directory_in_use_is_refused_and_a_killed_runs_lock_taken_over(
    embedded_overrides, tmp_path, capsys, caplog
):
    import os
    import socket

    out = tmp_path / "run"
    out.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": alive.pid, "host": socket.gethostname(), "started": 0}
        (out / ".run.lock").write_text(json.dumps(holder))
        code, err = tune_run(out, embedded_overrides, *QUICK, capsys=capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1, err[-2000:]
        assert f"in use by another run (process {alive.pid}" in lines[0]
        assert sorted(os.listdir(out)) == [".run.lock"]  # nothing else written
    finally:
        alive.kill()
        alive.wait()
    # the holder is gone (killed): its lock is stale, taken over, and released at the end
    code, err = tune_run(out, embedded_overrides, *QUICK, capsys=capsys)
    assert code == 0, err[-2000:]
    assert f"took over {out / '.run.lock'} left by process {alive.pid}" in err + caplog.text
    assert not (out / ".run.lock").exists() and (out / "checkpoints" / "latest").is_dir()


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(
    embedded_overrides, tmp_path, capsys, monkeypatch
):
    from safetensors import SafetensorError

    from abmll_tune import checkpointing

    out = tmp_path / "run"
    real, calls = checkpointing.save_file, []

    def save_file(*args, **kwargs):  # the disk fills at the second write of latest/
        if Path(args[1]).parent.name.startswith(".latest."):
            calls.append(args[1])
        if len(calls) > 1:
            raise SafetensorError(
                "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                '"No space left on device" })'
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", save_file)
    code, err = tune_run(
        out, embedded_overrides, "epochs=1", "save_every_n_visits=1", "validation.max_tasks=1",
        "validation.adapt_steps=1", capsys=capsys,
    )  # fmt: skip
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "no space left on device while writing under" in lines[0] and str(out) in lines[0]
    assert f"{out / 'checkpoints' / 'latest'} is intact" in lines[0]
    assert not list((out / "checkpoints").glob(".*"))  # no temporaries left
    assert not (out / ".run.lock").exists()
    monkeypatch.setattr(checkpointing, "save_file", real)
    code, err = tune_run(
        out, embedded_overrides, "epochs=1", "save_every_n_visits=1", "validation.max_tasks=1",
        "validation.adapt_steps=1", "resume_from_checkpoint=true", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err[-2000:]
