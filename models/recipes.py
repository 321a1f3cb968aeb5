"""The default training-batch recipe: the training table's image files as they are.

Members whose batches are made online (self-blends, synthesizer forgeries, frame clips)
register their own recipe next to their network (see `models.registry.register_recipe`).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from core.data.clips import ClipDataset, ClipSettings, check_uniform_clips
from core.data.datasets import ImageDataset, collate_skip_errors
from models.registry import TrainData, register_recipe


@register_recipe("images")
def image_files(cfg: dict, table: pd.DataFrame, transform: Callable, seed: int) -> TrainData:
    """Every row's file, decoded and transformed with a per-(seed, epoch, index) seed."""
    return TrainData(ImageDataset(table["path"], table["target"], transform, seed), collate_skip_errors)


@register_recipe("clips")
def clip_files(cfg: dict, table: pd.DataFrame, transform: Callable, seed: int) -> TrainData:
    """Every row as a clip (`core.data.clips`): a video's evenly spaced frames (face-cropped with
    `clip.face_crop`), a still image's one-frame clip or a clip built from it (`clip.still`)."""
    from data_prep.clip_faces import clip_cropper

    settings = ClipSettings.from_cfg(cfg)
    check_uniform_clips(table["path"].tolist(), settings, f"{cfg['name']}'s training set")
    dataset = ClipDataset(table["path"], table["target"], transform, settings, seed, clip_cropper(cfg))
    return TrainData(dataset, collate_skip_errors)
