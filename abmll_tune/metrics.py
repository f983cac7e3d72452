"""Accuracy and calibration of option probabilities (``docs/method.md``, "Evaluation").

Every metric takes ``probs`` (one row per question: the probabilities of its options,
summing to 1; padded options are NaN) and ``gold`` (the correct option's index):

* accuracy - the argmax option is the gold one (ties: the first option);
* ECE - expected calibration error with 15 equal-width bins on the top-label
  confidence, as a fraction (not a percentage): sum_b n_b / N |acc_b - conf_b|. Bins are
  (k/15, (k+1)/15], with a confidence of exactly 0 in the first bin and exactly 1 in
  the last (Guo et al. 2017);
* MCE - the maximum of |acc_b - conf_b| over non-empty bins;
* NLL - mean of -log p(gold) (p clamped at 1e-12);
* Brier - mean over questions of sum_k (p_k - 1[k = gold])^2 over the question's options.

Per-task values are macro-averaged over tasks; over seeds, mean and standard error
(sample standard deviation / sqrt(n)).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

N_BINS = 15
METRICS = ("accuracy", "ece", "mce", "nll", "brier")


def _as_arrays(probs, gold) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    g = np.asarray(gold, dtype=np.int64)
    if p.ndim != 2 or g.shape != (p.shape[0],):
        raise ValueError(f"probs must be (N, options) and gold (N,), got {p.shape} and {g.shape}")
    if p.shape[0] == 0:
        raise ValueError("no predictions")
    return p, g


def confidences_and_correct(probs, gold) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_arrays(probs, gold)
    filled = np.where(np.isnan(p), -np.inf, p)
    pred = filled.argmax(axis=1)
    return filled.max(axis=1), (pred == g).astype(np.float64)


def bin_index(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin k holds confidences in (k/n, (k+1)/n]; 0 goes to bin 0, 1 to bin n - 1."""
    # round first: 0.2 * 15 is 3.0000000000000004 in floating point, and 0.2 = 3/15 closes bin 2
    return np.clip(np.ceil(np.round(confidence * n_bins, 9)).astype(np.int64) - 1, 0, n_bins - 1)


def reliability(probs, gold, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per bin: count, mean confidence and accuracy (NaN where empty)."""
    conf, correct = confidences_and_correct(probs, gold)
    idx = bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {
        "count": count,
        "confidence": mean_conf,
        "accuracy": accuracy,
        "edges": np.linspace(0, 1, n_bins + 1),
    }


def expected_calibration_error(probs, gold, n_bins: int = N_BINS) -> float:
    r = reliability(probs, gold, n_bins)
    nonempty = r["count"] > 0
    gaps = np.abs(r["accuracy"][nonempty] - r["confidence"][nonempty])
    return float((r["count"][nonempty] / r["count"].sum() * gaps).sum())


def maximum_calibration_error(probs, gold, n_bins: int = N_BINS) -> float:
    r = reliability(probs, gold, n_bins)
    nonempty = r["count"] > 0
    return float(np.abs(r["accuracy"][nonempty] - r["confidence"][nonempty]).max())


def accuracy(probs, gold) -> float:
    return float(confidences_and_correct(probs, gold)[1].mean())


def negative_log_likelihood(probs, gold) -> float:
    p, g = _as_arrays(probs, gold)
    return float(-np.log(np.clip(p[np.arange(len(g)), g], 1e-12, None)).mean())


def brier_score(probs, gold) -> float:
    p, g = _as_arrays(probs, gold)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(g)), g] = 1.0
    return float(np.nansum((p - onehot) ** 2, axis=1).mean())


def all_metrics(probs, gold) -> dict[str, float]:
    return {
        "accuracy": accuracy(probs, gold),
        "ece": expected_calibration_error(probs, gold),
        "mce": maximum_calibration_error(probs, gold),
        "nll": negative_log_likelihood(probs, gold),
        "brier": brier_score(probs, gold),
    }


def mean_categorical_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of KL(p_row || q_row) in nats; rows padded with zeros (options a
    question lacks, :func:`pad_probs`) contribute nothing where p is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return float(np.nansum(terms, axis=1).mean())


def pad_probs(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows of different option counts as one NaN-padded array."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def format_mean_se(m: dict) -> str:
    """``mean +- se``, or ``mean +- n/a`` for a single seed (whose SE is no measurement)."""
    se = "n/a" if m.get("n", 2) < 2 else f"{m['se']:.3f}"
    return f"{m['mean']:.3f} +- {se}"


def mean_and_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for a single value)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se


def summarize(predictions: Iterable[dict]) -> dict:
    """Metrics from prediction records (``task``, ``seed``, ``variant``, ``prune``,
    ``probs``, ``gold``): per task and seed, macro over tasks, mean +- SE over seeds,
    for every (variant, prune) pair."""
    groups: dict[tuple, dict[tuple, list]] = {}
    for r in predictions:
        key = (r["variant"], float(r.get("prune", 0.0)))
        groups.setdefault(key, {}).setdefault((r["seed"], r["task"]), []).append(r)
    out = {}
    for (variant, prune), cells in sorted(groups.items()):
        per_task: dict[int, dict[str, dict]] = {}
        for (seed, task), rows in sorted(cells.items()):
            per_task.setdefault(seed, {})[task] = all_metrics(
                pad_probs([r["probs"] for r in rows]), [r["gold"] for r in rows]
            )
        macro = {
            seed: {m: float(np.mean([t[m] for t in tasks.values()])) for m in METRICS}
            for seed, tasks in per_task.items()
        }
        over_seeds = {
            m: dict(
                zip(("mean", "se"), mean_and_se(v[m] for v in macro.values()), strict=True),
                n=len(macro),  # seeds: one seed has no standard error (shown as n/a)
            )
            for m in METRICS
        }
        out[f"{variant}@{prune:g}"] = {
            "variant": variant,
            "prune": prune,
            "per_task": {str(s): t for s, t in per_task.items()},
            "macro": {str(s): m for s, m in macro.items()},
            "summary": over_seeds,
        }
    return out
