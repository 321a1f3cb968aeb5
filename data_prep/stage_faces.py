"""The data stage's faces step: the primary face of every original (cached per image), the people
they show, and the donor pools that edits draw their donors from."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.folds import identity_labels, split_groups
from core.data.labels import LabelError
from core.distributed import DistInfo, barrier
from core.imaging import ImageDecodeError
from core.io import atomic_path
from core.log import get_logger
from data_prep.faces import EMBEDDING_DIM, Face, FaceAnalyzer, FaceModelError, cache_path
from data_prep.stage_jobs import PrepError
from data_prep.steps import Workers, my_share

log = get_logger("data_prep")

# One analyzer per process and settings; its dlib models load on first use.
_ANALYZERS: dict[str, FaceAnalyzer] = {}


def _faces_task(item: tuple[str, str, str, dict]) -> tuple[str, Face | None, str]:
    name, path, cache, settings = item
    key = json.dumps(settings, sort_keys=True)
    if key not in _ANALYZERS:
        _ANALYZERS[key] = FaceAnalyzer(embed=True, **settings)
    try:
        face, _ = _ANALYZERS[key].analyze_file(path, cache)
    except (ImageDecodeError, LabelError) as err:
        return name, None, str(err)
    return name, face, ""


def detect_faces(
    table: pd.DataFrame, out: Path, settings: dict, workers: Workers, progress: bool, dist: DistInfo | None = None
) -> tuple[dict[str, Face | None], dict[str, str]]:
    """Primary face of every original (src_name -> Face or None) and unreadable images (name -> reason).

    Results are cached per image under out/faces/, so a rerun reads them back. Under several
    processes each detects its share into the cache first; then every process reads them all.
    """
    try:
        FaceAnalyzer(embed=True, **settings)  # fail here, once, if a model file is missing
    except FaceModelError as err:
        raise PrepError(str(err)) from None
    cache_dir = out / "faces"
    items = [
        (n, p, str(cache_path(cache_dir, n)), settings) for n, p in zip(table["src_name"], table["path"], strict=True)
    ]
    dist = dist or DistInfo()
    if dist.enabled:
        for _ in workers.map(_faces_task, my_share(items, dist), "faces", progress):
            pass
        barrier(dist)
    faces: dict[str, Face | None] = {}
    errors: dict[str, str] = {}
    for name, face, err in workers.map(_faces_task, items, "faces (cached)" if dist.enabled else "faces", progress):
        if err:
            errors[name] = err
        else:
            faces[name] = face
    return faces, errors


def real_identities(table: pd.DataFrame, faces: dict[str, Face | None], distance: float) -> pd.Series:
    """Person label per original ("" for fakes and faces without an embedding): the reals' face
    embeddings joined within `distance`, transitively (`core.data.folds.identity_labels`)."""
    embedded = [
        i
        for i, (src, target) in enumerate(zip(table["src_name"], table["target"], strict=True))
        if target == 0 and faces.get(src) is not None and faces[src].embedding is not None
    ]
    vectors = np.array([faces[table["src_name"].iloc[i]].embedding for i in embedded], dtype=np.float32)
    labels = identity_labels(vectors.reshape(len(embedded), EMBEDDING_DIM), distance)
    people = pd.Series("", index=table.index)
    people.iloc[embedded] = [f"person{k}" for k in labels]
    return people


def donor_pools(table: pd.DataFrame, n_pools: int, seed: int, identity: bool = False) -> np.ndarray:
    """Donor pool (0 .. n_pools-1) of every original: a seeded partition of its groups.

    Swapped faces and other images' backgrounds are drawn only from the target's pool, so
    every image that shares pixels with another stays inside one pool: random donors across
    a whole small set chain most of it into one group that no split can keep apart. A group
    of the input (linked by parent and sources and, with `identity`, by the `identity`
    column: one person's photographs) never spans two pools. Groups go, in a seeded random
    order, to the pool holding the fewest reals (then the fewest images), so pools hold
    about as many donor candidates each.
    """
    groups = split_groups(table, identity)
    is_real = (table["target"] == 0).to_numpy()
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    reals = np.bincount(groups, weights=is_real, minlength=n_groups)
    images = np.bincount(groups, minlength=n_groups)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(b"donor_pools")]))
    pool_reals, pool_images = np.zeros(n_pools), np.zeros(n_pools)
    pool_of_group = np.zeros(n_groups, dtype=np.int64)
    for g in rng.permutation(n_groups):
        p = int(np.lexsort((pool_images, pool_reals))[0])
        pool_of_group[g] = p
        pool_reals[p] += reals[g]
        pool_images[p] += images[g]
    return pool_of_group[groups]


def assign_donor_pools(table: pd.DataFrame, faces: dict[str, Face | None], p: dict) -> np.ndarray:
    """Donor pools that keep each person's photographs in one pool where there are people enough.

    Then a split that also groups by identity still finds every group inside one pool. With
    fewer than two people per pool (the demo has two in all) a pool could not offer a donor
    of another person, so the partition then ignores people, and the log says so.
    """
    n_pools = int(p["donor_pools"])
    people = real_identities(table, faces, float(p["identity_distance"]))
    n_people = people[people != ""].nunique()
    by_person = n_people >= 2 * n_pools
    if not by_person:
        log.info(
            "donor pools: %d people for %d pools, fewer than two per pool: pools do not keep people together",
            n_people,
            n_pools,
        )
    return donor_pools(table.assign(identity=people), n_pools, int(p["seed"]), identity=by_person)


def write_face_embeddings(table: pd.DataFrame, faces: dict[str, Face | None], path: Path) -> None:
    """`names` (prepared img_name) and `embeddings` (N x 128 float32) of every real original with a face.

    Reals only: they say who is in the set. A fake's face may mix two people (a face swap), and
    joining people through it would chain different identities together.
    """
    reals = table[table["target"] == 0]
    found = [(n, faces.get(s)) for n, s in zip(reals["img_name"], reals["src_name"], strict=True)]
    found = [(n, f.embedding) for n, f in found if f is not None and f.embedding is not None]
    names = np.array([n for n, _ in found], dtype=str)
    vectors = np.array([e for _, e in found], dtype=np.float32).reshape(len(found), EMBEDDING_DIM)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, names=names, embeddings=vectors)
