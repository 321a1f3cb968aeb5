"""Fitting the blend and its calibration on out-of-fold predictions, and measuring both honestly.

Everything here sees out-of-fold (OOF) member probabilities and their labels only; the test
answers are never read. What a method is worth is measured by nested cross-validation over the
members' own folds: for each fold k the method is fitted on the OOF rows of the other folds and
scores fold k, so no row's score comes from a fit that saw its label. The calibration is nested
inside that: fold k's is fitted on the other folds' nested scores recomputed without fold k
(each fold j blended by a fit on the folds other than j and k), because the nested scores of
the other folds came from blends fitted on fold k. That costs K(K-1) more fits of the chosen
method, none for the plain mean. `auto` chooses the method on the same folds that measure it:
the reported blend row includes that choice and says so (`blend_row_note`).

Methods (`core.blend.applied` applies them):
- `mean`: the plain mean of the members' probabilities (the winning solution's blend);
- `rank_mean`: the mean of each member's rank within its own OOF scores;
- `weights`: non-negative weights summing to 1 that maximise the OOF AUC (`core.blend.search`).
  AUC only changes where two images swap places, so it is flat almost everywhere in the
  weights: a gradient (scipy's L-BFGS or SLSQP) is zero there and the search stops where it
  starts. The search is scipy's differential evolution: gradient-free (it compares AUCs, never
  slopes), seeded (the same OOF predictions give the same weights), and vectorised (a whole
  population is ranked per call, a chunk of candidates at a time on every core). Optuna's TPE,
  the project's tuner, was the other candidate, but its sampler costs milliseconds a trial,
  more than an AUC on a few thousand images. The plain mean and each member alone are in the
  first population, and the plain mean is kept unless a weighting beats its AUC strictly;
- `stack`: scikit-learn's logistic regression on the members' logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cache

import numpy as np

from core.blend.applied import CALIBRATIONS, METHODS, FittedBlend, blend_scores, calibrate, ecdf_knots, logit
from core.blend.search import search_weights
from core.config import ConfigError
from core.metrics import brier_score, expected_calibration_error, score_report

CHOICES = ("auto", *METHODS)


class BlendFitError(ValueError):
    """A method or calibration cannot be fitted on these rows; the message says why."""


@dataclass(frozen=True)
class BlendSettings:
    """The `ensemble:` section of configs/ensemble.yaml (documented there)."""

    method: str = "auto"
    calibration: str = "temperature"
    weight_generations: int = 50
    search_rows: int = 50_000
    stack_c: float = 1.0
    seed: int = 0
    ece_bins: int = 10
    rank_knots: int = 1001

    @classmethod
    def from_cfg(cls, section: dict | None) -> BlendSettings:
        section = dict(section or {})
        unknown = sorted(set(section) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"ensemble config: unknown key(s) {unknown} in the ensemble section")
        settings = cls(**section)
        if settings.method not in CHOICES:
            raise ConfigError(f"ensemble.method={settings.method!r}: expected one of {', '.join(CHOICES)}")
        if settings.calibration not in CALIBRATIONS:
            raise ConfigError(
                f"ensemble.calibration={settings.calibration!r}: expected one of {', '.join(CALIBRATIONS)}"
            )
        if min(settings.weight_generations, settings.ece_bins) < 1 or settings.rank_knots < 2:
            raise ConfigError("ensemble: weight_generations and ece_bins must be >= 1, rank_knots >= 2")
        if settings.search_rows < 1000:
            raise ConfigError(f"ensemble.search_rows={settings.search_rows}: at least 1000 rows to rank candidates on")
        return settings


def _need_both_classes(target: np.ndarray, what: str) -> None:
    if len(np.unique(target)) < 2:
        raise BlendFitError(f"{what} needs real and fake images among the rows it is fitted on")


def _search(probs: np.ndarray, target: np.ndarray, settings: BlendSettings) -> np.ndarray:
    if probs.shape[1] > 1:
        _need_both_classes(target, "the weights search")
    return search_weights(probs, target, settings.weight_generations, settings.seed, settings.search_rows)


def fit_stack(probs: np.ndarray, target: np.ndarray, c: float) -> dict:
    """Logistic regression on the members' logits; a member's missing scores are imputed with
    its mean logit over these rows (stored, so inference imputes the same)."""
    _need_both_classes(target, "stacking")
    from sklearn.linear_model import LogisticRegression

    z = logit(probs)
    impute = np.nan_to_num(np.nanmean(np.where(np.isnan(probs), np.nan, z), axis=0))
    z = np.where(np.isnan(probs), impute, z)
    model = LogisticRegression(C=c, max_iter=1000).fit(z, target)
    return {"coef": model.coef_[0].tolist(), "intercept": float(model.intercept_[0]), "impute": impute.tolist()}


def fit_method(
    method: str, probs: np.ndarray, target: np.ndarray, settings: BlendSettings, fixed: np.ndarray | None = None
) -> dict:
    """The numbers of `method` fitted on these OOF rows (`fixed`: weights given in the config)."""
    if method == "mean":
        return {}
    if method == "rank_mean":
        if np.isnan(probs).all(axis=0).any():
            raise BlendFitError("rank_mean needs out-of-fold scores of every member to rank against")
        return {"knots": [ecdf_knots(probs[:, j], settings.rank_knots) for j in range(probs.shape[1])]}
    if method == "weights":
        w = fixed if fixed is not None else _search(probs, target, settings)
        return {"weights": (np.asarray(w, dtype=float) / np.sum(w)).tolist()}
    if method == "stack":
        return fit_stack(probs, target, settings.stack_c)
    raise BlendFitError(f"unknown method {method!r}")


def fit_calibration(kind: str, scores: np.ndarray, target: np.ndarray) -> dict:
    """`temperature`: T and shift of sigmoid(logit(s) / T + shift), by maximum likelihood (scipy);
    strictly increasing, so the order of the scores and every AUC stay as they were.
    `isotonic`: scikit-learn's isotonic regression, stored as its breakpoints; it merges
    neighbouring scores into steps, so ties appear and an AUC can move slightly."""
    if kind == "none":
        return {"method": "none"}
    ok = ~np.isnan(scores)
    scores, target = scores[ok], np.asarray(target)[ok]
    _need_both_classes(target, f"{kind} calibration")
    if kind == "temperature":
        from scipy.optimize import minimize

        z = logit(scores)

        def nll(theta: np.ndarray) -> float:
            u = z * np.exp(-theta[0]) + theta[1]  # theta[0] = log T keeps T > 0
            return float(np.mean(np.logaddexp(0.0, u) - target * u))

        res = minimize(nll, np.zeros(2), method="L-BFGS-B")
        return {"method": "temperature", "temperature": float(np.exp(res.x[0])), "shift": float(res.x[1])}
    if kind == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, target)
        return {"method": "isotonic", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    raise BlendFitError(f"unknown calibration {kind!r}")


# --------------------------------------------------------------------------- nested cross-validation


def nested_scores(fit, apply, n: int, folds: np.ndarray) -> np.ndarray:
    """Each fold's rows scored by `apply(fitted, rows)` where `fitted = fit(other rows)`."""
    if len(np.unique(folds)) < 2:
        raise BlendFitError("measuring a fit out of fold needs out-of-fold predictions from two folds or more")
    out = np.full(n, np.nan)
    for k in np.unique(folds):
        held = folds == k
        out[held] = apply(fit(~held), held)
    return out


