"""Training data of the SLADD member: every training image once an epoch, and for every real with
a cached face a forgery made in the training step with the configuration the synthesizer
draws for it (models/sladd.py).

Loader side (`SLADDItems`, in the workers, deterministic in (seed, epoch, index)): one item per
row of the training table, decoded and resized whole to the network's input as the evaluation
transform resizes (so training and scoring see a face at one scale), mirrored with probability
`flip_p`.

- A real with a cached face is a *target*: its 68 landmarks are moved with it, and it brings a
  forgery *source*, another original of the training folds with a cached face (a fake with
  probability `source_fake_p`, else a real), resized and mirrored the same way, and the seed
  that its forgery draws from.
- Every other image (a fake, a real the data stage derived from an original) passes through
  with its own label, as the published training sees its dataset's own fakes.

Training-step side (`forge_pair`, NumPy, run in the main process because the configuration
comes from the synthesizer): `blending.sladd_forge` pastes the source's region into the target
(aligned by landmarks, colour-transferred inside the region) and the result is labelled. A
sample labelled fake always differs from its real inside the chosen region: the blend type
`none`, a forgery that changes less than `min_changed` of the region's pixels (a source that
looks like the target there, a small `mag`), and a forgery that cannot be made (degenerate
landmarks) all become the untouched real, labelled real, type `real`, with an empty mask, as the
public code labels `none`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import cv2
import numpy as np
import pandas as pd
import torch

from core.config import ConfigError
from core.data.datasets import sample_seed
from core.imaging import ImageDecodeError, decode_image
from core.log import get_logger
from core.preprocess import RESIZE_INTERPOLATION
from data_prep.blending import BLEND_TYPES, sladd_forge
from data_prep.faces import flip_landmarks
from data_prep.sbi_online import RealFace, face_settings, faces_dir, read_cached_faces

log = get_logger("sladd")

# The detector's blend-type classes: the three blend types that change the image, "real" (every
# real, the synthesizer's `none` and every forgery that changed nothing), and "other_fake" (the
# training set's own fakes, which the synthesizer did not make), as the public SLADD code labels them.
TYPE_CLASSES = ("alpha", "poisson", "copy", "real", "other_fake")
REAL_TYPE = TYPE_CLASSES.index("real")
OTHER_FAKE_TYPE = TYPE_CLASSES.index("other_fake")
# Why a synthesized slot ended up real (the `status` of `Forged`).
STATUSES = ("fake", "none", "unchanged", "failed")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ForgeSettings:
    """The `forge:` section of the member config: how a configuration becomes a labelled image.

    mag_min: `mag` is drawn in [mag_min, 1]. mag_types: the blend types that blend at ratio
    `mag` (the others at 1). min_changed: the share of the region's core (blend weight at least
    half its peak) whose pixels must change, by at least `min_delta` levels in some channel, for
    the image to count as fake (a Poisson clone of a face into itself moves a third of the
    region by one level: rounding, not a forgery). feather: the alpha
    blend's extra blur, in eye distances. map_size: side of the blend-mask map the detector
    predicts.
    """

    mag_min: float
    mag_types: tuple[str, ...]
    min_changed: float
    min_delta: int
    feather: float
    map_size: int

    @classmethod
    def from_cfg(cls, cfg: dict) -> ForgeSettings:
        section = _section(cfg, "forge", cls)
        section["mag_types"] = tuple(section["mag_types"])
        s = cls(**section)
        if not 0.0 < s.mag_min <= 1.0:
            raise ConfigError(f"forge.mag_min must be in (0, 1], not {s.mag_min}: mag 0 forges nothing")
        unknown = sorted(set(s.mag_types) - set(BLEND_TYPES[:3]))
        if unknown:
            raise ConfigError(
                f"forge.mag_types: {unknown} are not blend types that take a ratio {list(BLEND_TYPES[:3])}"
            )
        if not 0.0 < s.min_changed <= 1.0:
            raise ConfigError(
                f"forge.min_changed must be in (0, 1], not {s.min_changed}: 0 would let a no-op be a fake"
            )
        if s.min_delta < 1:
            raise ConfigError(f"forge.min_delta must be >= 1 level, not {s.min_delta}")
        if s.feather < 0 or s.map_size < 1:
            raise ConfigError(f"forge.feather must be >= 0 and forge.map_size >= 1, not {s.feather}, {s.map_size}")
        return s


@dataclass(frozen=True)
class RecipeSettings:
    """The `recipe:` section (name `sladd`): what each item brings; see the module docstring.
    forge_threads: threads that forge a batch in the training step (cv2 and NumPy release the GIL)."""

    name: str
    flip_p: float
    source_fake_p: float
    forge_threads: int

    @classmethod
    def from_cfg(cls, cfg: dict) -> RecipeSettings:
        s = cls(**_section(cfg, "recipe", cls))
        for key in ("flip_p", "source_fake_p"):
            if not 0.0 <= getattr(s, key) <= 1.0:
                raise ConfigError(f"recipe.{key} must be a probability in [0, 1], not {getattr(s, key)}")
        if s.forge_threads < 1:
            raise ConfigError(f"recipe.forge_threads must be >= 1, not {s.forge_threads}")
        return s


def _section(cfg: dict, key: str, kind: type) -> dict:
    """The config's `key` section with exactly the fields of `kind`: a missing or unknown key is
    refused, so no constant hides in a default."""
    section = cfg.get(key)
    if not isinstance(section, dict):
        raise ConfigError(f"{cfg.get('name', 'member')}: the sladd recipe needs a `{key}:` section")
    names = {f.name for f in fields(kind)}
    missing, unknown = sorted(names - set(section)), sorted(set(section) - names)
    if missing or unknown:
        raise ConfigError(f"{cfg.get('name', 'member')}: `{key}:` lacks {missing}, has unknown {unknown}")
    return dict(section)


# --------------------------------------------------------------------------- forging one pair


class Forged(NamedTuple):
    """One synthesized slot: the image (uint8 H x W x 3), its label (1 fake, 0 real), its type
    class (TYPE_CLASSES), the mag it was blended at (nan when its type takes no mag or it is
    real), its blend-mask map (float32 map_size x map_size: the region's blend weight, not scaled
    by mag), and `status` (STATUSES) with `reason` for a failed forgery."""

    image: np.ndarray
    label: int
    type_class: int
    mag: float
    mask_map: np.ndarray
    status: str
    reason: str = ""


def mask_map(mask: np.ndarray, size: int) -> np.ndarray:
    """The blend weight averaged down to size x size: the detector's map target."""
    return cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def changed_share(real: np.ndarray, fake: np.ndarray, mask: np.ndarray, min_delta: int = 1) -> float:
    """Share of the region's core (weight >= half the mask's peak) where some channel moved by
    at least `min_delta` levels."""
    peak = float(mask.max())
    if peak <= 0:
        return 0.0
    core = mask >= 0.5 * peak
    delta = np.abs(real[core].astype(np.int16) - fake[core].astype(np.int16))
    return float((delta >= min_delta).any(axis=-1).mean())


