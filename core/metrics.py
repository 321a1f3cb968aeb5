"""The competition's metrics: ROC-AUC, tie-broken by TPR at FPR = 1e-3."""

from __future__ import annotations

import numpy as np

# scikit-learn is imported where a metric is computed, not here: importing it takes about a
# second, which every `python infer.py` call (it reaches this module through the blending
# code) would pay without computing a metric.

TIE_BREAK_FPR = 1e-3


def roc_auc(target: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC; NaN when only one class is present (undefined, not 0.5)."""
    target = np.asarray(target)
    if len(np.unique(target)) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(target, score))


def tpr_at_fpr(target: np.ndarray, score: np.ndarray, max_fpr: float = TIE_BREAK_FPR) -> float:
    """Highest true-positive rate over every threshold whose false-positive rate is at most `max_fpr`.

    A threshold t calls an image fake when its score is >= t; t runs over every distinct score
    (and above the highest, the point FPR = TPR = 0), so the answer is never below 0. A
    threshold cannot fall inside a tie: images with equal scores are all called fake or all
    real, so a tie that straddles the FPR limit counts whole or not at all (no interpolation
    between ROC points). Every ROC point is used (`drop_intermediate=False`): the default
    pruning drops points on straight ROC segments, one of which can be the best point under
    the limit, and how it prunes has changed between scikit-learn releases.
    """
    target = np.asarray(target)
    if len(np.unique(target)) < 2:
        return float("nan")
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(target, score, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())


def score_report(target: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Both competition metrics, with the keys used in every report and meta.json."""
    return {"auc": roc_auc(target, score), "tpr@fpr1e-3": tpr_at_fpr(target, score)}


def reliability_bins(target: np.ndarray, prob: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per equal-width probability bin ([0, 1/bins), ..., [1 - 1/bins, 1]): how many images, their
    mean predicted probability and their share of fakes (NaN for an empty bin)."""
    target = np.asarray(target, dtype=float)
    prob = np.asarray(prob, dtype=float)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        mean_prob = float(prob[inside].mean()) if n else float("nan")
        fake_rate = float(target[inside].mean()) if n else float("nan")
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": n, "mean_prob": mean_prob, "fake_rate": fake_rate})
    return out


def expected_calibration_error(target: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: over `bins` equal-width probability bins, the share of images
    in a bin times the gap between its share of fakes and its mean probability, summed."""
    n = len(np.asarray(prob))
    if n == 0:
        return float("nan")
    return float(
        sum(b["n"] / n * abs(b["fake_rate"] - b["mean_prob"]) for b in reliability_bins(target, prob, bins) if b["n"])
    )


def brier_score(target: np.ndarray, prob: np.ndarray) -> float:
    """Mean squared difference between the probability and the label (1 = fake)."""
    diff = np.asarray(prob, dtype=float) - np.asarray(target, dtype=float)
    return float(np.mean(diff**2)) if len(diff) else float("nan")
