"""bench/device/device_kit.py (make device-kit): the pins it takes, the one-wheel-per-package and
size checks. Downloading is pip's; the whole kit is rehearsed by `make device-rehearsal`
(CI), which installs it with --target and runs bench/device/run_on_device.sh --cpu-smoke."""

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

spec = importlib.util.spec_from_file_location(
    "device_kit", REPO / "bench" / "device" / "device_kit.py"
)
device_kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(device_kit)


def test_kit_versions_are_the_constraints_pins():
    pins = device_kit.pinned_versions(REPO / "constraints.txt")
    assert list(pins) == list(device_kit.KIT_PACKAGES)
    # the same versions the project's own environment runs (pyproject pins a subset)
    import importlib.metadata as md

    assert pins == {name: md.version(name) for name in pins}


def test_pins_file_errors_name_the_line_and_the_missing(tmp_path):
    bad = tmp_path / "constraints.txt"
    bad.write_text("torch==2.13.0\ntorchtune>=0.6\n")
    with pytest.raises(device_kit.KitError, match=r"constraints.txt:2: not a 'name==version'"):
        device_kit.pinned_versions(bad)
    bad.write_text("# comment\ntorchtune==0.6.1\n")
    with pytest.raises(device_kit.KitError, match="pins no version of torchao, torchdata"):
        device_kit.pinned_versions(bad)


def test_one_wheel_per_package():
    wheels = [Path("torchao-0.15.0-cp310-abi3-manylinux_2_28_x86_64.whl")]
    wheels += [Path("abmll_tune-0.1.0-py3-none-any.whl")]
    device_kit.check_one_wheel_each(wheels, ["torchao", "abmll-tune"])
    with pytest.raises(device_kit.KitError, match="torchao: 2 wheels; dill: no wheel"):
        device_kit.check_one_wheel_each(
            [*wheels, Path("torchao-0.14.0-py3-none-any.whl")], ["torchao", "abmll-tune", "dill"]
        )


def test_size_limit_counts_the_kit_and_what_travels():
    tree = device_kit.tree_bytes()
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    assert tree >= sum(
        (REPO / f).stat().st_size for f in tracked.stdout.split() if (REPO / f).is_file()
    )
    device_kit.check_size(40 * 2**20, 7 * 2**20, 48)
    with pytest.raises(device_kit.KitError, match=r"= 49.0 MiB, over the 48 MiB"):
        device_kit.check_size(42 * 2**20, 7 * 2**20, 48)


def test_gpu_check_interrupted_keeps_the_parts_that_finished(tmp_path):
    # a timeout's SIGTERM (run_on_device.sh's guard) must leave a JSON with whole parts
    out = tmp_path / "gpu_check.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "device" / "gpu_check.py"),
        "--cpu-smoke",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_file() and "paper_step" in json.loads(out.read_text()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, output[-2000:]  # a check that did not finish does not pass
    report = json.loads(out.read_text())
    assert report["interrupted"] == "SIGTERM"
    assert "seconds" in report["paper_step"] and "environment" in report
    assert "interrupted (SIGTERM)" in output


def test_a_kit_is_tied_to_the_sources_it_was_built_from(tmp_path):
    # a copy of the project's wheel sources, a kit.json from them, then one source edit
    root = tmp_path / "tree"
    for top in device_kit.SOURCES:
        src = REPO / top
        if src.is_file():
            root.mkdir(exist_ok=True)
            (root / top).write_bytes(src.read_bytes())
        else:
            shutil.copytree(src, root / top, ignore=shutil.ignore_patterns("__pycache__"))
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "kit.json").write_text(json.dumps({"source_digest": device_kit.source_digest(root)}))
    assert device_kit.source_digest(root) == device_kit.source_digest(REPO)
    assert device_kit.check_kit(kit, root) == 0
    (root / "abmll_tune" / "meta.py").write_text("# edited\n")
    assert device_kit.check_kit(kit, root) == 1
    assert device_kit.check_kit(tmp_path / "missing", root) == 1


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location(
        "gpu_check", REPO / "bench" / "device" / "gpu_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_run_cut_by_the_budget_does_not_fail_the_gpu_check():
    gpu_check = _gpu_check_module()

    def report(*runs):
        parts = {p: {} for p in gpu_check.PARTS}
        return {**parts, "recipes": {"ok": True}, "methods": {"runs": list(runs)}}

    done = {"train_exit": 0, "eval_exit": 0}
    assert gpu_check._passed(report(done, {"train_exit": 124}, {"train_exit": 0, "eval_exit": 124}))
    assert not gpu_check._passed(report(done, {"train_exit": 1}))  # an error fails it
    assert not gpu_check._passed(report({"train_exit": 124}))  # nothing finished
    assert not gpu_check._passed({**report(done), "interrupted": "SIGTERM"})


def test_the_inductor_probe_records_a_failing_compiler(monkeypatch):
    import torch

    gpu_check = _gpu_check_module()

    def broken(*args, **kwargs):
        raise RuntimeError("no working C compiler")

    monkeypatch.setattr(torch, "compile", broken)
    probe = gpu_check.inductor_probe(torch.device("cpu"))
    assert probe["ok"] is False and "no working C compiler" in probe["error"]
    assert {"cc", "triton", "cache_dir", "cache_writable", "seconds"} <= set(probe)
