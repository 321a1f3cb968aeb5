import numpy as np
import pandas as pd
import pytest

from core.data.folds import (
    FoldError,
    check_folds,
    fold_summary,
    identity_labels,
    largest_group,
    split_groups,
    stratified_group_folds,
    summary_markdown,
)


def table(n_parents=30, children=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_parents):
        rows.append((f"r{i}", 0, f"r{i}"))
        rows += [(f"f{i}_{j}", 1, f"r{i}") for j in range(rng.integers(0, children + 1))]
    return pd.DataFrame(rows, columns=["img_name", "target", "parent"])


def donor_table(n_parents=40, seed=0):
    """Each real has one fake of its own; every other fake also carries a face from the next real
    (`sources`), which chains parents 2k and 2k+1 (and a few more) into one group."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_parents):
        rows.append((f"r{i}", 0, f"r{i}", ""))
        donor = f"r{(i + 1) % n_parents}" if i % 2 == 0 else ""
        rows.append((f"f{i}", 1, f"r{i}", donor))
    # A background donor that is not in the table still links the two fakes that used it.
    rows.append((f"b{n_parents}", 1, "r5", "outside.jpg"))
    rows.append((f"b{n_parents + 1}", 1, "r9", "outside.jpg;r9"))
    df = pd.DataFrame(rows, columns=["img_name", "target", "parent", "sources"])
    return df.sample(frac=1.0, random_state=int(rng.integers(1000))).reset_index(drop=True)


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
    with pytest.raises(FoldError, match="1 group.* split across folds"):
        check_folds(leak)
    one_class = df.assign(fold=np.where(df["target"] == 1, 0, 1))
    with pytest.raises(FoldError, match="has only class"):
        check_folds(one_class.assign(parent=one_class["img_name"]))


def test_too_few_groups():
    with pytest.raises(FoldError, match="only 2 groups .images joined by parent and sources. for 5 folds"):
        stratified_group_folds(table(n_parents=2), 5, seed=0)


def test_sources_join_groups_transitively():
    df = donor_table()
    groups = pd.Series(split_groups(df), index=df["img_name"])
    # r0's fake took r1's face: r0, r1 and both their fakes are one group; r1's fake took none.
    assert groups["r0"] == groups["f0"] == groups["r1"] == groups["f1"]
    assert groups["r2"] != groups["r0"]
    # An outside donor links the fakes that used it, and through them their parents.
    assert groups["b40"] == groups["b41"] == groups["r5"] == groups["r9"] == groups["r4"] == groups["r8"]
    assert groups.nunique() == 20 - 1
    # pairs (r4, r5) and (r8, r9) with their fakes, joined by b40 and b41: 10 images
    assert largest_group(groups.to_numpy()) == (10, 10 / len(df))
    # Without the column every parent is its own group; ids count from 0 in row order.
    plain = split_groups(df.drop(columns="sources"))
    assert len(np.unique(plain)) == 40 and plain[0] == 0


def test_both_split_modes_keep_donor_groups_whole_where_parent_groups_leak():
    df = donor_table()
    df["fold"] = stratified_group_folds(df, 5, seed=0)
    check_folds(df)
    groups = split_groups(df)
    assert (pd.Series(df["fold"].to_numpy()).groupby(groups).nunique() == 1).all()
    # Folds grouped by parent alone put a donor's photograph and the fake wearing its face apart.
    by_parent = df.assign(fold=stratified_group_folds(df.drop(columns="sources"), 5, seed=0))
    with pytest.raises(FoldError, match="split across folds, validation would leak"):
        check_folds(by_parent)


def test_identity_joins_people_and_their_fakes():
    df = donor_table().drop(columns="sources")
    df["identity"] = np.where(df["img_name"].isin(["r3", "r17"]), "person0", "")
    groups = pd.Series(split_groups(df, identity=True), index=df["img_name"])
    assert groups["r3"] == groups["r17"] == groups["f17"] == groups["f3"]
    assert groups.nunique() == 40 - 1
    # Identity labels only count when asked for.
    assert len(np.unique(split_groups(df))) == 40
    df["fold"] = stratified_group_folds(df, 4, seed=1, identity=True)
    check_folds(df, identity=True)


def test_identity_labels_join_within_the_distance_transitively():
    rng = np.random.default_rng(0)
    a = rng.normal(size=128)
    a /= np.linalg.norm(a)
    b = -a
    emb = np.stack([a, a + 0.01, b, b + 0.4 * np.eye(128)[0], b + 0.8 * np.eye(128)[0], np.full(128, np.nan)])
    labels = identity_labels(emb.astype(np.float32), 0.5)
    # b, b+0.4 and b+0.8 chain at steps of 0.4 < 0.5 although b and b+0.8 are 0.8 apart.
    assert labels.tolist() == [0, 0, 1, 1, 1, -1]
    assert identity_labels(emb.astype(np.float32), 0.3).tolist() == [0, 0, 1, 2, 3, -1]


def test_summary_reports_groups_largest_share_and_people_per_fold():
    df = donor_table().drop(columns="sources")
    df["identity"] = [f"p{int(n[1:]) % 3}" if n.startswith("r") else "" for n in df["img_name"]]
    df["fold"] = stratified_group_folds(df, 2, seed=0)
    df["cluster"] = -1
    df["method"] = np.where(df["target"] == 1, "fake", "real")
    summary = fold_summary(df)
    assert summary["groups"] == 40 and summary["largest_group"]["n"] == 3
    people = {k: set(df.loc[(df["fold"] == k) & (df["identity"] != ""), "identity"]) for k in (0, 1)}
    shared = people[0] & people[1]
    for k in (0, 1):
        assert summary["folds"][k]["identities"] == len(people[k]) > 0
        assert summary["folds"][k]["identities_in_other_folds"] == len(shared)
    text = summary_markdown({**summary, "grouping": "group_by parent"}, "t")
    assert "the largest group holds 3 images (3.7% of all)" in text
    assert "| identities | of them in other folds |" in text and "Grouping: group_by parent." in text
