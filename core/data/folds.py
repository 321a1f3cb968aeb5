"""Validation folds that never put two images sharing pixels (or, optionally, a person) on both sides.

Images form groups: an image, its `parent` (the real it was derived from) and every image
in its `sources` (the other images that gave it pixels: a face donor, a background source)
are joined, transitively (`split_groups`); with identity grouping on, faces of one person
are joined too (`identity_labels`). No group ever spans two folds.

Two ways to build folds: `stratified_group_folds` (label-stratified, random groups) and
`cluster_folds` (whole k-means clusters of image embeddings held out: the winning
solution's hard split, which makes each validation fold a domain the model has not seen).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neighbors import radius_neighbors_graph

from core.log import get_logger

log = get_logger("folds")

FOLD_COLUMNS = ["img_name", "target", "cluster", "fold"]
SOURCES_SEP = ";"
# A group with this share of its images in one k-means cluster belongs there (`place_groups`).
CLEAR_HOME = 0.75
# Identity labels become graph nodes beside image names; the prefix keeps the two apart.
_IDENTITY_NODE = "\0identity:"


class FoldError(ValueError):
    """Folds cannot be built or are inconsistent; the message says why."""


# --------------------------------------------------------------------------- groups


def _components(n_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected component of each node of the undirected graph with edges a[i] - b[i]."""
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n_nodes, n_nodes))
    return connected_components(graph, directed=False)[1]