def nested_method(
    method: str,
    probs: np.ndarray,
    target: np.ndarray,
    folds: np.ndarray,
    settings: BlendSettings,
    fixed: np.ndarray | None = None,
) -> np.ndarray:
    """OOF scores of `method`, each fold blended by a fit on the other folds' OOF rows only."""
    if method == "mean":  # nothing to fit
        return blend_scores("mean", {}, probs)
    return nested_scores(
        lambda train: fit_method(method, probs[train], target[train], settings, fixed),
        lambda params, held: blend_scores(method, params, probs[held]),
        len(target),
        folds,
    )


def inner_nested(
    method: str,
    probs: np.ndarray,
    target: np.ndarray,
    folds: np.ndarray,
    settings: BlendSettings,
    fixed: np.ndarray | None = None,
) -> Callable[[int], np.ndarray]:
    """For fold k, the nested scores of `method` over the other folds, computed as if fold k did
    not exist: each fold j != k blended by a fit on the folds other than j and k (NaN on fold k).
    What fold k's calibration may be fitted on: the nested scores of the other folds came from
    blends fitted on fold k too. Computed on first use, once per fold."""
    if method == "mean":  # nothing is fitted: each score is its own row's alone
        scores = blend_scores("mean", {}, probs)
        return lambda k: np.where(folds == k, np.nan, scores)
    if len(np.unique(folds)) < 3:
        message = (
            f"calibrating {method} out of fold needs three folds or more (its calibration is fitted on "
            "nested scores of the other folds, blended without the calibrated fold)"
        )

        def refuse(k: int) -> np.ndarray:
            raise BlendFitError(message)

        return refuse

    @cache
    def scores_without(k: int) -> np.ndarray:
        rest = folds != k
        out = np.full(len(target), np.nan)
        out[rest] = nested_method(method, probs[rest], target[rest], folds[rest], settings, fixed)
        return out

    return scores_without


