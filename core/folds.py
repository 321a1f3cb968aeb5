"""Validation folds that never split a parent image from the fakes derived from it."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

FOLD_COLUMNS = ["img_name", "target", "cluster", "fold"]


class FoldError(ValueError):
    """Folds cannot be built or are inconsistent; the message says why."""


def stratified_group_folds(df: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row: stratified by `target`, grouped by `parent`, deterministic for a seed."""
    if n_folds < 2:
        raise FoldError(f"n_folds must be at least 2, got {n_folds}")
    n_groups = df["parent"].nunique()
    if n_groups < n_folds:
        raise FoldError(f"only {n_groups} parent groups for {n_folds} folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(df), -1, dtype=int)
    for k, (_, val_idx) in enumerate(splitter.split(df, df["target"], groups=df["parent"])):
        folds[val_idx] = k
    return folds


def check_folds(df: pd.DataFrame) -> None:
    """Raise FoldError if a parent spans folds or a fold lacks a class."""
    spread = df.groupby("parent")["fold"].nunique()
    leaking = spread[spread > 1].index.tolist()
    if leaking:
        raise FoldError(f"parent(s) split across folds, validation would leak: {leaking[:5]}")
    for k, part in df.groupby("fold"):
        classes = set(part["target"].unique())
        if classes != {0, 1}:
            raise FoldError(f"fold {k} has only class(es) {sorted(classes)}; AUC is undefined there")


def read_folds(path, labels: pd.DataFrame) -> pd.DataFrame:
    """Join `folds.csv` onto the train table, checking both cover the same images."""
    folds = pd.read_csv(path, dtype={"img_name": str})
    missing = [c for c in FOLD_COLUMNS if c not in folds.columns]
    if missing:
        raise FoldError(f"{path}: missing column(s) {missing}")
    merged = labels.merge(folds[["img_name", "cluster", "fold"]], on="img_name", how="left")
    absent = merged["img_name"][merged["fold"].isna()].tolist()
    if absent:
        raise FoldError(f"{path}: {len(absent)} train image(s) have no fold, e.g. {absent[:5]}; rerun cv_split.py")
    merged["fold"] = merged["fold"].astype(int)
    return merged
