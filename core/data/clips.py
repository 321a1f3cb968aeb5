"""Clips of frames for networks that take them (a member config with a `clip` section; its network
says `takes_clips`).

A video becomes a clip of `frames` frames taken at evenly spaced indices over the whole video
(first to last, never the first T), optionally face-cropped by a `crop` function the caller
supplies (the data stage's detector; core does not import it). A still image becomes, by
`clip.still`, a one-frame clip (`single`) or a clip built from the image (`clip`: the image seen
through a slow, smooth camera drift, deterministic per seed). Every frame of a clip gets the same
augmentation draw, so the augmentation does not flicker over time.

Videos live in a labelled set of their own (`data.video_labels`, `data.video_root`,
`data.video_manifest`; the demo's under `<demo_dir>/videos/`), in the competition's label format
with per-video names; `with_videos` adds them to a clip member's training table with folds kept
by video and by source video (the manifest's `parent`), so a fake made from a real video never
sits in another fold than its source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from core.config import ConfigError
from core.data.datasets import Crop, ImageDataset, Transform, sample_seed
from core.imaging import ImageDecodeError, decode_image, is_video, open_video
from core.trained import takes_clips

if TYPE_CHECKING:
    import pandas as pd

    from core.data.sources import DataPaths

STILL_MODES = ("single", "clip")
# A clip member's video crop: (video path, frames) -> frames of the face region.
ClipCrop = Callable[[str, list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class ClipSettings:
    """The member config's `clip` section."""

    frames: int
    still: str = "single"
    drift: float = 0.03  # `clip` stills: the camera's largest shift and zoom, as a fraction of the image
    face_crop: bool = False  # videos: crop the face region (the caller's detector)

    @classmethod
    def from_cfg(cls, cfg: dict) -> ClipSettings:
        section = dict(cfg.get("clip") or {})
        if "frames" not in section or int(section["frames"]) < 1:
            raise ConfigError(f"clip.frames must be a positive integer, not {section.get('frames')!r}")
        unknown = sorted(set(section) - {"frames", "still", "drift", "face_crop"})
        if unknown:
            raise ConfigError(f"unknown clip setting(s) {unknown}; known: frames, still, drift, face_crop")
        settings = cls(**section)
        if settings.still not in STILL_MODES:
            raise ConfigError(f"clip.still must be one of {list(STILL_MODES)}, not {settings.still!r}")
        return settings


# --------------------------------------------------------------------------- reading clips


def clip_indices(n_frames: int, frames: int) -> np.ndarray:
    """`frames` indices spread evenly from the first frame to the last (repeated when the video is
    shorter than the clip)."""
    if n_frames < 1:
        raise ValueError("a video without frames has no clip")
    return np.linspace(0, n_frames - 1, num=frames).round().astype(int)


def read_clip(path: str, frames: int) -> list[np.ndarray]:
    """`frames` RGB frames of the video at `path`, at `clip_indices` over its whole length. A file
    that is missing, cannot be opened, reports no frames or ends before its last frame raises
    ImageDecodeError naming it."""
    import cv2

    with open_video(path) as (cap, total):
        wanted = clip_indices(total, frames)
        kept: dict[int, np.ndarray] = {}
        for index in range(int(wanted.max()) + 1):  # read in order: seeking is unreliable in many codecs
            if index in wanted:
                ok, frame = cap.read()
                if ok:
                    kept[index] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            else:
                ok = cap.grab()
            if not ok:
                raise ImageDecodeError(f"{path}: truncated: frame {index} of {total} could not be decoded")
    return [kept[i] for i in wanted]


def drift_clip(image: np.ndarray, frames: int, drift: float, rng: np.random.Generator) -> list[np.ndarray]:
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


def still_clip(image: np.ndarray, settings: ClipSettings, seed: int) -> list[np.ndarray]:
    """A still image as a clip: itself (`single`) or `drift_clip` of `settings.frames` frames (`clip`)."""
    if settings.still == "single":
        return [image]
    return drift_clip(image, settings.frames, settings.drift, np.random.default_rng(seed))


def load_clip(path: str, settings: ClipSettings, seed: int, crop: ClipCrop | None = None) -> list[np.ndarray]:
    """The frames of `path` as the network takes them: a video's clip (face-cropped with `crop` when
    given and `settings.face_crop`), or a still image's `still_clip`."""
    if is_video(path):
        frames = read_clip(path, settings.frames)
        return crop(path, frames) if crop is not None and settings.face_crop else frames
    return still_clip(decode_image(path), settings, seed)


