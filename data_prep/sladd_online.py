"""Training data of the SLADD member: real faces, each with a forgery source, forged in the
training step with the configuration the synthesizer draws for the pair (models/sladd.py).

Loader side (`SLADDPairs`, in the workers, deterministic in (seed, epoch, index)): one item is
one training real with a cached face, the *target*, and

- the target decoded and resized whole to the network's input as the evaluation transform
  resizes (so training and scoring see a face at one scale), mirrored with probability
  `flip_p`, its cached 68 landmarks moved with it;
- a forgery *source*: another original of the training folds with a cached face, a fake with
  probability `source_fake_p` (else a real), resized and mirrored the same way;
- with probability `dataset_fakes`, a fake of the training set that reaches the detector as it
  is (resized, mirrored), as the published training sees its dataset's own fakes;
- the seed that the forgery of this item draws from.

Training-step side (`forge_pair`, NumPy, run in the main process because the configuration
comes from the synthesizer): `blending.sladd_forge` pastes the source's region into the target
(aligned by landmarks, colour-transferred inside the region) and the result is labelled. A
sample labelled fake always differs from its real inside the chosen region: the blend type
`none`, a forgery that changes less than `min_changed` of the region's pixels (a source that
looks like the target there, a small `mag`), and a forgery that cannot be made (degenerate
landmarks) all become the untouched real, labelled real, type `real`, with an empty mask. The
synthesizer's reward for such a choice is then the detector's loss on a real, so it learns to
avoid choices that make nothing.
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
from core.dataset import sample_seed
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
    dataset_fakes: float
    forge_threads: int

    @classmethod
    def from_cfg(cls, cfg: dict) -> RecipeSettings:
        s = cls(**_section(cfg, "recipe", cls))
        for key in ("flip_p", "source_fake_p", "dataset_fakes"):
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
    real), its blend-mask map (float32 map_size x map_size), and `status` (STATUSES) with
    `reason` for a failed forgery."""

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
    return Forged(fake, 1, BLEND_TYPES.index(blend_type), target_mag, mask_map(mask, s.map_size), "fake")


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


class SLADDPairs:
    """Items: `real`, `source` (uint8 S x S x 3), `real_lm`, `source_lm` (68 x 2), `fake` (a
    training fake, uint8, or None), `seed` (the forgery's) and `index`; or `index` and `error`
    (file and reason) when an image cannot be read. See the module docstring."""

    def __init__(
        self,
        targets: Sequence[RealFace],
        real_sources: Sequence[RealFace],
        fake_sources: Sequence[RealFace],
        dataset_fakes: Sequence[str],
        size: int,
        settings: RecipeSettings,
        seed: int,
    ):
        if not real_sources and not fake_sources:
            raise ConfigError("the sladd recipe has no forgery source with a cached face")
        self.targets = list(targets)
        self.real_sources, self.fake_sources = list(real_sources), list(fake_sources)
        self.dataset_fakes = list(dataset_fakes)
        self.size = size
        self.s = settings
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.targets)

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
        target = self.targets[index]
        item_seed = sample_seed(self.seed, self.epoch, index)
        # Separate streams: a recipe setting changes its own draws, never the others'.
        flips = np.random.default_rng([item_seed, 0]).random(3) < self.s.flip_p
        source = self._source(np.random.default_rng([item_seed, 1]), target)
        fake_rng = np.random.default_rng([item_seed, 2])
        with_fake = bool(self.dataset_fakes) and fake_rng.random() < self.s.dataset_fakes
        fake_path = self.dataset_fakes[int(fake_rng.integers(len(self.dataset_fakes)))] if with_fake else None
        path = target.path
        try:
            real, real_lm = self._load(target, bool(flips[0]))
            path = source.path
            src, src_lm = self._load(source, bool(flips[1]))
            fake = None
            if fake_path is not None:
                path = fake_path
                fake = cv2.resize(decode_image(fake_path), (self.size,) * 2, interpolation=RESIZE_INTERPOLATION)
                fake = np.ascontiguousarray(fake[:, ::-1]) if flips[2] else fake
        except (ImageDecodeError, ValueError) as err:
            return {"index": index, "error": str(err) if path in str(err) else f"{path}: {err}"}
        return {
            "index": index,
            "real": real,
            "real_lm": real_lm,
            "source": src,
            "source_lm": src_lm,
            "fake": fake,
            "seed": int(np.random.SeedSequence([item_seed, 3]).generate_state(1)[0]),
        }


def collate_sladd(items: list[dict]) -> dict:
    """B good items as the synthesizer's input: `real` and `source` (B, S, S, 3) uint8,
    `real_lm`, `source_lm` (B, 68, 2), `seed` (B,), the training fakes `fake` (M, S, S, 3) uint8;
    and, for the trainer's contract, `image` (the reals, (B, 3, S, S) uint8) and `target` (B zeros).
    `errors` holds the bad items' reasons."""
    good = [it for it in items if "error" not in it]
    batch: dict[str, Any] = {"errors": [it["error"] for it in items if "error" in it]}
    batch["index"] = torch.tensor([it["index"] for it in good], dtype=torch.long)
    if not good:
        return batch
    for key in ("real", "source"):
        batch[key] = torch.from_numpy(np.stack([it[key] for it in good]))
    for key in ("real_lm", "source_lm"):
        batch[key] = torch.from_numpy(np.stack([it[key] for it in good]).astype(np.float64))
    batch["seed"] = torch.tensor([it["seed"] for it in good], dtype=torch.int64)
    fakes = [it["fake"] for it in good if it["fake"] is not None]
    size = good[0]["real"].shape[0]
    batch["fake"] = torch.from_numpy(np.stack(fakes)) if fakes else torch.zeros((0, size, size, 3), dtype=torch.uint8)
    batch["image"] = batch["real"].permute(0, 3, 1, 2)
    batch["target"] = torch.zeros(len(good), dtype=torch.long)
    return batch


def sladd_pairs(cfg: dict, table: pd.DataFrame, seed: int) -> SLADDPairs:
    """The recipe's dataset from the training table: its reals with a cached face as targets,
    every original with a cached face as a source, its fakes as the pass-through fakes. Logs
    one line with the counts and the skipped images by reason."""
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
    fakes = table.loc[is_fake, "path"].astype(str).tolist()
    reasons = "; ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "none"
    log.info(
        "sladd: %d reals to forge, %d fakes with a face as further sources, %d training fakes; reals skipped: %s",
        len(targets),
        len(fake_sources),
        len(fakes),
        reasons,
    )
    if not targets:
        raise ConfigError(f"{folder}: none of the {int((table['target'] == 0).sum())} training reals has a cached face")
    size = int(cfg["data"]["image_size"])
    return SLADDPairs(targets, targets, fake_sources, fakes, size, settings, seed)
