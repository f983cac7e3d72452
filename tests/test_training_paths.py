"""Every training path a paper-scale config uses, exercised on the CPU with the tiny model:
bf16, activation checkpointing, torch.compile and torchtune's chunked cross-entropy, each
against the plain fp32 path with the same seeds (a few ABMLL task visits)."""

import helpers
import pytest
import torch
from safetensors.torch import load_file

QUICK = [
    "epochs=1",
    "validation=null",
    "save_every_n_visits=null",
    "log_peak_memory_stats=false",
    # Adam normalises each step, so a rounding-level gradient difference on an entry with a
    # near-zero gradient becomes a whole step of difference (measured under compile with
    # eps 1e-8: 2e-3, one step of lr 1e-3, after one visit); a larger eps keeps the step
    # linear in such gradients, so differences stay at the rounding level they come from
    "inner_optimizer.eps=1e-3",
    "outer_optimizer.eps=1e-3",
]


def _run(tmp_path, name, overrides, extra, capsys=None, visits=3):
    out = tmp_path / name
    code, _, err = helpers.tune_run(
        "abmll_meta_single_device",
        "configs/tiny_cpu_abmll.yaml",
        f"output_dir={out}",
        *overrides,
        *QUICK,
        f"stop_after_visits={visits}",
        *extra,
        capsys=capsys,
    )
    assert code == 0, err[-3000:]
    nll = helpers.logged(out, "nll")
    adapters = load_file(str(out / "checkpoints" / "latest" / "adapters.safetensors"))
    return nll, adapters, err


@pytest.fixture(scope="module")
def plain(embedded_overrides, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("plain"), "plain", embedded_overrides, [], None)


def _close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(
            a[k].float(), b[k].float(), rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
        )


# (overrides, task visits, nll tolerance, adapter rtol, adapter atol): why each is what it is
PATHS = {
    # recomputation restores the RNG state, so the noise and the arithmetic are the same
    "activation_checkpointing": (["enable_activation_checkpointing=true"], 3, 0.0, 0.0, 0.0),
    # the answer logits are one chunk of one position: the same cross-entropy
    "chunked_loss": (
        ["loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss"],
        3,
        1e-6,
        1e-6,
        1e-8,
    ),
    # torchtune's compile_model and compile_loss with the aot_eager backend (below): dynamo's
    # graphs and AOTAutograd's joint forward-backward, the part the CUDA path shares; only
    # inductor's CPU C++ code generation is left out (2 minutes cold on 2 cores, and no CPU
    # config compiles; the GPU check compiles with inductor on the device). Decomposed ops
    # reorder a little float32 arithmetic: measured after 3 visits 5e-8 in the loss, 2.4e-7
    # in the adapters (inductor: 2e-2 and 2e-3)
    "compile": (["compile=true"], 3, 1e-6, 0.0, 1e-5),
}


@pytest.mark.parametrize("path", PATHS, ids=list(PATHS))
def test_training_path_agrees_with_the_plain_path(
    path, plain, embedded_overrides, tmp_path, capsys, monkeypatch
):
    extra, visits, nll_tol, rtol, atol = PATHS[path]
    if path == "compile":
        monkeypatch.setenv("TORCH_COMPILE_BACKEND", "aot_eager")  # torchtune's compile_* read it
    try:
        nll, adapters, _ = _run(tmp_path, path, embedded_overrides, extra, capsys, visits)
    finally:
        if path == "compile":
            torch._dynamo.reset()
    ref_nll, ref_adapters, _ = plain
    assert len(nll) == len(ref_nll) == visits and all(v == v for v in nll)
    assert max(abs(a - b) for a, b in zip(nll, ref_nll, strict=True)) <= nll_tol, (nll, ref_nll)
    _close(adapters, ref_adapters, rtol, atol)


def test_bf16_trains_with_finite_losses_near_fp32(plain, embedded_overrides, tmp_path, caplog):
    nll, adapters, _ = _run(tmp_path, "bf16", embedded_overrides, ["dtype=bf16"])
    ref_nll, ref_adapters, _ = plain
    print(f"bf16 NLL {nll} fp32 NLL {ref_nll} torch {torch.__version__}")  # -rA shows it
    assert "bf16 on the CPU is about 30x slower" in caplog.text  # a warning, the run goes on
    assert len(nll) == 3 and all(v == v and abs(v) < 1e3 for v in nll)
    # bf16 keeps 8 bits of mantissa (relative rounding 4e-3 per operation), amplified by
    # Adam's steps from visit to visit. Measured |bf16 - fp32| per visit (losses ~6.6):
    # torch 2.13 (this CPU) 0.017, 0.051, 0.079; torch 2.11 (the lent H100 machine's CPU,
    # bench/device/run_on_device.sh, 2026-12-05) 0.030, 0.075, 0.154. The first visit is one
    # visit's rounding; later ones hold Adam's amplification, which differs between torch
    # versions' bf16 kernels, hence the wider bound
    diffs = [abs(a - b) for a, b in zip(nll, ref_nll, strict=True)]
    assert diffs[0] < 0.05 and max(diffs) < 0.25, (nll, ref_nll)
    # the adapters themselves drift apart (measured: 13% of one layer's entries by more
    # than 1e-2): finite, in bf16, of the same names and shapes
    assert all(v.dtype == torch.bfloat16 and bool(v.isfinite().all()) for v in adapters.values())
    assert {k: v.shape for k, v in adapters.items()} == {
        k: v.shape for k, v in ref_adapters.items()
    }
