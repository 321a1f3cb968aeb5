"""The hard validation split: features, their cache, k-means, cluster-held-out folds, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import adjusted_rand_score

import cv_split
from core.config import ConfigError, load_config
from core.data.clustering import kmeans, sweep
from core.data.features import cached_features, load_cache
from core.data.folds import FoldError, check_folds, cluster_folds, pack_clusters, place_groups, split_groups
from core.data.sources import read_train_table, resolve_data
from models.encoders import KEYS, EncoderError, build_encoder, encoder_key

TINY_TIMM = {"kind": "timm", "name": "test_efficientnet.r160_in1k", "pretrained": False, "image_size": 32}
TINY_CLIP = {
    "kind": "open_clip",
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    },
}
TINTS = [(200, 60, 60), (60, 200, 60), (60, 60, 200)]


def tinted_image(rng: np.random.Generator, tint: tuple[int, int, int], fake: bool, size: int = 32) -> np.ndarray:
    """A noisy image of one colour domain; fakes carry a small bright square."""
    img = np.clip(np.array(tint) + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
    if fake:
        y, x = rng.integers(0, size - 8, size=2)
        img[y : y + 8, x : x + 8] = 255
    return img


def build_domains(root: Path, parents_per_domain: int = 6, seed: int = 0) -> dict:
    """Three colour domains; every real parent has one or two fakes derived from it. The first
    fake of parent 0 of each domain also carries a face from parent 1 of the same domain
    (`sources`), which joins those two parents into one group."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for d, tint in enumerate(TINTS):
        for i in range(parents_per_domain):
            real = f"d{d}_r{i}.png"
            Image.fromarray(tinted_image(rng, tint, False)).save(root / "train" / real)
            rows.append((real, 0, "real", real, ""))
            for j in range(1 + i % 2):
                fake = f"d{d}_r{i}_f{j}.png"
                Image.fromarray(tinted_image(rng, tint, True)).save(root / "train" / fake)
                donor = f"d{d}_r1.png" if i == 0 and j == 0 else ""
                rows.append((fake, 1, f"patch{d}", real, "face", donor))
    rows = [r if len(r) == 6 else (*r, "") for r in rows]
    manifest = pd.DataFrame(rows, columns=["img_name", "target", "method", "parent", "region", "sources"])
    manifest.to_csv(root / "manifest.csv", index=False)
    manifest[["img_name", "target"]].to_csv(root / "train_labels.csv", index=False)
    Image.fromarray(tinted_image(rng, TINTS[0], False)).save(root / "test" / "t0.png")
    pd.DataFrame({"img_name": ["t0.png"]}).to_csv(root / "test_list.csv", index=False)
    return {
        "train_labels": str(root / "train_labels.csv"),
        "train_root": str(root / "train"),
        "test_list": str(root / "test_list.csv"),
        "test_root": str(root / "test"),
        "test_labels": None,
        "manifest": str(root / "manifest.csv"),
    }


@pytest.fixture
def cluster_project(tmp_path: Path) -> dict:
    data = build_domains(tmp_path / "data")
    outputs = tmp_path / "outputs"
    cfg = {
        "data": {**data, "demo_dir": str(tmp_path / "unused")},
        "paths": {"outputs": str(outputs), "folds": str(outputs / "folds.csv")},
        "split": {
            "mode": "clusters",
            "n_folds": 3,
            "seed": 0,
            "k": 3,
            "encoder": TINY_TIMM,
            "batch_size": 8,
            "num_workers": 0,
            "device": "cpu",
            "kmeans": {"n_init": 2, "max_iter": 50, "tol": 1e-4},
            "tsne_max": 0,
            "progress": False,
        },
    }
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return {"cfg": path, "outputs": outputs, "folds": outputs / "folds.csv", "manifest": Path(data["manifest"])}


def run_split(project: dict, *extra: str) -> int:
    return cv_split.main(["--config", str(project["cfg"]), "--force", *extra])


