"""Image embeddings for clustering, computed in batches and cached on disk.

The cache is a folder with `features.npy` (float32, one L2-normalised row per image), and
`index.csv` (`img_name,size,mtime_ns,encoder`: row i of the index describes row i of the
array). On a rerun an image's row is reused when its name, file size, modification time
and encoder key all match; only the other images go through the encoder, and when nothing
needs computing the encoder is never built. A different encoder therefore recomputes
everything, while adding images to the training set computes only the new ones.

The features are streamed to that file as they are computed (a memory-mapped `.npy`, written
beside the cache and renamed over it once complete), and the caller gets them memory-mapped:
a run holds a batch of features in memory, not N x width floats (500k images x 768 dims is 1.5 GB).
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
from core.io import atomic_path, write_csv
from core.log import get_logger
from core.progress import progress_bar

log = get_logger("features")

FEATURES_FILE = "features.npy"
INDEX_FILE = "index.csv"
INDEX_COLUMNS = ["img_name", "size", "mtime_ns", "encoder"]
CHUNK_ROWS = 65536  # rows read or written at a time

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


class FeatureFile:
    """A (rows x width) float32 `.npy` memory-mapped at `path`, created NaN-filled once the width is known."""

    def __init__(self, path: Path, rows: int, where: str):
        self.path, self.rows, self.where = path, rows, where
        self.array: np.ndarray | None = None

    def ensure(self, width: int) -> np.ndarray:
        if self.array is None:
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(self.rows, width))
            for start in range(0, self.rows, CHUNK_ROWS):
                self.array[start : start + CHUNK_ROWS] = np.nan
        elif self.array.shape[1] != width:
            raise FeatureError(
                f"{self.where}: cached features have {self.array.shape[1]} dims, the encoder gives {width}"
            )
        return self.array

    def close(self) -> None:
        """Write the mapped pages out and unmap them."""
        if self.array is not None:
            self.array.flush()
            self.array = None


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    paths: Sequence[str],
    transform: Callable,
    device: torch.device,
    into: FeatureFile,
    rows: np.ndarray,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    on_error: Callable[[str], None] | None = None,
) -> None:
    """L2-normalised `model(images)` of `paths[i]` written to row `rows[i]` of `into`, a batch at a
    time; rows of undecodable files are left NaN."""
    report = on_error or log.warning
    model = model.to(device).eval()
    loader = make_loader(ImageDataset(paths, transform=transform), batch_size, num_workers)
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
        into.ensure(feats.shape[1])[rows[batch["index"].numpy()]] = feats


def finite_rows(features: np.ndarray) -> np.ndarray:
    """Which rows hold features (no NaN), read a chunk at a time (a memory-mapped array stays on disk)."""
    return np.concatenate(
        [np.isfinite(features[s : s + CHUNK_ROWS]).all(axis=1) for s in range(0, len(features), CHUNK_ROWS)]
        or [np.zeros(0, dtype=bool)]
    )


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
    """Features for `paths` in their order, memory-mapped from the cache in `cache_dir` (read-only),
    reusing its rows where still valid.

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
    if len(todo) == 0 and np.array_equal(row_of, np.arange(len(cached[1]))):
        log.info("features: all %d images from the cache %s", len(names), cache_dir)
        return cached[1], FeatureStats(reused=len(names), computed=0, failed=[])
    cache_dir = Path(cache_dir)
    log.info("features: %d cached, %d to compute -> %s", len(names) - len(todo), len(todo), cache_dir)
    failed: list[str] = []
    reuse = np.flatnonzero(row_of >= 0)
    with atomic_path(cache_dir / FEATURES_FILE) as tmp:
        store = FeatureFile(tmp, len(names), str(cache_dir))
        for start in range(0, len(reuse), CHUNK_ROWS):
            part = reuse[start : start + CHUNK_ROWS]
            store.ensure(cached[1].shape[1])[part] = cached[1][row_of[part]]
        if len(todo):
            model, transform = build()
            extract_features(
                model,
                [paths[i] for i in todo],
                transform,
                device,
                store,
                todo,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
                on_error=failed.append,
            )
        if store.array is None:
            raise FeatureError(f"none of the {len(todo)} images could be decoded")
        store.close()
        # Drop the old index, move the array in, then write the index that vouches for it: a crash
        # in between leaves no index (everything recomputed), never an index over the wrong rows.
        (cache_dir / INDEX_FILE).unlink(missing_ok=True)
    for message in failed:
        log.warning("features: skipped %s", message)
    write_csv(current, cache_dir / INDEX_FILE)
    feats = np.load(cache_dir / FEATURES_FILE, mmap_mode="r")
    return feats, FeatureStats(reused=len(reuse), computed=len(todo), failed=failed)