def _links(df: pd.DataFrame, identity: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row position, name) pairs: every name a row is joined to besides its own."""
    pos = np.arange(len(df))
    pairs = [pd.DataFrame({"row": pos, "name": df["parent"].to_numpy()})]
    if "sources" in df.columns:
        sources = df["sources"].fillna("").astype(str).str.split(SOURCES_SEP).to_numpy()
        pairs.append(pd.DataFrame({"row": pos, "name": sources}).explode("name"))
    if identity and "identity" in df.columns:
        ids = df["identity"].fillna("").astype(str).to_numpy()
        pairs.append(pd.DataFrame({"row": pos, "name": np.where(ids != "", _IDENTITY_NODE + ids, "")}))
    links = pd.concat(pairs, ignore_index=True)
    links["name"] = links["name"].fillna("").astype(str)
    links = links[links["name"] != ""]
    return links["row"].to_numpy(dtype=np.int64), links["name"].to_numpy()


def split_groups(df: pd.DataFrame, identity: bool = False) -> np.ndarray:
    """Group id per row: connected components of the images linked by `parent` and `sources`.

    `sources` (an optional column) names, `;`-joined, the images other than the parent that
    gave the row pixels. With `identity`, rows sharing a non-empty `identity` label are joined
    too. A name that is not a row (a donor outside the table) still joins the rows naming it.
    Ids count from 0 in order of first appearance, so the same table gives the same ids.
    """
    if len(df) == 0:
        return np.zeros(0, dtype=np.int64)
    names = df["img_name"].astype(str).to_numpy()
    rows, linked = _links(df, identity)
    codes, _ = pd.factorize(np.concatenate([names, linked]))
    own, other = codes[: len(names)], codes[len(names) :]
    comp = _components(int(codes.max()) + 1, own[rows], other)
    return pd.factorize(comp[own])[0].astype(np.int64)


def largest_group(groups: np.ndarray) -> tuple[int, float]:
    """(images in the largest group, its share of all images)."""
    if len(groups) == 0:
        return 0, 0.0
    n = int(np.bincount(groups).max())
    return n, n / len(groups)


def identity_labels(embeddings: np.ndarray, distance: float) -> np.ndarray:
    """Person id per face: faces whose embeddings lie within `distance` of each other are joined,
    transitively (single linkage). Rows of NaN (no face) get -1."""
    ok = np.isfinite(embeddings).all(axis=1)
    labels = np.full(len(embeddings), -1, dtype=np.int64)
    if not ok.any():
        return labels
    # sklearn computes the radius graph in memory-bounded chunks, so a large set does not
    # need the full pairwise distance matrix at once.
    graph = radius_neighbors_graph(embeddings[ok], radius=float(distance), mode="connectivity", include_self=False)
    labels[ok] = pd.factorize(connected_components(graph, directed=False)[1])[0]
    return labels


# --------------------------------------------------------------------------- folds


def _grouped_by(identity: bool) -> str:
    return "parent, sources and identity" if identity else "parent and sources"


def stratified_group_folds(df: pd.DataFrame, n_folds: int, seed: int, identity: bool = False) -> np.ndarray:
    """Fold index per row: stratified by `target`, whole `split_groups` per fold, deterministic for a seed."""
    if n_folds < 2:
        raise FoldError(f"n_folds must be at least 2, got {n_folds}")
    groups = split_groups(df, identity)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups < n_folds:
        raise FoldError(f"only {n_groups} groups (images joined by {_grouped_by(identity)}) for {n_folds} folds")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = np.full(len(df), -1, dtype=int)
    for k, (_, val_idx) in enumerate(splitter.split(df, df["target"], groups=groups)):
        folds[val_idx] = k
    return folds


def place_groups(df: pd.DataFrame, clusters: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Move every group (default: `split_groups(df)`) whole into one cluster; returns the cluster per row.

    A group with at least `CLEAR_HOME` of its images in one cluster goes there. The others,
    spread over clusters, are placed smallest first into the cluster holding most of their
    images (ties: most of their roots, the images that are their own parent, then the lower
    id) among those with room left, a cluster taking images up to its k-means size; one that
    fits in none of them goes to the one of them with the most room left. Every group lands
    in a cluster holding some of its images. Rows with cluster -1 (no features) do not vote;
    a group with no votes stays at -1.

    Why the room: groups spread over clusters (donor chains, a person's photographs, an
    image with its edits) have no single domain, and their plain majorities pile them into
    the largest cluster. On the demo sample (556 images, 101 groups) a plain majority put
    47% of the images into cluster 0, where k-means had 33%; this placement 33%, keeping 354
    images in their own k-means cluster against 368.
    """
    groups = split_groups(df) if groups is None else np.asarray(groups)
    clusters = np.asarray(clusters, dtype=np.int64)
    out = np.full(len(clusters), -1, dtype=np.int64)
    voting = clusters >= 0
    if not voting.any():
        return out
    n_clusters, n_groups = int(clusters.max()) + 1, int(groups.max()) + 1
    root = (df["parent"].astype(str).to_numpy() == df["img_name"].astype(str).to_numpy()) & voting
    votes = np.zeros((n_groups, n_clusters))
    roots = np.zeros((n_groups, n_clusters))
    np.add.at(votes, (groups[voting], clusters[voting]), 1)
    np.add.at(roots, (groups[root], clusters[root]), 1)
    room = np.bincount(clusters[voting], minlength=n_clusters).astype(float)
    size = np.bincount(groups, minlength=n_groups)
    home = np.full(n_groups, -1, dtype=np.int64)
    for g in np.lexsort((np.arange(n_groups), size)):
        held = np.flatnonzero(votes[g] > 0)
        if not len(held):
            continue
        # Most votes, then most roots, then lowest id (lexsort: last key first).
        ranked = held[np.lexsort((held, -roots[g, held], -votes[g, held]))]
        fits = ranked[room[ranked] >= size[g]]
        clear = votes[g, ranked[0]] >= CLEAR_HOME * votes[g].sum()
        if clear:
            home[g] = ranked[0]
        else:
            home[g] = fits[0] if len(fits) else ranked[int(np.argmax(room[ranked]))]
        room[home[g]] -= size[g]
    return home[groups]