def test_cluster_folds_from_the_cli_are_deterministic_whole_and_reported(cluster_project, monkeypatch):
    p = cluster_project
    assert run_split(p) == 0
    first = p["folds"].read_bytes()
    folds = pd.read_csv(p["folds"])
    assert list(folds.columns) == ["img_name", "target", "cluster", "fold"]
    merged = folds.merge(pd.read_csv(p["manifest"]), on=["img_name", "target"])
    assert len(merged) == len(folds) == 3 * 6 + 3 * 9
    # a parent, all its fakes and every image sharing pixels with them share one cluster and one fold
    groups = split_groups(merged)
    assert groups.max() + 1 == 3 * 6 - 3
    assert (merged.groupby(groups)["cluster"].nunique() == 1).all()
    assert (merged.groupby(groups)["fold"].nunique() == 1).all()
    # every cluster is held out in exactly one fold; K == n_folds, so fold i is cluster i
    assert (folds.groupby("cluster")["fold"].nunique() == 1).all()
    assert sorted(folds["cluster"].unique()) == [0, 1, 2]
    assert (folds["cluster"] == folds["fold"]).all()
    assert (folds.groupby("fold")["target"].nunique() == 2).all()
    # the colour domains are what a random-weight encoder picks up
    domain = folds["img_name"].str[:2]
    assert adjusted_rand_score(domain, folds["cluster"]) > 0.9

    out = p["outputs"]
    report = json.loads((out / "folds_report.json").read_text())
    assert report["mode"] == "clusters"
    assert report["groups"] == 15 and report["largest_group"]["n"] == 5
    assert report["grouping"] == "group_by auto: identity off, no face embeddings (the data stage writes them)"
    assert sum(f["n"] for f in report["folds"].values()) == len(folds)
    assert sum(f["methods"].get("real", 0) for f in report["folds"].values()) == 18
    assert "| cluster | images |" in (out / "folds_report.md").read_text()
    assert (out / "folds_clusters.png").read_bytes()[:4] == b"\x89PNG"

    # second run: same bytes, and the encoder is never built (every feature comes from the cache)
    calls = []
    monkeypatch.setattr(cv_split, "build_encoder", lambda cfg: calls.append(cfg) or build_encoder(cfg))
    assert run_split(p) == 0
    assert calls == []
    assert p["folds"].read_bytes() == first

    # a fresh outputs folder (no cache: the seeded random encoder is rebuilt) gives the same folds
    fresh = p["outputs"].parent / "fresh"
    assert run_split(p, f"paths.outputs={fresh}", "--out", str(fresh / "folds.csv")) == 0
    assert (fresh / "folds.csv").read_bytes() == first
    assert len(calls) == 1

    # a different encoder invalidates the cache and is built once
    monkeypatch.setattr(cv_split, "build_encoder", lambda cfg: calls.append(cfg) or build_encoder(cfg))
    assert run_split(p, "split.encoder.image_size=48") == 0
    assert len(calls) == 2


def test_more_clusters_than_folds_packs_whole_clusters(cluster_project):
    assert run_split(cluster_project, "split.k=6", "split.n_folds=2") == 0
    folds = pd.read_csv(cluster_project["folds"])
    assert folds["cluster"].nunique() >= 2
    assert (folds.groupby("cluster")["fold"].nunique() == 1).all()
    assert sorted(folds["fold"].unique()) == [0, 1]


def test_sweep_reports_every_k(cluster_project, capsys):
    assert cv_split.main(["--config", str(cluster_project["cfg"]), "--sweep", "2", "4"]) == 0
    result = json.loads((cluster_project["outputs"] / "kmeans_sweep.json").read_text())
    assert [r["k"] for r in result["rows"]] == [2, 3, 4]
    assert all(-1 <= r["silhouette"] <= 1 and r["inertia"] > 0 for r in result["rows"])
    inertia = [r["inertia"] for r in result["rows"]]
    assert inertia == sorted(inertia, reverse=True)  # more clusters never fit worse here
    assert "| k | inertia | silhouette |" in capsys.readouterr().out
    assert not cluster_project["folds"].exists()  # a sweep writes no folds


def test_a_fold_with_one_class_is_a_one_line_error(cluster_project, monkeypatch, capsys):
    # Clusters that follow the label: fakes in cluster 0, reals in 1 and 2 (parents ignored via
    # a manifest-free config, so nothing regroups them).
    cfg = yaml.safe_load(cluster_project["cfg"].read_text())
    cfg["data"]["manifest"] = None
    cluster_project["cfg"].write_text(yaml.safe_dump(cfg))

    def by_label(cfg, feats):
        table = pd.read_csv(cfg["data"]["train_labels"])
        return np.where(table["target"] == 1, 0, 1 + np.arange(len(table)) % 2)

    monkeypatch.setattr(cv_split, "cluster_labels", by_label)
    assert run_split(cluster_project) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1  # one line, no traceback
    err = errors[0]
    assert err.startswith("error: fold 0 (cluster(s) [0]) holds only fake images")
    assert "smaller split.n_folds" in err
    assert not cluster_project["folds"].exists()


