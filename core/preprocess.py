"""The evaluation preprocessing a trained network was fed, in NumPy and OpenCV alone.

infer.py's ONNX path turns a decoded image into the network's input with this instead of the
albumentations pipeline of `core.transforms` (whose import pulls in torch): the same resize
(OpenCV INTER_AREA to a square) and the same normalisation, computed the same way (a float32
lookup table per channel, as albumentations does for uint8 images), so both give the same
numbers (tests/test_preprocess.py compares them).

What a network needs is read from its checkpoint's meta.json (`Preprocessing.from_config`
on the trained config): the one place that learns other recipes when a checkpoint records
them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# INTER_AREA for the usual downscale of 512-1024 px photographs: no aliasing.
RESIZE_INTERPOLATION = cv2.INTER_AREA
MAX_PIXEL = 255.0


@dataclass(frozen=True)
class Preprocessing:
    """Resize to `size` x `size`, then (x - mean * 255) / (std * 255) per channel, as CHW float32."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_config(cls, config: Mapping) -> Preprocessing:
        """From a trained model's config (its meta.json `config`): the `data` section's
        `image_size` and optional `mean` / `std`, as `core.transforms.build_transform` reads them."""
        data = config["data"]
        return cls(
            int(data["image_size"]),
            tuple(float(v) for v in data.get("mean", IMAGENET_MEAN)),
            tuple(float(v) for v in data.get("std", IMAGENET_STD)),
        )

    @cached_property
    def _tables(self) -> np.ndarray:
        """Per channel, what each of the 256 uint8 values becomes."""
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1) * np.float32(MAX_PIXEL)
        scale = np.reciprocal(np.asarray(self.std, np.float32).reshape(-1, 1) * np.float32(MAX_PIXEL))
        return (np.arange(256, dtype=np.float32) - mean) * scale

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> the network's input (3, size, size) float32."""
        resized = cv2.resize(image, (self.size, self.size), interpolation=RESIZE_INTERPOLATION)
        return np.stack([self._tables[c][resized[:, :, c]] for c in range(3)])
