"""The face region of a video clip, for members that take clips with `clip.face_crop: true`.

dlib finds the face in every frame of the clip; each frame is cut at a square box of its own,
centred on its face, the centres smoothed over the clip (a centred moving average of `SMOOTH`
frames) so the crop follows a moving face without jittering, and one side for the whole clip (the
median face side, widened by `margin` of it on each side) so the face keeps its scale. A frame
where no face is found takes the nearest frame's box. Per-frame boxes are cached per video under
`cache_dir` (keyed by the file's size and modification time), so a frame is searched once however
many epochs and clips read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from core.imaging import ImageDecodeError
from core.io import write_json
from data_prep.faces import Box, FaceAnalyzer

SMOOTH = 5  # chosen: frames averaged per box centre (published: DeepfakeBench aligns each frame alone)


def smoothed_boxes(found: list[Box | None], shape: tuple[int, ...], margin: float) -> list[Box]:
    """A square box (x0, y0, x1, y1) per frame of a clip from its detections `found` (None where no
    face was found: the nearest frame's is used): centres averaged over `SMOOTH` frames, one side
    for the clip (the median side plus `margin` of it per side), shifted inside an image of `shape`."""
    have = [i for i, box in enumerate(found) if box is not None]
    boxes = np.asarray([found[min(have, key=lambda j: abs(j - i))] for i in range(len(found))], dtype=np.float64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    pad = SMOOTH // 2
    padded = np.pad(centres, ((pad, pad), (0, 0)), mode="edge")
    kernel = np.ones(SMOOTH) / SMOOTH
    centres = np.stack([np.convolve(padded[:, c], kernel, mode="valid") for c in range(2)], axis=1)
    h, w = shape[:2]
    side = min(float(np.median(np.max(boxes[:, 2:] - boxes[:, :2], axis=1))) * (1 + 2 * margin), h, w)
    out = []
    for cx, cy in centres:
        left = int(round(min(max(cx - side / 2, 0), w - side)))
        top = int(round(min(max(cy - side / 2, 0), h - side)))
        out.append((left, top, left + int(side), top + int(side)))
    return out


class ClipFaceCropper:
    """`cropper(path, frames, indices) -> frames`: each frame of a clip cut at its smoothed face box
    (see the module docstring); ImageDecodeError when no frame of the clip shows a face."""

    def __init__(self, cache_dir: str | Path | None, margin: float = 0.3):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.margin = margin
        self._analyzer: FaceAnalyzer | None = None  # built in the process that uses it (loader workers)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_analyzer": None}

    def _cached(self, path: str) -> tuple[Path | None, list, dict[str, list | None]]:
        st = Path(path).stat()
        key = [st.st_size, st.st_mtime_ns]
        if self.cache_dir is None:
            return None, key, {}
        cache = self.cache_dir / f"{hashlib.sha1(str(path).encode()).hexdigest()}.json"
        saved = json.loads(cache.read_text()) if cache.is_file() else {}
        return cache, key, saved.get("boxes", {}) if saved.get("key") == key else {}

    def detections(self, path: str, frames: list[np.ndarray], indices: list[int]) -> list[Box | None]:
        """The face box of each frame (None where none is found), from the cache where it has them."""
        cache, key, boxes = self._cached(path)
        missing = [(i, f) for i, f in zip(indices, frames, strict=True) if str(i) not in boxes]
        if missing:
            if self._analyzer is None:
                self._analyzer = FaceAnalyzer(embed=False, pick="score")
            for i, frame in missing:
                box = self._analyzer.primary_box(frame)
                boxes[str(i)] = None if box is None else list(box)
            if cache is not None:
                write_json({"key": key, "boxes": boxes}, cache)
        return [None if boxes[str(i)] is None else tuple(boxes[str(i)]) for i in indices]

    def __call__(self, path: str, frames: list[np.ndarray], indices: list[int]) -> list[np.ndarray]:
        found = self.detections(path, frames, indices)
        if all(box is None for box in found):
            raise ImageDecodeError(f"{path}: no face found in {len(frames)} frame(s)")
        boxes = smoothed_boxes(found, frames[0].shape, self.margin)
        return [np.ascontiguousarray(f[y0:y1, x0:x1]) for f, (x0, y0, x1, y1) in zip(frames, boxes, strict=True)]


def clip_cropper(cfg: dict) -> ClipFaceCropper | None:
    """The cropper of a member config whose `clip.face_crop` is on (cache under `prep.out`), else None."""
    if not (cfg.get("clip") or {}).get("face_crop"):
        return None
    return ClipFaceCropper(Path(cfg["prep"]["out"]) / "clip_faces")
