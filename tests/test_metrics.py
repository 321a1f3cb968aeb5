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


def brute_force_tpr_at_fpr(y: np.ndarray, p: np.ndarray, max_fpr: float) -> float:
    """Every threshold by hand: fake when score >= t, t over each distinct score and above all."""
    best = 0.0
    for t in np.r_[np.unique(p), np.inf]:
        called = p >= t
        fpr = (called & (y == 0)).sum() / (y == 0).sum()
        if fpr <= max_fpr:
            best = max(best, (called & (y == 1)).sum() / (y == 1).sum())
    return best


def test_collinear_roc_corner_is_not_pruned():
    # Three tie groups of one fake and one real on top: ROC points (k/2000, k/10), k = 1..3, on one
    # straight line. FPR <= 1e-3 admits k = 2 (TPR 0.2); pruning collinear points leaves only k = 1.
    p = np.r_[[10, 10, 9, 9, 8, 8], np.zeros(1997), -np.ones(7)]
    y = np.r_[[1, 0, 1, 0, 1, 0], np.zeros(1997), np.ones(7)]
    assert brute_force_tpr_at_fpr(y, p, 1e-3) == pytest.approx(0.2)
    assert tpr_at_fpr(y, p) == pytest.approx(0.2)


def test_a_tie_across_the_limit_counts_whole_or_not_at_all():
    # 1000 reals: FPR <= 1e-3 admits one. The top tie holds 3 fakes and 2 reals, so taking it
    # would mean 2 false positives: the threshold must stay above it, at TPR 0.
    p = np.r_[[5.0] * 5, np.zeros(998), np.zeros(7)]
    y = np.r_[[1, 1, 1, 0, 0], np.zeros(998), np.ones(7)]
    assert tpr_at_fpr(y, p) == 0.0 == brute_force_tpr_at_fpr(y, p, 1e-3)


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_on_tied_scores(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 3000))
    y = rng.integers(0, 2, n)
    if len(np.unique(y)) < 2:
        y[0], y[1] = 0, 1
    # Few distinct values, so ties are everywhere; fakes score a little higher on average.
    p = np.round(rng.random(n) + 0.4 * y, int(rng.integers(1, 3)))
    max_fpr = float(rng.choice([1e-3, 1e-2, 0.05]))
    assert tpr_at_fpr(y, p, max_fpr) == pytest.approx(brute_force_tpr_at_fpr(y, p, max_fpr))