def _fill_empty_clusters(grouped: np.ndarray, clusters: np.ndarray, groups: np.ndarray, n_wanted: int) -> np.ndarray:
    """While fewer than `n_wanted` clusters hold a group, give an emptied k-means cluster one group.

    A k-means cluster whose images all belong to groups placed elsewhere is left with no
    group of its own. The emptied cluster (largest first, by its
    k-means size) takes, from the clusters holding more than one group, the group with the
    most images k-means put in it (ties: the smaller group, then the lower group id).
    """
    grouped = grouped.copy()
    ids, sizes = np.unique(clusters[clusters >= 0], return_counts=True)
    for c in ids[np.lexsort((ids, -sizes))]:
        held = np.unique(grouped[grouped >= 0])
        if len(held) >= n_wanted:
            break
        if c in held:
            continue
        stats = pd.DataFrame({"group": groups, "home": grouped, "votes": clusters == c})
        stats = stats.groupby("group").agg(home=("home", "first"), votes=("votes", "sum"), n=("votes", "size"))
        shared = stats["home"].map(stats.groupby("home").size()) > 1
        movable = stats[shared & (stats["home"] >= 0)].reset_index()
        if movable.empty:
            break
        best = movable.sort_values(["votes", "n", "group"], ascending=[False, True, True]).iloc[0]
        grouped[groups == best["group"]] = c
    return grouped


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


