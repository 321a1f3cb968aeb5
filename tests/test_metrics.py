import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core.metrics import roc_auc, score_report, tpr_at_fpr


def test_auc_agrees_with_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    p = rng.random(500) + 0.3 * y
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))


def test_tpr_at_fpr_by_hand():
    # 2000 negatives: FPR <= 1e-3 allows at most 2 negatives above the threshold.
    neg = np.arange(2000) / 2000  # scores 0 .. 0.9995
    pos = np.array([0.99975, 0.9997, 0.5, 0.1])  # two beat every negative but the top one
    y = np.r_[np.zeros(2000), np.ones(4)]
    p = np.r_[neg, pos]
    # Thresholds admitting <= 2 negatives (0.9995, 0.999) admit the 2 top positives: TPR 0.5.
    assert tpr_at_fpr(y, p) == pytest.approx(0.5)


def test_single_class_is_nan_not_a_number_that_looks_real():
    report = score_report(np.zeros(5), np.linspace(0, 1, 5))
    assert np.isnan(report["auc"]) and np.isnan(report["tpr@fpr1e-3"])