def nested_calibration(
    kind: str,
    scores: np.ndarray,
    target: np.ndarray,
    folds: np.ndarray,
    reference: Callable[[int], np.ndarray] | None = None,
) -> np.ndarray:
    """The blend's nested `scores` calibrated fold by fold: fold k by a fit on `reference(k)` over
    the other folds (`inner_nested`: scores none of whose fits saw fold k), or on `scores`
    themselves where no blend was fitted (`reference` None)."""
    if len(np.unique(folds)) < 2:
        raise BlendFitError("measuring a fit out of fold needs out-of-fold predictions from two folds or more")
    out = np.full(len(target), np.nan)
    for k in np.unique(folds):
        held = folds == k
        fitted_on = scores if reference is None else reference(int(k))
        out[held] = calibrate(fit_calibration(kind, fitted_on[~held], target[~held]), scores[held])
    return out


@dataclass
class MethodResult:
    """A method's nested OOF scores and how they rank, per fold and pooled."""

    method: str
    scores: np.ndarray | None
    fold_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    pooled: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def fold_values(self, key: str = "auc") -> np.ndarray:
        return np.array([m[key] for _, m in sorted(self.fold_metrics.items())], dtype=float)

    @property
    def fold_auc_mean(self) -> float:
        v = self.fold_values()
        return float(np.nanmean(v)) if len(v) and not np.isnan(v).all() else float("nan")


def fold_metrics(scores: np.ndarray, target: np.ndarray, folds: np.ndarray) -> dict[int, dict[str, float]]:
    out = {}
    for k in np.unique(folds):
        held = (folds == k) & ~np.isnan(scores)
        out[int(k)] = score_report(target[held], scores[held])
    return out


def evaluate(method: str, scores: np.ndarray, target: np.ndarray, folds: np.ndarray) -> MethodResult:
    ok = ~np.isnan(scores)
    return MethodResult(method, scores, fold_metrics(scores, target, folds), score_report(target[ok], scores[ok]))


def evaluate_methods(
    probs: np.ndarray, target: np.ndarray, folds: np.ndarray, settings: BlendSettings, fixed: np.ndarray | None
) -> dict[str, MethodResult]:
    """The methods `settings.method` chooses among measured by nested CV: every one for `auto`,
    else the forced one and the plain mean it is compared with. One that cannot be fitted
    carries its reason."""
    out = {}
    for method in METHODS if settings.method == "auto" else dict.fromkeys(("mean", settings.method)):
        try:
            scores = nested_method(method, probs, target, folds, settings, fixed)
        except BlendFitError as err:
            out[method] = MethodResult(method, None, error=str(err))
            continue
        out[method] = evaluate(method, scores, target, folds)
    return out