def test_stratified_mode_still_available(cluster_project):
    assert run_split(cluster_project, "--mode", "stratified") == 0
    folds = pd.read_csv(cluster_project["folds"])
    assert (folds["cluster"] == -1).all()
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    assert (cluster_project["outputs"] / "folds_report.md").is_file()
    assert not (cluster_project["outputs"] / "folds_clusters.png").exists()


# --- library pieces -------------------------------------------------------------------------


def test_groups_move_whole_to_their_majority_cluster_ties_to_their_roots():
    df = pd.DataFrame(
        {
            "img_name": ["p", "p1", "p2", "p3", "q", "q1", "r", "r1", "s", "t", "t1", "t2"],
            "parent": ["p", "p", "p", "p", "q", "q", "r", "r", "s", "t", "t", "t"],
        }
    )
    clusters = np.array([0, 1, 1, 1, 2, 0, 1, -1, -1, 2, 1, 1])
    # p: three quarters in 1; q: a tie, settled by its root's cluster (2, which t leaves room in);
    # r: its one vote; s: no vote; t: the majority of a spread group, with room there.
    assert place_groups(df, clusters).tolist() == [1, 1, 1, 1, 2, 2, 1, 1, -1, 1, 1, 1]


def test_placement_keeps_clusters_near_their_kmeans_sizes():
    """Four groups of three (two images in cluster 0, one in cluster 1) and singletons make
    clusters of 10 and 10. Majorities alone would give 14 and 6; room-limited placement sends a
    group to cluster 1, where it has an image, and never to a cluster holding none of its images."""
    rows, clusters = [], []
    for i, c in enumerate([0, 0, 1, 1, 1, 1, 1, 1]):
        rows.append((f"s{i}", f"s{i}"))
        clusters.append(c)
    for g in range(4):
        for j, c in enumerate([0, 0, 1]):
            rows.append((f"g{g}_{j}", f"g{g}_0"))
            clusters.append(c)
    df = pd.DataFrame(rows, columns=["img_name", "parent"])
    clusters = np.array(clusters)
    assert np.bincount(clusters).tolist() == [10, 10]
    placed = place_groups(df, clusters)
    assert np.bincount(placed).tolist() == [11, 9]
    groups = split_groups(df)
    assert (pd.Series(placed).groupby(groups).nunique() == 1).all()
    assert all(clusters[groups == g][0] in clusters[groups == g] for g in np.unique(groups))
    # The singletons keep their own cluster.
    assert (placed[:8] == clusters[:8]).all()


def test_a_group_that_fits_nowhere_goes_where_most_room_is_left():
    """h (one image in each cluster, its root in 0) takes cluster 0's room first; g (two of its
    three images in 0) then fits in neither and goes to cluster 1, which has more room left
    than its majority cluster 0."""
    df = pd.DataFrame({"img_name": ["h", "h1", "g", "g1", "g2"], "parent": ["h", "h", "g", "g", "g"]})
    assert place_groups(df, np.array([0, 1, 0, 0, 1])).tolist() == [0, 0, 1, 1, 1]


def test_a_cluster_left_without_a_group_takes_one_back():
    """Cluster 2 holds one fake of group a and one of group b; both groups fit better elsewhere,
    so placement empties it, and with three folds wanted it takes back group a (first of the tie)."""
    df = pd.DataFrame(
        {
            "img_name": ["a", "a1", "a2", "b", "b1", "b2", "c", "c1", "d", "d1"],
            "parent": ["a", "a", "a", "b", "b", "b", "c", "c", "d", "d"],
            "target": [0, 1, 1, 0, 1, 1, 0, 1, 0, 1],
        }
    )
    clusters = np.array([0, 0, 2, 1, 1, 2, 0, 0, 1, 1])
    assert set(place_groups(df, clusters).tolist()) == {0, 1}
    cluster, fold = cluster_folds(df, clusters, n_folds=3)
    assert sorted(np.unique(fold).tolist()) == [0, 1, 2]
    held = fold[df["img_name"] == "a"][0]
    assert (fold[df["parent"] == "a"] == held).all() and (fold == held).sum() == 3
    check_folds(df.assign(fold=fold, cluster=cluster))


