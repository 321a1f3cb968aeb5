"""The demo's sources: two public-domain photographs that ship inside installed packages
(scikit-image's astronaut, matplotlib's Grace Hopper) with their landmarks, the augmented views
the demo's reals are cut from, and the region swaps its fakes are made with. The still images
(`data_prep.demo`) and the videos (`data_prep.demo_videos`) both build on these.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from data_prep.edits import face_swap, region_swap, to_uint8
from data_prep.faces import FaceAnalyzer, flip_landmarks

PHOTOS = ("astronaut", "grace_hopper")
# skimage.data.camera() was considered too: dlib's HOG detector finds no face in it at
# upsample 0-2, so it cannot give landmarks and is left out.

# (method, region) of each kind of fake, drawn equally often.
FAKE_RECIPES = (
    ("edit:swap", "eyes"),
    ("edit:swap", "eyebrows"),
    ("edit:swap", "nose"),
    ("edit:swap", "mouth"),
    ("edit:faceswap", "face"),
    ("sbi", "face"),
)
FAKE_METHODS = tuple(dict.fromkeys(m for m, _ in FAKE_RECIPES))
REGIONS = tuple(dict.fromkeys(r for _, r in FAKE_RECIPES))


class DemoError(RuntimeError):
    """The demo cannot be built; the message says why."""


@dataclass(frozen=True)
class Photo:
    name: str
    rgb: np.ndarray
    landmarks: np.ndarray


@dataclass
class View:
    """An augmented real image before JPEG, with its landmarks in its own coordinates."""

    rgb: np.ndarray
    landmarks: np.ndarray
    photo: str


def _read_photo(name: str) -> np.ndarray:
    if name == "astronaut":
        from skimage import data

        return np.ascontiguousarray(data.astronaut()[..., :3])
    if name == "grace_hopper":
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    raise DemoError(f"unknown demo photograph {name!r}")


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[Photo, ...]:
    """The source photographs with their landmarks, detected once per process."""
    # pick="score": upsampled HOG also fires weakly on the astronaut's suit patch, whose box
    # is about as large as her face; the detector score tells them apart clearly.
    analyzer = FaceAnalyzer(detector="hog", upsample=1, embed=False, pick="score")
    photos = []
    for name in PHOTOS:
        rgb = _read_photo(name)
        face = analyzer.primary(rgb)
        if face is None:
            raise DemoError(f"{name}: dlib found no face in the bundled photograph")
        photos.append(Photo(name=name, rgb=rgb, landmarks=face.landmarks))
    return tuple(photos)


def colour_jitter(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-channel gain, brightness, contrast and saturation, all mild."""
    x = rgb.astype(np.float32) * rng.uniform(0.92, 1.08, 3).astype(np.float32)
    mean = float(x.mean())
    x = (x - mean) * rng.uniform(0.85, 1.15) + mean + rng.uniform(-20, 20)
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = grey[..., None] + (x - grey[..., None]) * rng.uniform(0.8, 1.2)
    return to_uint8(x)


def augment_view(photo: Photo, size: int, rng: np.random.Generator) -> View:
    """A random square view around the face: scale, shift, small rotation, flip, colour jitter."""
    lm = photo.landmarks.astype(np.float64)
    lo, hi = lm.min(0), lm.max(0)
    face = float((hi - lo).max())
    side = face * rng.uniform(1.5, 2.3)
    # Landmarks stop at the brows; moving the centre up a little keeps the forehead in view.
    centre = (lo + hi) / 2.0 + rng.uniform(-0.08, 0.08, 2) * face - np.array([0.0, 0.1 * face])
    mat = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(rng.uniform(-12, 12)), size / side)
    mat[:, 2] += (size - 1) / 2.0 - centre
    rgb = cv2.warpAffine(photo.rgb, mat, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    pts = (lm @ mat[:, :2].T + mat[:, 2]).astype(np.float32)
    if rng.random() < 0.5:
        rgb = np.ascontiguousarray(rgb[:, ::-1])
        pts = flip_landmarks(pts, size)
    return View(rgb=colour_jitter(rgb, rng), landmarks=pts, photo=photo.name)


def swap_region(target: View, source: Photo, region: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste `region` of another photograph onto `target`; returns (image, edit weight in [0, 1]).

    The source is mirrored half of the time (two photographs give few poses otherwise);
    "face" is a full face swap (`edits.face_swap`), the other regions a region swap
    (`edits.region_swap`), the same code the data stage runs.
    """
    src_rgb, src_lm = source.rgb, source.landmarks
    if rng.random() < 0.5:
        src_rgb = np.ascontiguousarray(src_rgb[:, ::-1])
        src_lm = flip_landmarks(src_lm, src_rgb.shape[1])
    if region == "face":
        result = face_swap(target.rgb, target.landmarks, src_rgb, src_lm, rng)
    else:
        result = region_swap(target.rgb, target.landmarks, src_rgb, src_lm, region, rng)
    return result.rgb, result.mask
