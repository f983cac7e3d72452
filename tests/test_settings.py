"""The typed settings: the docs' tables come from them, and their checks name the key."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from abmll_tune.evaluation import EvalSettings
from abmll_tune.methods import ABMLL
from abmll_tune.modules import gaussian
from abmll_tune.settings import check_settings, setting
from abmll_tune.settings_tables import generated_pages, render_readme

TRAINING = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def test_the_documented_tables_are_generated_from_the_settings_classes():
    pages = {p.name: p.read_text() for p in generated_pages()}
    for name in ("RecipeSettings", "ABMLL", "Reptile", "StructuredLoRA"):
        assert f"<!-- settings: {name} -->" in pages["training.md"]
    assert "<!-- settings: EvalSettings -->" in pages["evaluation.md"]
    for name, text in pages.items():
        assert render_readme(text) == text, f"{name}: run python -m abmll_tune.settings_tables"


def test_a_drifted_table_is_detected():
    text = TRAINING.read_text()
    drifted = text.replace("| `beta` | 5e-10 |", "| `beta` | 1e-3 |")
    assert drifted != text and render_readme(drifted) != drifted


@dataclass(frozen=True)
class _Example:
    name: str = setting(doc="required")
    rate: float = setting(0.1, doc="a rate", minimum=0)
    mode: str = setting("a", doc="a mode", choices=("a", "b"))
    sizes: tuple[int, ...] = setting((1,), doc="sizes")
    limit: int | None = setting(None, doc="optional")
    evaluation: EvalSettings | None = setting(None, doc="nested")


@pytest.mark.parametrize(
    "values, message",
    [
        ({}, "name: missing required key"),
        ({"name": "x", "rate": -1}, "rate: must be >= 0, got -1"),
        ({"name": "x", "rate": True}, "rate: expected float, got bool True"),
        ({"name": "x", "mode": "c"}, "mode: 'c' is not one of ['a', 'b']"),
        ({"name": "x", "sizes": [1, "2"]}, "sizes: expected a list of int"),
        ({"name": "x", "rat": 1}, "rat: unknown key (did you mean 'rate'?)"),
        ({"name": "x", "evaluation": {"seedz": [1]}}, "evaluation.seedz: unknown key"),
        (
            {"name": "x", "evaluation": {"pruning_levels": [1.5]}},
            "pruning levels must be fractions",
        ),
    ],
)
def test_check_settings_names_the_key(values, message):
    instance, problems = check_settings(_Example, values)
    assert instance is None and any(message in p for p in problems), problems


def test_check_settings_fills_defaults_and_converts():
    instance, problems = check_settings(
        _Example, {"name": "x", "rate": 1, "sizes": [2, 3], "evaluation": {"seeds": [7]}}
    )
    assert problems == []
    assert instance.rate == 1.0 and isinstance(instance.rate, float)
    assert instance.sizes == (2, 3) and instance.evaluation.seeds == (7,)
    assert instance.limit is None and instance.mode == "a"


def test_a_method_validates_its_own_settings_when_built_in_python():
    with pytest.raises(ValueError, match="train_samples must be >= 1"):
        ABMLL(train_samples=0)


class _Square(gaussian.StdParam):
    """A std form added as one class: sigma = c + m^2 (no low-rank sampling variance)."""

    name = "square_test"

    def variance(self, m, floor):
        return (floor + m * m) ** 2

    def variance_inplace(self, m, floor, half_slope_out, log_out):
        sigma = m * m + floor
        if half_slope_out is not None:  # d sigma^2 / dm / 2 = 2 m sigma
            half_slope_out.copy_(2 * m * sigma)
        m.copy_(sigma * sigma)
        return None if log_out is None else torch.log(m).sum().to(torch.float64)


def test_a_new_std_form_is_one_class_and_the_kl_uses_it():
    torch.manual_seed(0)
    form = _Square()
    pairs = [
        (torch.randn(2, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64) * 0.3)
        for _ in range(4)
    ]
    leaves = [t.clone().requires_grad_(True) for pair in pairs for t in pair]
    q_mu, q_sd, p_mu, p_sd = [(leaves[2 * i], leaves[2 * i + 1]) for i in range(4)]
    kl = gaussian.kl_diag_gaussians(
        q_mu, q_sd, p_mu, p_sd, scale=2.0, floor=0.1, std_param=form, chunk_rows=3
    )

    def dense(pair):
        return 2.0 * pair[1] @ pair[0]

    var_q, var_p = form.variance(dense(q_sd), 0.1), form.variance(dense(p_sd), 0.1)
    diff = dense(q_mu) - dense(p_mu)
    reference = (0.5 * torch.log(var_p / var_q) + (var_q + diff**2) / (2 * var_p) - 0.5).sum()
    torch.testing.assert_close(kl, reference)
    grads = torch.autograd.grad(kl, leaves)
    expected = torch.autograd.grad(reference, leaves)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)
    # the sampling path uses the dense variance for a form without a low-rank one
    x2 = torch.rand(3, 5, dtype=torch.float64)
    got = gaussian.output_variance(x2, *q_sd, scale=2.0, floor=0.1, std_param=form)
    torch.testing.assert_close(got, x2 @ var_q.detach().transpose(0, 1))