def test_cluster_folds_keep_groups_joined_by_sources_whole():
    rng = np.random.default_rng(0)
    n = 120
    df = pd.DataFrame({"img_name": [f"r{i}" for i in range(n)], "target": 0})
    df["parent"] = df["img_name"]
    fakes = pd.DataFrame({"img_name": [f"f{i}" for i in range(n)], "target": 1, "parent": df["img_name"]})
    fakes["sources"] = [f"r{int(j)}" for j in rng.integers(0, n, n)]  # a random donor each
    df = pd.concat([df.assign(sources=""), fakes], ignore_index=True)
    clusters = rng.integers(0, 4, len(df))
    cluster, fold = cluster_folds(df, clusters, n_folds=4)
    groups = split_groups(df)
    assert (pd.Series(fold).groupby(groups).nunique() == 1).all()
    check_folds(df.assign(fold=fold, cluster=cluster))
    # Grouped by parent alone these folds would leak: a donor and the fake wearing its face apart.
    _, by_parent = cluster_folds(df.drop(columns="sources"), clusters, n_folds=4)
    with pytest.raises(FoldError, match="split across folds"):
        check_folds(df.assign(fold=by_parent, cluster=0))


def test_cluster_folds_hold_out_each_cluster_once_and_balance_sizes():
    rng = np.random.default_rng(0)
    n = 600
    df = pd.DataFrame({"img_name": [f"i{i}" for i in range(n)], "target": rng.integers(0, 2, n)})
    df["parent"] = df["img_name"]
    clusters = rng.choice(7, size=n, p=[0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05])
    cluster, fold = cluster_folds(df, clusters, n_folds=3)
    held = pd.DataFrame({"cluster": cluster, "fold": fold})
    assert (held.groupby("cluster")["fold"].nunique() == 1).all()
    assert sorted(np.unique(cluster)) == list(range(7))
    sizes = np.bincount(fold)
    assert sizes.max() / sizes.min() < 1.35
    # clusters are renumbered by size: 0 is the largest
    counts = np.bincount(cluster)
    assert (np.diff(counts) <= 0).all()
    # K == n_folds: fold i is cluster i
    cluster, fold = cluster_folds(df, clusters, n_folds=7)
    assert (cluster == fold).all()
    with pytest.raises(FoldError, match="only 7 non-empty cluster"):
        cluster_folds(df, clusters, n_folds=8)


def test_pack_clusters_breaks_size_ties_by_label_balance():
    sizes = pd.DataFrame({"cluster": [0, 1, 2, 3], "n": [10, 10, 5, 5], "fake": [10, 0, 5, 0]})
    packed = pack_clusters(sizes, 2)
    # after 0 -> fold 0 and 1 -> fold 1, the all-fake 2 must join the all-real fold 1 ... and 3 the other
    assert packed[0] != packed[1]
    assert packed[2] == packed[1] and packed[3] == packed[0]


def test_kmeans_is_deterministic_finds_blobs_and_the_sampled_path_agrees():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 32))
    truth = np.repeat(np.arange(4), [120, 90, 60, 30])
    x = (centres[truth] + 0.2 * rng.normal(size=(300, 32))).astype(np.float32)
    a = kmeans(x, 4, seed=3, n_init=2)
    b = kmeans(x, 4, seed=3, n_init=2)
    assert np.array_equal(a.labels, b.labels)
    assert adjusted_rand_score(truth, a.labels) == 1.0
    assert a.sizes == [120, 90, 60, 30]  # numbered by decreasing size
    # torch_kmeans sees 20 points per cluster only; k-means++ needs its restarts on so few
    sampled = kmeans(x, 4, seed=3, n_init=4, fit_memory=1)
    assert sampled.fit_size == 80
    assert adjusted_rand_score(truth, sampled.labels) == 1.0
    chunked = kmeans(x, 4, seed=3, n_init=2, chunk_size=7)
    assert np.array_equal(chunked.labels, a.labels)
    rows = sweep(x, [3, 4], seed=0, silhouette_sample=100)
    assert rows[1]["silhouette"] > rows[0]["silhouette"]
    with pytest.raises(ValueError, match="NaN"):
        kmeans(np.full((10, 2), np.nan, dtype=np.float32), 2)


# --- features and their cache ---------------------------------------------------------------


