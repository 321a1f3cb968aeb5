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
