"""The face region of a video clip, for members that take clips with `clip.face_crop: true`.

dlib finds the face in every frame of the clip; the clip is cut at ONE square box for all its
frames (the median of the per-frame boxes, widened by `margin` of its side on each side), so the
crop does not jitter from frame to frame and motion stays the face's own. The box is cached per
video under `cache_dir` (keyed by the file's size, modification time and the clip length), so a
video is searched once however many epochs read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from core.imaging import ImageDecodeError
from core.io import write_json
from data_prep.faces import FaceAnalyzer

Box = tuple[int, int, int, int]


def clip_box(boxes: list[Box], shape: tuple[int, ...], margin: float) -> Box:
    """One square box (x0, y0, x1, y1) around the median of `boxes`, `margin` of its side added per
    side, shifted inside an image of `shape` where it can be."""
    x0, y0, x1, y1 = np.median(np.asarray(boxes, dtype=np.float64), axis=0)
    h, w = shape[:2]
    side = min(max(x1 - x0, y1 - y0) * (1 + 2 * margin), h, w)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return left, top, left + int(side), top + int(side)


class ClipFaceCropper:
    """`cropper(path, frames) -> frames`: every frame cut at the clip's face box (see the module
    docstring); ImageDecodeError when no frame shows a face."""

    def __init__(self, cache_dir: str | Path | None, margin: float = 0.3):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.margin = margin
        self._analyzer: FaceAnalyzer | None = None  # built in the process that uses it (loader workers)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_analyzer": None}

    def _cache_file(self, path: str, n_frames: int) -> tuple[Path | None, list]:
        st = Path(path).stat()
        key = [st.st_size, st.st_mtime_ns, n_frames, self.margin]
        if self.cache_dir is None:
            return None, key
        return self.cache_dir / f"{hashlib.sha1(str(path).encode()).hexdigest()}.json", key

    def box(self, path: str, frames: list[np.ndarray]) -> Box:
        cache, key = self._cache_file(path, len(frames))
        if cache is not None and cache.is_file():
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return tuple(saved["box"])
        if self._analyzer is None:
            self._analyzer = FaceAnalyzer(embed=False, pick="score")
        found = [face.box for face in map(self._analyzer.primary, frames) if face is not None]
        if not found:
            raise ImageDecodeError(f"{path}: no face found in {len(frames)} frame(s)")
        box = clip_box(found, frames[0].shape, self.margin)
        if cache is not None:
            write_json({"key": key, "box": list(box)}, cache)
        return box

    def __call__(self, path: str, frames: list[np.ndarray]) -> list[np.ndarray]:
        x0, y0, x1, y1 = self.box(path, frames)
        return [np.ascontiguousarray(f[y0:y1, x0:x1]) for f in frames]


def clip_cropper(cfg: dict) -> ClipFaceCropper | None:
    """The cropper of a member config whose `clip.face_crop` is on (cache under `prep.out`), else None."""
    if not (cfg.get("clip") or {}).get("face_crop"):
        return None
    return ClipFaceCropper(Path(cfg["prep"]["out"]) / "clip_faces")