class CountingEncoder(torch.nn.Module):
    """Mean colour per channel plus a constant: records how many images it saw."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return torch.cat([images.mean(dim=(2, 3)), torch.ones(len(images), 1)], dim=1)


def test_feature_cache_recomputes_only_what_changed(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        Image.fromarray(tinted_image(rng, TINTS[i % 3], False)).save(tmp_path / name)
    paths = [str(tmp_path / n) for n in names]
    cache = tmp_path / "cache"
    built = []

    def factory():
        built.append(CountingEncoder())
        return built[-1], lambda img, seed: torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32) / 255)

    def run(key="enc-a"):
        return cached_features(names, paths, cache, key, factory, torch.device("cpu"), batch_size=4, progress=False)

    feats, stats = run()
    assert (stats.computed, stats.reused, len(built)) == (6, 0, 1)
    assert feats.shape == (6, 4) and np.allclose(np.linalg.norm(feats, axis=1), 1)
    assert isinstance(feats, np.memmap) and Path(feats.filename) == cache / "features.npy"  # streamed to the cache
    again, stats = run()
    assert (stats.computed, stats.reused, len(built)) == (0, 6, 1)  # no encoder built at all
    assert np.array_equal(again, feats)

    Image.fromarray(tinted_image(rng, TINTS[2], True)).save(paths[0])  # a changed file
    (tmp_path / names[3]).write_bytes(b"not an image")  # a broken one
    changed, stats = run()
    assert (stats.computed, stats.reused, built[-1].seen) == (2, 4, 1)
    assert len(stats.failed) == 1 and names[3] in stats.failed[0]
    assert np.isnan(changed[3]).all() and not np.allclose(changed[0], feats[0])
    assert np.array_equal(changed[[1, 2, 4, 5]], feats[[1, 2, 4, 5]])
    _, stats = run()
    assert stats.computed == 1  # the failed image is retried, not trusted

    _, stats = run(key="enc-b")  # another encoder: everything again
    assert stats.computed == 6
    index, _ = load_cache(cache)
    assert set(index["encoder"]) == {"enc-b"}


def test_encoders_build_offline_and_key_their_config(tmp_path):
    clip = build_encoder(TINY_CLIP)
    assert clip.image_size == 32
    assert clip.module(torch.randn(2, 3, 32, 32)).shape == (2, 16)
    timm_enc = build_encoder(TINY_TIMM)
    assert timm_enc.module(torch.randn(2, 3, 32, 32)).ndim == 2
    assert timm_enc.transform_cfg()["image_size"] == 32
    assert encoder_key(TINY_TIMM) != encoder_key({**TINY_TIMM, "image_size": 48})
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    key = encoder_key({**TINY_TIMM, "weights": str(weights)})
    weights.write_bytes(b"xy")  # same path, new content: features must be recomputed
    assert encoder_key({**TINY_TIMM, "weights": str(weights)}) != key
    with pytest.raises(EncoderError, match="kind must be one of"):
        build_encoder({"kind": "dinov9"})
    with pytest.raises(EncoderError, match="no such weights file"):
        build_encoder({**TINY_TIMM, "weights": str(tmp_path / "missing.safetensors")})


def test_shipped_config_resolves_per_profile():
    cfg = load_config(["configs/data.yaml"])
    original = resolve_data(cfg, prepared=False)  # the data stage's output need not exist here
    demo = cv_split.resolve_split(cfg, original)  # no competition data configured: the demo
    assert original.is_demo
    assert (demo["split"]["mode"], demo["split"]["n_folds"], demo["split"]["k"]) == ("clusters", 5, 5)
    assert demo["split"]["encoder"]["kind"] == "timm" and "demo" not in demo["split"]
    real_cfg = load_config(["configs/data.yaml"], ["data.train_labels=x.csv", "data.train_root=r"])
    real_cfg["data"].update(test_list="t.csv", test_root="t")
    real = cv_split.resolve_split(real_cfg, resolve_data(real_cfg, prepared=False))
    assert (real["split"]["n_folds"], real["split"]["k"]) == (7, 7)  # seven experts, split i = cluster i
    real_encoder = real["split"]["encoder"]
    assert (real_encoder["kind"], real_encoder["name"], real_encoder["pretrained"]) == (
        "open_clip",
        "ViT-L-14",
        "openai",
    )
    assert real_encoder["quick_gelu"] is None  # not chosen: the openai tag's QuickGELU applies


def test_every_encoder_key_is_in_the_config_and_overridable_without_plus():
    cfg = load_config(["configs/data.yaml"])
    assert set(cfg["split"]["encoder"]) == KEYS and set(cfg["split"]["demo"]["encoder"]) == KEYS
    overridden = load_config(
        ["configs/data.yaml"],
        ["split.encoder.image_size=64", "split.encoder.seed=3", "split.demo.encoder.mean=[0.5,0.5,0.5]"],
    )
    assert overridden["split"]["encoder"]["image_size"] == 64 and overridden["split"]["encoder"]["seed"] == 3
    assert overridden["split"]["demo"]["encoder"]["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(EncoderError, match="unknown key"):
        build_encoder({**TINY_TIMM, "image_sise": 64})


# --- identity grouping ----------------------------------------------------------------------


def with_people(project: dict, n_people: int, tmp_path: Path, **split: object) -> tuple[dict, pd.DataFrame]:
    """The project's config and train table, its reals spread over `n_people` people by face
    embeddings written where the data stage writes them (tight clusters far apart)."""
    cfg = load_config([str(project["cfg"])])
    cfg["split"].update(split)
    data = resolve_data(cfg)
    table = read_train_table(data)
    reals = table.loc[table["target"] == 0, "img_name"].tolist()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n_people, 128))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    person = np.arange(len(reals)) % n_people
    embeddings = centres[person] + 0.01 * rng.normal(size=(len(reals), 128))
    path = tmp_path / "face_embeddings.npz"
    np.savez(path, names=np.array(reals), embeddings=embeddings.astype(np.float32))
    data = dataclasses.replace(data, face_embeddings=path)
    return cfg, cv_split.attach_identities(cfg, data, table)


@pytest.mark.parametrize("mode", ["stratified", "clusters"])
def test_identity_grouping_keeps_each_person_in_one_fold(cluster_project, tmp_path, mode):
    cfg, table = with_people(cluster_project, 6, tmp_path)
    assert table.loc[table["target"] == 0, "identity"].nunique() == 6
    assert (table.loc[table["target"] == 1, "identity"] == "").all()  # fakes follow their parent
    # People 0 and 1 (parents 0 and 1 of each domain) are joined by the donor fakes too.
    assert cv_split.use_identity(cfg, table) == (True, "group_by auto: identity on, 6 people, 5 groups")
    folds, _ = cv_split.build_folds(cfg, table, mode)
    reals = folds[folds["target"] == 0]
    assert (reals.groupby("identity")["fold"].nunique() == 1).all()
    # every fake sits with its parent, so with its person
    person = dict(zip(reals["img_name"], reals["identity"], strict=True))
    assert (folds.groupby(folds["parent"].map(person))["fold"].nunique() == 1).all()
    summary = cv_split.fold_summary(folds, folds["group"].to_numpy())
    assert all(f["identities_in_other_folds"] == 0 for f in summary["folds"].values())
    assert sum(f["identities"] for f in summary["folds"].values()) == 6


def test_identity_grouping_is_off_with_one_line_when_it_leaves_too_few_groups(cluster_project, tmp_path, capfd):
    cfg, table = with_people(cluster_project, 2, tmp_path)
    why = "group_by auto: identity off, it would leave 1 group(s) (2 people) for 3 folds"
    assert cv_split.use_identity(cfg, table) == (False, why)
    capfd.readouterr()
    folds, _ = cv_split.build_folds(cfg, table, "stratified")
    assert capfd.readouterr().err.count(why) == 1
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    # Both people then appear in several folds, and the report says so.
    summary = cv_split.fold_summary(folds, folds["group"].to_numpy())
    assert all(f["identities"] == 2 == f["identities_in_other_folds"] for f in summary["folds"].values())
    # Asked for explicitly it is on, and then three folds cannot be made from two people.
    cfg["split"]["group_by"] = "identity"
    assert cv_split.use_identity(cfg, table)[0] is True
    with pytest.raises(FoldError, match="only 1 groups .images joined by parent, sources and identity. for 3 folds"):
        cv_split.build_folds(cfg, table, "stratified")


def test_identity_settings_and_files_give_clear_errors(cluster_project, tmp_path):
    cfg = load_config([str(cluster_project["cfg"])], ["+split.group_by=identity"])
    data = resolve_data(cfg)
    table = cv_split.attach_identities(cfg, data, read_train_table(data))
    assert (table["identity"] == "").all()  # no data stage, no embeddings
    with pytest.raises(FoldError, match="split.group_by identity needs the face embeddings"):
        cv_split.use_identity(cfg, table)
    cfg["split"]["group_by"] = "person"
    with pytest.raises(ConfigError, match="split.group_by must be one of"):
        cv_split.use_identity(cfg, table)
    broken = tmp_path / "face_embeddings.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(FoldError, match="face_embeddings.npz: cannot read the face embeddings"):
        cv_split.attach_identities(cfg, dataclasses.replace(data, face_embeddings=broken), table)
    cfg["split"]["group_by"] = "parent"
    assert cv_split.use_identity(cfg, table) == (False, "group_by parent: images joined by parent and sources")
