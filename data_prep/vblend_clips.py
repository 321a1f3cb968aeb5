"""Video-level blends made online in training: a clip member's training set plus pseudo-fake clips
made each epoch from the table's real video clips (`data_prep.video_blending`).

The blends sit after the table's rows: item `len(base) + k` is the k-th blend of the epoch, made
from real video `reals[(k + epoch * n_blends) mod len(reals)]` (so the epochs cycle through every real
video), read as the base dataset reads a training video with the item's own seed (the same clip cutting
and face crop), its frames' landmarks from `ClipLandmarks`' cache, blended, then augmented like any
clip. How many: `blend_count` from `vblend.share`, the part of an epoch's fake clips that are
blends. Deterministic in (seed, epoch, index), as every training set is.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Dataset

from core.clip_reading import training_clip
from core.data.clips import ClipDataset, clip_tensor
from core.data.datasets import sample_seed
from core.imaging import ImageDecodeError
from data_prep.clip_landmarks import ClipLandmarks, fill_missing
from data_prep.video_blending import VideoBlendConfig, video_blend


def blend_count(share: float, n_fakes: int, n_reals: int) -> int:
    """Blends per epoch so that they are `share` of the fake clips: share / (1 - share) x the table's
    fakes; one per real video when the table has no fakes."""
    if share <= 0 or n_reals == 0:
        return 0
    if n_fakes == 0:
        return n_reals
    return max(1, math.ceil(share / (1 - share) * n_fakes - 1e-9))


class VideoBlendClips(Dataset):
    """`base`'s items, then `n_blends` video-level blends of its real videos `reals` (indices into
    `base`); items as `ClipDataset`'s (`image`, `target` 1 for a blend, `index`, or `error`)."""

    def __init__(
        self, base: ClipDataset, reals: list[int], n_blends: int, cfg: VideoBlendConfig, landmarks: ClipLandmarks
    ):
        if n_blends and not reals:
            raise ValueError("video-level blends need real video clips")
        self.base, self.reals, self.n_blends, self.cfg, self.landmarks = base, list(reals), n_blends, cfg, landmarks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) + self.n_blends

    def source(self, index: int) -> int:
        """The base item (a real video) blend `index` is made from."""
        k = index - len(self.base)
        return self.reals[(k + self.epoch * self.n_blends) % len(self.reals)]

    def blend(self, index: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """(real frames, blended frames, blend weights) of blend `index`, before augmentation."""
        seed = sample_seed(self.base.seed, self.epoch, index)
        path = self.base.paths[self.source(index)]
        real = training_clip(path, self.base.settings, np.random.default_rng(seed), self.base.crop)
        points = fill_missing(self.landmarks(real))
        if points is None:
            raise ImageDecodeError(f"{path}: no face found in the {len(real)} frame(s) of its video-level blend")
        fake, weights = video_blend(real, points, self.cfg, np.random.default_rng(seed))
        return real, fake, weights

    def __getitem__(self, index: int) -> dict:
        if index < len(self.base):
            return self.base[index]
        try:
            _, fake, _ = self.blend(index)
        except ImageDecodeError as err:
            return {"index": index, "error": str(err)}
        seed = sample_seed(self.base.seed, self.epoch, index)
        return {"image": clip_tensor(fake, self.base.transform, seed), "target": 1, "index": index}
