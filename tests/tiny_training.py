"""A BatchNorm network and image files small enough for a Trainer to fit in a second on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.data.datasets import ImageDataset


class TinyBatchNormNet(torch.nn.Module):
    """conv -> BatchNorm -> ReLU -> pool -> linear, returning logits and features as members do."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)
        )
        self.head = torch.nn.Linear(4, 2)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(images).flatten(1)
        return {"logits": self.head(features), "features": features}


def to_tensor(image: np.ndarray, seed: int) -> torch.Tensor:
    return torch.from_numpy(image.transpose(2, 0, 1) / 255.0).float()


def image_files(folder: Path, n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n` random 16 px PNGs, alternately real and fake; the fakes are brighter, so a net can learn."""
    rng = np.random.default_rng(seed)
    paths, targets = [], []
    for i in range(n):
        path = folder / f"img{i}.png"
        pixels = rng.integers(0, 160, (16, 16, 3)) + 80 * (i % 2)
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        paths.append(str(path))
        targets.append(i % 2)
    return paths, targets


def tiny_dataset(folder: Path, n: int, seed: int = 0) -> ImageDataset:
    paths, targets = image_files(folder, n, seed)
    return ImageDataset(paths, targets, to_tensor, seed)
