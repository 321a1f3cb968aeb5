"""Blended pseudo-fakes from real faces: self-blended images (SBI) and the SLADD forgery space.

Everything here is a pure function of numpy arrays:

- images are RGB uint8 arrays (H, W, 3);
- landmarks are dlib's 68 points as float (68, 2) in (x, y) pixel coordinates;
- a face box is (x0, y0, x1, y1) in pixels, x1 and y1 exclusive (`faces.Face.box`);
- every random choice draws from an explicit `np.random.Generator`, so a fixed seed
  reproduces the output byte for byte.

SBI follows the reference recipe (METHODS.md section 2); its every constant is in the `sbi:`
section of `configs/members/sbi_fed.yaml`, read by `load_sbi_config`. One training sample
(`sbi_sample`) is: horizontal flip; the face cut from its widened landmark box; `sbi_pair`
(augment one copy, warp the source, blend it in through the mask, the same colour jitter
and JPEG on both images); a crop on the face box with random margins, resized to 380.
`sbi_test_crop` is the same last crop with the test-time margins, for inference.

No face detector runs here: the functions take cached landmarks and boxes so that a
training Dataset can call them online. The image operations are written with cv2 look-up
tables, filters and remaps rather than an augmentation library, because each operation
must draw its parameters from the caller's Generator and the whole SBI pair must stay well
under 25 ms at 380 px on one core.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from core.config import read_yaml
from data_prep.faces import flip_landmarks

__all__ = [
    "BLEND_TYPES",
    "ColorJitter",
    "JAW",
    "LEFT_BROW",
    "LEFT_EYE",
    "MASK_VARIANTS",
    "MOUTH",
    "NOSE",
    "RIGHT_BROW",
    "RIGHT_EYE",
    "SBIConfig",
    "SBIMask",
    "SBI_RECIPE_FILE",
    "SLADD_REGIONS",
    "SLADD_REGION_NAMES",
    "align_source",
    "blend",
    "color_transfer",
    "face_crop_window",
    "face_scale",
    "load_sbi_config",
    "precrop_window",
    "region_mask",
    "sbi_mask",
    "sbi_mask_stages",
    "sbi_pair",
    "sbi_sample",
    "sbi_test_crop",
    "sladd_forge",
]

# dlib 68-point index groups. "Right"/"left" are the subject's, as in dlib's own scheme:
# the right eye (36-41) appears on the left of a frontal photograph.
JAW = tuple(range(0, 17))
RIGHT_BROW = tuple(range(17, 22))
LEFT_BROW = tuple(range(22, 27))
NOSE = tuple(range(27, 36))
RIGHT_EYE = tuple(range(36, 42))
LEFT_EYE = tuple(range(42, 48))
MOUTH = tuple(range(48, 68))

MASK_VARIANTS = ("hull68", "forehead", "components")

# The SLADD synthesizer's ten regions. Each region is a tuple of components; each component
# is a landmark index group whose convex hull is filled separately, so "nose+mouth" is two
# hulls rather than one hull that would also swallow the cheeks between them.
SLADD_REGION_NAMES = (
    "left_eye",
    "right_eye",
    "eyes",
    "nose",
    "mouth",
    "nose+left_eye",
    "nose+right_eye",
    "nose+eyes",
    "nose+mouth",
    "eyes+nose+mouth",
)
SLADD_REGIONS: tuple[tuple[tuple[int, ...], ...], ...] = (
    (LEFT_EYE,),
    (RIGHT_EYE,),
    (LEFT_EYE, RIGHT_EYE),
    (NOSE,),
    (MOUTH,),
    (NOSE, LEFT_EYE),
    (NOSE, RIGHT_EYE),
    (NOSE, LEFT_EYE, RIGHT_EYE),
    (NOSE, MOUTH),
    (LEFT_EYE, RIGHT_EYE, NOSE, MOUTH),
)
BLEND_TYPES = ("alpha", "poisson", "copy", "none")

INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}

# The published recipe, shipped with the member that trains on it.
SBI_RECIPE_FILE = Path(__file__).resolve().parents[1] / "configs" / "members" / "sbi_fed.yaml"


# --------------------------------------------------------------------------- configuration


def _pair(value: Any, name: str, lo: float = -np.inf, hi: float = np.inf) -> tuple:
    if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
        raise ValueError(f"{name} must be [low, high] with {lo} <= low <= high <= {hi}, got {value}")
    return tuple(value)


def _probability(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


@dataclass(frozen=True)
class ColorJitter:
    """Three colour operations, each firing with its own probability; shifts are +- limits.

    rgb_shift: per channel, on the 0-255 scale. hue_shift in degrees; sat_shift and
    val_shift on the 0-255 scale. brightness: fraction of 255 added; contrast: gain 1 +- c.
    """

    rgb_shift: float
    rgb_p: float
    hue_shift: float
    sat_shift: float
    val_shift: float
    hsv_p: float
    brightness: float
    contrast: float
    brightness_contrast_p: float

    def __post_init__(self) -> None:
        for name in ("rgb_p", "hsv_p", "brightness_contrast_p"):
            _probability(getattr(self, name), name)
        for name in ("rgb_shift", "hue_shift", "sat_shift", "val_shift", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} is a +- limit and must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SBIConfig:
    """Every number of the self-blending recipe. No field has a default: the values, and the
    reason for each one that METHODS.md does not state, are in the `sbi:` section of
    `configs/members/sbi_fed.yaml`; build one with `load_sbi_config`."""

    # Flip and the cut before blending (fractions of the 68-point box's width w and height h).
    flip_p: float
    precrop_side: float
    precrop_top: float
    precrop_bottom: float
    # Which copy gets augmented, and how.
    augment_source_p: float
    source_color: ColorJitter
    downscale_p: float
    downscale_factors: tuple[int, ...]
    downscale_down: str
    downscale_up: str
    sharpen_alpha: tuple[float, float]
    sharpen_lightness: tuple[float, float]
    # Source warp (translation as fractions of the frame, scale about the face centre).
    translate_x: float
    translate_y: float
    scale: tuple[float, float]
    warp_mask_with_source: bool
    # Mask.
    mask_variants: tuple[str, ...]
    forehead_extend: tuple[float, float]
    elastic_spacing: float
    elastic_std: float
    mask_resize: tuple[int, int]
    blur_kernel: tuple[int, int]
    blur1_sigma: float
    blur2_sigma: tuple[int, int]
    ratios: tuple[float, ...]
    # The pair's shared augmentation.
    pair_augment: bool
    pair_color: ColorJitter
    jpeg_p: float
    jpeg_quality: tuple[int, int]
    # The crop after blending (fractions of the face box) and the network's input size.
    crop_margin: float
    crop_margin_scale: tuple[float, float]
    test_margin_scale: float
    output_size: int

    def __post_init__(self) -> None:
        # YAML gives lists and mappings; tuples and frozen dataclasses keep the config hashable.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            elif isinstance(value, dict) and f.name.endswith("_color"):
                object.__setattr__(self, f.name, ColorJitter(**value))
        for name in ("flip_p", "augment_source_p", "downscale_p", "jpeg_p"):
            _probability(getattr(self, name), name)
        for name in ("precrop_side", "precrop_top", "precrop_bottom", "crop_margin", "test_margin_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        unknown = set(self.mask_variants) - set(MASK_VARIANTS)
        if not self.mask_variants or unknown:
            raise ValueError(f"mask_variants must be a non-empty subset of {MASK_VARIANTS}, got {self.mask_variants}")
        lo, hi = _pair(self.blur_kernel, "blur_kernel", 1)
        if lo % 2 == 0 or hi % 2 == 0:
            raise ValueError(f"blur_kernel must be odd sizes lo <= hi, got {self.blur_kernel}")
        _pair(self.blur2_sigma, "blur2_sigma", 0)
        _pair(self.mask_resize, "mask_resize", 2)
        _pair(self.jpeg_quality, "jpeg_quality", 0, 100)
        _pair(self.crop_margin_scale, "crop_margin_scale", 0)
        # A ratio of 0 would make the "fake" its real bit for bit (the empty-mask check runs on
        # the mask, before the ratio is drawn): a wrong label, so it is refused.
        if not self.ratios or not all(0.0 < r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios must be non-empty and in (0, 1], got {self.ratios}")
        if not self.downscale_factors or min(self.downscale_factors) < 1:
            raise ValueError(f"downscale_factors must be >= 1, got {self.downscale_factors}")
        for name in ("downscale_down", "downscale_up"):
            if getattr(self, name) not in INTERPOLATIONS:
                raise ValueError(f"{name} must be one of {tuple(INTERPOLATIONS)}, got {getattr(self, name)!r}")
        if self.output_size < 8:
            raise ValueError(f"output_size must be >= 8, got {self.output_size}")
        for name in ("source_color", "pair_color"):
            if not isinstance(getattr(self, name), ColorJitter):
                raise ValueError(f"{name} must be a mapping of ColorJitter fields, got {getattr(self, name)!r}")


def load_sbi_config(path: str | Path = SBI_RECIPE_FILE, **overrides: Any) -> SBIConfig:
    """The `sbi:` section of a member config as an SBIConfig; `overrides` replace whole fields.

    With no arguments: the published recipe shipped in configs/members/sbi_fed.yaml.
    """
    cfg = read_yaml(path)
    section = cfg.get("sbi")
    if not isinstance(section, dict):
        raise ValueError(f"{path}: no `sbi:` section")
    names = {f.name for f in fields(SBIConfig)}
    missing, unknown = sorted(names - set(section)), sorted(set(section) - names)
    if missing or unknown:
        raise ValueError(f"{path}: the `sbi:` section lacks {missing} and has unknown keys {unknown}")
    try:
        return replace(SBIConfig(**section), **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


# --------------------------------------------------------------------------- validation


def _check_image(img: np.ndarray, name: str) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"{name}: expected an RGB uint8 array (H, W, 3), got {desc}")


def _check_landmarks(lm: np.ndarray, name: str) -> np.ndarray:
    lm = np.asarray(lm, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"{name}: expected 68 (x, y) landmarks of shape (68, 2), got {lm.shape}")
    if not np.isfinite(lm).all():
        raise ValueError(f"{name}: landmarks contain NaN or infinity")
    return lm


def face_scale(landmarks: np.ndarray) -> float:
    """Distance between the eye centres, the length every relative size here is measured in.

    Eye centres are steadier than the jaw line, which moves with pose and open mouths.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    d = np.linalg.norm(lm[list(LEFT_EYE)].mean(0) - lm[list(RIGHT_EYE)].mean(0))
    return float(max(d, 1.0))


