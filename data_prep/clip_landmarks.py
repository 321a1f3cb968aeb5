"""dlib's 68 landmarks of video frames, cached per decoded frame, for video-level blending.

A frame's landmarks are cached under `cache_dir` in a file named by the SHA-1 of its pixels (and
shape), so whichever clip of a video reads the frame, in whatever epoch or loader worker, dlib
searches it once; a frame without a face is cached as "no face" (an empty array). Files are
written temp-then-rename and read without pickle.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from core.io import write_with
from data_prep.faces import FaceAnalyzer

NO_FACE = np.zeros((0, 2), np.float32)


def frame_key(frame: np.ndarray) -> str:
    digest = hashlib.sha1(np.ascontiguousarray(frame).data)
    digest.update(str(frame.shape).encode())
    return digest.hexdigest()


def _save(path: Path, points: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, points)

    write_with(path, write)


class ClipLandmarks:
    """`landmarks(frames) -> [(68, 2) float32 or None per frame]` (None: no face found)."""

    def __init__(self, cache_dir: str | Path | None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._analyzer: FaceAnalyzer | None = None  # built in the process that uses it (loader workers)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_analyzer": None}

    def _detect(self, frame: np.ndarray) -> np.ndarray:
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer(embed=False, pick="score")
        face = self._analyzer.primary(frame)
        return NO_FACE if face is None else np.asarray(face.landmarks, np.float32)

    def frame(self, frame: np.ndarray) -> np.ndarray | None:
        cache = None if self.cache_dir is None else self.cache_dir / f"{frame_key(frame)}.npy"
        if cache is not None and cache.is_file():
            points = np.load(cache, allow_pickle=False)
        else:
            points = self._detect(frame)
            if cache is not None:
                _save(cache, points)
        return points if len(points) else None

    def __call__(self, frames: list[np.ndarray]) -> list[np.ndarray | None]:
        return [self.frame(f) for f in frames]


def fill_missing(points: list[np.ndarray | None]) -> list[np.ndarray] | None:
    """Every frame's landmarks, a frame without a face taking its nearest frame's; None when no frame has a face."""
    found = [i for i, p in enumerate(points) if p is not None]
    if not found:
        return None
    return [points[min(found, key=lambda j: abs(j - i))] for i in range(len(points))]
