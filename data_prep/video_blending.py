"""Video-level blending (VB, METHODS.md section 5): a pseudo-fake clip made from a real clip.

The paper (Yan et al., CVPR 2025) makes VB "by blending the original image and its warped version
frame-by-frame" to reproduce Facial Feature Drift: a facial feature that moves against the rest of
the face from one frame to the next, as when each frame of a fake is generated on its own. The
public code does not ship its VB dataset (`VideoBlendDataset` is named, commented out, in its
`training/train.py`), so every number below is this project's choice (docs/members/sta.md).

For a clip of T frames with 68 landmarks per frame:

    region r    one of `regions` (eyes, eyebrows, nose, mouth), drawn once per clip
    ratio a     drawn once per clip from `ratio`
    per frame t, drawn independently for every frame (the drift varies frame to frame):
      warp_t    scale 1 +- scale, shift +- shift of the face's size per axis, rotation +- rotate degrees,
                about the region's centre in frame t
      mask_t    feather(region r's dilated hull in frame t, sigma = blur x face size) * a
      fake_t    mask_t * warp_t(frame_t) + (1 - mask_t) * frame_t

Outside mask_t (weight 0) a fake frame equals its real frame exactly (tested). Parameters: the
`vblend:` section of a clip member's config (`load_vblend_config`), which also sets `share`, the
part of each epoch's fake clips that are video-level blends (`models.recipes`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.config import ConfigError, read_yaml
from data_prep.edits import SWAP_REGIONS, feather, region_mask, to_uint8

VBLEND_RECIPE_FILE = Path(__file__).resolve().parents[1] / "configs" / "members" / "sta.yaml"


@dataclass(frozen=True)
class VideoBlendConfig:
    """The `vblend:` section: see the module docstring and configs/members/sta.yaml."""

    regions: tuple[str, ...]  # the facial features a clip's drift may move, one drawn per clip
    scale: float  # a frame's warp scales by 1 +- scale ...
    shift: float  # ... shifts by +- shift of the face's size per axis ...
    rotate: float  # ... and rotates by +- rotate degrees, drawn for every frame
    blur: float  # the region mask's feathering sigma, a fraction of the face's size
    ratio: tuple[float, float]  # the blend ratio, drawn once per clip
    share: float  # the part of an epoch's fake clips that are video-level blends, in [0, 1)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.regions) - set(SWAP_REGIONS))
        if not self.regions or unknown:
            raise ConfigError(f"vblend.regions must be some of {list(SWAP_REGIONS)}, not {list(self.regions)}")
        if not 0 < self.ratio[0] <= self.ratio[1] <= 1:
            raise ConfigError(f"vblend.ratio must be 0 < low <= high <= 1, not {list(self.ratio)}")
        if not 0 <= self.share < 1:
            raise ConfigError(f"vblend.share must lie in [0, 1), not {self.share}")
        if min(self.scale, self.shift, self.rotate, self.blur) < 0:
            raise ConfigError("vblend: scale, shift, rotate and blur must not be negative")


def vblend_config(section: Any, where: str, **overrides: Any) -> VideoBlendConfig:
    """A `vblend:` mapping as a VideoBlendConfig; ConfigError naming `where` when it does not fit."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: no `vblend:` section")
    names = {f.name for f in fields(VideoBlendConfig)}
    if set(section) != names:
        raise ConfigError(f"{where}: `vblend:` needs exactly {sorted(names)}, has {sorted(section)}")
    values = {**section, **overrides}
    values["regions"], values["ratio"] = tuple(values["regions"]), tuple(values["ratio"])
    return VideoBlendConfig(**values)


def load_vblend_config(path: str | Path = VBLEND_RECIPE_FILE, **overrides: Any) -> VideoBlendConfig:
    """The `vblend:` section of a member config file; `overrides` replace fields."""
    return vblend_config(read_yaml(path).get("vblend"), str(path), **overrides)


def _face_size(landmarks: np.ndarray) -> float:
    lo, hi = landmarks.min(0), landmarks.max(0)
    return float((hi - lo).max())


def frame_warps(frames: int, cfg: VideoBlendConfig, rng: np.random.Generator) -> np.ndarray:
    """(T, 4): scale, shift x, shift y (fractions of the face's size), rotation (degrees), drawn
    independently for every frame."""
    bounds = np.array([cfg.scale, cfg.shift, cfg.shift, cfg.rotate])
    params = rng.uniform(-bounds, bounds, size=(frames, 4))
    params[:, 0] += 1.0
    return params


def video_blend(
    frames: list[np.ndarray], landmarks: list[np.ndarray], cfg: VideoBlendConfig, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(fake frames, blend weights): see the module docstring. `landmarks[t]` are frame t's 68 points."""
    if len(frames) != len(landmarks) or not frames:
        raise ValueError(f"video_blend: {len(frames)} frames and {len(landmarks)} landmark sets")
    region = cfg.regions[rng.integers(len(cfg.regions))]
    ratio = rng.uniform(*cfg.ratio)
    fakes, weights = [], []
    for frame, lm, (scale, dx, dy, angle) in zip(frames, landmarks, frame_warps(len(frames), cfg, rng), strict=True):
        lm = np.asarray(lm, dtype=np.float64)
        size = _face_size(lm)
        hard = region_mask(lm, region, frame.shape)
        ys, xs = np.nonzero(hard)
        if not len(xs):  # the region lies outside the frame: nothing to move
            fakes.append(frame.copy())
            weights.append(np.zeros(frame.shape[:2], np.float32))
            continue
        centre = (float(xs.mean()), float(ys.mean()))
        mat = cv2.getRotationMatrix2D(centre, float(angle), float(scale))
        mat[:, 2] += (dx * size, dy * size)
        h, w = frame.shape[:2]
        warped = cv2.warpAffine(frame, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        weight = feather(hard, cfg.blur * size) * ratio
        mixed = weight[..., None] * warped.astype(np.float32) + (1 - weight[..., None]) * frame
        fake = to_uint8(mixed)
        fake[weight == 0] = frame[weight == 0]  # exactly the real frame outside the mask
        fakes.append(fake)
        weights.append(weight)
    return fakes, weights
