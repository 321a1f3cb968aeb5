"""Online self-blended training pairs: every real face with its own fresh self-blend, made in
the loader workers from the data stage's cached landmarks, with what the face-embedding
guidance of `sbi_fed` needs.

One item is one real row of the training table, deterministic in (seed, epoch, index):

    decode -> `sbi_frames` (blending.sbi_sample, keeping the blended frame) -> the real and
    fake crops at output_size, normalised like the evaluation transform -> with guidance,
    the fake's face embedding (dlib, computed here; the real's comes from the face cache) or
    the aligned face crops of both (a torch embedder runs on the device) -> with
    `mix_ratio` > 0, that share of the fakes is another fake image of the training set, cut to
    its largest face as evaluation cuts images (`data.face_crop`).

`collate_pairs` puts an item's real and fake in the same batch, reals first: B items give B
reals then B fakes, and image i pairs with image i + B.

Embeddings are taken in the cut frame before the final crop and resize (so the network's
input size does not change them) and in the photograph's own orientation: the cached
embedding of the real is the unflipped original's, and on the demo a mirror alone moves a
dlib embedding by 1 - cos = 0.0076 (median), over half of what a self-blend moves it
(0.012 to 0.014), against 0.0028 for the remaining augmentation once the flip is undone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd
import torch

from core.config import ConfigError, deep_merge
from core.data.datasets import sample_seed
from core.imaging import ImageDecodeError, decode_image
from core.log import get_logger
from core.progress import progress_bar
from data_prep.blending import Box, SBIConfig, face_crop_window, precrop_window, sbi_pair
from data_prep.face_crop import member_face_cropper
from data_prep.faces import (
    EMBEDDING_FILE,
    FaceAnalyzer,
    _load_model,
    cache_path,
    estimate_similarity,
    eye_centers,
    flip_landmarks,
    load_face_cache,
    model_path,
)

log = get_logger("sbi")

EMBEDDER_KINDS = ("dlib", "torch")
REAL_EMBEDDINGS = ("cached", "online")
# Manifest methods of images the data stage made from originals (data_prep.stage).
DERIVED_METHODS = ("edit:", "sd:")
# The five-point template of the common 112 px ArcFace alignment (eye centres, nose tip,
# mouth corners, in image left-to-right order), scaled to the crop size asked for.
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


# --------------------------------------------------------------------------- the blended sample


class SBIFrames(NamedTuple):
    """`sbi_sample`'s output plus the frame it was blended in.

    real, fake: uint8 (S, S, 3) network crops; mask: r*M on that crop (float32). frame_real,
    frame_fake: the cut frame after blending and the pair's shared augmentation, in the
    photograph's own orientation; frame_landmarks: the 68 points in that frame.
    """

    real: np.ndarray
    fake: np.ndarray
    mask: np.ndarray
    frame_real: np.ndarray
    frame_fake: np.ndarray
    frame_landmarks: np.ndarray


def sbi_frames(img: np.ndarray, landmarks: np.ndarray, box: Box, rng: np.random.Generator, cfg: SBIConfig) -> SBIFrames:
    """`blending.sbi_sample` step for step (the same draws, the same bytes: tested), keeping
    the blended frame and its landmarks, which `sbi_sample` does not return and the face
    embedder needs. A flipped frame is flipped back, with its landmarks, before it is returned."""
    lm = np.asarray(landmarks, dtype=np.float64)
    x0, y0, x1, y1 = box
    w = img.shape[1]
    flipped = bool(rng.random() < cfg.flip_p)
    if flipped:
        img = img[:, ::-1]
        lm = flip_landmarks(lm, w).astype(np.float64)
        x0, x1 = w - x1, w - x0  # exclusive bounds: pixel i goes to w - 1 - i
    cx0, cy0, cx1, cy1 = precrop_window(lm, img.shape, cfg)
    frame = np.ascontiguousarray(img[cy0:cy1, cx0:cx1])
    frame_lm = lm - (cx0, cy0)
    real, fake, mask = sbi_pair(frame, frame_lm, rng, cfg)
    scales = rng.uniform(*cfg.crop_margin_scale, size=4)
    wx0, wy0, wx1, wy1 = face_crop_window((x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0), frame.shape, scales, cfg)
    size = cfg.output_size

    def crop(a: np.ndarray) -> np.ndarray:
        return cv2.resize(a[wy0:wy1, wx0:wx1], (size, size), interpolation=cv2.INTER_LINEAR)

    out = (crop(real), crop(fake), crop(mask))
    if flipped:
        frame_lm = flip_landmarks(frame_lm, frame.shape[1]).astype(np.float64)
        real, fake = np.ascontiguousarray(real[:, ::-1]), np.ascontiguousarray(fake[:, ::-1])
    return SBIFrames(*out, real, fake, frame_lm)


# --------------------------------------------------------------------------- face embedders


@dataclass(frozen=True)
class EmbedderSpec:
    """`loss.embedder` of the member config.

    kind: `dlib` (128-d ResNet, run in the loader workers) or `torch` (a face-recognition
    network from a local torch.export archive, run on the device by the criterion; the
    workers cut aligned face crops for it). real: `cached` (dlib: the real's embedding from
    the data stage's face cache) or `online` (embedded again here, after the same
    augmentation as its fake). models_dir: where dlib's .dat files are (null: the
    face_recognition_models package). file, size, mean, std: the torch network, its square
    input size and its normalisation of [0, 1] pixels. share: the share of fakes embedded
    (drawn per item); the others train without the guidance terms, and with dlib cost
    nothing (a dlib descriptor costs several times a self-blend).
    """

    kind: str = "dlib"
    real: str = "cached"
    share: float = 1.0
    models_dir: str | None = None
    file: str | None = None
    size: int = 112
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_cfg(cls, cfg: dict | None) -> EmbedderSpec:
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"loss.embedder: unknown key(s) {unknown}")
        spec = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
        if spec.kind not in EMBEDDER_KINDS:
            raise ConfigError(f"loss.embedder.kind must be one of {list(EMBEDDER_KINDS)}, not {spec.kind!r}")
        if spec.real not in REAL_EMBEDDINGS:
            raise ConfigError(f"loss.embedder.real must be one of {list(REAL_EMBEDDINGS)}, not {spec.real!r}")
        if not 0.0 < spec.share <= 1.0:
            raise ConfigError(f"loss.embedder.share must be in (0, 1], not {spec.share}")
        if spec.kind == "torch" and not spec.file:
            raise ConfigError(
                "loss.embedder.kind is torch but loss.embedder.file (a torch.export .pt2 archive) is not set"
            )
        return spec


class DlibEmbedder:
    """dlib's 128-d face descriptor of a face given its 68 landmarks (dlib aligns the chip
    from them). The model file is found now and loaded once per process, on first use."""

    def __init__(self, models_dir: str | Path | None = None):
        self.path = model_path(EMBEDDING_FILE, models_dir)

    def __call__(self, img: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        import dlib

        encoder = _load_model("embedding", self.path)
        pts = np.rint(landmarks).astype(int)
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        shape = dlib.full_object_detection(
            dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), [dlib.point(int(x), int(y)) for x, y in pts]
        )
        return np.asarray(encoder.compute_face_descriptor(np.ascontiguousarray(img), shape), dtype=np.float32)


def aligned_face(img: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """The `size` x `size` face crop a 112 px ArcFace-style network expects: a similarity
    transform taking the eye centres, nose tip (30) and mouth corners (48, 54) onto the
    standard five-point template (uint8, borders reflected)."""
    right_eye, left_eye = eye_centers(landmarks)
    lm = np.asarray(landmarks, dtype=np.float64)
    points = np.stack([right_eye, left_eye, lm[30], lm[48], lm[54]])
    matrix = estimate_similarity(points, ARCFACE_112 * (size / 112.0))
    return cv2.warpAffine(
        np.ascontiguousarray(img), matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


# --------------------------------------------------------------------------- the reals and their cached faces


@dataclass(frozen=True)
class RealFace:
    """One original with a cached face (a real the recipe blends, or a forgery source): its
    file, cached 68 landmarks, face box and embedding."""

    path: str
    landmarks: np.ndarray
    box: tuple[int, int, int, int]
    embedding: np.ndarray | None


def face_settings(cfg: dict) -> str:
    """The face cache's settings string for the data stage's `prep.faces` (part of every cache key)."""
    from data_prep.stage import DEFAULTS  # the stage pulls in the edit and diffusion code: only here

    settings = deep_merge(DEFAULTS["prep"]["faces"], (cfg.get("prep") or {}).get("faces") or {})
    return FaceAnalyzer(embed=True, **settings).settings()


def faces_dir(cfg: dict) -> Path:
    from data_prep.stage import DEFAULTS

    return Path((cfg.get("prep") or {}).get("out") or DEFAULTS["prep"]["out"]) / "faces"


def _cached_face(path: str, name: str, folder: Path, settings: str) -> RealFace | str:
    """The cached face of one original, or why there is none."""
    try:
        st = Path(path).stat()
    except OSError:
        return "image missing"
    hit, face = load_face_cache(cache_path(folder, name), (int(st.st_size), int(st.st_mtime_ns), settings))
    if not hit:
        return "no face cache for this image (stale or missing: rerun python -m data_prep)"
    if face is None:
        return "no face found by the data stage"
    return RealFace(str(path), face.landmarks.astype(np.float64), face.box, face.embedding)


def read_real_faces(
    table: pd.DataFrame, folder: str | Path, settings: str, progress: bool = True
) -> tuple[list[RealFace], dict[str, int]]:
    """The table's reals that have a cached face, and how many were skipped for each reason
    (`read_cached_faces` on the reals)."""
    return read_cached_faces(table[table["target"] == 0], folder, settings, progress, "sbi faces")


def read_cached_faces(
    table: pd.DataFrame,
    folder: str | Path,
    settings: str,
    progress: bool = True,
    desc: str = "faces",
    skip_derived: bool = True,
) -> tuple[list[RealFace], dict[str, int]]:
    """The table's images (any label) that have a cached face, and how many were skipped for each reason.

    The cache holds the data stage's originals (prepared name `orig/<name>`, cache file
    `<folder>/<name>.npz`, keyed by the image's size, modification time and `settings`).
    Images the stage derived from them (re-encoded, degraded, new backgrounds) have no face
    of their own in it and are skipped: a parent's landmarks need not fit a derived image.
    `skip_derived` says so by their manifest method; without it the cache alone decides, which
    keeps originals whose method names an edit (the demo's own fakes).
    """
    folder = Path(folder)
    faces: list[RealFace] = []
    skipped: dict[str, int] = {}
    rows = list(zip(table["img_name"], table["path"], table["method"], strict=True))
    for img_name, path, method in progress_bar(rows, desc=desc, unit="img", disable=not progress):
        if skip_derived and str(method).startswith(DERIVED_METHODS):
            found: RealFace | str = "derived by the data stage (no face of its own in the cache)"
        else:
            found = _cached_face(str(path), str(img_name).removeprefix("orig/"), folder, settings)
        if isinstance(found, str):
            skipped[found] = skipped.get(found, 0) + 1
        else:
            faces.append(found)
    return faces, skipped


# --------------------------------------------------------------------------- the dataset


class SBIPairs:
    """Items: one real and its self-blend (`real`, `fake`: normalised CHW float tensors), with
    `guided` per image (whether its embedding or face crop exists: False for a mixed-in fake
    and for a fake left out by `embedder.share`)
    and, with guidance, `embedding` (dlib, D floats per image) or `face` (uint8 crops for a
    torch embedder). A real that cannot be blended yields `error` (file and reason) instead.

    `mix_fakes` (paths) with `mix_ratio` > 0: that share of the items carry one of those
    images, drawn per item, as their fake, through `mix_transform` (the member's training
    transform), instead of the self-blend; with `mix_crop` (the member's evaluation face crop),
    cut to its largest face first, so a mixed-in fake meets the network as the self-blends (face
    crops) and the evaluation images do; one without a face leaves the item its self-blend.
    """

    def __init__(
        self,
        reals: Sequence[RealFace],
        sbi: SBIConfig,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        embedder: EmbedderSpec | None = None,
        mix_fakes: Sequence[str] = (),
        mix_ratio: float = 0.0,
        mix_transform: Callable[[np.ndarray, int], torch.Tensor] | None = None,
        mix_crop: Callable[[np.ndarray], list[np.ndarray]] | None = None,
    ):
        if not 0.0 <= mix_ratio <= 1.0:
            raise ConfigError(f"recipe.mix_ratio must be in [0, 1], not {mix_ratio}")
        if mix_ratio > 0 and (not mix_fakes or mix_transform is None):
            raise ConfigError(f"recipe.mix_ratio is {mix_ratio} but the training set has no other fakes to mix in")
        self.reals = list(reals)
        self.sbi = sbi
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0)
        self.seed = seed
        self.epoch = 0
        self.embedder = embedder
        self.dlib = DlibEmbedder(embedder.models_dir) if embedder and embedder.kind == "dlib" else None
        self.mix_fakes = list(mix_fakes)
        self.mix_ratio = float(mix_ratio)
        self.mix_transform = mix_transform
        self.mix_crop = mix_crop

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.reals)

    def _tensor(self, img: np.ndarray) -> torch.Tensor:
        """uint8 HWC -> float CHW, (x / 255 - mean) / std, as core.data.transforms normalises (in place:
        a fifth of the time of the numpy expression at 380 px)."""
        return torch.from_numpy(img).permute(2, 0, 1).contiguous().float().sub_(self.mean).mul_(self.scale)

    def __getitem__(self, index: int) -> dict:
        real = self.reals[index]
        item_seed = sample_seed(self.seed, self.epoch, index)
        rng = np.random.default_rng(item_seed)
        # Separate streams decide the mixing and which fakes are embedded, so neither setting
        # changes any self-blend.
        mix_rng = np.random.default_rng([item_seed, 1])
        share = self.embedder.share if self.embedder else 0.0
        guided = [share > 0, bool(np.random.default_rng([item_seed, 2]).random() < share)]
        try:
            s = sbi_frames(decode_image(real.path), real.landmarks, real.box, rng, self.sbi)
            item = {"index": index, "real": self._tensor(s.real), "guided": guided}
            mixed = self._mixed_fake(mix_rng) if self.mix_ratio and mix_rng.random() < self.mix_ratio else None
            if mixed is not None:
                item["fake"] = mixed
                item["guided"][1] = False
            else:
                item["fake"] = self._tensor(s.fake)
            item.update(self._guidance(real, s, item["guided"][1]))
        except (ImageDecodeError, ValueError) as err:
            return {"index": index, "error": f"{real.path}: {err}" if real.path not in str(err) else str(err)}
        return item

    def _mixed_fake(self, rng: np.random.Generator) -> torch.Tensor | None:
        """One of `mix_fakes`, drawn with `rng`, cut by `mix_crop` as evaluation cuts an image (its
        largest face) and passed through `mix_transform`; None where `mix_crop` finds no face (the
        item keeps its self-blend)."""
        path = self.mix_fakes[int(rng.integers(len(self.mix_fakes)))]
        image, seed = decode_image(path), int(rng.integers(2**31))
        if self.mix_crop is not None:
            crops = self.mix_crop(image)
            if not crops:
                return None
            image = crops[0]
        return self.mix_transform(image, seed)

    def _guidance(self, real: RealFace, s: SBIFrames, fake_guided: bool) -> dict:
        """What the criterion needs to measure the real-to-fake identity shift, per image."""
        spec = self.embedder
        if spec is None:
            return {}
        if spec.kind == "torch":
            size = spec.size
            crops = [
                aligned_face(s.frame_real, s.frame_landmarks, size),
                aligned_face(s.frame_fake, s.frame_landmarks, size),
            ]
            if not fake_guided:
                crops[1] = np.zeros_like(crops[1])
            return {"face": [torch.from_numpy(c.transpose(2, 0, 1).copy()) for c in crops]}
        if spec.real == "cached" and real.embedding is not None:
            e_real = real.embedding
        else:
            e_real = self.dlib(s.frame_real, s.frame_landmarks)
        e_fake = self.dlib(s.frame_fake, s.frame_landmarks) if fake_guided else np.zeros_like(e_real)
        return {"embedding": [torch.from_numpy(e_real), torch.from_numpy(e_fake)]}


def collate_pairs(items: list[dict]) -> dict:
    """A batch of B good items as 2B images: the B reals, then their B fakes in the same order
    (image i pairs with image i + B), `target` 0 then 1, and every per-image extra
    (`guided`, `embedding`, `face`) laid out the same way. `errors` holds the bad items' reasons."""
    good = [it for it in items if "error" not in it]
    batch: dict[str, Any] = {"errors": [it["error"] for it in items if "error" in it]}
    batch["index"] = torch.tensor([it["index"] for it in good], dtype=torch.long)
    if not good:
        return batch
    n = len(good)
    batch["image"] = torch.stack([it["real"] for it in good] + [it["fake"] for it in good])
    batch["target"] = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    batch["guided"] = torch.tensor([it["guided"][0] for it in good] + [it["guided"][1] for it in good])
    for key in ("embedding", "face"):
        if key in good[0]:
            batch[key] = torch.stack([it[key][0] for it in good] + [it[key][1] for it in good])
    return batch


# --------------------------------------------------------------------------- the recipe's data


def sbi_config(cfg: dict) -> SBIConfig:
    """The member config's `sbi:` section as an SBIConfig, checked against the network's input."""
    section = cfg.get("sbi")
    if not isinstance(section, dict):
        raise ConfigError(f"{cfg.get('name', 'member')}: the sbi recipe needs an `sbi:` section")
    names = {f.name for f in fields(SBIConfig)}
    missing, unknown = sorted(names - set(section)), sorted(set(section) - names)
    if missing or unknown:
        raise ConfigError(f"{cfg.get('name', 'member')}: the `sbi:` section lacks {missing}, has unknown {unknown}")
    try:
        sbi = SBIConfig(**section)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cfg.get('name', 'member')}: sbi: {err}") from None
    size = int(cfg["data"]["image_size"])
    if sbi.output_size != size:
        raise ConfigError(
            f"sbi.output_size ({sbi.output_size}) must equal data.image_size ({size}): training crops and "
            "evaluation images would reach the network at different sizes"
        )
    return sbi


def sbi_pairs(cfg: dict, table: pd.DataFrame, transform: Callable, seed: int, guided: bool) -> SBIPairs:
    """The recipe's dataset: the table's reals with a cached face, their self-blends, the
    guidance inputs when `guided`, and the table's fakes for `recipe.mix_ratio`. Logs one line
    with the reals used and the skipped ones by reason."""
    from core.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    sbi = sbi_config(cfg)
    recipe = cfg.get("recipe") or {}
    folder = faces_dir(cfg)
    if not folder.is_dir():
        raise ConfigError(
            f"{folder}: no face cache; the sbi recipe reads the data stage's landmarks (python -m data_prep)"
        )
    progress = bool((cfg.get("train") or {}).get("progress", True))
    reals, skipped = read_real_faces(table, folder, face_settings(cfg), progress)
    reasons = "; ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "none"
    log.info("sbi: %d reals with a cached face blended online; skipped: %s", len(reals), reasons)
    if not reals:
        raise ConfigError(f"{folder}: none of the {int((table['target'] == 0).sum())} training reals has a cached face")
    spec = EmbedderSpec.from_cfg((cfg.get("loss") or {}).get("embedder")) if guided else None
    data = cfg["data"]
    mix_ratio = float(recipe.get("mix_ratio", 0.0))
    return SBIPairs(
        reals,
        sbi,
        data.get("mean", IMAGENET_MEAN),
        data.get("std", IMAGENET_STD),
        seed,
        embedder=spec,
        mix_fakes=table.loc[table["target"] == 1, "path"].astype(str).tolist(),
        mix_ratio=mix_ratio,
        mix_transform=transform,
        mix_crop=member_face_cropper(cfg) if mix_ratio > 0 else None,
    )
