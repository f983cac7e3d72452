"""Adding a method is one new file: tests/zero_shot_method.py, selected by its
_component_, runs through the unchanged meta-training and evaluation recipes."""

import json

import helpers
from safetensors.torch import load_file


def _predictions(directory):
    rows = [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]
    return {(r["task"], r["id"], r["seed"]): r["probs"] for r in rows if r["variant"] == "mean"}


def test_a_one_file_method_trains_and_evaluates_through_the_recipes(
    embedded_overrides, tmp_path, capsys
):
    out = tmp_path / "zero_shot"
    code, _, err = helpers.tune_run(
        "abmll_meta_single_device",
        "configs/tiny_cpu_structured_lora.yaml",
        f"output_dir={out}",
        "method._component_=zero_shot_method.ZeroShot",
        "epochs=1",
        "stop_after_visits=4",
        "validation.max_tasks=2",
        *embedded_overrides,
        capsys=capsys,
    )
    assert code == 0, err[-3000:]
    meta = json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["method"] == "zero_shot"
    assert helpers.logged(out, "nll")  # the loop ran and measured
    # nothing was trained: the adapters equal the ones validated before training
    latest = load_file(str(out / "checkpoints" / "latest" / "adapters.safetensors"))
    initial = load_file(str(out / "checkpoints" / "best" / "adapters.safetensors"))
    assert latest.keys() == initial.keys()
    assert all(bool((latest[k] == initial[k]).all()) for k in latest)

    evaluation = ["evaluation.seeds=[100]", "evaluation.max_tasks=3", *embedded_overrides]
    code, _, err = helpers.tune_run(
        "evaluate_few_shot",
        "configs/tiny_cpu_eval.yaml",
        f"output_dir={tmp_path / 'eval_zero_shot'}",
        "~method",  # taken from the checkpoint
        f"adapter_checkpoint={out / 'checkpoints' / 'latest'}",
        *evaluation,
        capsys=capsys,
    )
    assert code == 0, err[-3000:]
    results = json.loads((tmp_path / "eval_zero_shot" / "results.json").read_text())
    assert results["method"] == "zero_shot"
    code, _, err = helpers.tune_run(
        "evaluate_few_shot",
        "configs/tiny_cpu_eval.yaml",
        f"output_dir={tmp_path / 'eval_pretrained'}",
        "method=pretrained",
        "adapter_checkpoint=null",
        "evaluation.adapt_steps=0",
        *evaluation,
        capsys=capsys,
    )
    assert code == 0, err[-3000:]
    # zero-shot = the base model unadapted: the same probabilities, bit for bit
    zero_shot = _predictions(tmp_path / "eval_zero_shot")
    pretrained = _predictions(tmp_path / "eval_pretrained")
    assert zero_shot and zero_shot == pretrained