@dataclass
class Gain:
    """A method's per-fold AUC minus the plain mean's on the same fold."""

    mean: float
    spread: float  # population std over the folds, as the report's other spreads


def gain_over_mean(result: MethodResult, baseline: MethodResult) -> Gain:
    diff = result.fold_values() - baseline.fold_values()
    diff = diff[~np.isnan(diff)]
    if len(diff) == 0:
        return Gain(float("nan"), float("nan"))
    return Gain(float(diff.mean()), float(diff.std(ddof=0)))


def choose_method(results: dict[str, MethodResult], requested: str) -> tuple[str, str]:
    """The method to use and why. `auto`: the best mean per-fold nested AUC, but the plain mean
    unless that method beats it by more than the spread of its per-fold gain."""
    base = results["mean"]
    if requested != "auto":
        res = results[requested]
        if res.error:
            raise BlendFitError(f"ensemble.method={requested}: {res.error}")
        if requested == "mean":
            return "mean", "forced by ensemble.method=mean"
        g = gain_over_mean(res, base)
        verdict = (
            f"it loses to the plain mean out of fold ({res.fold_auc_mean:.4f} against {base.fold_auc_mean:.4f}, "
            f"per-fold gain {g.mean:+.4f} +- {g.spread:.4f})"
            if not g.mean > 0
            else f"per-fold gain over the plain mean {g.mean:+.4f} +- {g.spread:.4f}"
        )
        return requested, f"forced by ensemble.method={requested}; {verdict}"
    usable = {m: r for m, r in results.items() if r.error is None and not np.isnan(r.fold_auc_mean)}
    best = max(usable, key=lambda m: (usable[m].fold_auc_mean, m == "mean"))
    if best == "mean":
        return "mean", "auto: the plain mean has the best nested out-of-fold AUC"
    g = gain_over_mean(usable[best], base)
    if g.mean > g.spread:
        return best, (
            f"auto: {best} beats the plain mean by {g.mean:+.4f} mean per-fold AUC, "
            f"more than the fold-to-fold spread of that gain ({g.spread:.4f})"
        )
    return "mean", (
        f"auto: {best} has the best nested out-of-fold AUC but beats the plain mean by {g.mean:+.4f}, "
        f"not more than the fold-to-fold spread of that gain ({g.spread:.4f}); the plain mean is kept"
    )


@dataclass
class CalibrationResult:
    """ECE and Brier score of the blend's nested scores, uncalibrated and calibrated out of fold."""

    requested: str
    applied: str
    reason: str
    before: dict[str, float]
    after: dict[str, dict[str, float]]  # per calibration tried: its nested ECE / Brier
    uncalibrated: np.ndarray  # the blend's nested scores
    calibrated: np.ndarray  # the same calibrated out of fold by the applied calibration
    bins: int
    nested: dict[str, np.ndarray] = field(default_factory=dict)  # per calibration tried: its nested scores


def calibration_metrics(scores: np.ndarray, target: np.ndarray, bins: int) -> dict[str, float]:
    ok = ~np.isnan(scores)
    return {
        "ece": expected_calibration_error(target[ok], scores[ok], bins),
        "brier": brier_score(target[ok], scores[ok]),
    }


