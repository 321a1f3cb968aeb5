"""Validation folds that never split a parent image from the fakes derived from it.

Two ways to build them: `stratified_group_folds` (label-stratified, random parent groups)
and `cluster_folds` (whole k-means clusters of image embeddings held out: the winning
solution's hard split, which makes each validation fold a domain the model has not seen).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from core.log import get_logger

log = get_logger("folds")

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


def group_clusters(df: pd.DataFrame, clusters: np.ndarray) -> np.ndarray:
    """Move every parent group whole into one cluster: the majority cluster of its images.

    Ties go to the parent image's own cluster, then to the lower cluster id. Rows with
    cluster -1 (no features) do not vote; a group with no votes stays at -1.
    """
    work = pd.DataFrame({"parent": df["parent"].to_numpy(), "cluster": np.asarray(clusters, dtype=np.int64)})
    voting = work[work["cluster"] >= 0]
    votes = voting.groupby(["parent", "cluster"]).size().rename("votes").reset_index()
    own = dict(zip(df["img_name"], clusters, strict=True))
    votes["is_parent"] = [own.get(p, -1) == c for p, c in zip(votes["parent"], votes["cluster"], strict=True)]
    # Sort so the first row per parent is the winner: most votes, then the parent's own, then lowest id.
    votes = votes.sort_values(["parent", "votes", "is_parent", "cluster"], ascending=[True, False, False, True])
    winner = votes.drop_duplicates("parent").set_index("parent")["cluster"]
    return work["parent"].map(winner).fillna(-1).to_numpy(dtype=np.int64)


def _renumber_by_size(clusters: np.ndarray) -> np.ndarray:
    """Clusters 0..m-1 by decreasing size (ties: the lower old id first); -1 stays -1."""
    ids, counts = np.unique(clusters[clusters >= 0], return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    mapping = {old: new for new, old in enumerate(order)}
    return np.array([mapping.get(c, -1) for c in clusters], dtype=np.int64)


def pack_clusters(sizes: pd.DataFrame, n_folds: int) -> dict[int, int]:
    """Fold of each cluster: largest cluster first, into the fold with the fewest images;
    among equally full folds, the one whose fake share ends closest to the overall share.

    `sizes` has one row per cluster: `cluster, n, fake`.
    """
    rate = sizes["fake"].sum() / sizes["n"].sum()
    n_in, fake_in = np.zeros(n_folds), np.zeros(n_folds)
    assignment = {}
    for row in sizes.sort_values(["n", "cluster"], ascending=[False, True]).itertuples():
        emptiest = np.flatnonzero(n_in == n_in.min())
        imbalance = [abs((fake_in[f] + row.fake) / (n_in[f] + row.n) - rate) for f in emptiest]
        fold = int(emptiest[int(np.argmin(imbalance))])
        assignment[int(row.cluster)] = fold
        n_in[fold] += row.n
        fake_in[fold] += row.fake
    return assignment


def cluster_folds(df: pd.DataFrame, clusters: np.ndarray, n_folds: int) -> tuple[np.ndarray, np.ndarray]:
    """Folds that hold out whole clusters. Returns (cluster, fold) per row.

    `clusters` are k-means labels per row (-1 where an image had no features). Parent
    groups are first moved whole into their majority cluster, so no group spans two
    clusters and none spans two folds. With as many clusters as folds, fold i is cluster i
    (the published setup); with more, clusters are packed into folds by `pack_clusters`.
    """
    if n_folds < 2:
        raise FoldError(f"n_folds must be at least 2, got {n_folds}")
    grouped = group_clusters(df, clusters)
    moved = int(((grouped != clusters) & (np.asarray(clusters) >= 0)).sum())
    if moved:
        log.info("%d image(s) moved to their parent group's majority cluster", moved)
    grouped = _renumber_by_size(grouped)
    orphans = grouped < 0
    if orphans.any():
        if not (~orphans).any():
            raise FoldError("no image has features; nothing to cluster")
        smallest = int(np.bincount(grouped[~orphans]).argmin())
        log.warning("%d image(s) without features (and no parent with any) go to cluster %d", orphans.sum(), smallest)
        grouped[orphans] = smallest
    n_clusters = int(grouped.max()) + 1
    if n_clusters < n_folds:
        raise FoldError(
            f"only {n_clusters} non-empty cluster(s) after keeping parent groups together, for {n_folds} folds; "
            "lower split.n_folds or raise split.k"
        )
    if n_clusters == n_folds:
        folds = grouped.copy()
    else:
        target = df["target"].to_numpy()
        sizes = pd.DataFrame({"cluster": grouped, "fake": target}).groupby("cluster")["fake"].agg(["size", "sum"])
        sizes = sizes.rename(columns={"size": "n", "sum": "fake"}).reset_index()
        mapping = pack_clusters(sizes, n_folds)
        folds = np.array([mapping[c] for c in grouped], dtype=np.int64)
    for k in range(n_folds):
        classes = set(df["target"].to_numpy()[folds == k].tolist())
        if classes != {0, 1}:
            held = sorted(set(grouped[folds == k].tolist()))
            kind = {0: "real", 1: "fake"}[classes.pop()] if classes else "no"
            raise FoldError(
                f"fold {k} (cluster(s) {held}) holds only {kind} images, so its AUC is undefined; "
                f"try a smaller split.n_folds (now {n_folds}) or another split.k (now {n_clusters} clusters)"
            )
    return grouped, folds


def fold_summary(df: pd.DataFrame) -> dict:
    """Counts per fold by label and by method, and cluster sizes: what the split report shows."""
    out: dict = {"n_images": int(len(df)), "folds": {}, "clusters": {}}
    for k, part in df.groupby("fold"):
        out["folds"][int(k)] = {
            "n": int(len(part)),
            "real": int((part["target"] == 0).sum()),
            "fake": int((part["target"] == 1).sum()),
            "clusters": sorted(int(c) for c in part["cluster"].unique()),
            "methods": {str(m): int(n) for m, n in part["method"].value_counts().sort_index().items()},
        }
    for c, part in df.groupby("cluster"):
        out["clusters"][int(c)] = {
            "n": int(len(part)),
            "real": int((part["target"] == 0).sum()),
            "fake": int((part["target"] == 1).sum()),
            "fold": sorted(int(f) for f in part["fold"].unique()),
        }
    return out


def summary_markdown(summary: dict, title: str) -> str:
    """The summary as markdown tables: folds by label, folds by method, cluster sizes."""
    folds = summary["folds"]
    methods = sorted({m for f in folds.values() for m in f["methods"]})
    lines = [f"# {title}", "", f"{summary['n_images']} images in {len(folds)} folds.", ""]
    lines += ["| fold | images | real | fake | clusters held out |", "|---:|---:|---:|---:|---|"]
    for k, f in folds.items():
        lines.append(f"| {k} | {f['n']} | {f['real']} | {f['fake']} | {', '.join(map(str, f['clusters']))} |")
    lines += ["", "| fold | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for k, f in folds.items():
        lines.append(f"| {k} | " + " | ".join(str(f["methods"].get(m, 0)) for m in methods) + " |")
    clusters = {c: v for c, v in summary["clusters"].items() if c >= 0}
    if clusters:
        lines += ["", "| cluster | images | real | fake | fold |", "|---:|---:|---:|---:|---:|"]
        for c, v in clusters.items():
            lines.append(f"| {c} | {v['n']} | {v['real']} | {v['fake']} | {', '.join(map(str, v['fold']))} |")
    return "\n".join(lines) + "\n"


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
