"""Scoring inputs with networks that take clips, without torch (infer.py and its service).

Each input is fed as the member's validation fed it: its clips cut by `core.clip_reading` (a
video's every clip of its window, face-cropped when `clip.face_crop` is on; a still's one clip,
built from its pixels as `clip.still` says), each frame through the member's evaluation
preprocessing (`core.preprocess`, the NumPy twin of the torch transform), and its probability is
the mean of its clips' (the published test's video score). A network is any callable
`clips (K, T, 3, S, S) float32 -> outputs`: ONNX Runtime (its export has a free clip length), or
PyTorch behind the same interface where no verified export exists. The models fed the same clips
(a member's folds) form a group: an input is read and cut once per group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.clip_reading import Clip, ClipCrop, ClipSettings, scoring_clips, still_clip
from core.imaging import ImageDecodeError
from core.infer.scoring import Network, fake_probability
from core.preprocess import Preprocessing


@dataclass
class ClipGroup:
    """Clip networks fed the same clips, and their columns in the ensemble."""

    settings: ClipSettings
    preprocessing: Preprocessing
    networks: list[Network]
    columns: list[int]
    crop: ClipCrop | None = None

    def inputs(self, clips: Sequence[Clip]) -> np.ndarray:
        """(K, T, 3, S, S) float32: every frame of every clip preprocessed."""
        return np.stack([np.stack([self.preprocessing(frame) for frame in clip]) for clip in clips])

    def probabilities(self, clips: Sequence[Clip]) -> np.ndarray:
        """(n_networks,) fake probabilities of one input: each network's mean over its clips."""
        x = self.inputs(clips)
        return np.array([fake_probability(network(x)).mean() for network in self.networks])


class ClipScorer:
    """Fills the clip models' columns of infer.py's (N, n_models) probabilities."""

    def __init__(self, groups: list[ClipGroup], n_models: int):
        self.groups = groups
        self.n_models = n_models

    def score_file(self, path: Path) -> np.ndarray:
        """(n_models,) probabilities of the file at `path`, NaN outside the clip models' columns;
        ImageDecodeError when it cannot be read as clips."""
        row = np.full(self.n_models, np.nan)
        for group in self.groups:
            row[group.columns] = group.probabilities(scoring_clips(path, group.settings, group.crop))
        return row

    def score(self, paths: Sequence[Path], probs: np.ndarray, report: Callable[[str], None]) -> None:
        """Score every input file into `probs[:, columns]`; an input that cannot be read as clips is
        reported once and left NaN."""
        columns = [c for group in self.groups for c in group.columns]
        for row, path in enumerate(paths):
            try:
                probs[row, columns] = self.score_file(path)[columns]
            except ImageDecodeError as err:
                report(str(err))

    def score_arrays(self, images: Sequence[np.ndarray], probs: np.ndarray) -> None:
        """Score decoded still images (the service's uploads) into `probs[:, columns]`, each as the
        clip built from its pixels, so an upload scores as the same file given to infer.py."""
        for row, image in enumerate(images):
            for group in self.groups:
                probs[row, group.columns] = group.probabilities([still_clip(image, group.settings)])