def clip_tensor(frames: Sequence[np.ndarray], transform: Transform | None, seed: int) -> torch.Tensor:
    """(T, 3, H, W): every frame through `transform` with the same seed (one augmentation draw per clip)."""
    if transform is None:
        return torch.stack([torch.from_numpy(np.ascontiguousarray(f.transpose(2, 0, 1))) for f in frames])
    return torch.stack([transform(f, seed) for f in frames])


class ClipDataset(Dataset):
    """`core.data.datasets.ImageDataset` for clip networks: items `image` (T, 3, H, W), `target`, `index`,
    or `error` (a one-line reason naming the file: unreadable, truncated)."""

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int] | None,
        transform: Transform | None,
        settings: ClipSettings,
        seed: int = 0,
        crop: ClipCrop | None = None,
    ):
        self.paths = [str(p) for p in paths]
        self.targets = None if targets is None else [int(t) for t in targets]
        self.transform, self.settings, self.seed, self.crop = transform, settings, seed, crop
        self.epoch = 0

    def subset(self, indices: Sequence[int]) -> ClipDataset:
        targets = None if self.targets is None else [self.targets[i] for i in indices]
        return ClipDataset(
            [self.paths[i] for i in indices], targets, self.transform, self.settings, self.seed, self.crop
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        seed = sample_seed(self.seed, self.epoch, index)
        try:
            frames = load_clip(self.paths[index], self.settings, seed, self.crop)
        except ImageDecodeError as err:
            return {"index": index, "error": str(err)}
        item = {"image": clip_tensor(frames, self.transform, seed), "index": index}
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


def check_uniform_clips(paths: Sequence[str], settings: ClipSettings, where: str) -> None:
    """A batch holds clips of one length: one-frame stills cannot share batches with video clips."""
    kinds = {is_video(p) for p in paths}
    if settings.still == "single" and settings.frames > 1 and kinds == {True, False}:
        raise ConfigError(
            f"{where} mixes videos and still images, but clip.still is 'single' (one-frame clips) and videos give "
            f"{settings.frames}; a batch holds clips of one length: set clip.still=clip"
        )


def eval_dataset(
    cfg: dict,
    paths: Sequence[str],
    targets: Sequence[int] | None,
    transform: Transform,
    crop: ClipCrop | None = None,
    faces: Crop | None = None,
) -> ImageDataset | ClipDataset:
    """The dataset that scores `paths` for the member `cfg`: clips when it takes them, else images
    (each image's face crops with `faces`, for a member that records `data.face_crop`)."""
    if not takes_clips(cfg):
        return ImageDataset(paths, targets, transform, crop=faces)
    settings = ClipSettings.from_cfg(cfg)
    check_uniform_clips(paths, settings, f"{cfg.get('name', 'the member')}'s scored set")
    return ClipDataset(paths, targets, transform, settings, crop=crop)


# --------------------------------------------------------------------------- the video set


def read_video_table(paths: DataPaths) -> pd.DataFrame | None:
    """The labelled videos (`core.data.sources.read_train_table`'s columns), or None when none are configured."""
    from dataclasses import replace

    from core.data.sources import read_train_table

    if paths.video_labels is None or not paths.video_labels.is_file():
        return None
    return read_train_table(
        replace(paths, train_labels=paths.video_labels, train_root=paths.video_root, manifest=paths.video_manifest)
    )


def video_folds(videos: pd.DataFrame, folds: Sequence[int], seed: int) -> np.ndarray:
    """A fold of `folds` per video: stratified by label, a real video and every video made from it
    (`parent`, `sources`) in one fold, deterministic for `seed`."""
    from core.data.folds import stratified_group_folds

    folds = sorted(folds)
    return np.asarray(folds)[stratified_group_folds(videos, len(folds), seed)]


def with_videos(cfg: dict, paths: DataPaths, table: pd.DataFrame) -> pd.DataFrame:
    """The training table (with its `fold` column) plus the configured videos with their folds, for a
    member that takes clips; the table unchanged otherwise. The videos' `cluster` is -1."""
    import pandas as pd

    if not takes_clips(cfg):
        return table
    videos = read_video_table(paths)
    if videos is None or videos.empty:
        return table
    clash = sorted(set(videos["img_name"]) & set(table["img_name"]))
    if clash:
        raise ConfigError(f"{paths.video_labels}: video names also name training images, e.g. {clash[:3]}")
    videos = videos.assign(cluster=-1, fold=video_folds(videos, table["fold"].unique(), int(cfg["split"]["seed"])))
    return pd.concat([table, videos], ignore_index=True)
