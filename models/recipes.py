"""The default training-batch recipe (the training table's image files as they are) and the clip
recipe of members that take clips.

Members whose batches are made online (self-blends, synthesizer forgeries) register their own
recipe next to their network (see `models.registry.register_recipe`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from core.data.clips import ClipDataset, ClipSettings, check_uniform_clips
from core.data.datasets import ImageDataset, collate_skip_errors
from core.imaging import is_video
from core.log import get_logger
from models.registry import TrainData, register_recipe, register_recipe_check

log = get_logger("recipes")


@register_recipe("images")
def image_files(cfg: dict, table: pd.DataFrame, transform: Callable, seed: int) -> TrainData:
    """Every row's file, decoded and transformed with a per-(seed, epoch, index) seed."""
    return TrainData(ImageDataset(table["path"], table["target"], transform, seed), collate_skip_errors)


@register_recipe_check("clips")
def check_clip_table(cfg: dict, table: pd.DataFrame) -> None:
    """`clip:` and `vblend:` read, and the table's clips fit one batch length (ConfigError otherwise)."""
    settings = ClipSettings.from_cfg(cfg)
    check_uniform_clips(table["path"].tolist(), settings, f"{cfg['name']}'s training and validation set")
    if "vblend" in cfg:
        from data_prep.video_blending import vblend_config

        vblend_config(cfg["vblend"], f"{cfg['name']}'s config")


@register_recipe("clips")
def clip_files(cfg: dict, table: pd.DataFrame, transform: Callable, seed: int) -> TrainData:
    """Every row as a clip (`core.data.clips`): a video's clip (face-cropped with `clip.face_crop`), a
    still image's one-frame clip or a clip built from it (`clip.still`); with a `vblend:` section, plus
    video-level blends of the real video clips made online (`data_prep.vblend_clips`)."""
    from data_prep.clip_faces import clip_cropper

    check_clip_table(cfg, table)
    settings = ClipSettings.from_cfg(cfg)
    dataset = ClipDataset(table["path"], table["target"], transform, settings, seed, clip_cropper(cfg))
    if "vblend" not in cfg:
        return TrainData(dataset, collate_skip_errors)
    return TrainData(with_video_blends(cfg, table, dataset), collate_skip_errors)


def with_video_blends(cfg: dict, table: pd.DataFrame, dataset: ClipDataset):
    """`dataset` and the video-level blends `vblend:` asks for (`data_prep.vblend_clips`)."""
    from data_prep.clip_landmarks import ClipLandmarks
    from data_prep.vblend_clips import VideoBlendClips, blend_count
    from data_prep.video_blending import vblend_config

    vblend = vblend_config(cfg["vblend"], f"{cfg['name']}'s config")
    videos = [is_video(p) for p in table["path"]]
    targets = table["target"].tolist()
    reals = [i for i, (v, t) in enumerate(zip(videos, targets, strict=True)) if v and t == 0]
    fakes = sum(1 for v, t in zip(videos, targets, strict=True) if v and t == 1)
    n_blends = blend_count(vblend.share, fakes, len(reals))
    log.info(
        "%s: %d video-level blends per epoch from %d real video clips, beside %d fake video clips",
        cfg["name"],
        n_blends,
        len(reals),
        fakes,
    )
    landmarks = ClipLandmarks(Path(cfg["prep"]["out"]) / "clip_landmarks")
    return VideoBlendClips(dataset, reals, n_blends, vblend, landmarks)
