"""ROC-AUC of many candidate blends at once, and the search for the blend weights with the best AUC.

The AUC is the Mann-Whitney statistic: the share of (fake, real) pairs that the fake scores
above, a tie counting half (as scipy's rankdata and scikit-learn's roc_auc_score count it). Per
candidate, the fakes' and the reals' scores are sorted apart (two NumPy sorts of half the rows,
faster than one argsort and a gather) and each fake is placed among the reals by binary search,
once below and once above its ties, which counts the ties exactly with no special case.
Candidates are scored a chunk at a time (never the whole population matrix) on a thread per
core: NumPy releases the GIL while it multiplies, sorts and searches.

The weights search is scipy's differential evolution: AUC only changes where two images swap
places, so it is flat almost everywhere in the weights and a gradient search stops where it
starts. On more rows than `search_rows`, the search ranks a seeded sample of them, stratified by
label, and the weighting it finds must beat the plain mean's exact AUC on every row.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Candidates scored together: 16 x 50,000 rows keep a chunk's arrays near 10 MB.
CHUNK = 16


def _pairs_above(fakes: np.ndarray, reals: np.ndarray) -> np.ndarray:
    """Per row of (C, P) `fakes` and (C, R) `reals`: the (fake, real) pairs with the fake scored
    higher, a tie counting half."""
    fakes, reals = np.sort(fakes, axis=1), np.sort(reals, axis=1)
    below = [np.searchsorted(r, f, "left").sum() for f, r in zip(fakes, reals, strict=True)]
    not_above = [np.searchsorted(r, f, "right").sum() for f, r in zip(fakes, reals, strict=True)]
    return (np.array(below, dtype=float) + np.array(not_above, dtype=float)) / 2.0


def _workers(chunks: int) -> int:
    return max(1, min(chunks, os.cpu_count() or 1))


def pairs_above(count: int, rows: Callable[[slice], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """`_pairs_above` of `count` candidates, `rows(s)` giving the scores of the candidates in `s`
    on the fakes and on the reals, as (len(s), fakes) and (len(s), reals) arrays."""
    parts = [slice(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    with ThreadPoolExecutor(_workers(len(parts))) as pool:
        return np.concatenate(list(pool.map(lambda s: _pairs_above(*rows(s)), parts)))


def _by_label(values: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) `values` -> their fakes' and reals' rows, transposed: (K, fakes) and (K, reals)."""
    fake = np.asarray(target) == 1
    return np.ascontiguousarray(values[fake].T), np.ascontiguousarray(values[~fake].T)


def rank_auc(target: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of each column of (N, S) `scores` (ties counted half, as scikit-learn's roc_auc_score)."""
    fakes, reals = _by_label(np.asarray(scores, dtype=float), target)
    return pairs_above(len(fakes), lambda s: (fakes[s], reals[s])) / (fakes.shape[1] * reals.shape[1])


def blend_auc(probs: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of the blend `probs @ w` for each column w of (M, S) `weights`."""
    fakes, reals = _by_label(np.asarray(probs, dtype=float), target)
    pairs = pairs_above(weights.shape[1], lambda s: (weights[:, s].T @ fakes, weights[:, s].T @ reals))
    return pairs / (fakes.shape[1] * reals.shape[1])


def stratified_sample(target: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most `limit` rows, each label keeping its share (all rows when there are few)."""
    target = np.asarray(target)
    if len(target) <= limit:
        return np.arange(len(target))
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(target):
        rows = np.flatnonzero(target == label)
        take = max(1, round(limit * len(rows) / len(target)))
        picked.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(picked))


def _simplex(raw: np.ndarray) -> np.ndarray:
    """(M, S) raw values in [0, 1] -> columns summing to 1 (all zero: the plain mean)."""
    total = raw.sum(axis=0, keepdims=True)
    return np.where(total > 0, raw / np.where(total > 0, total, 1.0), 1.0 / raw.shape[0])


def search_weights(
    probs: np.ndarray, target: np.ndarray, generations: int, seed: int, search_rows: int | None = None
) -> np.ndarray:
    """Simplex weights with the highest AUC of the weighted mean, on the images every member
    scored (the search is in the module docstring); the plain mean unless strictly beaten on
    every one of those images. `probs` must hold both labels among those images."""
    from scipy.optimize import differential_evolution

    m = probs.shape[1]
    equal = np.full(m, 1.0 / m)
    if m == 1:
        return equal
    ok = ~np.isnan(probs).any(axis=1)
    probs, target = probs[ok], np.asarray(target)[ok]
    sample = stratified_sample(target, search_rows or len(target), seed)
    rows, labels = probs[sample], target[sample]

    def negative_auc(raw: np.ndarray) -> np.ndarray:  # vectorised: a whole population per call
        return -blend_auc(rows, labels, _simplex(raw.reshape(m, -1)))

    rng = np.random.default_rng(seed)
    starts = np.vstack([np.ones(m), np.eye(m), rng.uniform(size=(14 * m, m))])  # the mean, each member alone
    result = differential_evolution(
        negative_auc,
        [(0.0, 1.0)] * m,
        init=starts,
        maxiter=generations,
        tol=0.0,  # the default stops once AUCs agree within 1%, which they do from the first generation
        polish=False,  # polishing is a gradient search: nothing to gain on a flat objective
        vectorized=True,
        updating="deferred",
        rng=seed,
    )
    best = _simplex(result.x.reshape(m, 1))[:, 0]
    if len(sample) == len(target):  # the search's AUCs were exact already
        return best if -result.fun > blend_auc(probs, target, equal[:, None])[0] else equal
    exact = blend_auc(probs, target, np.stack([best, equal], axis=1))
    return best if exact[0] > exact[1] else equal
