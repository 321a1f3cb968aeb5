"""The demo sample's short videos: clips made from its photographs, real and faked.

A real clip is a photograph seen through a moving camera: the view's centre, scale and rotation
move smoothly (smoothstep) from one random pose to another over 16 to 32 frames, while the lighting
changes (a gain and an offset that drift the same way). Fakes are made from a real clip (its
`parent`), frame by frame with the same drawn parameters in every frame, so a fake differs from its
real only where it was edited:

- `edit:swap` (eyes, eyebrows, nose or mouth) and `edit:faceswap` (face): the demo's image edits
  (`data_prep.edits`) on every frame, the other photograph the donor;
- `vblend` (face): the video-level blend (`data_prep.video_blending`), a warped copy of each frame
  drifting against its surroundings.

Clips are small (128 px) MPEG-4 files (`.mp4`), so decoding them is cheap; frames keep the demo
stills' framing (face-centred, about half the frame), so they need no face crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from core.progress import progress_bar
from data_prep.demo_photos import FAKE_RECIPES, Photo, View, swap_region
from data_prep.edits import to_uint8
from data_prep.faces import flip_landmarks
from data_prep.video_blending import load_vblend_config, video_blend

VIDEO_SIZE = 128
VIDEO_FRAMES = (16, 32)  # inclusive range of clip lengths
FPS = 12
FAKE_SWAPS = tuple(r for r in FAKE_RECIPES if r[0] != "sbi")  # the image edits, applied to every frame
VIDEO_FAKES = (*FAKE_SWAPS, *[("vblend", "face")] * len(FAKE_SWAPS))  # half video-level blends
VBLEND = load_vblend_config()


def smoothstep(frames: int) -> np.ndarray:
    a = np.linspace(0.0, 1.0, frames)
    return 3 * a**2 - 2 * a**3


def clip_jitter(rng: np.random.Generator):
    """`data_prep.demo_photos.colour_jitter`'s mild colour change, drawn once for a whole clip."""
    gains = rng.uniform(0.92, 1.08, 3).astype(np.float32)
    contrast, saturation = rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.2)

    def apply(rgb: np.ndarray) -> np.ndarray:
        x = rgb.astype(np.float32) * gains
        mean = float(x.mean())
        x = (x - mean) * contrast + mean
        grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return grey[..., None] + (x - grey[..., None]) * saturation

    return apply


def camera_views(photo: Photo, frames: int, size: int, rng: np.random.Generator) -> list[View]:
    """The photograph through a camera moving smoothly between two random poses, lighting drifting."""
    lm = photo.landmarks.astype(np.float64)
    lo, hi = lm.min(0), lm.max(0)
    face = float((hi - lo).max())
    centre0 = (lo + hi) / 2.0 - np.array([0.0, 0.1 * face])
    # (dx, dy, side, angle, gain, offset) at the first and the last frame
    ends = np.stack(
        [
            np.concatenate([rng.uniform(-0.08, 0.08, 2) * face, [face * rng.uniform(1.6, 2.2)], rng.uniform(-8, 8, 1)])
            for _ in range(2)
        ]
    )
    light = rng.uniform([0.8, -20.0], [1.2, 20.0], size=(2, 2))
    flip = rng.random() < 0.5
    jitter = clip_jitter(rng)
    views = []
    for s in smoothstep(frames):
        dx, dy, side, angle = ends[0] + (ends[1] - ends[0]) * s
        gain, offset = light[0] + (light[1] - light[0]) * s
        centre = centre0 + (dx, dy)
        mat = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(angle), size / side)
        mat[:, 2] += (size - 1) / 2.0 - centre
        rgb = cv2.warpAffine(photo.rgb, mat, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        pts = (lm @ mat[:, :2].T + mat[:, 2]).astype(np.float32)
        if flip:
            rgb, pts = np.ascontiguousarray(rgb[:, ::-1]), flip_landmarks(pts, size)
        rgb = to_uint8(jitter(rgb) * gain + offset)
        views.append(View(rgb=rgb, landmarks=pts, photo=photo.name))
    return views


def fake_clip(
    views: list[View], method: str, region: str, donor: Photo, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(fake frames, the real frames they differ from) for one of VIDEO_FAKES."""
    real = [v.rgb for v in views]
    if method == "vblend":
        fakes, _ = video_blend(real, [v.landmarks for v in views], VBLEND, np.random.default_rng(seed))
        return fakes, real
    # the same generator state for every frame: the same donor flip, colours and feathering throughout
    return [swap_region(v, donor, region, np.random.default_rng(seed))[0] for v in views], real


def write_clip(path: Path, frames: Sequence[np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part.mp4")
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    tmp.replace(path)


def build_videos(
    root: Path,
    folder: str,
    rng: np.random.Generator,
    n_real: int,
    n_fake: int,
    photos: Sequence[Photo],
    progress: bool,
) -> pd.DataFrame:
    """Write `n_real` real clips and `n_fake` fakes under `root/folder`; return their manifest rows
    (names `folder/NNNNN.mp4`, relative to `root`). Every real parents at most one fake."""
    total = n_real + n_fake
    names = [f"{folder}/{k:05d}.mp4" for k in rng.permutation(total)]
    lengths = rng.integers(VIDEO_FRAMES[0], VIDEO_FRAMES[1] + 1, size=n_real)
    reals = [camera_views(photos[i % len(photos)], int(n), VIDEO_SIZE, rng) for i, n in enumerate(lengths)]
    kinds = rng.permutation(np.resize(np.arange(len(VIDEO_FAKES)), n_fake))
    parents = rng.permutation(n_real)[:n_fake]
    rows = []
    for k in progress_bar(range(total), desc=f"demo {folder}", unit="clip", disable=not progress):
        if k < n_real:
            frames, parent, method, region = [v.rgb for v in reals[k]], names[k], "real", ""
        else:
            p = int(parents[k - n_real])
            method, region = VIDEO_FAKES[kinds[k - n_real]]
            donor = next(ph for ph in photos if ph.name != reals[p][0].photo)
            frames, _ = fake_clip(reals[p], method, region, donor, int(rng.integers(2**31)))
            parent = names[p]
        write_clip(root / names[k], frames)
        target = int(k >= n_real)
        rows.append({"img_name": names[k], "target": target, "method": method, "parent": parent, "region": region})
    return pd.DataFrame(rows).assign(sources="").sort_values("img_name").reset_index(drop=True)
