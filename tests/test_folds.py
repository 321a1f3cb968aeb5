import numpy as np
import pandas as pd
import pytest

from core.folds import FoldError, check_folds, stratified_group_folds


def table(n_parents=30, children=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_parents):
        rows.append((f"r{i}", 0, f"r{i}"))
        rows += [(f"f{i}_{j}", 1, f"r{i}") for j in range(rng.integers(0, children + 1))]
    return pd.DataFrame(rows, columns=["img_name", "target", "parent"])


def test_parents_stay_with_their_children_and_split_is_deterministic():
    df = table()
    df["fold"] = stratified_group_folds(df, 5, seed=3)
    assert (df.groupby("parent")["fold"].nunique() == 1).all()
    assert sorted(df["fold"].unique()) == [0, 1, 2, 3, 4]
    assert (stratified_group_folds(df, 5, seed=3) == df["fold"]).all()
    check_folds(df)


def test_check_folds_catches_leaks_and_single_class_folds():
    df = table()
    df["fold"] = stratified_group_folds(df, 3, seed=0)
    leak = df.copy()
    child = leak.index[leak["img_name"].str.startswith("f")][0]
    leak.loc[child, "fold"] = (leak.loc[child, "fold"] + 1) % 3
    with pytest.raises(FoldError, match="split across folds"):
        check_folds(leak)
    one_class = df.assign(fold=np.where(df["target"] == 1, 0, 1))
    with pytest.raises(FoldError, match="has only class"):
        check_folds(one_class.assign(parent=one_class["img_name"]))


def test_too_few_groups():
    with pytest.raises(FoldError, match="only 2 parent groups for 5 folds"):
        stratified_group_folds(table(n_parents=2), 5, seed=0)
