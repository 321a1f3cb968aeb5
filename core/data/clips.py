"""Clip datasets for networks that take clips (a member config with a `clip` section; its network
says `takes_clips`). How a video or a still becomes clips is `core.clip_reading` (torch-free, shared
with infer.py's ONNX path); here they become tensors.

A training item is one clip (a video's clip at a drawn place in its window, a still's clip drawn
per epoch); a scoring item (`scoring=True`, `eval_dataset`) holds every clip of its file, (K, T, 3,
H, W), and is scored as the mean of its clips' probabilities (`core.train.prediction`), as the
published test averages a video's clips. Every frame of a clip gets the same augmentation draw,
so the augmentation does not flicker over time.

Videos live in a labelled set of their own (`data.video_labels`, `data.video_root`,
`data.video_manifest`; the demo's under `<demo_dir>/videos/`), in the competition's label format
with per-video names; `with_videos` adds them to a clip member's training table with folds kept
by video and by source video (the manifest's `parent`), so a fake made from a real video never
sits in another fold than its source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from core.clip_reading import (
    ClipCrop,
    ClipSettings,
    check_uniform_clips,
    scoring_clips,
    still_clip,
    training_clip,
)
from core.config import ConfigError
from core.data.datasets import ImageDataset, Transform, sample_seed
from core.imaging import ImageDecodeError, decode_image, is_video
from core.trained import takes_clips

if TYPE_CHECKING:
    import pandas as pd

    from core.data.sources import DataPaths


def clip_tensor(frames: Sequence[np.ndarray], transform: Transform | None, seed: int) -> torch.Tensor:
    """(T, 3, H, W): every frame through `transform` with the same seed (one augmentation draw per clip)."""
    if transform is None:
        return torch.stack([torch.from_numpy(np.ascontiguousarray(f.transpose(2, 0, 1))) for f in frames])
    return torch.stack([transform(f, seed) for f in frames])


class ClipDataset(Dataset):
    """`core.data.datasets.ImageDataset` for clip networks: items `image`, `target`, `index`, or
    `error` (a one-line reason naming the file: unreadable, truncated). `image` is one clip (T, 3,
    H, W) for training; with `scoring`, every clip of the file (K, T, 3, H, W) and `clips` = K."""

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int] | None,
        transform: Transform | None,
        settings: ClipSettings,
        seed: int = 0,
        crop: ClipCrop | None = None,
        scoring: bool = False,
    ):
        self.paths = [str(p) for p in paths]
        self.targets = None if targets is None else [int(t) for t in targets]
        self.transform, self.settings, self.seed, self.crop = transform, settings, seed, crop
        self.scoring = scoring
        self.epoch = 0

    def subset(self, indices: Sequence[int]) -> ClipDataset:
        targets = None if self.targets is None else [self.targets[i] for i in indices]
        return ClipDataset(
            [self.paths[i] for i in indices],
            targets,
            self.transform,
            self.settings,
            self.seed,
            self.crop,
            self.scoring,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def _clips(self, path: str, seed: int) -> list[list[np.ndarray]]:
        if self.scoring:  # position-free: a video's every clip, a still's clip seeded by its pixels
            return scoring_clips(path, self.settings, self.crop)
        if is_video(path):
            return [training_clip(path, self.settings, np.random.default_rng(seed), self.crop)]
        return [still_clip(decode_image(path), self.settings, seed)]

    def __getitem__(self, index: int) -> dict:
        seed = sample_seed(self.seed, self.epoch, index)
        try:
            clips = self._clips(self.paths[index], seed)
        except ImageDecodeError as err:
            return {"index": index, "error": str(err)}
        tensors = [clip_tensor(frames, self.transform, seed) for frames in clips]
        item = {"image": torch.stack(tensors), "clips": len(tensors)} if self.scoring else {"image": tensors[0]}
        item["index"] = index
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


def eval_dataset(
    cfg: dict,
    paths: Sequence[str],
    targets: Sequence[int] | None,
    transform: Transform,
    crop: ClipCrop | None = None,
) -> ImageDataset | ClipDataset:
    """The dataset that scores `paths` for the member `cfg`: clips when it takes them (every clip
    of a file in one item), else images."""
    if not takes_clips(cfg):
        return ImageDataset(paths, targets, transform)
    settings = ClipSettings.from_cfg(cfg)
    check_uniform_clips(paths, settings, f"{cfg.get('name', 'the member')}'s scored set")
    return ClipDataset(paths, targets, transform, settings, crop=crop, scoring=True)


# --------------------------------------------------------------------------- the video set


def read_video_table(paths: DataPaths) -> pd.DataFrame | None:
    """The labelled videos (`core.data.sources.read_train_table`'s columns), or None when none are configured."""
    from dataclasses import replace

    from core.data.sources import read_train_table

    if paths.video_labels is None or not paths.video_labels.is_file():
        return None
    return read_train_table(
        replace(paths, train_labels=paths.video_labels, train_root=paths.video_root, manifest=paths.video_manifest)
    )


def video_folds(videos: pd.DataFrame, folds: Sequence[int], seed: int) -> np.ndarray:
    """A fold of `folds` per video: stratified by label, a real video and every video made from it
    (`parent`, `sources`) in one fold, deterministic for `seed`."""
    from core.data.folds import stratified_group_folds

    folds = sorted(folds)
    return np.asarray(folds)[stratified_group_folds(videos, len(folds), seed)]


def with_videos(cfg: dict, paths: DataPaths, table: pd.DataFrame) -> pd.DataFrame:
    """The training table (with its `fold` column) plus the configured videos with their folds, for a
    member that takes clips; the table unchanged otherwise. The videos' `cluster` is -1."""
    import pandas as pd

    if not takes_clips(cfg):
        return table
    videos = read_video_table(paths)
    if videos is None or videos.empty:
        return table
    clash = sorted(set(videos["img_name"]) & set(table["img_name"]))
    if clash:
        raise ConfigError(f"{paths.video_labels}: video names also name training images, e.g. {clash[:3]}")
    videos = videos.assign(cluster=-1, fold=video_folds(videos, table["fold"].unique(), int(cfg["split"]["seed"])))
    return pd.concat([table, videos], ignore_index=True)
