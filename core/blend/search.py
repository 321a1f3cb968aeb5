"""ROC-AUC of many candidate blends at once, and the search for the blend weights with the best AUC.

The AUC is the Mann-Whitney statistic: the positives' ranks summed, a tie counting half (average
ranks, as scipy's rankdata and scikit-learn's roc_auc_score). Each candidate costs one NumPy
argsort of its scores; ties are resolved from the sorted scores only in the candidates that have
any. Candidates are scored a chunk at a time (never the whole population matrix) on a thread
per core: NumPy releases the GIL while it sorts and multiplies.

The weights search is scipy's differential evolution: AUC only changes where two images swap
places, so it is flat almost everywhere in the weights and a gradient search stops where it
starts. On more rows than `search_rows`, the search ranks a seeded sample of them, stratified by
label (an AUC on 50,000 images moves by about 1e-3 between samples, less than the weightings it
compares differ by), and the weighting it finds must beat the plain mean's exact AUC on every row.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Candidates sorted together: 16 x 50,000 rows keep a chunk's arrays near 20 MB.
CHUNK = 16


def _average_ranks(ordered: np.ndarray) -> np.ndarray:
    """1-based ranks of sorted values, tied values sharing the mean of their ranks."""
    n = len(ordered)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    counts = np.diff(np.r_[starts, n])
    return np.repeat(starts + (counts + 1) / 2.0, counts)


def _positive_rank_sums(positive: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Sum of the positives' average ranks within each row of (C, N) `rows`."""
    order = np.argsort(rows, axis=1)
    ordered = np.take_along_axis(rows, order, axis=1)
    hits = positive[order].astype(float)
    sums = hits @ np.arange(1.0, rows.shape[1] + 1.0)
    for c in np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1)):
        sums[c] = hits[c] @ _average_ranks(ordered[c])
    return sums


def _workers(chunks: int) -> int:
    return max(1, min(chunks, os.cpu_count() or 1))


def chunked_auc(target: np.ndarray, count: int, rows: Callable[[slice], np.ndarray]) -> np.ndarray:
    """AUC of `count` candidates, `rows(s)` giving the (len(s), N) scores of the candidates in `s`."""
    positive = np.asarray(target) == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    parts = [slice(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    with ThreadPoolExecutor(_workers(len(parts))) as pool:
        sums = np.concatenate(list(pool.map(lambda s: _positive_rank_sums(positive, rows(s)), parts)))
    return (sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def rank_auc(target: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of each column of (N, S) `scores` (ties counted half, as scikit-learn's roc_auc_score)."""
    scores = np.asarray(scores, dtype=float)
    return chunked_auc(target, scores.shape[1], lambda s: np.ascontiguousarray(scores[:, s].T))


def blend_auc(probs: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of the blend `probs @ w` for each column w of (M, S) `weights`."""
    members = np.ascontiguousarray(np.asarray(probs, dtype=float).T)
    return chunked_auc(target, weights.shape[1], lambda s: weights[:, s].T @ members)


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
