"""Safe image and video decoding.

Every decoder returns RGB uint8 arrays of shape (H, W, 3) whatever the file holds
(grayscale, palette, RGBA, 16-bit, CMYK), applies EXIF orientation, and raises
`ImageDecodeError` naming the file and the reason instead of a library traceback.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# A 16k x 16k photograph is larger than any competition image; past this PIL's own
# decompression-bomb check fires, and we turn it into an error rather than a warning.
MAX_PIXELS = 16384 * 16384
MIN_SIDE = 16

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


class ImageDecodeError(ValueError):
    """An image or video could not be turned into RGB pixels; the message names the file."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit and 32-bit integer images: scale the full range down to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white: the colour under alpha = 0 is arbitrary.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(path: str | Path) -> np.ndarray:
    """Read `path` as an RGB uint8 array (H, W, 3), or raise ImageDecodeError."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"{path}: empty file")
    return _decode(path, str(path))


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """`decode_image` for an image held in memory (an upload); errors name it `name`."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, name: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageDecodeError(f"{name}: {w}x{h} pixels exceeds the limit of {MAX_PIXELS}")
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"{name}: decompression bomb ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:
        # PIL reports truncation and unknown formats as OSError / UnidentifiedImageError.
        reason = "not an image or unsupported format" if "cannot identify" in str(err) else str(err)
        raise ImageDecodeError(f"{name}: {reason}") from None
    if min(rgb.size) < MIN_SIDE:
        raise ImageDecodeError(f"{name}: {rgb.size[0]}x{rgb.size[1]} is smaller than {MIN_SIDE} px")
    return np.asarray(rgb, dtype=np.uint8)


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def opens_as_image(path: str | Path) -> bool:
    """True when the decoder recognises the file's header, whatever its name (GIF, ICO, PPM,
    an image saved without an extension). Reads the header only, not the pixels."""
    try:
        with Image.open(path):
            return True
    except (OSError, ValueError, SyntaxError):
        return False


@contextmanager
def open_video(path: str | Path) -> Iterator[tuple[Any, int]]:
    """OpenCV's capture of the video at `path` and its frame count, released on exit. A file that
    is missing, cannot be opened or holds no frame raises ImageDecodeError naming it. A container
    that records no frame count (a live stream's dump, some WebM and Matroska files) is counted by
    reading it through once, then opened again at its start."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: no such file")
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise ImageDecodeError(f"{path}: cannot open as a video")
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:
            total = sum(1 for _ in iter(cap.grab, False))
            cap.release()
            cap = cv2.VideoCapture(str(path))
        if total <= 0:
            raise ImageDecodeError(f"{path}: video holds no frames")
        yield cap, total
    finally:
        cap.release()


def indexed_video_frames(path: str | Path, num_frames: int) -> list[tuple[int, np.ndarray]]:
    """`num_frames` (frame index, RGB frame) pairs spread evenly over the whole video.

    Frames are taken at evenly spaced indices from first to last, not from the start,
    so a long video is represented by all of its length; a frame that does not decode is left out.
    Each is reached by seeking; a file whose seeks do not land (no index to seek by, as in a
    container that records no frame count) is read in order instead.
    """
    with open_video(path) as (cap, total):
        indices = np.unique(np.linspace(0, total - 1, num=min(num_frames, total)).round().astype(int))
        frames = _frames_by_seeking(cap, indices)
    if frames is None:
        with open_video(path) as (cap, _):
            frames = _frames_in_order(cap, indices)
    if not frames:
        raise ImageDecodeError(f"{path}: no frame could be decoded")
    return frames


def _frames_by_seeking(cap: Any, indices: np.ndarray) -> list[tuple[int, np.ndarray]] | None:
    """The decodable frames at `indices`, each reached by a seek; None as soon as one does not land."""
    import cv2

    frames = []
    for idx in indices:
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(idx))
        if int(cap.get(cv2.CAP_PROP_POS_FRAMES)) != idx:
            return None
        ok, frame = cap.read()
        if ok:
            frames.append((int(idx), cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
    return frames


def _frames_in_order(cap: Any, indices: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The decodable frames at `indices` (ascending), reading the video from its start."""
    import cv2

    frames, wanted = [], set(indices.tolist())
    for idx in range(int(indices[-1]) + 1):
        if not cap.grab():
            break
        if idx in wanted:
            ok, frame = cap.retrieve()
            if ok:
                frames.append((idx, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
    return frames


def sample_video_frames(path: str | Path, num_frames: int) -> list[np.ndarray]:
    """The frames of `indexed_video_frames`, without their indices."""
    return [frame for _, frame in indexed_video_frames(path, num_frames)]