def cluster_folds(
    df: pd.DataFrame, clusters: np.ndarray, n_folds: int, identity: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Folds that hold out whole clusters. Returns (cluster, fold) per row.

    `clusters` are k-means labels per row (-1 where an image had no features). Groups
    (`split_groups`) are first moved whole into one cluster each (`place_groups`), so no group
    spans two clusters and none spans two folds; a cluster that this leaves empty, when fewer
    than `n_folds` would hold images otherwise, takes one group back (`_fill_empty_clusters`).
    With as many clusters as folds, fold i is cluster i (the published setup); with more,
    clusters are packed into folds by `pack_clusters`.
    """
    if n_folds < 2:
        raise FoldError(f"n_folds must be at least 2, got {n_folds}")
    clusters = np.asarray(clusters, dtype=np.int64)
    groups = split_groups(df, identity)
    voted = place_groups(df, clusters, groups)
    moved = int(((voted != clusters) & (clusters >= 0)).sum())
    if moved:
        log.info("%d image(s) moved to another cluster to keep their group whole", moved)
    grouped = _fill_empty_clusters(voted, clusters, groups, n_folds)
    refilled = grouped != voted
    if refilled.any():
        log.info(
            "%d group(s) (%d images) moved into cluster(s) the placement left empty",
            len(np.unique(groups[refilled])),
            int(refilled.sum()),
        )
    grouped = _renumber_by_size(grouped)
    orphans = grouped < 0
    if orphans.any():
        if not (~orphans).any():
            raise FoldError("no image has features; nothing to cluster")
        smallest = int(np.bincount(grouped[~orphans]).argmin())
        log.warning("%d image(s) without features (and no group with any) go to cluster %d", orphans.sum(), smallest)
        grouped[orphans] = smallest
    n_clusters = int(grouped.max()) + 1
    if n_clusters < n_folds:
        raise FoldError(
            f"only {n_clusters} non-empty cluster(s) after keeping groups (images joined by {_grouped_by(identity)}) "
            f"together, for {n_folds} folds; "
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


def fold_summary(df: pd.DataFrame, groups: np.ndarray | None = None) -> dict:
    """Counts per fold by label, method, group and identity, and cluster sizes: what the split report shows.

    `groups` are the ones the folds were built from (default: `split_groups(df)`); `identity`
    labels, where the table has them, are counted per fold whether or not they grouped it.
    """
    groups = split_groups(df) if groups is None else np.asarray(groups)
    n_largest, share = largest_group(groups)
    out: dict = {
        "n_images": int(len(df)),
        "groups": int(len(np.unique(groups))),
        "largest_group": {"n": n_largest, "share": round(share, 4)},
        "folds": {},
        "clusters": {},
    }
    identity = df["identity"].fillna("").astype(str) if "identity" in df.columns else pd.Series("", index=df.index)
    has_identity = identity != ""
    fold_of_identity = df.loc[has_identity, "fold"].groupby(identity[has_identity]).nunique()
    for k, part in df.groupby("fold"):
        ids = identity.loc[part.index][has_identity.loc[part.index]].unique()
        out["folds"][int(k)] = {
            "n": int(len(part)),
            "real": int((part["target"] == 0).sum()),
            "fake": int((part["target"] == 1).sum()),
            "groups": int(len(np.unique(groups[df.index.get_indexer(part.index)]))),
            "clusters": sorted(int(c) for c in part["cluster"].unique()),
            "methods": {str(m): int(n) for m, n in part["method"].value_counts().sort_index().items()},
        }
        if has_identity.any():
            out["folds"][int(k)]["identities"] = int(len(ids))
            out["folds"][int(k)]["identities_in_other_folds"] = int((fold_of_identity.loc[ids] > 1).sum())
    for c, part in df.groupby("cluster"):
        out["clusters"][int(c)] = {
            "n": int(len(part)),
            "real": int((part["target"] == 0).sum()),
            "fake": int((part["target"] == 1).sum()),
            "fold": sorted(int(f) for f in part["fold"].unique()),
        }
    return out


def summary_markdown(summary: dict, title: str) -> str:
    """The summary as markdown tables: folds by label, groups and identities, folds by method, cluster sizes."""
    folds = summary["folds"]
    methods = sorted({m for f in folds.values() for m in f["methods"]})
    with_ids = all("identities" in f for f in folds.values()) and bool(folds)
    big = summary["largest_group"]
    lines = [
        f"# {title}",
        "",
        f"{summary['n_images']} images in {len(folds)} folds, {summary['groups']} groups that never span two folds; "
        f"the largest group holds {big['n']} images ({100 * big['share']:.1f}% of all).",
        "",
    ]
    if summary.get("grouping"):
        lines += [f"Grouping: {summary['grouping']}.", ""]
    cols = ["fold", "images", "real", "fake", "groups"] + (["identities", "of them in other folds"] if with_ids else [])
    lines += ["| " + " | ".join(cols) + " | clusters held out |", "|" + "---:|" * len(cols) + "---|"]
    for k, f in folds.items():
        ids = f" {f['identities']} | {f['identities_in_other_folds']} |" if with_ids else ""
        clusters = ", ".join(map(str, f["clusters"]))
        lines.append(f"| {k} | {f['n']} | {f['real']} | {f['fake']} | {f['groups']} |{ids} {clusters} |")
    lines += ["", "| fold | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for k, f in folds.items():
        lines.append(f"| {k} | " + " | ".join(str(f["methods"].get(m, 0)) for m in methods) + " |")
    clusters = {c: v for c, v in summary["clusters"].items() if c >= 0}
    if clusters:
        lines += ["", "| cluster | images | real | fake | fold |", "|---:|---:|---:|---:|---:|"]
        for c, v in clusters.items():
            lines.append(f"| {c} | {v['n']} | {v['real']} | {v['fake']} | {', '.join(map(str, v['fold']))} |")
    return "\n".join(lines) + "\n"


def check_folds(df: pd.DataFrame, identity: bool = False) -> None:
    """Raise FoldError if a group (`split_groups`) spans folds or a fold lacks a class."""
    groups = split_groups(df, identity)
    spread = pd.Series(df["fold"].to_numpy()).groupby(groups).nunique()
    leaking = spread.index[spread > 1].to_numpy()
    if len(leaking):
        examples = df["img_name"].to_numpy()[np.isin(groups, leaking[:3])][:5].tolist()
        raise FoldError(
            f"{len(leaking)} group(s) of images joined by {_grouped_by(identity)} split across folds, "
            f"validation would leak: e.g. {examples}"
        )
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