def forge_pair(
    target: np.ndarray,
    target_lm: np.ndarray,
    source: np.ndarray,
    source_lm: np.ndarray,
    region: int,
    blend_type: str,
    mag: float,
    seed: int,
    s: ForgeSettings,
) -> Forged:
    """The configuration (region index, blend type, mag) applied to one pair, labelled (see the
    module docstring). The forgery draws its randomness (the region mask's warp) from `seed`."""
    real = Forged(target.copy(), 0, REAL_TYPE, float("nan"), np.zeros((s.map_size,) * 2, np.float32), "none")
    if blend_type == "none":
        return real
    ratio = float(mag) if blend_type in s.mag_types else 1.0
    try:
        fake, mask = sladd_forge(
            target, target_lm, source, source_lm, region, blend_type, ratio, np.random.default_rng(seed), s.feather
        )
    except ValueError as err:
        return real._replace(status="failed", reason=str(err))
    if changed_share(target, fake, mask, s.min_delta) < s.min_changed:
        return real._replace(status="unchanged")
    target_mag = ratio if blend_type in s.mag_types else float("nan")
    # The map target is the region's blend weight before the ratio, as the public code's (which
    # regresses the mask it blended with, whatever `mag` the copy blend took): `mag` has its own head.
    region_weight = mask / np.float32(ratio)
    return Forged(fake, 1, BLEND_TYPES.index(blend_type), target_mag, mask_map(region_weight, s.map_size), "fake")


