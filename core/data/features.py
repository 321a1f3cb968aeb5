"""Image embeddings for clustering, computed in batches and cached on disk.

The cache is a folder with `features.npy` (float32, one L2-normalised row per image), and
`index.csv` (`img_name,size,mtime_ns,encoder`: row i of the index describes row i of the
array). On a rerun an image's row is reused when its name, file size, modification time
and encoder key all match; only the other images go through the encoder, and when nothing
needs computing the encoder is never built. A different encoder therefore recomputes
everything, while adding images to the training set computes only the new ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from core.data.datasets import ImageDataset, make_loader
from core.device import autocast
from core.io import write_csv, write_with
from core.log import get_logger
from core.progress import progress_bar

log = get_logger("features")

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.csv"
INDEX_COLUMNS = ["img_name", "size", "mtime_ns", "encoder"]

# Builds the encoder and its eval transform only when some image needs embedding.
EncoderFactory = Callable[[], tuple[torch.nn.Module, Callable]]


class FeatureError(ValueError):
    """Features cannot be computed or the cache cannot be used; the message says why."""


@dataclass
class FeatureStats:
    reused: int
    computed: int
    failed: list[str]  # one message per image that could not be decoded (its row is NaN)


def file_stamps(paths: Sequence[str]) -> pd.DataFrame:
    """Size and modification time of each file: what decides whether a cached row is stale."""
    stats = [Path(p).stat() for p in paths]
    return pd.DataFrame({"size": [s.st_size for s in stats], "mtime_ns": [s.st_mtime_ns for s in stats]})


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    paths: Sequence[str],
    transform: Callable,
    device: torch.device,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
    dim: int | None = None,
) -> np.ndarray:
    """L2-normalised `model(images)` for every path, float32 (N, D); NaN rows for undecodable files.

    When no file decodes, the result is all NaN if the width `dim` is known, else FeatureError.
    """
    report = on_error or log.warning
    model = model.to(device).eval()
    loader = make_loader(ImageDataset(paths, transform=transform), batch_size, num_workers)
    out: np.ndarray | None = None
    for batch in progress_bar(loader, desc="features", disable=not progress, leave=False):
        for message in batch["errors"]:
            report(message)
        if "image" not in batch:
            continue
        with autocast(device):
            feats = model(batch["image"].to(device, non_blocking=True))
        if isinstance(feats, dict | tuple | list):
            raise TypeError("the encoder must return one (B, D) tensor")
        # Unit length: k-means on the sphere groups by direction (what the encoder encodes),
        # not by activation magnitude.
        feats = torch.nn.functional.normalize(feats.float().flatten(1), dim=1).cpu().numpy()
        if out is None:
            out = np.full((len(paths), feats.shape[1]), np.nan, dtype=np.float32)
        out[batch["index"].numpy()] = feats
    if out is None:
        if dim is None:
            raise FeatureError(f"none of the {len(paths)} images could be decoded")
        out = np.full((len(paths), dim), np.nan, dtype=np.float32)
    return out


def _save_npy(array: np.ndarray, path: Path) -> None:
    # np.save appends ".npy" to a path without it, so write through a file handle.
    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    write_with(path, writer)


def load_cache(cache_dir: str | Path) -> tuple[pd.DataFrame, np.ndarray] | None:
    """The cached index and features, or None when absent or inconsistent (then it is rebuilt)."""
    cache_dir = Path(cache_dir)
    index_path, feats_path = cache_dir / INDEX_FILE, cache_dir / FEATURES_FILE
    if not (index_path.is_file() and feats_path.is_file()):
        return None
    try:
        index = pd.read_csv(index_path, dtype={"img_name": str, "encoder": str})
        feats = np.load(feats_path, mmap_mode="r")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        log.warning("%s: unreadable feature cache (%s); recomputing", cache_dir, err)
        return None
    if list(index.columns) != INDEX_COLUMNS or len(index) != feats.shape[0] or feats.ndim != 2:
        log.warning("%s: feature cache index and array disagree; recomputing", cache_dir)
        return None
    return index, feats


def cached_features(
    names: Sequence[str],
    paths: Sequence[str],
    cache_dir: str | Path,
    encoder_key: str,
    build: EncoderFactory,
    device: torch.device,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, FeatureStats]:
    """Features for `paths` in their order, reusing the cache in `cache_dir` where still valid.

    `build()` is called only if at least one image has no valid cached row. Rows of images
    that fail to decode are NaN and are not trusted on the next run (they are retried).
    """
    names, paths = list(names), list(paths)
    current = file_stamps(paths).assign(img_name=names, encoder=encoder_key)[INDEX_COLUMNS]
    cached = load_cache(cache_dir)
    row_of = np.full(len(names), -1, dtype=np.int64)
    if cached is not None:
        old_index, old_feats = cached
        old_index = old_index.assign(row=np.arange(len(old_index)))
        valid = ~np.isnan(np.asarray(old_feats[:, 0]))
        old_index = old_index[valid]
        hit = current.merge(old_index, on=INDEX_COLUMNS, how="left")["row"]
        row_of = hit.fillna(-1).to_numpy(dtype=np.int64)
    todo = np.flatnonzero(row_of < 0)
    failed: list[str] = []
    if len(todo) == 0:
        feats = np.asarray(cached[1][row_of], dtype=np.float32)
        log.info("features: all %d images from the cache %s", len(names), cache_dir)
        return feats, FeatureStats(reused=len(names), computed=0, failed=failed)

    log.info("features: %d cached, %d to compute -> %s", len(names) - len(todo), len(todo), cache_dir)
    model, transform = build()
    new = extract_features(
        model,
        [paths[i] for i in todo],
        transform,
        device,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        on_error=failed.append,
        dim=cached[1].shape[1] if cached is not None and (row_of >= 0).any() else None,
    )
    for message in failed:
        log.warning("features: skipped %s", message)
    feats = np.full((len(names), new.shape[1]), np.nan, dtype=np.float32)
    reuse = np.flatnonzero(row_of >= 0)
    if len(reuse):
        old = cached[1]
        if old.shape[1] != new.shape[1]:
            raise FeatureError(
                f"{cache_dir}: cached features have {old.shape[1]} dims, the encoder gives {new.shape[1]}"
            )
        feats[reuse] = old[row_of[reuse]]
    feats[todo] = new
    # Drop the old index, write the array, then the index that vouches for it: a crash in
    # between leaves no index (everything recomputed), never an index over the wrong rows.
    (Path(cache_dir) / INDEX_FILE).unlink(missing_ok=True)
    _save_npy(feats, Path(cache_dir) / FEATURES_FILE)
    write_csv(current, Path(cache_dir) / INDEX_FILE)
    return feats, FeatureStats(reused=len(reuse), computed=len(todo), failed=failed)
