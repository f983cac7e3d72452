"""Metrics on hand-computed cases and against torchmetrics' implementation."""

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from abmll_tune.metrics import (
    accuracy,
    all_metrics,
    bin_index,
    brier_score,
    expected_calibration_error,
    format_mean_se,
    maximum_calibration_error,
    mean_and_se,
    negative_log_likelihood,
    pad_probs,
    summarize,
)


def test_all_correct_and_all_wrong():
    probs = [[0.9, 0.1], [0.2, 0.8]]
    assert accuracy(probs, [0, 1]) == 1.0
    assert accuracy(probs, [1, 0]) == 0.0
    # all correct with confidences 0.9 and 0.8: both in their own bins, gaps 0.1 and 0.2
    assert expected_calibration_error(probs, [0, 1]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.2)
    assert expected_calibration_error(probs, [1, 0]) == pytest.approx(0.5 * 0.9 + 0.5 * 0.8)
    assert maximum_calibration_error(probs, [1, 0]) == pytest.approx(0.9)


def test_confidence_of_exactly_one_and_zero_bin_correctly():
    assert bin_index(np.array([0.0, 1.0, 1 / 15, 0.2, 0.2000001])).tolist() == [0, 14, 0, 2, 3]
    # a confident correct answer is perfectly calibrated
    assert expected_calibration_error([[1.0, 0.0]], [0]) == 0.0
    assert expected_calibration_error([[1.0, 0.0]], [1]) == 1.0
    assert negative_log_likelihood([[1.0, 0.0]], [1]) == pytest.approx(-math.log(1e-12))


def test_one_bin_and_ties():
    # four questions, all at confidence 0.6 (one bin), half right: ECE = |0.5 - 0.6|
    probs = [[0.6, 0.4]] * 4
    assert expected_calibration_error(probs, [0, 0, 1, 1]) == pytest.approx(0.1)
    assert maximum_calibration_error(probs, [0, 0, 1, 1]) == pytest.approx(0.1)
    # a tie predicts the first option
    assert accuracy([[0.5, 0.5]], [0]) == 1.0 and accuracy([[0.5, 0.5]], [1]) == 0.0


def test_nll_and_brier_by_hand():
    probs = [[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]
    assert negative_log_likelihood(probs, [0, 2]) == pytest.approx(
        -(math.log(0.7) + math.log(0.5)) / 2
    )
    brier = ((0.3**2 + 0.2**2 + 0.1**2) + (0.25**2 + 0.25**2 + 0.5**2)) / 2
    assert brier_score(probs, [0, 2]) == pytest.approx(brier)


def test_padded_options_are_ignored():
    probs = pad_probs([[0.7, 0.3], [0.1, 0.2, 0.7]])
    assert np.isnan(probs[0, 2])
    assert accuracy(probs, [0, 2]) == 1.0
    assert brier_score(probs, [0, 2]) == pytest.approx(
        ((0.3**2) * 2 + (0.1**2 + 0.2**2 + 0.3**2)) / 2
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_and_mce_match_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(500, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    gold = rng.integers(0, 4, size=500)
    t_probs, t_gold = torch.tensor(probs), torch.tensor(gold)
    ece = multiclass_calibration_error(t_probs, t_gold, num_classes=4, n_bins=15, norm="l1")
    mce = multiclass_calibration_error(t_probs, t_gold, num_classes=4, n_bins=15, norm="max")
    assert expected_calibration_error(probs, gold) == pytest.approx(float(ece), abs=1e-6)
    assert maximum_calibration_error(probs, gold) == pytest.approx(float(mce), abs=1e-6)


def test_mean_and_standard_error():
    mean, se = mean_and_se([0.6, 0.7, 0.8])
    assert mean == pytest.approx(0.7) and se == pytest.approx(
        np.std([0.6, 0.7, 0.8], ddof=1) / math.sqrt(3)
    )
    assert mean_and_se([0.5]) == (0.5, 0.0)


def test_summarize_macro_is_the_average_of_tasks_and_seeds_give_se():
    rng = np.random.default_rng(0)
    records = []
    for seed in (1, 2):
        for task in ("a", "b", "c"):
            for i in range(20):
                p = rng.dirichlet([1, 1, 1])
                records.append(
                    {
                        "task": task,
                        "id": f"{task}{i}",
                        "seed": seed,
                        "variant": "mean",
                        "prune": 0.0,
                        "probs": p.tolist(),
                        "gold": int(rng.integers(3)),
                    }
                )
    out = summarize(records)["mean@0"]
    for seed in ("1", "2"):
        per_task = out["per_task"][seed]
        for metric in ("accuracy", "ece", "nll", "brier", "mce"):
            assert out["macro"][seed][metric] == pytest.approx(
                np.mean([per_task[t][metric] for t in "abc"])
            )
        rows = [r for r in records if r["seed"] == int(seed) and r["task"] == "a"]
        assert per_task["a"] == all_metrics([r["probs"] for r in rows], [r["gold"] for r in rows])
    accs = [out["macro"][s]["accuracy"] for s in ("1", "2")]
    assert out["summary"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert out["summary"]["accuracy"]["se"] == pytest.approx(np.std(accs, ddof=1) / math.sqrt(2))
    assert out["summary"]["accuracy"]["n"] == 2
    se = out["summary"]["accuracy"]["se"]
    assert format_mean_se(out["summary"]["accuracy"]) == f"{np.mean(accs):.3f} +- {se:.3f}"
    one_seed = summarize([r for r in records if r["seed"] == 1])["mean@0"]["summary"]["accuracy"]
    # a single seed has no standard error: never shown as "+- 0.000"
    assert one_seed["n"] == 1 and format_mean_se(one_seed) == f"{one_seed['mean']:.3f} +- n/a"
