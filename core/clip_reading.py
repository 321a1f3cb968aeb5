"""Clips of frames as a clip network takes them, in NumPy and OpenCV alone (infer.py's ONNX path
reads clips with this and never imports torch; `core.data.clips` builds datasets on it).

A video is cut as the published StA code cuts it (DeepfakeBench's video dataset with
`frame_num: 32`, `clip_size: 8`): a window of `window` frames at the video's start, split
into K = window // frames segments, one clip of `frames` adjacent frames in each. Scoring takes
every clip, each at the start of its segment, and the video's probability is the mean of its
clips' (`clip_starts`); a training sample is one of them, at an offset drawn in its segment
(`training_start`). Only the window is decoded (never the whole video), once per clip read, in
order from the first frame, so no codec's seeking is trusted; a container that over-reports its
frame count is read to its real end; a video shorter than the window gives fewer clips, and one
shorter than a clip gives one clip with its last frame repeated.

A still image becomes, by `clip.still`, a one-frame clip (`single`) or a clip built from the
image (`clip`: the image seen through a slow, smooth camera drift). Where scoring builds that
drift, its seed is a function of the image's pixels (`still_seed`), never of its position in a
list: a test list, one rank's shard and a single upload give the image the same clip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.config import ConfigError
from core.imaging import ImageDecodeError, decode_image, is_video, open_video

STILL_MODES = ("single", "clip")
SETTINGS = ("frames", "window", "still", "drift", "face_crop")
# A clip member's video crop: (video path, the clip's frames, their indices in the video) -> the
# frames cut around the face (the data stage's detector; core does not import it).
ClipCrop = Callable[[str, list[np.ndarray], list[int]], list[np.ndarray]]
Clip = list[np.ndarray]


@dataclass(frozen=True)
class ClipSettings:
    """The member config's `clip` section."""

    frames: int
    window: int = 32  # published: frame_num 32, the frames a video's clips are cut from
    still: str = "single"
    drift: float = 0.03  # `clip` stills: the camera's largest shift and zoom, as a fraction of the image
    face_crop: bool = False  # videos: crop the face region (the caller's detector)

    @classmethod
    def from_cfg(cls, cfg: dict) -> ClipSettings:
        section = dict(cfg.get("clip") or {})
        if "frames" not in section or int(section["frames"]) < 1:
            raise ConfigError(f"clip.frames must be a positive integer, not {section.get('frames')!r}")
        unknown = sorted(set(section) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown clip setting(s) {unknown}; known: {', '.join(SETTINGS)}")
        settings = cls(**section)
        if settings.still not in STILL_MODES:
            raise ConfigError(f"clip.still must be one of {list(STILL_MODES)}, not {settings.still!r}")
        if settings.window < settings.frames:
            raise ConfigError(f"clip.window ({settings.window}) must hold at least one clip of {settings.frames}")
        return settings


# --------------------------------------------------------------------------- cutting a window


def clip_starts(n_frames: int, frames: int, window: int) -> list[int]:
    """Where each clip of a video with `n_frames` decodable frames starts, for scoring: the window
    (its first `window` frames) in K = max(1, window // frames) segments, a clip at each
    segment's start (the published code draws the start inside the segment; scoring here stays
    deterministic). A video shorter than a clip has one clip, at 0."""
    if n_frames < 1:
        raise ValueError("a video without frames has no clip")
    total = min(window, n_frames)
    count = max(1, total // frames)
    if count == 1:
        return [0]
    step = (total - frames) // (count - 1)
    return [k * step for k in range(count)]


def training_start(n_frames: int, frames: int, window: int, rng: np.random.Generator) -> int:
    """A training clip's start: one of the window's segments at random, at an offset drawn inside
    it as the published dataset draws it (`random.randrange(k * step, min((k + 1) * step,
    total - frames + 1))`)."""
    total = min(window, n_frames)
    count, last = max(1, total // frames), max(total - frames, 0)
    if count == 1:
        return int(rng.integers(0, last + 1))
    step = (total - frames) // (count - 1)
    k = int(rng.integers(count))
    return int(rng.integers(k * step, max(min((k + 1) * step, last + 1), k * step + 1)))


def cut(window: list[np.ndarray], start: int, frames: int) -> Clip:
    """`frames` adjacent frames of `window` from `start`, the last frame repeated past its end."""
    return [window[min(start + i, len(window) - 1)] for i in range(frames)]


def read_window(path: str | Path, window: int) -> list[np.ndarray]:
    """The video's first `window` RGB frames, read in order (seeking is unreliable in many codecs),
    fewer when it ends sooner, whatever its container reports (OpenCV's frame count often
    over-reports, or records none). A file that is missing, cannot be opened, holds no frame or has no
    decodable frame raises ImageDecodeError naming it."""
    import cv2

    frames: list[np.ndarray] = []
    with open_video(path) as (cap, total):
        for _ in range(min(window, total)):
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    if not frames:
        raise ImageDecodeError(f"{path}: truncated: no frame could be decoded")
    return frames


def video_clips(path: str | Path, settings: ClipSettings, crop: ClipCrop | None = None) -> list[Clip]:
    """Every clip that scores the video at `path` (`clip_starts`), its window decoded once;
    face-cropped with `crop` when given and `settings.face_crop`."""
    window = read_window(path, settings.window)
    starts = clip_starts(len(window), settings.frames, settings.window)
    return [_cropped(path, window, s, settings, crop) for s in starts]


def training_clip(
    path: str | Path, settings: ClipSettings, rng: np.random.Generator, crop: ClipCrop | None = None
) -> Clip:
    """One training clip of the video at `path` (`training_start`), reading its window only."""
    window = read_window(path, settings.window)
    start = training_start(len(window), settings.frames, settings.window, rng)
    return _cropped(path, window, start, settings, crop)


def _cropped(path, window: list[np.ndarray], start: int, settings: ClipSettings, crop: ClipCrop | None) -> Clip:
    frames = cut(window, start, settings.frames)
    if crop is None or not settings.face_crop:
        return frames
    indices = [min(start + i, len(window) - 1) for i in range(settings.frames)]
    return crop(str(path), frames, indices)


# --------------------------------------------------------------------------- stills


def drift_clip(image: np.ndarray, frames: int, drift: float, rng: np.random.Generator) -> Clip:
    """A clip built from a still image: the image through a camera that moves smoothly, linearly from
    one random pose to another (shift and zoom up to `drift` of the image), reflected at the borders."""
    import cv2

    h, w = image.shape[:2]
    start, end = rng.uniform(-drift, drift, size=(2, 3))  # (dx, dy, zoom) at the first and last frame
    out = []
    for a in np.linspace(0.0, 1.0, frames):
        dx, dy, zoom = (1 - a) * start + a * end
        mat = cv2.getRotationMatrix2D((w / 2, h / 2), 0.0, 1.0 + abs(zoom))
        mat[:, 2] += (dx * w, dy * h)
        out.append(cv2.warpAffine(image, mat, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101))
    return out


def still_seed(image: np.ndarray) -> int:
    """A seed that is a function of the image's pixels alone (and of nothing about where it is listed)."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=8)
    digest.update(repr(image.shape).encode())
    return int.from_bytes(digest.digest(), "little")


def still_clip(image: np.ndarray, settings: ClipSettings, seed: int | None = None) -> Clip:
    """A still image as a clip: itself (`single`) or `drift_clip` of `settings.frames` frames
    (`clip`), drawn with `seed`, or with `still_seed(image)` when none is given (scoring)."""
    if settings.still == "single":
        return [image]
    rng = np.random.default_rng(still_seed(image) if seed is None else seed)
    return drift_clip(image, settings.frames, settings.drift, rng)


def scoring_clips(path: str | Path, settings: ClipSettings, crop: ClipCrop | None = None) -> list[Clip]:
    """The clips that score the file at `path`, whose probability is the mean of theirs: a video's
    `video_clips`, a still image's one `still_clip`."""
    if is_video(path):
        return video_clips(path, settings, crop)
    return [still_clip(decode_image(path), settings)]


def check_uniform_clips(paths, settings: ClipSettings, where: str) -> None:
    """A batch holds clips of one length: one-frame stills cannot share batches with video clips."""
    kinds = {is_video(p) for p in paths}
    if settings.still == "single" and settings.frames > 1 and kinds == {True, False}:
        raise ConfigError(
            f"{where} mixes videos and still images, but clip.still is 'single' (one-frame clips) and videos give "
            f"{settings.frames}; a batch holds clips of one length: set clip.still=clip"
        )
