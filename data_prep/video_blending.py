"""Video-level blending (METHODS.md section 5): a pseudo-fake clip made from a real clip.

Each frame is blended, inside a soft face mask, with a warped copy of itself whose warp drifts
smoothly over the clip: scale, shift and rotation move from one random setting at the first frame
to another at the last along a smoothstep, so the facial features inside the mask drift against
their surroundings over time, and no frame jumps. The copy is colour-shifted once for the whole
clip (as a self-blend shifts its source), so the blend boundary is there in every frame.

    warp_t  = A(p_t) about the face centre,  p_t = p_0 + (p_1 - p_0) s(t / (T - 1)),  s(a) = 3a^2 - 2a^3
    mask_t  = blur(erode(hull of frame t's 68 landmarks)) * ratio        (zero outside the hull)
    fake_t  = mask_t * colour(warp_t(frame_t)) + (1 - mask_t) * frame_t

Parameters: the `vblend:` section of configs/members/sta.yaml (`load_vblend_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.config import read_yaml
from data_prep.edits import face_hull_mask, morph, to_uint8

VBLEND_RECIPE_FILE = Path(__file__).resolve().parents[1] / "configs" / "members" / "sta.yaml"


@dataclass(frozen=True)
class VideoBlendConfig:
    """The drift's bounds and the mask; see the module docstring and configs/members/sta.yaml."""

    scale: float  # the copy's scale lies in 1 +- scale at each end of the clip
    shift: float  # its shift, per axis, in +- shift of the face's size
    rotate: float  # its rotation in +- rotate degrees
    erode: float  # the hull is eroded by this fraction of the face's size ...
    blur: float  # ... then blurred with a Gaussian of this sigma (fraction of the face's size)
    ratio: tuple[float, float]  # the blend ratio, drawn once per clip
    colour_shift: float  # the copy's per-channel gain in 1 +- colour_shift, drawn once per clip

    def __post_init__(self) -> None:
        if not 0 < self.blur * 3 <= self.erode:
            raise ValueError("vblend: blur * 3 must not exceed erode, or the soft mask would leave the face hull")


def load_vblend_config(path: str | Path = VBLEND_RECIPE_FILE, **overrides: Any) -> VideoBlendConfig:
    """The `vblend:` section of a member config; `overrides` replace fields."""
    section = read_yaml(path).get("vblend")
    if not isinstance(section, dict):
        raise ValueError(f"{path}: no `vblend:` section")
    names = {f.name for f in fields(VideoBlendConfig)}
    if set(section) != names:
        raise ValueError(f"{path}: `vblend:` needs exactly {sorted(names)}, has {sorted(section)}")
    values = {**section, **overrides}
    values["ratio"] = tuple(values["ratio"])
    return VideoBlendConfig(**values)


def _face_size(landmarks: np.ndarray) -> float:
    lo, hi = landmarks.min(0), landmarks.max(0)
    return float((hi - lo).max())


def drift_params(frames: int, cfg: VideoBlendConfig, rng: np.random.Generator) -> np.ndarray:
    """(T, 4): scale, shift x, shift y (fractions of the face size), rotation (degrees) per frame,
    moving from one random draw to another along a smoothstep."""
    bounds = np.array([cfg.scale, cfg.shift, cfg.shift, cfg.rotate])
    ends = rng.uniform(-bounds, bounds, size=(2, 4))
    a = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    s = (3 * a**2 - 2 * a**3)[:, None]
    params = ends[0] + (ends[1] - ends[0]) * s
    params[:, 0] += 1.0
    return params


def blend_mask(landmarks: np.ndarray, shape: tuple[int, ...], cfg: VideoBlendConfig) -> np.ndarray:
    """float32 (H, W) in [0, 1]: the landmark hull eroded, then blurred; zero outside the hull."""
    size = _face_size(landmarks)
    hull = face_hull_mask(landmarks, shape)
    core = morph(hull, cfg.erode * size, cv2.MORPH_ERODE).astype(np.float32)
    sigma = max(cfg.blur * size, 0.5)
    return cv2.GaussianBlur(core, (0, 0), sigma) * hull


def video_blend(
    frames: list[np.ndarray], landmarks: list[np.ndarray], cfg: VideoBlendConfig, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(fake frames, blend weights): see the module docstring. `landmarks[t]` are frame t's 68 points."""
    if len(frames) != len(landmarks) or not frames:
        raise ValueError(f"video_blend: {len(frames)} frames and {len(landmarks)} landmark sets")
    params = drift_params(len(frames), cfg, rng)
    ratio = rng.uniform(*cfg.ratio)
    gain = rng.uniform(1 - cfg.colour_shift, 1 + cfg.colour_shift, 3).astype(np.float32)
    fakes, weights = [], []
    for frame, lm, (scale, dx, dy, angle) in zip(frames, landmarks, params, strict=True):
        lm = np.asarray(lm, dtype=np.float64)
        size = _face_size(lm)
        cx, cy = lm.mean(0)
        mat = cv2.getRotationMatrix2D((float(cx), float(cy)), float(angle), float(scale))
        mat[:, 2] += (dx * size, dy * size)
        h, w = frame.shape[:2]
        copy = cv2.warpAffine(frame, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        weight = blend_mask(lm, frame.shape, cfg) * ratio
        mixed = weight[..., None] * (copy.astype(np.float32) * gain) + (1 - weight[..., None]) * frame
        fakes.append(to_uint8(mixed))
        weights.append(weight)
    return fakes, weights
