"""Blend methods and calibration fitted out of fold: nested CV that never sees a held-out fold,
the auto rule against the plain mean, ECE by hand, calibration that lowers it, and the fitted
blend applied from its JSON file with NumPy alone (rank_mean included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core.blend.applied import FittedBlend, calibrate, ecdf_knots, logit, rank_scores, read_fitted_blend, sigmoid
from core.blend.fitting import (
    BlendSettings,
    MethodResult,
    blend_row_note,
    choose_method,
    evaluate_calibration,
    fit_calibration,
    fit_ensemble,
    nested_calibration,
    nested_method,
)
from core.blend.search import CHUNK, rank_auc, search_weights, stratified_sample
from core.config import ConfigError
from core.infer.ensemble import Ensemble
from core.metrics import brier_score, expected_calibration_error
from core.trained import ModelFile

FAST = BlendSettings(weight_generations=10)


def synthetic_oof(n: int = 300, folds: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three members: one informative, one weakly informative, one noise; folds interleaved."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    probs = np.stack(
        [
            sigmoid(2.0 * (y - 0.5) + rng.normal(0, 1.0, n)),
            sigmoid(0.6 * (y - 0.5) + rng.normal(0, 1.0, n)),
            rng.uniform(size=n),
        ],
        axis=1,
    )
    return probs, y, np.arange(n) % folds


def test_rank_auc_is_sklearns_auc_with_ties_counted_half():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    scores = rng.integers(0, 6, (200, 3)).astype(float)  # many ties
    assert rank_auc(y, scores) == pytest.approx([roc_auc_score(y, scores[:, j]) for j in range(3)], abs=1e-12)
    # more candidates than one chunk, tied and untied columns mixed, scored on threads
    many = np.where(np.arange(40) % 3 == 0, rng.integers(0, 4, (200, 40)), rng.normal(size=(200, 40)))
    assert len(many.T) > CHUNK
    assert rank_auc(y, many) == pytest.approx([roc_auc_score(y, c) for c in many.T], abs=1e-12)


def test_ece_and_brier_by_hand():
    target = np.array([0, 1, 0, 1])
    prob = np.array([0.05, 0.15, 0.15, 1.0])  # 1.0 falls in the last bin, not an eleventh
    # bins: [0, .1): p .05, fakes 0 -> gap .05; [.1, .2): mean p .15, fakes 1/2 -> gap .35; [.9, 1]: gap 0
    assert expected_calibration_error(target, prob, bins=10) == pytest.approx((0.05 + 2 * 0.35 + 0.0) / 4)
    assert brier_score(target, prob) == pytest.approx((0.05**2 + 0.85**2 + 0.15**2 + 0.0) / 4)
    assert expected_calibration_error(target, prob, bins=1) == pytest.approx(abs(0.5 - prob.mean()))


def overconfident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels drawn from true probabilities; the scores are those probabilities made overconfident
    (logit times 3) and shifted up (logit + 1)."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0.02, 0.98, n)
    y = (rng.uniform(size=n) < true).astype(int)
    return sigmoid(3.0 * logit(true) + 1.0), y, np.arange(n) % 5


@pytest.mark.parametrize("kind", ["temperature", "isotonic"])
def test_calibration_fitted_out_of_fold_lowers_the_ece_of_a_miscalibrated_set(kind):
    scores, y, folds = overconfident()
    before = expected_calibration_error(y, scores)
    after = expected_calibration_error(y, nested_calibration(kind, scores, y, folds))
    assert before > 0.1 and after < before / 3


def test_temperature_recovers_the_distortion_and_keeps_the_order():
    scores, y, _ = overconfident()
    cal = fit_calibration("temperature", scores, y)
    assert cal["temperature"] == pytest.approx(3.0, rel=0.15)  # sigmoid(logit(s) / 3 - 1/3) undoes it
    assert cal["shift"] == pytest.approx(-1.0 / 3.0, abs=0.15)
    out = calibrate(cal, scores)
    assert (np.diff(out[np.argsort(scores)]) >= 0).all() and roc_auc_score(y, out) == roc_auc_score(y, scores)


@pytest.mark.parametrize("kind", ["temperature", "isotonic"])
def test_a_calibration_that_raises_the_out_of_fold_ece_is_not_applied(kind):
    # Every score is 0.8 and 80% of the images are fakes, so the blend is calibrated as a whole;
    # but fold 0 holds 13 fakes of 20 and fold 1 19 of 20, so a calibration fitted on one fold
    # moves the other fold's scores the wrong way.
    scores = np.full(40, 0.8)
    y = np.array([1] * 13 + [0] * 7 + [1] * 19 + [0])
    folds = np.repeat([0, 1], 20)
    result = evaluate_calibration(scores, y, folds, kind, bins=10)
    assert result.before["ece"] == pytest.approx(0.0, abs=1e-12)
    assert result.after[kind]["ece"] == pytest.approx(0.3, abs=0.01)
    assert result.applied == "none" and result.reason.startswith(f"{kind} not applied: fitted out of fold")
    np.testing.assert_array_equal(result.calibrated, scores)


@pytest.mark.parametrize("method", ["weights", "stack"])
def test_a_fitted_method_never_sees_the_labels_of_the_fold_it_scores(method):
    probs, y, folds = synthetic_oof()
    clean = nested_method(method, probs, y, folds, FAST)
    corrupted = y.copy()
    corrupted[folds == 0] = 1 - corrupted[folds == 0]  # fold 0's labels flipped
    dirty = nested_method(method, probs, corrupted, folds, FAST)
    held = folds == 0
    np.testing.assert_array_equal(clean[held], dirty[held])
    # the flipped labels do reach the fits that train on fold 0, so the check above can fail
    assert not np.array_equal(clean[folds == 1], dirty[folds == 1])


def test_calibration_is_fitted_without_the_fold_it_calibrates():
    scores, y, folds = overconfident(n=500)
    corrupted = np.where(folds == 2, 1 - y, y)
    clean, dirty = (nested_calibration("temperature", scores, t, folds) for t in (y, corrupted))
    np.testing.assert_array_equal(clean[folds == 2], dirty[folds == 2])
    assert not np.array_equal(clean[folds == 0], dirty[folds == 0])


@pytest.mark.parametrize("method", ["weights", "stack"])  # rank_mean's fit reads no label
def test_a_fitted_blend_is_calibrated_without_the_labels_of_the_fold_it_calibrates(method):
    # fold k's calibration is fitted on the other folds' scores from blends that never saw fold k
    probs, y, folds = synthetic_oof(n=400)
    probs = sigmoid(3.0 * logit(probs))  # overconfident members, so the calibration moves the scores
    settings = BlendSettings(method=method, weight_generations=5)
    corrupted = np.where(folds == 0, 1 - y, y)
    clean, dirty = (fit_ensemble(["a", "b", "c"], probs, t, folds, settings).calibration for t in (y, corrupted))
    held = folds == 0
    np.testing.assert_array_equal(clean.uncalibrated[held], dirty.uncalibrated[held])
    for kind in ("temperature", "isotonic"):
        assert not np.array_equal(clean.nested[kind][held], clean.uncalibrated[held])  # it calibrates something
        np.testing.assert_array_equal(clean.nested[kind][held], dirty.nested[kind][held])
        assert not np.array_equal(clean.nested[kind][folds == 1], dirty.nested[kind][folds == 1])


def test_a_fitted_blend_on_two_folds_is_not_calibrated_and_says_why():
    probs, y, _ = synthetic_oof(n=200)
    fit = fit_ensemble(["a", "b", "c"], probs, y, np.arange(200) % 2, BlendSettings(method="stack"))
    assert fit.calibration.applied == "none" and "needs three folds or more" in fit.calibration.reason
    mean = fit_ensemble(["a", "b", "c"], probs, y, np.arange(200) % 2, BlendSettings(method="mean"))
    assert "error" not in mean.calibration.after["temperature"]  # nothing fitted: two folds are enough


def test_rank_mean_ranks_each_fold_against_the_other_folds_only():
    probs, y, folds = synthetic_oof(n=40)
    nested = nested_method("rank_mean", probs, y, folds, FAST)
    held = folds == 1

    def ranked_against(reference: np.ndarray) -> np.ndarray:
        return np.mean([rank_scores(ecdf_knots(reference[:, j]), probs[held, j]) for j in range(3)], axis=0)

    np.testing.assert_allclose(nested[held], ranked_against(probs[~held]), atol=1e-12)
    assert not np.allclose(nested[held], ranked_against(probs))  # ranked against every fold, it would differ


def test_rank_of_one_image_against_the_stored_oof_distribution():
    knots = ecdf_knots(np.array([0.1, 0.2, 0.2, 0.4]))
    ranks = rank_scores(knots, np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.9, np.nan]))
    # mid-rank CDF: 0.1 -> 0.5/4, 0.2 -> (1 + 2/2)/4, 0.4 -> (3 + 0.5)/4; linear between; 0 and 1 outside
    np.testing.assert_allclose(ranks[:6], [0.0, 0.125, 0.5, 0.6875, 0.875, 1.0])
    assert np.isnan(ranks[6])
    many = ecdf_knots(np.random.default_rng(0).uniform(size=50_000), max_knots=101)
    assert len(many["x"]) == 101 and rank_scores(many, np.array([0.5]))[0] == pytest.approx(0.5, abs=0.01)


def test_weights_search_favours_the_informative_member_and_keeps_the_mean_on_a_tie():
    probs, y, _ = synthetic_oof()
    w = search_weights(probs, y, generations=20, seed=0)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all() and w[0] > 0.5 and w[2] < 0.2
    assert rank_auc(y, (probs @ w)[:, None])[0] > rank_auc(y, probs.mean(axis=1)[:, None])[0]
    twins = np.repeat(probs[:, :1], 2, axis=1)  # two identical members: every weighting ties
    np.testing.assert_array_equal(search_weights(twins, y, generations=5, seed=0), [0.5, 0.5])
    np.testing.assert_array_equal(search_weights(probs, y, generations=20, seed=0), w)  # seeded


def test_weights_searched_on_a_sample_of_many_rows_still_beat_the_mean_on_every_row():
    probs, y, _ = synthetic_oof(n=6000)
    sample = stratified_sample(y, 1000, seed=0)
    assert len(sample) == pytest.approx(1000, abs=1) and y[sample].mean() == pytest.approx(y.mean(), abs=2e-3)
    full = search_weights(probs, y, generations=10, seed=0)
    sampled = search_weights(probs, y, generations=10, seed=0, search_rows=1000)
    assert not np.array_equal(full, sampled)  # the search did rank another set of rows
    np.testing.assert_allclose(sampled, full, atol=0.1)
    assert rank_auc(y, (probs @ sampled)[:, None])[0] > rank_auc(y, probs.mean(axis=1)[:, None])[0]
    # the plain mean stays where the sample's best does not beat it on every row
    twins = np.repeat(probs[:, :1], 2, axis=1)
    np.testing.assert_array_equal(search_weights(twins, y, generations=5, seed=0, search_rows=1000), [0.5, 0.5])


def test_a_forced_method_is_measured_against_the_plain_mean_only():
    probs, y, folds = synthetic_oof()
    fit = fit_ensemble(["a", "b", "c"], probs, y, folds, BlendSettings(method="stack"))
    assert set(fit.results) == {"mean", "stack"} and fit.method == "stack"
    fit = fit_ensemble(["a", "b", "c"], probs, y, folds, BlendSettings(method="mean"))
    assert set(fit.results) == {"mean"}


def result(method: str, fold_auc: list[float]) -> MethodResult:
    return MethodResult(method, None, {k: {"auc": a, "tpr@fpr1e-3": 0.0} for k, a in enumerate(fold_auc)})


def test_auto_keeps_the_plain_mean_unless_beaten_by_more_than_the_fold_spread():
    mean = result("mean", [0.70, 0.80, 0.75, 0.65])
    noisy = result("stack", [0.78, 0.76, 0.80, 0.62])  # gain +0.015, spread 0.047
    clear = result("weights", [0.74, 0.83, 0.80, 0.69])  # gain +0.04, spread 0.007
    results = {"mean": mean, "rank_mean": result("rank_mean", [0.70, 0.80, 0.75, 0.65]), "stack": noisy}
    method, reason = choose_method(results, "auto")
    assert method == "mean" and "stack has the best" in reason and "not more than" in reason
    method, reason = choose_method({**results, "weights": clear}, "auto")
    assert method == "weights" and "more than the fold-to-fold spread" in reason
    method, reason = choose_method({**results, "weights": result("weights", [0.6, 0.7, 0.7, 0.6])}, "weights")
    assert method == "weights" and "loses to the plain mean out of fold" in reason


def test_fit_ensemble_measures_all_four_methods_and_calibrates_out_of_fold():
    probs, y, folds = synthetic_oof()
    fit = fit_ensemble(["a", "b", "c"], probs, y, folds, FAST)
    assert set(fit.results) == {"mean", "rank_mean", "weights", "stack"}
    assert all(r.error is None and len(r.fold_metrics) == 4 for r in fit.results.values())
    assert fit.method in {"weights", "stack"}  # the noise member drags the plain mean down
    assert fit.calibration.calibrated.shape == y.shape
    note = blend_row_note(fit)
    assert note.startswith("The blend row includes the choice of method") and "not nested over that choice" in note


def test_one_fold_measures_nothing_and_keeps_the_plain_mean():
    probs, y, _ = synthetic_oof(n=50)
    fit = fit_ensemble(["a", "b", "c"], probs, y, np.zeros(50, dtype=int), FAST)
    assert fit.method == "mean" and fit.results["stack"].error.startswith("measuring a fit out of fold needs")
    assert fit.calibration.applied == "none"


def test_settings_refuse_unknown_keys_and_values():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['methd'\]"):
        BlendSettings.from_cfg({"methd": "mean"})
    with pytest.raises(ConfigError, match="ensemble.method='median': expected one of auto, mean"):
        BlendSettings.from_cfg({"method": "median"})


@pytest.mark.parametrize("method", ["mean", "rank_mean", "weights", "stack"])
def test_the_blend_file_round_trips_and_follows_the_member_order(tmp_path, method):
    probs, y, folds = synthetic_oof()
    fit = fit_ensemble(["a", "b", "c"], probs, y, folds, BlendSettings(method=method, weight_generations=10))
    path = tmp_path / "ensemble_fit.json"
    path.write_text(json.dumps(fit.fitted.to_json()))
    read = read_fitted_blend(path)
    np.testing.assert_array_equal(read.apply(probs), fit.fitted.apply(probs))
    order = [2, 0, 1]
    reordered = read.reorder(["c", "a", "b"])
    np.testing.assert_allclose(reordered.apply(probs[:, order]), fit.fitted.apply(probs), atol=1e-12)


def test_ensemble_applies_a_fit_for_its_members_only():
    fit = FittedBlend(["b", "a"], "weights", {"weights": [0.25, 0.75]}, {"method": "none"})
    models = [ModelFile(m, Path(f"{m}.safetensors"), {}, "") for m in ("a", "b")]
    probs = np.array([[0.2, 0.6]])  # per model: a, b
    assert Ensemble(models, fit=fit).blend(probs)[0] == pytest.approx(0.75 * 0.2 + 0.25 * 0.6)
    other = FittedBlend(["a", "c"], "weights", {"weights": [1.0, 0.0]}, {"method": "none"})
    ensemble = Ensemble(models, fit=other)
    assert ensemble.fit is None and ensemble.blend(probs)[0] == pytest.approx(0.4)


def test_infer_applies_the_fit_without_sklearn_scipy_or_pandas(tmp_path):
    probs, y, folds = synthetic_oof()
    fit = fit_ensemble(["a", "b", "c"], probs, y, folds, BlendSettings(method="rank_mean"))
    path = tmp_path / "ensemble_fit.json"
    path.write_text(json.dumps(fit.fitted.to_json()))
    code = (
        "import json, sys, numpy as np, infer\n"
        "from pathlib import Path\n"
        "from core.blend.applied import read_fitted_blend\n"
        "from core.infer.ensemble import Ensemble\nfrom core.trained import ModelFile\n"
        "models = [ModelFile(m, Path(m), {}, '') for m in ('a', 'b', 'c')]\n"
        "e = Ensemble(models, fit=read_fitted_blend(sys.argv[1]))\n"
        "out = e.blend(np.array(json.loads(sys.argv[2])))\n"
        "heavy = [m for m in ('sklearn', 'scipy', 'pandas', 'torch', 'optuna') if m in sys.modules]\n"
        "print(json.dumps({'blend': out.tolist(), 'heavy': heavy}))\n"
    )
    row = probs[:1].tolist()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), json.dumps(row)], capture_output=True, text=True, timeout=120
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    # one image ranked against the stored OOF distributions scores as it would inside the batch
    assert got["blend"][0] == pytest.approx(fit.fitted.apply(probs)[0], abs=1e-12)


def saturated(n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Distinct probabilities of a confident member (logits 8 to 30 from the middle, where the
    old clip at 1e-6 tied them) and labels it is three times overconfident about."""
    rng = np.random.default_rng(seed)
    z = rng.choice([-1.0, 1.0], n) * rng.uniform(8.0, 30.0, n)
    y = (rng.uniform(size=n) < sigmoid(z / 3.0)).astype(int)
    p = sigmoid(z)
    keep = np.unique(p, return_index=True)[1][:n]
    return p[keep], y[keep]


