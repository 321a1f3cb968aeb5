"""A blend fitted by ensemble.py, as stored in `outputs/ensemble_fit.json`, applied with NumPy alone.

ensemble.py fits the blend and its calibration on out-of-fold predictions (with scikit-learn,
scipy) and writes only numbers here; infer.py's CPU path applies them without
importing any of those (nor pandas), and no fitted object is ever unpickled. The JSON holds:

- `members`: the member names, in the column order of the matrices given to `apply`;
- `method`: `mean` | `rank_mean` | `weights` | `stack`, with its numbers in `params`:
  `mean`: none; `weights`: `weights` (non-negative, summing to 1); `rank_mean`: per member
  the knots of its OOF distribution (`knots`: `x` scores, `cdf` mid-rank CDF at each);
  `stack`: `coef`, `intercept` of a logistic regression on the members' logits and `impute`
  (each member's mean OOF logit, used where that member could not score an image);
- `calibration`: `none` | `temperature` (`temperature`, `shift`: p = sigmoid(logit(s) / T + shift))
  | `isotonic` (`x`, `y`: the breakpoints, linear in between, clipped at the ends);
- `models`: a fingerprint of the trained folds whose predictions it was fitted on
  (`core.trained.models_stamp` of their meta.json files), so infer.py falls back to the plain
  mean, and says so, once a member is trained again.

Rank averaging needs a reference to rank one image against: each member's score is replaced by
its place among that member's out-of-fold scores, the share below it with ties counted half
(exact at the stored knots, linear between them, so two images rarely tie), so a single image
gets the same number it gets inside the submission.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FIT_FILE = "ensemble_fit.json"
METHODS = ("mean", "rank_mean", "weights", "stack")
CALIBRATIONS = ("none", "temperature", "isotonic")
# Members write float64 probabilities only (oof.csv, test.csv: `y_pred`), so logits are taken
# from them in float64. Only exactly 0 and exactly 1 are moved, to the nearest float inside
# (0, 1), so they stay finite and on the right side of every other score: logit -744.4 and
# +36.7, the most extreme logits a float64 probability can carry.
LOWEST = float(np.nextafter(0.0, 1.0))
HIGHEST = float(np.nextafter(1.0, 0.0))


def nan_weighted_mean(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Row-wise weighted mean of (N, M) `values` over the columns that are not NaN; NaN
    where a row has none. A member that could not score an image does not pull it to 0."""
    values = np.asarray(values, dtype=float)
    w = np.ones(values.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    ok = ~np.isnan(values)
    den = ok @ w
    num = np.where(ok, values, 0.0) @ w
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


class BlendFileError(ValueError):
    """The fitted blend file is unreadable or does not fit the members; the message names it."""


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64: distinct probabilities keep distinct logits (1 - p is exact
    for p >= 1/2), and only exactly 0 or 1 is moved first (LOWEST, HIGHEST)."""
    p = np.clip(np.asarray(p, dtype=float), LOWEST, HIGHEST)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow, and without cancellation below 1/2: a probability of
    1e-300 comes out as such, not as 0."""
    z = np.asarray(z, dtype=float)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def ecdf_knots(scores: np.ndarray, max_knots: int = 1001) -> dict[str, list[float]]:
    """Knots of the mid-rank CDF of `scores` (NaN left out): at each distinct score x, the share of
    scores below x plus half the share equal to it. At most `max_knots` of them, evenly spread
    over the distinct scores (exact at the knots, linear in between), so a large OOF set stays small."""
    s = np.sort(np.asarray(scores, dtype=float)[~np.isnan(scores)])
    if len(s) == 0:
        raise BlendFileError("no score to rank against")
    x, counts = np.unique(s, return_counts=True)
    cdf = (np.cumsum(counts) - counts / 2.0) / len(s)
    if len(x) > max_knots:
        keep = np.unique(np.linspace(0, len(x) - 1, max_knots).round().astype(int))
        x, cdf = x[keep], cdf[keep]
    return {"x": x.tolist(), "cdf": cdf.tolist()}


def rank_scores(knots: dict[str, list[float]], scores: np.ndarray) -> np.ndarray:
    """Each score's place in the reference distribution, in [0, 1] (0 below its lowest score,
    1 above its highest; NaN stays NaN)."""
    scores = np.asarray(scores, dtype=float)
    x = np.asarray(knots["x"], dtype=float)
    cdf = np.asarray(knots["cdf"], dtype=float)
    out = np.interp(scores, x, cdf, left=0.0, right=1.0)
    return np.where(np.isnan(scores), np.nan, out)


def blend_scores(method: str, params: dict, probs: np.ndarray) -> np.ndarray:
    """(N, M) member probabilities -> (N,) blend score with `method`'s fitted `params`
    (NaN-aware: a member that could not score an image is left out of that image's blend)."""
    probs = np.asarray(probs, dtype=float)
    if method == "mean":
        return nan_weighted_mean(probs)
    if method == "weights":
        return nan_weighted_mean(probs, np.asarray(params["weights"], dtype=float))
    if method == "rank_mean":
        ranks = [rank_scores(k, probs[:, j]) for j, k in enumerate(params["knots"])]
        return nan_weighted_mean(np.stack(ranks, axis=1))
    if method == "stack":
        z = logit(probs)
        z = np.where(np.isnan(probs), np.asarray(params["impute"], dtype=float), z)
        out = sigmoid(z @ np.asarray(params["coef"], dtype=float) + float(params["intercept"]))
        return np.where(np.isnan(probs).all(axis=1), np.nan, out)
    raise BlendFileError(f"unknown blend method {method!r} (known: {', '.join(METHODS)})")


def calibrate(calibration: dict, scores: np.ndarray) -> np.ndarray:
    """Blend scores -> calibrated probabilities (NaN stays NaN)."""
    scores = np.asarray(scores, dtype=float)
    kind = calibration.get("method", "none")
    if kind == "none":
        return scores
    if kind == "temperature":
        out = sigmoid(logit(scores) / float(calibration["temperature"]) + float(calibration["shift"]))
    elif kind == "isotonic":
        out = np.interp(scores, np.asarray(calibration["x"], dtype=float), np.asarray(calibration["y"], dtype=float))
    else:
        raise BlendFileError(f"unknown calibration {kind!r} (known: {', '.join(CALIBRATIONS)})")
    return np.where(np.isnan(scores), np.nan, out)


@dataclass
class FittedBlend:
    """A blend method with its fitted numbers and the calibration applied after it."""

    members: list[str]
    method: str = "mean"
    params: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=lambda: {"method": "none"})
    models: str | None = None  # core.trained.models_stamp of the models it was fitted on (None: not recorded)

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """(N, M) member probabilities, columns in `members` order -> uncalibrated blend."""
        return blend_scores(self.method, self.params, probs)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(N, M) member probabilities, columns in `members` order -> calibrated blend probability."""
        return calibrate(self.calibration, self.scores(probs))

    def reorder(self, members: list[str]) -> FittedBlend:
        """The same blend for member columns given in `members`' order (the same set)."""
        if sorted(members) != sorted(self.members):
            raise BlendFileError(f"the blend was fitted for {self.members}, not {members}")
        idx = [self.members.index(m) for m in members]
        params = dict(self.params)
        for key in ("weights", "coef", "impute", "knots"):
            if key in params:
                params[key] = [params[key][i] for i in idx]
        return FittedBlend(list(members), self.method, params, dict(self.calibration), self.models)

    def describe(self) -> str:
        cal = self.calibration.get("method", "none")
        return f"{self.method}" + ("" if cal == "none" else f", {cal}-calibrated")

    def to_json(self) -> dict:
        return {
            "members": self.members,
            "method": self.method,
            "params": self.params,
            "calibration": self.calibration,
            "models": self.models,
        }


def read_fitted_blend(path: str | Path) -> FittedBlend | None:
    """The fitted blend in `path`, or None when there is none (ensemble.py has not run)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
        fit = FittedBlend(
            list(obj["members"]), obj["method"], dict(obj["params"]), dict(obj["calibration"]), obj.get("models")
        )
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BlendFileError(f"{path}: not a blend file written by ensemble.py ({err!r})") from None
    if fit.method not in METHODS or fit.calibration.get("method") not in CALIBRATIONS:
        raise BlendFileError(f"{path}: unknown method {fit.method!r} or calibration {fit.calibration!r}")
    return fit