# --------------------------------------------------------------------------- the loader's items


def resize_face(img: np.ndarray, landmarks: np.ndarray, size: int, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """The whole image at size x size (the evaluation transform's resize) and its landmarks,
    mirrored when `flip` (landmarks re-indexed, so "left eye" stays the subject's)."""
    h, w = img.shape[:2]
    out = cv2.resize(img, (size, size), interpolation=RESIZE_INTERPOLATION)
    # Pixel centres: x in the source maps to (x + 0.5) * size / w - 0.5.
    lm = (np.asarray(landmarks, dtype=np.float64) + 0.5) * (size / w, size / h) - 0.5
    if flip:
        out = np.ascontiguousarray(out[:, ::-1])
        lm = flip_landmarks(lm, size).astype(np.float64)
    return out, lm


@dataclass(frozen=True)
class Entry:
    """One row of the training table: its file and label, and its cached face when it is a target."""

    path: str
    label: int
    face: RealFace | None


class SLADDItems:
    """Items, one per entry: a target gives `real`, `source` (uint8 S x S x 3), `real_lm`,
    `source_lm` (68 x 2) and `seed` (its forgery's); any other image gives `other` (uint8
    S x S x 3) and `label`; both give `index`, or `index` and `error` (file and reason) when an
    image cannot be read. See the module docstring."""

    def __init__(
        self,
        entries: Sequence[Entry],
        real_sources: Sequence[RealFace],
        fake_sources: Sequence[RealFace],
        size: int,
        settings: RecipeSettings,
        seed: int,
    ):
        if not real_sources and not fake_sources:
            raise ConfigError("the sladd recipe has no forgery source with a cached face")
        self.entries = list(entries)
        self.real_sources, self.fake_sources = list(real_sources), list(fake_sources)
        self.size = size
        self.s = settings
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def _source(self, rng: np.random.Generator, target: RealFace) -> RealFace:
        """Another original: a fake with probability source_fake_p when there are fakes (else a
        real); the target itself only when its pool holds nothing else."""
        want_fake = rng.random() < self.s.source_fake_p
        pool = self.fake_sources if (want_fake and self.fake_sources) or not self.real_sources else self.real_sources
        pick = int(rng.integers(len(pool)))
        if pool[pick].path == target.path and len(pool) > 1:
            pick = (pick + 1) % len(pool)
        return pool[pick]

    def _load(self, face: RealFace, flip: bool) -> tuple[np.ndarray, np.ndarray]:
        return resize_face(decode_image(face.path), face.landmarks, self.size, flip)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        item_seed = sample_seed(self.seed, self.epoch, index)
        # Separate streams: a recipe setting changes its own draws, never the others'.
        flips = np.random.default_rng([item_seed, 0]).random(2) < self.s.flip_p
        path = entry.path
        try:
            if entry.face is None:
                other = cv2.resize(decode_image(path), (self.size,) * 2, interpolation=RESIZE_INTERPOLATION)
                other = np.ascontiguousarray(other[:, ::-1]) if flips[0] else other
                return {"index": index, "other": other, "label": entry.label}
            source = self._source(np.random.default_rng([item_seed, 1]), entry.face)
            real, real_lm = self._load(entry.face, bool(flips[0]))
            path = source.path
            src, src_lm = self._load(source, bool(flips[1]))
        except (ImageDecodeError, ValueError) as err:
            return {"index": index, "error": str(err) if path in str(err) else f"{path}: {err}"}
        return {
            "index": index,
            "real": real,
            "real_lm": real_lm,
            "source": src,
            "source_lm": src_lm,
            "seed": int(np.random.SeedSequence([item_seed, 3]).generate_state(1)[0]),
        }


def collate_sladd(items: list[dict]) -> dict:
    """The good items as the synthesizer's input and the images that pass through: `real` and
    `source` (B, S, S, 3) uint8, `real_lm`, `source_lm` (B, 68, 2), `seed` (B,) for the B targets;
    `other` (M, S, S, 3) uint8 and `other_target` (M,) for the rest; and, for the trainer's
    contract, `image` (all B + M, (N, 3, S, S) uint8) and `target`. `errors` holds the bad items'
    reasons."""
    good = [it for it in items if "error" not in it]
    batch: dict[str, Any] = {"errors": [it["error"] for it in items if "error" in it]}
    batch["index"] = torch.tensor([it["index"] for it in good], dtype=torch.long)
    if not good:
        return batch
    targets = [it for it in good if "real" in it]
    others = [it for it in good if "other" in it]
    size = (targets[0]["real"] if targets else others[0]["other"]).shape[0]

    def stack(rows: list[dict], key: str, shape: tuple, dtype: type) -> torch.Tensor:
        return torch.from_numpy(np.stack([r[key] for r in rows]).astype(dtype) if rows else np.zeros(shape, dtype))

    image = (0, size, size, 3)
    batch.update(
        real=stack(targets, "real", image, np.uint8),
        source=stack(targets, "source", image, np.uint8),
        real_lm=stack(targets, "real_lm", (0, 68, 2), np.float64),
        source_lm=stack(targets, "source_lm", (0, 68, 2), np.float64),
        seed=torch.tensor([it["seed"] for it in targets], dtype=torch.int64),
        other=stack(others, "other", image, np.uint8),
        other_target=torch.tensor([it["label"] for it in others], dtype=torch.long),
    )
    batch["image"] = torch.cat([batch["real"], batch["other"]]).permute(0, 3, 1, 2)
    batch["target"] = torch.cat([torch.zeros(len(targets), dtype=torch.long), batch["other_target"]])
    return batch


def sladd_items(cfg: dict, table: pd.DataFrame, seed: int) -> SLADDItems:
    """The recipe's dataset from the training table: every row, its reals with a cached face as
    targets, every original with a cached face as a source. Logs one line with the counts and
    the reals that pass through unforged, by reason."""
    settings = RecipeSettings.from_cfg(cfg)
    folder = faces_dir(cfg)
    if not folder.is_dir():
        raise ConfigError(
            f"{folder}: no face cache; the sladd recipe reads the data stage's landmarks (python -m data_prep)"
        )
    progress = bool((cfg.get("train") or {}).get("progress", True))
    key = face_settings(cfg)
    is_fake = table["target"] == 1
    targets, skipped = read_cached_faces(table[~is_fake], folder, key, progress, "sladd reals")
    # The demo's own fakes are originals whose method names the edit that made them: the cache decides.
    fake_sources, _ = read_cached_faces(table[is_fake], folder, key, progress, "sladd sources", skip_derived=False)
    faces = {f.path: f for f in targets}
    paths, labels = table["path"].astype(str).tolist(), table["target"].astype(int).tolist()
    entries = [Entry(p, y, faces.get(p) if y == 0 else None) for p, y in zip(paths, labels, strict=True)]
    reasons = "; ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "none"
    log.info(
        "sladd: %d images, %d reals to forge, %d fakes with a face as further sources; reals passing through: %s",
        len(entries),
        len(targets),
        len(fake_sources),
        reasons,
    )
    if not targets:
        raise ConfigError(f"{folder}: none of the {int((~is_fake).sum())} training reals has a cached face")
    return SLADDItems(entries, targets, fake_sources, int(cfg["data"]["image_size"]), settings, seed)