def test_logits_keep_float64_precision_and_move_only_exact_zero_and_one():
    p = np.array([0.0, 1e-300, 1e-20, 1e-7, 0.5, 1 - 1e-7, 1 - 1e-15, 1.0])
    z = logit(p)
    assert np.isfinite(z).all() and (np.diff(z) > 0).all()
    np.testing.assert_allclose(
        z[1:-1], [np.log(1e-300), np.log(1e-20), np.log(1e-7 / (1 - 1e-7)), 0.0, 16.118, 34.539], rtol=1e-4
    )
    np.testing.assert_allclose(sigmoid(z[1:-1]), p[1:-1], rtol=1e-9)  # 1e-300 comes back, not 0


def test_temperature_scaling_keeps_20000_saturated_scores_distinct():
    p, y = saturated()
    assert len(np.unique(p)) >= 19_000 and (np.minimum(p, 1 - p) < 1e-6).mean() > 0.5
    cal = fit_calibration("temperature", p, y)
    assert cal["temperature"] == pytest.approx(3.0, rel=0.2)
    out = calibrate(cal, p)
    assert len(np.unique(out)) == len(np.unique(p)) and (np.diff(out[np.argsort(p)]) > 0).all()


def test_stacking_keeps_saturated_scores_apart():
    p, y = saturated()
    probs = np.stack([p, p], axis=1)
    fit = fit_ensemble(["a", "b"], probs, y, np.arange(len(y)) % 4, BlendSettings(method="stack"))
    out = fit.fitted.scores(probs)
    assert len(np.unique(out)) == len(np.unique(p))
