"""Image transforms built from config with albumentations.

Normalisation always comes after resizing (the winning solution's released inference
normalised a full-size image first: slower, and different numerics at the edges). A
checkpoint imported from a published release records its authors' own evaluation recipe
(`core.preprocess`: another resize kernel, normalising first); it is evaluated with that
recipe, computed by `core.preprocess.Preprocessing` so that PyTorch and ONNX Runtime agree.
Every call takes a seed, so augmentation depends on (epoch, sample) only: the same with
any number of loader workers or processes, and the same after a resume.
"""

from __future__ import annotations

from collections.abc import Mapping

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from core.config import ConfigError

# Shared with core.preprocess, the same evaluation preprocessing without albumentations.
from core.preprocess import IMAGENET_MEAN as IMAGENET_MEAN
from core.preprocess import IMAGENET_STD as IMAGENET_STD
from core.preprocess import RESIZE_INTERPOLATION, Preprocessing


def _resize(size: int) -> A.Resize:
    return A.Resize(size, size, interpolation=RESIZE_INTERPOLATION)


def _normalize(cfg: Mapping) -> list:
    return [A.Normalize(mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD)), ToTensorV2()]


def _train_augs(aug: Mapping) -> list:
    """Label-keeping augmentations; `strength` scales their probabilities (0 turns them off)."""
    s = float(aug.get("strength", 1.0))
    if s <= 0:
        return []
    jpeg_lo = int(aug.get("jpeg_min_quality", 60))
    return [
        A.HorizontalFlip(p=0.5),
        A.ImageCompression(quality_range=(jpeg_lo, 100), p=min(1.0, 0.3 * s)),
        A.GaussianBlur(blur_limit=(3, 5), p=min(1.0, 0.1 * s)),
        A.GaussNoise(std_range=(0.01, 0.05), p=min(1.0, 0.1 * s)),
        A.ColorJitter(brightness=0.1 * s, contrast=0.1 * s, saturation=0.1 * s, hue=0.02 * s, p=min(1.0, 0.3 * s)),
        A.Affine(scale=(1 - 0.05 * s, 1 + 0.05 * s), translate_percent=(-0.03 * s, 0.03 * s), p=min(1.0, 0.3 * s)),
    ]


class ImageTransform:
    """Callable `transform(image, seed) -> CHW float tensor`."""

    def __init__(self, ops: list):
        self.compose = A.Compose(ops, seed=0)

    def __call__(self, image: np.ndarray, seed: int) -> torch.Tensor:
        self.compose.set_random_seed(seed)
        return self.compose(image=image)["image"]


class RecordedTransform:
    """Callable `transform(image, seed) -> CHW float tensor` of a recipe albumentations does not
    have (`core.preprocess.Preprocessing`); evaluation only, so the seed is unused."""

    def __init__(self, preprocessing: Preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, image: np.ndarray, seed: int) -> torch.Tensor:
        return torch.from_numpy(self.preprocessing(image))


def build_transform(cfg: Mapping, train: bool) -> ImageTransform | RecordedTransform:
    """`cfg` is the config's `data` section: `image_size`, optional `mean`/`std`, `aug`, and an
    imported checkpoint's `resize` / `normalize_first` (evaluation only)."""
    recorded = Preprocessing.from_config({"data": cfg})
    if not recorded.is_default:
        if train:
            raise ConfigError(f"data.resize {recorded.resize!r} / normalize_first: evaluation only, not for training")
        return RecordedTransform(recorded)
    size = int(cfg["image_size"])
    ops = ([_resize(size)] + (_train_augs(cfg.get("aug", {})) if train else [])) + _normalize(cfg)
    return ImageTransform(ops)