# --------------------------------------------------------------------------- the blend


def blend(src: np.ndarray, tgt: np.ndarray, mask: np.ndarray, ratio: float) -> np.ndarray:
    """fake = r*M*src + (1 - r*M)*tgt, returned with tgt's dtype (uint8 is rounded).

    `mask` is (H, W) or (H, W, 1) in [0, 1]. Evaluated as tgt + r*M*(src - tgt), the same
    formula, so that wherever r*M is 0 the output is the target bit for bit and wherever it
    is 1 it is the source bit for bit.
    """
    if src.shape != tgt.shape:
        raise ValueError(f"blend: source {src.shape} and target {tgt.shape} differ in shape")
    if mask.shape[:2] != tgt.shape[:2] or (mask.ndim == 3 and mask.shape[2] != 1) or mask.ndim not in (2, 3):
        raise ValueError(f"blend: mask {mask.shape} does not match image {tgt.shape}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"blend: ratio must be in [0, 1], got {ratio}")
    out = tgt.copy()
    w2 = mask.reshape(mask.shape[:2])
    if ratio == 0:
        return out
    # Only the mask's bounding box can change; skipping the rest halves the cost of a face
    # that fills part of the frame.
    rows = np.flatnonzero(w2.any(axis=1))
    if rows.size == 0:
        return out
    cols = np.flatnonzero(w2.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    w = np.clip(w2[y0:y1, x0:x1].astype(np.float32), 0.0, 1.0) * np.float32(ratio)
    if tgt.ndim == 3:
        w = w[..., None]
    t = tgt[y0:y1, x0:x1].astype(np.float32)
    res = t + w * (src[y0:y1, x0:x1].astype(np.float32) - t)
    if tgt.dtype == np.uint8:
        res = np.clip(np.rint(res), 0, 255)
    out[y0:y1, x0:x1] = res.astype(tgt.dtype)
    return out


# --------------------------------------------------------------------------- colour and frequency operations


def _lut3(per_channel: np.ndarray) -> np.ndarray:
    """(3, 256) float table -> the (1, 256, 3) uint8 layout cv2.LUT wants for 3 channels."""
    return np.clip(np.rint(per_channel), 0, 255).astype(np.uint8).T[None]


_BASE = np.arange(256, dtype=np.float32)


def _draw_color_ops(rng: np.random.Generator, jitter: ColorJitter) -> list[tuple[str, np.ndarray]]:
    """Draw RGB shift, HSV shift and brightness/contrast, each with its probability, as LUTs.

    Drawing returns tables rather than applying them so the pair augmentation can apply one
    draw to both images. The draws happen whether or not an op fires, which keeps the
    stream of random numbers aligned across configs that only change probabilities.
    """
    ops: list[tuple[str, np.ndarray]] = []
    fire = rng.random(3) < (jitter.rgb_p, jitter.hsv_p, jitter.brightness_contrast_p)
    shift = rng.uniform(-jitter.rgb_shift, jitter.rgb_shift, 3)
    if fire[0]:
        ops.append(("rgb", _lut3(_BASE[None] + shift[:, None])))
    dh, ds, dv = rng.uniform(-1, 1, 3) * (jitter.hue_shift, jitter.sat_shift, jitter.val_shift)
    if fire[1]:
        # OpenCV's 8-bit hue runs 0-179 (2 degrees a step) and wraps around.
        hue = (np.round(_BASE + dh / 2.0) % 180).astype(np.float32)
        ops.append(("hsv", _lut3(np.stack([hue, _BASE + ds, _BASE + dv]))))
    gain = 1.0 + rng.uniform(-jitter.contrast, jitter.contrast)
    bias = rng.uniform(-jitter.brightness, jitter.brightness) * 255.0
    if fire[2]:
        ops.append(("bc", np.clip(np.rint(_BASE * gain + bias), 0, 255).astype(np.uint8)))
    return ops


def _apply_color_ops(img: np.ndarray, ops: list[tuple[str, np.ndarray]]) -> np.ndarray:
    for kind, lut in ops:
        if kind == "hsv":
            hsv = cv2.LUT(cv2.cvtColor(img, cv2.COLOR_RGB2HSV), lut)
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        else:
            img = cv2.LUT(img, lut)
    return img


def _frequency_op(img: np.ndarray, rng: np.random.Generator, cfg: SBIConfig) -> np.ndarray:
    """Downscale by x2/x4 and back (nearest down, linear up: it aliases on purpose), or sharpen."""
    h, w = img.shape[:2]
    use_downscale = rng.random() < cfg.downscale_p
    factor = int(rng.choice(cfg.downscale_factors))
    alpha = rng.uniform(*cfg.sharpen_alpha)
    lightness = rng.uniform(*cfg.sharpen_lightness)
    if use_downscale:
        small = cv2.resize(
            img, (max(1, w // factor), max(1, h // factor)), interpolation=INTERPOLATIONS[cfg.downscale_down]
        )
        return cv2.resize(small, (w, h), interpolation=INTERPOLATIONS[cfg.downscale_up])
    effect = -np.ones((3, 3), np.float32)
    effect[1, 1] = 8.0 + lightness
    identity = np.zeros((3, 3), np.float32)
    identity[1, 1] = 1.0
    kernel = (1.0 - alpha) * identity + alpha * effect
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    # cv2 encodes BGR; swapping keeps the chroma planes the ones a real JPEG of this photo has.
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- geometry helpers


@lru_cache(maxsize=16)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    xs.flags.writeable = False
    ys.flags.writeable = False
    return xs, ys


def _smooth_remap(
    mask: np.ndarray, spacing: float, std: float, rng: np.random.Generator, interpolation: int
) -> np.ndarray:
    """Warp `mask` by a random displacement field that is smooth between control points.

    Control points sit every `spacing` pixels; each gets a normal(0, std) displacement and
    cv2.resize interpolates them to every pixel (linear: a piecewise-bilinear warp; cubic:
    a smoother, elastic one). One resize and one remap cost about a millisecond, against the
    hundreds that a per-pixel Gaussian-filtered field or skimage's piecewise-affine warp take.
    """
    h, w = mask.shape[:2]
    gh = max(2, int(np.ceil(h / max(spacing, 1.0))) + 1)
    gw = max(2, int(np.ceil(w / max(spacing, 1.0))) + 1)
    disp = rng.normal(0.0, std, size=(2, gh, gw)).astype(np.float32)
    if std <= 0:
        return mask
    dx = cv2.resize(disp[0], (w, h), interpolation=interpolation)
    dy = cv2.resize(disp[1], (w, h), interpolation=interpolation)
    xs, ys = _grid(h, w)
    return cv2.remap(mask, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _fill_hulls(shape: tuple[int, int], groups: list[np.ndarray]) -> np.ndarray:
    """Union of the convex hulls of each point group, as a float32 0/1 mask."""
    mask = np.zeros(shape, np.uint8)
    for pts in groups:
        # Sub-pixel fill: 4 fractional bits keep the hull edge where the landmarks put it.
        hull = cv2.convexHull(np.rint(pts * 16).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(np.float32)


def _odd_kernel(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(lo + 2 * rng.integers(0, (hi - lo) // 2 + 1))


# --------------------------------------------------------------------------- SBI


def _variant_groups(lm: np.ndarray, variant: str, rng: np.random.Generator, cfg: SBIConfig) -> list[np.ndarray]:
    # Draw even when unused, so the choice of variant does not shift later random numbers.
    lift = rng.uniform(*cfg.forehead_extend)
    if variant == "hull68":
        return [lm]
    if variant == "forehead":
        # "Up" is the face's own axis, chin to brows, so tilted faces get a tilted forehead.
        brows = lm[17:27]
        up = brows.mean(0) - lm[8]
        return [np.concatenate([lm, brows + lift * up])]
    # Components: the upper face (brows, eyes, nose bridge) and the lower face (nose, mouth,
    # inner jaw) as separate hulls, which leaves out the outer cheeks and gives the blend a
    # non-convex outline the 68-point hull never has.
    upper = lm[17:48]
    lower = lm[list(range(2, 15)) + list(NOSE) + list(MOUTH)]
    return [upper, lower]


class SBIMask(NamedTuple):
    """The mask and two of its stages, for measuring the recipe (bench.sbi_faithfulness)."""

    hull: np.ndarray  # the deformed hull at the small working size (float32, soft where the resize cut pixels)
    eroded: np.ndarray  # 0/1 float32 at the small size: where the first blur keeps its peak
    mask: np.ndarray  # M: float32 (H, W) in the frame, in [0, 1], peak 1


def sbi_mask_stages(landmarks: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, cfg: SBIConfig) -> SBIMask:
    """The SBI blending mask M with its stages.

    Hull of the chosen variant -> elastic deformation, in the frame -> resized to a random
    192-256 per side -> Gaussian blur (kernel k1, OpenCV's sigma for it) -> erosion: only the
    pixels where that blur keeps its peak, i.e. whose whole k1 x k1 window lies inside the
    hull -> Gaussian blur (kernel k2, sigma 5-45) -> resized back to the frame -> peak 1.
    Both blurs and the erosion run at the small size, so the blend edge is a fixed fraction
    of the frame whatever its resolution.
    """
    lm = _check_landmarks(landmarks, "landmarks")
    h, w = shape[:2]
    variant = cfg.mask_variants[int(rng.integers(len(cfg.mask_variants)))]
    hull = _fill_hulls((h, w), _variant_groups(lm, variant, rng, cfg))
    size = float(np.ptp(lm, axis=0).max())
    hull = _smooth_remap(hull, cfg.elastic_spacing * size, cfg.elastic_std * size, rng, cv2.INTER_CUBIC)
    rw, rh = (int(v) for v in rng.integers(cfg.mask_resize[0], cfg.mask_resize[1] + 1, size=2))
    k1 = _odd_kernel(rng, *cfg.blur_kernel)
    k2 = _odd_kernel(rng, *cfg.blur_kernel)
    sigma2 = float(rng.integers(cfg.blur2_sigma[0], cfg.blur2_sigma[1] + 1))
    small = cv2.resize(hull, (rw, rh), interpolation=cv2.INTER_LINEAR)
    blurred = cv2.GaussianBlur(small, (k1, k1), cfg.blur1_sigma)
    peak = float(blurred.max())
    if peak <= 0:
        return SBIMask(small, np.zeros_like(small), np.zeros((h, w), np.float32))
    # Every pixel whose window lies wholly inside sums the same kernel weights in the same
    # order, so they all equal the peak exactly; a window reaching past the hull falls short
    # (float32 can miss that only for the faintest corner weights of the largest kernels).
    eroded = (blurred >= peak).astype(np.float32)
    soft = cv2.GaussianBlur(eroded, (k2, k2), sigma2)
    return SBIMask(small, eroded, _peak_normalised(cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)))


def sbi_mask(landmarks: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, cfg: SBIConfig) -> np.ndarray:
    """SBI blending mask M in [0, 1], float32 (H, W), before the blend ratio (see `sbi_mask_stages`)."""
    return sbi_mask_stages(landmarks, shape, rng, cfg).mask


def _peak_normalised(mask: np.ndarray) -> np.ndarray:
    """`mask` scaled to a peak of 1, weights under 1/512 zeroed (all zeros if it is empty).

    A weight under 1/512 moves a uint8 pixel by under half a level, which rounding undoes;
    zeroing such weights makes the mask's support exactly the pixels that can change.
    """
    peak = float(mask.max())
    if peak <= 0:
        return np.zeros(mask.shape, np.float32)
    mask = mask / peak
    mask[mask < 1.0 / 512] = 0.0
    return mask


def _random_affine(h: int, w: int, centre: np.ndarray, rng: np.random.Generator, cfg: SBIConfig) -> np.ndarray:
    tx = rng.uniform(-cfg.translate_x, cfg.translate_x) * w
    ty = rng.uniform(-cfg.translate_y, cfg.translate_y) * h
    s = rng.uniform(*cfg.scale)
    # Scale about the face centre, then translate: the face moves by the stated amounts
    # wherever it sits in the frame (about the image centre an off-centre face would drift).
    cx, cy = centre
    return np.array([[s, 0.0, (1 - s) * cx + tx], [0.0, s, (1 - s) * cy + ty]], np.float64)


def sbi_pair(
    img: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, cfg: SBIConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One self-blended pair (real, fake, mask) in the frame of `img`, from its cached landmarks.

    `real` is the target copy (augmented when the coin picked the target), `fake` the source
    blended into it, `mask` the effective blend weight r*M in [0, 1] (float32, H x W): zero
    wherever `fake` equals `real` before the shared pair augmentation. `sbi_sample` calls
    this on the face cut from its frame; called on a whole frame, the mask's edge is a
    fraction of that frame instead.
    """
    _check_image(img, "image")
    lm = _check_landmarks(landmarks, "landmarks")
    h, w = img.shape[:2]

    source = img
    target = img
    augment_source = rng.random() < cfg.augment_source_p
    ops = _draw_color_ops(rng, cfg.source_color)
    changed = _frequency_op(_apply_color_ops(img, ops), rng, cfg)
    if augment_source:
        source = changed
    else:
        target = changed

    affine = _random_affine(h, w, (lm.min(0) + lm.max(0)) / 2.0, rng, cfg)
    source = cv2.warpAffine(source, affine, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    mask_lm = lm @ affine[:, :2].T + affine[:, 2] if cfg.warp_mask_with_source else lm
    mask = sbi_mask(mask_lm, (h, w), rng, cfg)
    if not mask.any():
        # A "fake" identical to its real would be a wrong label, not a harmless no-op.
        raise ValueError("sbi_pair: the landmarks give an empty mask (is the face inside the image?)")

    ratio = float(cfg.ratios[int(rng.integers(len(cfg.ratios)))])
    fake = blend(source, target, mask, ratio)
    real = target.copy() if target is img else target

    # Shared augmentation: one draw applied to both, so it adds no real/fake difference.
    pair_ops = _draw_color_ops(rng, cfg.pair_color)
    use_jpeg = rng.random() < cfg.jpeg_p
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    if cfg.pair_augment:
        real = _apply_color_ops(real, pair_ops)
        fake = _apply_color_ops(fake, pair_ops)
        if use_jpeg:
            real, fake = _jpeg(real, quality), _jpeg(fake, quality)
    return real, fake, mask * np.float32(ratio)


# --------------------------------------------------------------------------- SBI crops and the training sample

Box = tuple[float, float, float, float]
Window = tuple[int, int, int, int]


def _check_box(box: Box, shape: tuple[int, ...]) -> Box:
    arr = np.asarray(box, dtype=np.float64).reshape(-1)
    if arr.shape != (4,) or not np.isfinite(arr).all() or arr[2] <= arr[0] or arr[3] <= arr[1]:
        raise ValueError(f"face box: expected finite (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {box}")
    h, w = shape[:2]
    if arr[2] <= 0 or arr[3] <= 0 or arr[0] >= w or arr[1] >= h:
        raise ValueError(f"face box {tuple(arr.tolist())} lies outside the {w}x{h} image")
    return tuple(float(v) for v in arr)  # type: ignore[return-value]


def _window(box: Box, margins: np.ndarray, shape: tuple[int, ...]) -> Window:
    """`box` widened by margins (left, top, right, bottom) in pixels, as whole pixels inside the image."""
    h, w = shape[:2]
    x0, y0, x1, y1 = box
    left, top, right, bottom = margins
    return (
        max(0, int(np.floor(x0 - left))),
        max(0, int(np.floor(y0 - top))),
        min(w, int(np.ceil(x1 + right))),
        min(h, int(np.ceil(y1 + bottom))),
    )


def precrop_window(landmarks: np.ndarray, shape: tuple[int, ...], cfg: SBIConfig) -> Window:
    """The cut before blending, (x0, y0, x1, y1) in pixels, x1 and y1 exclusive.

    The 68-point box (width w, height h) widened by precrop_side * w left and right,
    precrop_top * h above and precrop_bottom * h below (published: w/2, h, 0.4h), clipped.
    """
    lm = _check_landmarks(landmarks, "landmarks")
    lo, hi = lm.min(0), lm.max(0)
    box = _check_box((*lo, *np.maximum(hi, lo + 1.0)), shape)
    bw, bh = hi - lo
    margins = np.array([cfg.precrop_side * bw, cfg.precrop_top * bh, cfg.precrop_side * bw, cfg.precrop_bottom * bh])
    return _window(box, margins, shape)


def face_crop_window(box: Box, shape: tuple[int, ...], scales: np.ndarray, cfg: SBIConfig) -> Window:
    """The crop after blending: `box` widened by crop_margin times its width (left, right) and
    height (top, bottom), each margin times its entry of `scales` (left, top, right, bottom)."""
    x0, y0, x1, y1 = _check_box(box, shape)
    full = cfg.crop_margin * np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
    return _window((x0, y0, x1, y1), full * np.asarray(scales, dtype=np.float64), shape)


def _to_output(img: np.ndarray, window: Window, size: int) -> np.ndarray:
    x0, y0, x1, y1 = window
    # Square output from any crop, aspect not kept, bilinear: the reference's resize.
    return cv2.resize(img[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_LINEAR)


def sbi_test_crop(img: np.ndarray, box: Box, cfg: SBIConfig) -> np.ndarray:
    """The network's input at test time: the face box with every margin at test_margin_scale,
    resized to output_size (uint8; the network takes it /255 with no mean/std)."""
    _check_image(img, "image")
    scales = np.full(4, cfg.test_margin_scale)
    return _to_output(img, face_crop_window(box, img.shape, scales, cfg), cfg.output_size)


def sbi_sample(
    img: np.ndarray, landmarks: np.ndarray, box: Box, rng: np.random.Generator, cfg: SBIConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training pair (real, fake, mask) at output_size from a real frame, its 68 landmarks and face box.

    Flip (p flip_p, landmarks and box with it) -> cut `precrop_window` -> `sbi_pair` in that
    cut -> crop `face_crop_window` with each margin scaled by its own draw from
    crop_margin_scale -> resized to output_size. real and fake are uint8 (the network takes
    them /255 with no mean/std); mask is r*M on the same crop, float32.
    """
    _check_image(img, "image")
    lm = _check_landmarks(landmarks, "landmarks")
    x0, y0, x1, y1 = _check_box(box, img.shape)
    w = img.shape[1]
    if rng.random() < cfg.flip_p:
        img = img[:, ::-1]
        lm = flip_landmarks(lm, w).astype(np.float64)
        x0, x1 = w - x1, w - x0  # exclusive bounds: pixel i goes to w - 1 - i
    cx0, cy0, cx1, cy1 = precrop_window(lm, img.shape, cfg)
    frame = np.ascontiguousarray(img[cy0:cy1, cx0:cx1])
    real, fake, mask = sbi_pair(frame, lm - (cx0, cy0), rng, cfg)
    scales = rng.uniform(*cfg.crop_margin_scale, size=4)
    window = face_crop_window((x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0), frame.shape, scales, cfg)
    size = cfg.output_size
    return _to_output(real, window, size), _to_output(fake, window, size), _to_output(mask, window, size)


# --------------------------------------------------------------------------- SLADD forgery space


def _odd(v: float) -> int:
    k = max(1, int(round(v)))
    return k if k % 2 == 1 else k + 1


def region_mask(
    landmarks: np.ndarray,
    region_index: int,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    dilate: float = 0.15,
    warp: bool = True,
    warp_std: float = 0.03,
    blur: float = 0.05,
) -> np.ndarray:
    """Soft mask (float32, H x W, peak 1) of one SLADD region.

    Each component's landmark hull is filled, dilated by `dilate`, warped by a random
    piecewise-bilinear field (control points every 0.25 units, displaced by normal(0,
    `warp_std`)) and blurred with a Gaussian of sigma `blur`. All lengths are fractions of
    the distance between the eye centres, so the mask scales with the face.

    The warp perturbs a grid of control points and interpolates linearly between them, the
    same kind of warp as a piecewise-affine transform (bilinear on grid cells instead of
    affine on triangles) at a millisecond instead of skimage's hundreds.
    """
    lm = _check_landmarks(landmarks, "landmarks")
    if not 0 <= int(region_index) < len(SLADD_REGIONS):
        raise ValueError(f"region_index must be in [0, {len(SLADD_REGIONS) - 1}], got {region_index}")
    h, w = shape[:2]
    unit = face_scale(lm)
    mask = _fill_hulls((h, w), [lm[list(g)] for g in SLADD_REGIONS[int(region_index)]])
    radius = int(round(dilate * unit))
    if radius > 0:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)))
    if warp:
        mask = _smooth_remap(mask, 0.25 * unit, warp_std * unit, rng, cv2.INTER_LINEAR)
    sigma = blur * unit
    if sigma > 0:
        mask = cv2.GaussianBlur(mask, (_odd(6 * sigma), _odd(6 * sigma)), sigma)
    return _peak_normalised(mask)


def align_source(
    src_img: np.ndarray, src_landmarks: np.ndarray, tgt_landmarks: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Warp the source face onto the target's by a similarity transform fitted to the landmarks.

    Returns the warped source of size shape[:2] and the source landmarks in the target frame.
    Raises ValueError when no transform can be fitted (degenerate landmarks).
    """
    _check_image(src_img, "source image")
    s_lm = _check_landmarks(src_landmarks, "source landmarks").astype(np.float32)
    t_lm = _check_landmarks(tgt_landmarks, "target landmarks").astype(np.float32)
    # RANSAC drops landmarks that moved with expression (an open mouth, a blink); the threshold
    # scales with the face so the inlier test means the same at every resolution, and
    # OpenCV's RANSAC seeds itself, so the fit is deterministic.
    thr = max(2.0, 0.1 * face_scale(t_lm))
    matrix, _ = cv2.estimateAffinePartial2D(s_lm, t_lm, method=cv2.RANSAC, ransacReprojThreshold=thr)
    if matrix is None or not np.isfinite(matrix).all():
        raise ValueError("align_source: no similarity transform fits the landmarks")
    h, w = shape[:2]
    warped = cv2.warpAffine(src_img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    moved = s_lm.astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
    return warped, moved


def color_transfer(src: np.ndarray, tgt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Recolour `src` so its LAB mean and std inside `mask` match `tgt`'s inside the same mask.

    The statistics are weighted by the mask, so a soft edge counts less than the centre.
    With fewer than 16 pixels of weight there is nothing to match and `src` comes back as is.
    """
    _check_image(src, "source image")
    _check_image(tgt, "target image")
    if src.shape != tgt.shape or mask.shape[:2] != src.shape[:2]:
        raise ValueError(f"color_transfer: shapes differ: {src.shape}, {tgt.shape}, mask {mask.shape}")
    wgt = np.clip(mask.reshape(mask.shape[:2]).astype(np.float32), 0, 1)
    total = float(wgt.sum())
    if total < 16:
        return src.copy()
    # Statistics need only the pixels with weight, i.e. the mask's bounding box.
    rows = np.flatnonzero(wgt.any(axis=1))
    cols = np.flatnonzero(wgt.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    # float LAB (L 0-100) keeps the exact statistics that 8-bit LAB would quantise.
    s_lab = cv2.cvtColor(src.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    t_lab = cv2.cvtColor(tgt[box].astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    wv = wgt[box].reshape(-1, 1)
    s_flat, t_flat = s_lab[box].reshape(-1, 3), t_lab.reshape(-1, 3)
    s_mu = (s_flat * wv).sum(0) / total
    t_mu = (t_flat * wv).sum(0) / total
    s_sd = np.sqrt((((s_flat - s_mu) ** 2) * wv).sum(0) / total)
    t_sd = np.sqrt((((t_flat - t_mu) ** 2) * wv).sum(0) / total)
    # A flat source channel has no spread to rescale; shift it only.
    gain = np.where(s_sd > 1e-3, t_sd / np.maximum(s_sd, 1e-3), 1.0).astype(np.float32)
    out_lab = (s_lab - s_mu.astype(np.float32)) * gain + t_mu.astype(np.float32)
    out_lab[..., 0] = np.clip(out_lab[..., 0], 0, 100)
    rgb = cv2.cvtColor(out_lab, cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _poisson(src: np.ndarray, tgt: np.ndarray, binary: np.ndarray) -> np.ndarray:
    """cv2.seamlessClone of src into tgt where binary is set, at the same position.

    OpenCV needs the mask's bounding box plus a one-pixel frame inside the image, and it pins
    the solution to the target along the mask's edge. A mask touching the border would fail,
    or with plain zero padding leave the border pixels unchanged. So images and mask are
    padded by reflection and only the padding's outer frame is cleared: the pinned edge then
    lies in the mirrored target, off the image, and the border pixels are cloned like the rest.
    """
    pad = 8
    src_p = cv2.copyMakeBorder(src, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    tgt_p = cv2.copyMakeBorder(tgt, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    mask_p = cv2.copyMakeBorder(binary, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    frame = 2
    mask_p[:frame] = 0
    mask_p[-frame:] = 0
    mask_p[:, :frame] = 0
    mask_p[:, -frame:] = 0
    x, y, bw, bh = cv2.boundingRect(mask_p)
    # seamlessClone puts the mask's box with its top-left at center - (w//2, h//2); this
    # centre leaves the source exactly where it is.
    center = (x + bw // 2, y + bh // 2)
    out = cv2.seamlessClone(src_p, tgt_p, mask_p * 255, center, cv2.NORMAL_CLONE)
    return out[pad:-pad, pad:-pad]


def sladd_forge(
    tgt: np.ndarray,
    tgt_lm: np.ndarray,
    src: np.ndarray,
    src_lm: np.ndarray,
    region_index: int,
    blend_type: str,
    mag: float,
    rng: np.random.Generator,
    feather: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """One SLADD forgery: `src`'s region pasted onto `tgt`. Returns (fake, mask).

    The source is aligned to the target by landmarks and colour-transferred inside the region
    first. Blend types:

    - "alpha": the region mask feathered by a further blur of sigma `feather` (eye-distance
      units), blended at ratio `mag`;
    - "poisson": Poisson seamless clone inside the hard region (mask > 0.5), then mixed with
      the target at ratio `mag`;
    - "copy": the hard region pasted at ratio `mag`, no feathering;
    - "none": the target unchanged and an all-zero mask.

    `mask` is the effective blend weight (float32 in [0, 1], H x W), the regression target of
    the detector's mask head. "none", and a `mag` small enough to change nothing, give back the
    real: `sladd_online.forge_pair` labels what comes out, never a fake equal to its real.
    """
    _check_image(tgt, "target image")
    _check_image(src, "source image")
    if blend_type not in BLEND_TYPES:
        raise ValueError(f"blend_type must be one of {BLEND_TYPES}, got {blend_type!r}")
    if not 0.0 <= float(mag) <= 1.0:
        raise ValueError(f"mag must be in [0, 1], got {mag}")
    h, w = tgt.shape[:2]
    if blend_type == "none":
        return tgt.copy(), np.zeros((h, w), np.float32)

    soft = region_mask(tgt_lm, region_index, (h, w), rng)
    if not soft.any():
        raise ValueError("sladd_forge: the region mask is empty (is the face inside the image?)")
    aligned, _ = align_source(src, src_lm, tgt_lm, (h, w))
    aligned = color_transfer(aligned, tgt, soft)
    mag = float(mag)

    if blend_type == "alpha":
        sigma = feather * face_scale(tgt_lm)
        weight = cv2.GaussianBlur(soft, (_odd(6 * sigma), _odd(6 * sigma)), sigma) if sigma > 0 else soft
        weight /= max(float(weight.max()), 1e-6)
        weight[weight < 1.0 / 512] = 0.0
        fake = blend(aligned, tgt, weight, mag)
    else:
        hard = (soft > 0.5).astype(np.float32)
        weight = hard
        if blend_type == "poisson" and hard.any():
            cloned = _poisson(aligned, tgt, hard.astype(np.uint8))
            fake = blend(cloned, tgt, hard, mag)
        else:
            fake = blend(aligned, tgt, hard, mag)
    return fake, (weight * np.float32(mag)).astype(np.float32)