def evaluate_calibration(
    scores: np.ndarray,
    target: np.ndarray,
    folds: np.ndarray,
    requested: str,
    bins: int,
    reference: Callable[[int], np.ndarray] | None = None,
) -> CalibrationResult:
    """Both calibrations measured out of fold (`nested_calibration`, fitted on `reference`); the
    requested one is applied when it lowers the nested ECE of the blend, else the blend stays as
    it is and the reason says so."""
    before = calibration_metrics(scores, target, bins)
    after, nested = {}, {}
    for kind in CALIBRATIONS[1:]:
        try:
            nested[kind] = nested_calibration(kind, scores, target, folds, reference)
        except BlendFitError as err:
            after[kind] = {"error": str(err)}
            continue
        after[kind] = calibration_metrics(nested[kind], target, bins)

    def result(applied: str, reason: str) -> CalibrationResult:
        calibrated = nested[applied] if applied != "none" else scores
        return CalibrationResult(requested, applied, reason, before, after, scores, calibrated, bins, nested)

    if requested == "none":
        return result("none", "ensemble.calibration=none")
    if "error" in after[requested]:
        return result("none", f"{requested} not applied: {after[requested]['error']}")
    ece = after[requested]["ece"]
    if ece < before["ece"]:
        return result(requested, f"{requested} lowers the out-of-fold ECE from {before['ece']:.4f} to {ece:.4f}")
    return result(
        "none",
        f"{requested} not applied: fitted out of fold it gives an ECE of {ece:.4f}, not below the "
        f"uncalibrated blend's {before['ece']:.4f}",
    )


# --------------------------------------------------------------------------- the whole fit


@dataclass
class EnsembleFit:
    """What ensemble.py reports and writes: every method's nested result, the choice, the blend
    fitted on all OOF rows with its calibration, and the chosen blend's nested OOF scores."""

    members: list[str]
    results: dict[str, MethodResult]
    requested: str  # ensemble.method: auto, or the method forced
    method: str
    reason: str
    fitted: FittedBlend
    calibration: CalibrationResult
    fixed_weights: bool


def blend_row_note(fit: EnsembleFit) -> str:
    """What the reported blend row is: nested over the fits and calibration always; over the
    choice of method only where the method was fixed before these folds were looked at."""
    nested = "each fold blended by a fit on the other folds"
    if fit.calibration.applied != "none":
        nested += (
            f", and {fit.calibration.applied}-calibrated by a fit on the other folds' scores from blends "
            "that never saw it"
        )
    if fit.requested != "auto":
        return f"The blend row: ensemble.method={fit.method}, fixed before the folds were looked at; nested: {nested}."
    return (
        f"The blend row includes the choice of method: {nested}, but auto chose {fit.method} among "
        f"{len(fit.results)} methods by their nested AUC on these same folds, so it is not nested over "
        "that choice (a little optimistic where the methods are close)."
    )


def fixed_weight_vector(members: list[str], weights: dict[str, float] | None) -> np.ndarray | None:
    if not weights:
        return None
    w = np.array([float(weights.get(m, 0.0)) for m in members])
    if (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"ensemble weights {weights}: need non-negative weights, one of them positive")
    return w


def fit_ensemble(
    members: list[str],
    probs: np.ndarray,
    target: np.ndarray,
    folds: np.ndarray,
    settings: BlendSettings,
    weights: dict[str, float] | None = None,
) -> EnsembleFit:
    """Measure the methods out of fold, choose, fit the choice on all OOF rows, then calibrate
    it on its own nested OOF scores (never on scores it was fitted on); the calibration is
    measured nested inside the nested blend (`inner_nested`)."""
    target = np.asarray(target, dtype=int)
    folds = np.asarray(folds)
    fixed = fixed_weight_vector(members, weights)
    results = evaluate_methods(probs, target, folds, settings, fixed)
    method, reason = choose_method(results, settings.method)
    params = fit_method(method, probs, target, settings, fixed)
    nested = results[method].scores
    reference = inner_nested(method, probs, target, folds, settings, fixed)
    cal = evaluate_calibration(nested, target, folds, settings.calibration, settings.ece_bins, reference)
    calibration = fit_calibration(cal.applied, nested, target)
    fitted = FittedBlend(list(members), method, params, calibration)
    return EnsembleFit(list(members), results, settings.method, method, reason, fitted, cal, fixed is not None)
