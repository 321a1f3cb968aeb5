"""Faces with dlib, offline: boxes, 68 landmarks, 128-d embeddings, aligned crops, a per-image cache.

The model files come from the `face_recognition_models` package, found on disk without
importing it (its `__init__` pulls in pkg_resources, which is deprecated and slow). Models
load lazily, once per process, so every data-loader worker holds its own copy and a
`FaceAnalyzer` stays cheap to pickle.

Coordinates are pixels, x right and y down. Landmark indices follow the iBUG 68-point
scheme, where "right eye" is the subject's right eye (on the left of an unmirrored image).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np

from core.data.labels import LabelError, safe_join
from core.imaging import ImageDecodeError, decode_image
from core.io import atomic_path
from core.progress import progress_bar

log = logging.getLogger("ffdi.data_prep.faces")

LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"
EMBEDDING_FILE = "dlib_face_recognition_resnet_model_v1.dat"
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"

NUM_LANDMARKS = 68
EMBEDDING_DIM = 128

REGIONS: dict[str, tuple[int, ...]] = {
    "jaw": tuple(range(0, 17)),
    "right_eyebrow": tuple(range(17, 22)),
    "left_eyebrow": tuple(range(22, 27)),
    "nose": tuple(range(27, 36)),
    "right_eye": tuple(range(36, 42)),
    "left_eye": tuple(range(42, 48)),
    "mouth": tuple(range(48, 68)),
}

# Index permutation for a horizontally mirrored face: after flipping the pixels and the x
# coordinates, point i of the mirrored face is point FLIP_68[i] of the original, so that
# "right eye" still means the subject's right eye and a similarity transform (which cannot
# reflect) can still align a mirrored face with an unmirrored one.
FLIP_68: tuple[int, ...] = (
    tuple(range(16, -1, -1))  # jaw, reversed
    + tuple(range(26, 16, -1))  # eyebrows swap, each reversed
    + (27, 28, 29, 30)  # nose bridge lies on the mirror axis
    + (35, 34, 33, 32, 31)  # nostrils reversed
    + (45, 44, 43, 42, 47, 46)  # right eye <- left eye
    + (39, 38, 37, 36, 41, 40)  # left eye <- right eye
    + (54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55)  # outer lip
    + (64, 63, 62, 61, 60, 67, 66, 65)  # inner lip
)

DetectorKind = Literal["hog", "cnn"]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1; x1 and y1 exclusive
PickRule = Literal["largest", "score"]

# Bump when the cached fields or their meaning change, so old cache files are recomputed.
CACHE_VERSION = 1


class FaceModelError(RuntimeError):
    """A dlib model file is missing or cannot be loaded; the message names the file."""


def default_models_dir() -> Path:
    """The `models` folder shipped by the installed face_recognition_models package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError(
            "face_recognition_models is not installed; install it from the package index "
            "or pass models_dir pointing at a folder with the dlib .dat files"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def model_path(filename: str, models_dir: str | Path | None = None) -> Path:
    """Path to one dlib model file, or FaceModelError saying which file is missing where."""
    folder = Path(models_dir) if models_dir is not None else default_models_dir()
    path = folder / filename
    if not path.is_file():
        raise FaceModelError(f"{path}: dlib model file not found (expected {filename} in {folder})")
    return path


# One loaded model per (kind, file) per process; the lock stops two threads loading the
# 100 MB landmark model twice.
_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def _load_model(kind: str, path: Path) -> Any:
    key = (kind, str(path))
    with _MODELS_LOCK:
        if key not in _MODELS:
            import dlib

            loaders = {
                "hog": lambda p: _frontal_detector(),
                "cnn": lambda p: dlib.cnn_face_detection_model_v1(p),
                "landmarks": lambda p: dlib.shape_predictor(p),
                "embedding": lambda p: dlib.face_recognition_model_v1(p),
            }
            try:
                _MODELS[key] = loaders[kind](str(path))
            except RuntimeError as err:
                raise FaceModelError(f"{path}: cannot load dlib {kind} model ({err})") from None
        return _MODELS[key]


def cache_dir() -> Path:
    """The user's cache for what this project derives once per machine: `FFDI_CACHE_DIR`, else
    `$XDG_CACHE_HOME/ffdi`, else `~/.cache/ffdi`."""
    if os.environ.get("FFDI_CACHE_DIR"):
        return Path(os.environ["FFDI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ffdi"


def _frontal_detector() -> Any:
    """dlib's HOG frontal face detector. dlib builds it from a compressed text copy compiled into
    the library, 0.3-0.7 s at every process start on this 2-core machine; its saved binary form
    loads in 2 ms and detects the same boxes with the same scores, so the first process saves it
    in the user's cache (`cache_dir`) and later ones read it. An unreadable copy is replaced;
    an unwritable cache only costs the saving."""
    import dlib

    path = cache_dir() / f"dlib-{dlib.__version__}-frontal_face_detector.svm"
    if path.is_file():
        try:
            return dlib.fhog_object_detector(str(path))
        except RuntimeError as err:
            log.warning("%s: unreadable saved face detector (%s); building it again", path, err)
    detector = dlib.get_frontal_face_detector()
    try:
        with atomic_path(path) as tmp:
            detector.save(str(tmp))
    except OSError as err:
        log.info("%s: cannot save the face detector (%s); it is built at each start", path, err.strerror)
    return detector


# The detections of the images searched last, by detector settings and pixels: infer.py cuts the
# aligned crops of a video frame for most networks and the SBI crop of the same frame for a network
# that takes face crops, each asking for the frame's faces (hashing the pixels costs 1 % of a search or less).
RECENT_SEARCHES = 64
_RECENT: OrderedDict[tuple, list] = OrderedDict()
_RECENT_LOCK = threading.Lock()


def box_area(box: Box) -> int:
    return max(box[2] - box[0], 0) * max(box[3] - box[1], 0)


# eq=False: field-wise == on numpy arrays raises instead of answering.
@dataclass(eq=False)
class Face:
    """One detected face.

    `box` is (x0, y0, x1, y1) with x1, y1 exclusive and clipped to the image, so
    `rgb[y0:y1, x0:x1]` is the face. `landmarks` are the 68 points (x, y) in pixels and may
    lie slightly outside the box or the image. `embedding` is the 128-d dlib face descriptor
    (None when embeddings were not asked for).
    """

    box: tuple[int, int, int, int]
    landmarks: np.ndarray
    embedding: np.ndarray | None = None
    score: float = 0.0

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> int:
        return box_area(self.box)

    def eye_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """(subject's right eye centre, subject's left eye centre), each (x, y)."""
        return eye_centers(self.landmarks)

    def inter_ocular(self) -> float:
        right, left = self.eye_centers()
        return float(np.linalg.norm(left - right))


def eye_centers(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(subject's right eye centre, subject's left eye centre) from 68 landmarks."""
    pts = np.asarray(landmarks, dtype=np.float64)
    return pts[list(REGIONS["right_eye"])].mean(axis=0), pts[list(REGIONS["left_eye"])].mean(axis=0)


def flip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Landmarks of the horizontally mirrored image (`rgb[:, ::-1]`), re-indexed by FLIP_68."""
    pts = np.asarray(landmarks, dtype=np.float32).copy()
    # Pixel i lands on pixel width - 1 - i, and pixel centres sit at integer coordinates.
    pts[:, 0] = (width - 1) - pts[:, 0]
    return pts[list(FLIP_68)]


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    # dlib reads the buffer directly and rejects strided views such as rgb[:, ::-1].
    return np.ascontiguousarray(arr)


class FaceAnalyzer:
    """Detect faces, place 68 landmarks and (optionally) compute 128-d embeddings with dlib.

    detector: "hog" (fast, frontal faces) or "cnn" (MMOD; more poses, slow on a CPU).
    upsample: how many times dlib doubles the image before detecting (finds smaller faces).
    pick: which face `primary` returns: the "largest" box or the best detector "score".
    min_score: detections scoring below this are dropped.
    """

    def __init__(
        self,
        detector: DetectorKind = "hog",
        upsample: int = 1,
        embed: bool = True,
        models_dir: str | Path | None = None,
        pick: PickRule = "largest",
        min_score: float = 0.0,
    ) -> None:
        if detector not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', not {detector!r}")
        if pick not in ("largest", "score"):
            raise ValueError(f"pick must be 'largest' or 'score', not {pick!r}")
        if upsample < 0:
            raise ValueError(f"upsample must be >= 0, not {upsample}")
        self.detector = detector
        self.upsample = int(upsample)
        self.embed = bool(embed)
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.pick = pick
        self.min_score = float(min_score)
        # Resolve the files now so a missing model fails at construction, not mid-run;
        # loading itself stays lazy.
        self._landmarks_path = model_path(LANDMARKS_FILE, self.models_dir)
        self._embedding_path = model_path(EMBEDDING_FILE, self.models_dir) if self.embed else None
        self._cnn_path = model_path(CNN_DETECTOR_FILE, self.models_dir) if detector == "cnn" else None

    def settings(self) -> str:
        """A short string naming everything that changes the result; part of the cache key."""
        return (
            f"v{CACHE_VERSION};det={self.detector};up={self.upsample};embed={int(self.embed)};"
            f"pick={self.pick};min={self.min_score:g}"
        )

    def _detect_rects(self, rgb: np.ndarray) -> list[tuple[Any, float]]:
        if self.detector == "cnn":
            cnn = _load_model("cnn", self._cnn_path)
            return [(d.rect, float(d.confidence)) for d in cnn(rgb, self.upsample)]
        hog = _load_model("hog", Path("builtin"))
        rects, scores, _ = hog.run(rgb, self.upsample, 0.0)
        return list(zip(rects, map(float, scores), strict=True))

    def _found(self, img: np.ndarray) -> list[tuple[Any, Box, float]]:
        """(dlib rectangle, box, score) of each detection kept, largest box first; an image this
        process searched recently with the same detector settings is not searched again."""
        key = (self.detector, self.upsample, self.min_score, img.shape, hashlib.blake2b(img, digest_size=16).digest())
        with _RECENT_LOCK:
            if key in _RECENT:
                _RECENT.move_to_end(key)
                return _RECENT[key]
        found = self._search(img)
        with _RECENT_LOCK:
            _RECENT[key] = found
            if len(_RECENT) > RECENT_SEARCHES:
                _RECENT.popitem(last=False)
        return found

    def _search(self, img: np.ndarray) -> list[tuple[Any, Box, float]]:
        h, w = img.shape[:2]
        found = []
        for rect, score in self._detect_rects(img):
            if score < self.min_score:
                continue
            # dlib's right/bottom are inclusive; store exclusive bounds so slicing works.
            box = (
                int(np.clip(rect.left(), 0, w)),
                int(np.clip(rect.top(), 0, h)),
                int(np.clip(rect.right() + 1, 0, w)),
                int(np.clip(rect.bottom() + 1, 0, h)),
            )
            if box[2] > box[0] and box[3] > box[1]:
                found.append((rect, box, score))
        found.sort(key=lambda f: (-box_area(f[1]), -f[2]))
        return found

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an RGB uint8 image (grayscale accepted), largest box first."""
        img = _as_rgb(rgb)
        found = self._found(img)
        if not found:
            return []
        shaper = _load_model("landmarks", self._landmarks_path)
        encoder = _load_model("embedding", self._embedding_path) if self.embed else None
        faces = []
        for rect, box, score in found:
            # Landmarks use the unclipped rectangle: the shape model was trained on those.
            shape = shaper(img, rect)
            pts = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            emb = None
            if encoder is not None:
                emb = np.asarray(encoder.compute_face_descriptor(img, shape), dtype=np.float32)
            faces.append(Face(box=box, landmarks=pts, embedding=emb, score=score))
        return faces

    def boxes(self, rgb: np.ndarray) -> list[Box]:
        """The boxes of `detect`'s faces, in its order, without their landmarks: the 100 MB
        landmark model is not loaded (a face crop cut from the box alone needs none)."""
        return [box for _, box, _ in self._found(_as_rgb(rgb))]

    def primary_box(self, rgb: np.ndarray) -> Box | None:
        """The box of the face `primary` returns, without its landmarks; None without a face."""
        found = self._found(_as_rgb(rgb))
        return found[self._pick([score for _, _, score in found])][1] if found else None

    def _pick(self, scores: list[float]) -> int:
        """The index of the face the `pick` rule chooses among faces sorted largest first."""
        return int(np.argmax(scores)) if self.pick == "score" else 0

    def largest(self, rgb: np.ndarray) -> Face | None:
        """The face with the largest box, or None."""
        faces = self.detect(rgb)
        return faces[0] if faces else None

    def primary(self, rgb: np.ndarray) -> Face | None:
        """The face chosen by this analyzer's `pick` rule, or None."""
        faces = self.detect(rgb)
        return faces[self._pick([f.score for f in faces])] if faces else None

    def analyze_file(self, path: str | Path, cache_file: str | Path | None = None) -> tuple[Face | None, bool]:
        """The primary face of one image file, through the cache when `cache_file` is given.

        Returns (face or None, whether it came from the cache). Raises ImageDecodeError for
        an unreadable image.
        """
        path = Path(path)
        try:
            st = path.stat()
        except OSError:
            raise ImageDecodeError(f"{path}: no such file") from None
        key = (int(st.st_size), int(st.st_mtime_ns), self.settings())
        if cache_file is not None:
            hit, face = load_face_cache(cache_file, key)
            if hit:
                return face, True
        face = self.primary(decode_image(path))
        if cache_file is not None:
            save_face_cache(cache_file, key, face)
        return face, False

    def analyze_files(
        self,
        paths: Sequence[str | Path],
        names: Sequence[str] | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = True,
    ) -> FaceResults:
        """The primary face of every image, cached as one `.npz` per image under `cache_dir`.

        `names` (default: the paths as given) key the result and name the cache files
        (`cache_dir/<name>.npz`). An unreadable image is logged in one line and listed in
        `errors`; the rest go on.
        """
        names = [str(p) for p in paths] if names is None else [str(n) for n in names]
        if len(names) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(names)} names")
        results = FaceResults()
        for path, name in progress_bar(
            list(zip(paths, names, strict=True)), desc="faces", unit="img", disable=not progress
        ):
            try:
                cache_file = cache_path(cache_dir, name) if cache_dir is not None else None
                face, cached = self.analyze_file(path, cache_file)
            except (ImageDecodeError, LabelError) as err:
                log.warning("skipped %s", err)
                results.errors[name] = str(err)
                continue
            results.faces[name] = face
            if cached:
                results.cached += 1
            else:
                results.computed += 1
        found = sum(f is not None for f in results.faces.values())
        log.info(
            "faces: %d images read (%d from cache, %d computed), %d with a face, %d without, %d errors",
            len(names),
            results.cached,
            results.computed,
            found,
            len(results.faces) - found,
            len(results.errors),
        )
        return results


@dataclass
class FaceResults:
    """What `FaceAnalyzer.analyze_files` found: a face or None per readable image, errors per unreadable one."""

    faces: dict[str, Face | None] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    cached: int = 0
    computed: int = 0


def cache_path(cache_dir: str | Path, name: str) -> Path:
    """Cache file for image `name`: `cache_dir/<name>.npz`, refusing names that climb out."""
    return safe_join(cache_dir, f"{name}.npz")


def save_face_cache(cache_file: str | Path, key: tuple[int, int, str], face: Face | None) -> None:
    """Write one image's result atomically; a missing face is stored too (found = False)."""
    found = face is not None
    has_emb = found and face.embedding is not None
    arrays = {
        "version": np.int64(CACHE_VERSION),
        "file_size": np.int64(key[0]),
        "file_mtime_ns": np.int64(key[1]),
        "settings": np.array(key[2]),
        "found": np.bool_(found),
        "box": np.array(face.box if found else (0, 0, 0, 0), dtype=np.int32),
        "landmarks": face.landmarks.astype(np.float32) if found else np.zeros((NUM_LANDMARKS, 2), np.float32),
        "has_embedding": np.bool_(has_emb),
        "embedding": face.embedding.astype(np.float32) if has_emb else np.zeros(EMBEDDING_DIM, np.float32),
        "score": np.float64(face.score if found else 0.0),
    }
    # A file object, not a name: np.savez would append ".npz" to the temporary name.
    with atomic_path(cache_file) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load_face_cache(cache_file: str | Path, key: tuple[int, int, str]) -> tuple[bool, Face | None]:
    """(hit, face). A missing, unreadable or stale file (other size, mtime or settings) is a miss."""
    cache_file = Path(cache_file)
    if not cache_file.is_file():
        return False, None
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            stored = (int(data["file_size"]), int(data["file_mtime_ns"]), str(data["settings"]))
            if int(data["version"]) != CACHE_VERSION or stored != key:
                return False, None
            if not bool(data["found"]):
                return True, None
            emb = data["embedding"].astype(np.float32) if bool(data["has_embedding"]) else None
            box = tuple(int(v) for v in data["box"])
            pts = data["landmarks"].astype(np.float32)
            face = Face(box=box, landmarks=pts, embedding=emb, score=float(data["score"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        # A truncated or foreign file is recomputed rather than trusted.
        return False, None
    return True, face


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking src to dst.

    Closed form (Umeyama), so it is deterministic, unlike RANSAC-based estimators.
    Returns a 2x3 float64 matrix for cv2.warpAffine.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s == 0:
        raise ValueError("source points are all identical")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = (sig * np.diag(sign)).sum() / var_s
    mat = np.zeros((2, 3))
    mat[:, :2] = scale * rot
    mat[:, 2] = mu_d - scale * rot @ mu_s
    return mat


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to (N, 2) points; float32 result."""
    pts = np.asarray(points, dtype=np.float64)
    mat = np.asarray(matrix, dtype=np.float64)
    return (pts @ mat[:, :2].T + mat[:, 2]).astype(np.float32)


def alignment_matrix(face: Face | np.ndarray, size: int, margin: float = 0.3) -> np.ndarray:
    """2x3 matrix taking image coordinates to an upright `size` x `size` crop of the face.

    The eye line (centre of points 36-41 to centre of 42-47) becomes horizontal. The crop is
    centred on the landmarks' box in the upright frame and is (1 + 2 * margin) times its
    larger side, i.e. `margin` of the face size is added on every side.
    """
    pts = np.asarray(face.landmarks if isinstance(face, Face) else face, dtype=np.float64)
    if pts.shape != (NUM_LANDMARKS, 2):
        raise ValueError(f"expected ({NUM_LANDMARKS}, 2) landmarks, got {pts.shape}")
    if size < 1 or margin < 0:
        raise ValueError(f"need size >= 1 and margin >= 0, got {size} and {margin}")
    right, left = eye_centers(pts)
    angle = np.arctan2(left[1] - right[1], left[0] - right[0])
    cos, sin = np.cos(-angle), np.sin(-angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    upright = pts @ rot.T
    lo, hi = upright.min(0), upright.max(0)
    side = max(float((hi - lo).max()), 1.0) * (1.0 + 2.0 * margin)
    scale = size / side
    centre = (lo + hi) / 2.0
    mat = np.zeros((2, 3))
    mat[:, :2] = scale * rot
    # Pixel centres of the output run 0..size-1, so the crop's centre is (size - 1) / 2.
    mat[:, 2] = (size - 1) / 2.0 - scale * centre
    return mat


def align_crop(rgb: np.ndarray, face: Face, size: int, margin: float = 0.3) -> np.ndarray:
    """Upright square crop of `face` at `size` x `size` (see `alignment_matrix`).

    Parts of the crop outside the image are filled by reflection, which hides the hard
    edge a constant border would leave for a detector to learn.
    """
    mat = alignment_matrix(face, size, margin)
    return cv2.warpAffine(
        np.ascontiguousarray(rgb), mat, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def align_landmarks(face: Face, size: int, margin: float = 0.3) -> np.ndarray:
    """The face's 68 landmarks in the coordinates of `align_crop(rgb, face, size, margin)`."""
    return transform_points(face.landmarks, alignment_matrix(face, size, margin))
