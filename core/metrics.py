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
    """Highest true-positive rate reachable with a false-positive rate of at most `max_fpr`."""
    target = np.asarray(target)
    if len(np.unique(target)) < 2:
        return float("nan")
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(target, score)
    return float(tpr[fpr <= max_fpr].max())


def score_report(target: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Both competition metrics, with the keys used in every report and meta.json."""
    return {"auc": roc_auc(target, score), "tpr@fpr1e-3": tpr_at_fpr(target, score)}
