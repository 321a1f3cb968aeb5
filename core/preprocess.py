"""The evaluation preprocessing a trained network was fed, in NumPy and OpenCV alone.

infer.py's ONNX path turns a decoded image into the network's input with this instead of the
albumentations pipeline of `core.data.transforms` (whose import pulls in torch): the same resize
(OpenCV INTER_AREA to a square) and the same normalisation, computed the same way (a float32
lookup table per channel, as albumentations does for uint8 images), so both give the same
numbers (tests/test_preprocess.py compares them).

What a network needs is read from its checkpoint's meta.json (`Preprocessing.from_config`
on the trained config): the one place that learns other recipes when a checkpoint records
them. This project's own checkpoints record only `image_size` (and `mean` / `std`); an
imported published checkpoint also records how its authors fed it (`data` keys):

- `resize`: `area` (the default: OpenCV INTER_AREA), `linear` (OpenCV INTER_LINEAR) or
  `bilinear_antialias` (torchvision's `resize(antialias=True)`, computed here as separable
  weight matrices, `antialias_weights`);
- `normalize_first`: normalise the full-size image, then resize it (the winning solution's
  released inference did so);
- `face_crop`: the network takes a crop around each face rather than the image (SBI's test
  crop: `{kind: sbi_test, margin: 0.25, margin_scale: 0.5}`), scored as the highest over the
  faces. Finding faces needs dlib, so the crop itself is made outside `core` (train.py and
  infer.py hand each network that records it its cropper, `data_prep.face_crop`); here it is
  only read and checked. A member trained here records it from its config (`data.face_crop`), an
  imported checkpoint from its release;
- `video_frames`: how many frames of a video the network's member is scored on (SBI's test:
  32); infer.py takes the most any scored member records, 16 where none does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from core.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# INTER_AREA for the usual downscale of 512-1024 px photographs: no aliasing.
RESIZE_INTERPOLATION = cv2.INTER_AREA
MAX_PIXEL = 255.0
RESIZE_KERNELS = ("area", "linear", "bilinear_antialias")
FACE_CROP_KINDS = ("sbi_test",)


@dataclass(frozen=True)
class FaceCrop:
    """How the network's input is cut around a face: the face box widened by `margin` times its
    width (left, right) and height (top, bottom), each margin times `margin_scale`."""

    kind: str
    margin: float
    margin_scale: float

    @classmethod
    def from_config(cls, spec: Mapping) -> FaceCrop:
        try:
            crop = cls(str(spec["kind"]), float(spec["margin"]), float(spec["margin_scale"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"data.face_crop {spec!r}: expected kind, margin and margin_scale ({err!r})") from None
        if crop.kind not in FACE_CROP_KINDS or crop.margin < 0 or crop.margin_scale < 0:
            raise ConfigError(f"data.face_crop {spec!r}: kind must be one of {FACE_CROP_KINDS}, margins >= 0")
        return crop


def antialias_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 resampling matrix of PyTorch's antialiased bilinear resize
    (`interpolate(mode="bilinear", antialias=True, align_corners=False)`, which torchvision's
    `resize(antialias=True)` calls): output pixel i averages the inputs within `support` of its
    centre scale * (i + 0.5) with a triangle filter stretched by the scale when downsampling,
    the weights renormalised to sum to 1 (so at the borders too). Matches it to ~5e-7."""
    scale = in_size / out_size
    support, stretch = (scale, 1.0 / scale) if scale >= 1.0 else (1.0, 1.0)
    centre = scale * (np.arange(out_size) + 0.5)[:, None]
    # PyTorch truncates the window bounds toward zero, as C++ integer casts do.
    lo = np.maximum(np.trunc(centre - support + 0.5), 0)
    hi = np.minimum(np.trunc(centre + support + 0.5), in_size)
    j = np.arange(in_size)[None, :]
    weights = np.clip(1.0 - np.abs((j - centre + 0.5) * stretch), 0.0, None) * ((j >= lo) & (j < hi))
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _resample(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`weights @ x` for a banded (out, in) `weights` and (in, n) `x`, one tap at a time: each
    output pixel reads only the few inputs of its window (a dense product costs ~100 times more
    on a 1024 px photograph)."""
    nonzero = weights > 0
    start = nonzero.argmax(axis=1)
    taps = int(nonzero.sum(axis=1).max())
    out = np.zeros((len(weights), x.shape[1]), np.float32)
    for t in range(taps):
        index = np.minimum(start + t, weights.shape[1] - 1)
        # Past the end of a window the weight is 0 (the clipped index repeats the last input).
        w = np.where(start + t < weights.shape[1], weights[np.arange(len(weights)), index], 0.0)
        out += w[:, None] * x[index]
    return out


def resize_antialias(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) float32 -> (size, size, C) float32, as torchvision's antialiased bilinear resize."""
    h, w, c = image.shape
    if (h, w) == (size, size):  # the weights are the identity then
        return image
    rows = _resample(image.reshape(h, w * c), antialias_weights(h, size)).reshape(size, w, c)
    cols = _resample(rows.transpose(1, 0, 2).reshape(w, size * c), antialias_weights(w, size))
    return cols.reshape(size, size, c).transpose(1, 0, 2)


@dataclass(frozen=True)
class Preprocessing:
    """Resize to `size` x `size`, then (x - mean * 255) / (std * 255) per channel, as CHW float32
    (with `normalize_first`, normalise and then resize). `face_crop`: what the caller cuts
    around each face before this runs; `video_frames`: the frames a video is scored on (see the
    module docstring)."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "area"
    normalize_first: bool = False
    face_crop: FaceCrop | None = None
    video_frames: int | None = None

    @classmethod
    def from_config(cls, config: Mapping) -> Preprocessing:
        """From a trained model's config (its meta.json `config`): the `data` section's
        `image_size` and optional `mean` / `std`, as `core.data.transforms.build_transform` reads them,
        and the optional `resize`, `normalize_first`, `face_crop` and `video_frames`."""
        data = config["data"]
        resize = str(data.get("resize", "area"))
        if resize not in RESIZE_KERNELS:
            raise ConfigError(f"data.resize {resize!r}: expected one of {RESIZE_KERNELS}")
        crop = data.get("face_crop")
        frames = data.get("video_frames")
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
            raise ConfigError(f"data.video_frames {frames!r}: expected a positive integer or null")
        return cls(
            int(data["image_size"]),
            tuple(float(v) for v in data.get("mean", IMAGENET_MEAN)),
            tuple(float(v) for v in data.get("std", IMAGENET_STD)),
            resize,
            bool(data.get("normalize_first", False)),
            None if crop is None else FaceCrop.from_config(crop),
            frames,
        )

    @property
    def is_default(self) -> bool:
        """Whether the resize is the one the project trains with (INTER_AREA, before normalising),
        which `core.data.transforms` builds with albumentations."""
        return self.resize == "area" and not self.normalize_first

    @cached_property
    def _tables(self) -> np.ndarray:
        """Per channel, what each of the 256 uint8 values becomes."""
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1) * np.float32(MAX_PIXEL)
        scale = np.reciprocal(np.asarray(self.std, np.float32).reshape(-1, 1) * np.float32(MAX_PIXEL))
        return (np.arange(256, dtype=np.float32) - mean) * scale

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) -> the network's input (3, size, size) float32."""
        if self.is_default:
            resized = cv2.resize(image, (self.size, self.size), interpolation=RESIZE_INTERPOLATION)
            return np.stack([self._tables[c][resized[:, :, c]] for c in range(3)])
        if self.normalize_first:
            return self._resize(self._normalize(image)).transpose(2, 0, 1).copy()
        return self._normalize(self._resize(image)).transpose(2, 0, 1).copy()

    def _normalize(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 or float32 pixel values 0-255 -> (x / 255 - mean) / std, float32, as
        torchvision's ToTensor then Normalize compute it."""
        x = image.astype(np.float32) / np.float32(MAX_PIXEL)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def _resize(self, image: np.ndarray) -> np.ndarray:
        if self.resize == "bilinear_antialias":
            return resize_antialias(image.astype(np.float32), self.size)
        kernel = RESIZE_INTERPOLATION if self.resize == "area" else cv2.INTER_LINEAR
        return cv2.resize(image, (self.size, self.size), interpolation=kernel)
