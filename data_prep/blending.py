"""Blended pseudo-fakes from real faces: self-blended images (SBI) and the SLADD forgery space.

Everything here is a pure function of numpy arrays:

- images are RGB uint8 arrays (H, W, 3);
- landmarks are dlib's 68 points as float (68, 2) in (x, y) pixel coordinates;
- every random choice draws from an explicit `np.random.Generator`, so a fixed seed
  reproduces the output byte for byte.

No face detector runs here: the functions take cached landmarks so that a training
Dataset can call them online. The image operations are written with cv2 look-up tables,
filters and remaps rather than an augmentation library, because each operation must draw
its parameters from the caller's Generator and the whole SBI pair must stay well under
25 ms at 380 px on one core.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import cv2
import numpy as np

__all__ = [
    "BLEND_TYPES",
    "DEFAULT_SBI",
    "JAW",
    "LEFT_BROW",
    "LEFT_EYE",
    "MASK_VARIANTS",
    "MOUTH",
    "NOSE",
    "RIGHT_BROW",
    "RIGHT_EYE",
    "SBIConfig",
    "SLADD_REGIONS",
    "SLADD_REGION_NAMES",
    "align_source",
    "blend",
    "color_transfer",
    "face_scale",
    "region_mask",
    "sbi_mask",
    "sbi_pair",
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


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SBIConfig:
    """Every number of the self-blending recipe (METHODS.md section 2).

    Values that METHODS.md states are its published ones; the others are marked "chosen"
    with the reason next to them.
    """

    # Source/target augmentation, applied to one of the two copies (50/50).
    rgb_shift: float = 20.0  # per channel, +- on the 0-255 scale
    # Chosen: METHODS.md names an HSV shift without magnitudes. Hue in degrees, saturation and
    # value on the 0-255 scale; small enough that the blended face keeps a plausible colour.
    hue_shift: float = 10.0
    sat_shift: float = 20.0
    val_shift: float = 20.0
    brightness: float = 0.1  # +- fraction of 255 added
    contrast: float = 0.1  # +- fraction, gain 1 +- contrast
    # Chosen: per-operation probabilities are not published. 0.3 keeps many pairs whose only
    # source/target mismatch is the frequency operation and the warp, the subtlest fakes.
    aug_color_p: float = 0.3
    # One of downscale-and-back or sharpen is always applied (50/50 between them).
    downscale_factors: tuple[int, ...] = (2, 4)
    # Chosen: the usual sharpen kernel ranges (identity mixed with a Laplacian sharpen).
    sharpen_alpha: tuple[float, float] = (0.2, 0.5)
    sharpen_lightness: tuple[float, float] = (0.5, 1.0)
    # Source warp.
    translate_x: float = 0.03  # +- fraction of the width
    translate_y: float = 0.015  # +- fraction of the height
    scale: tuple[float, float] = (0.95, 1.05)
    # Chosen: the mask follows the warped source, so the pasted region is the source's own
    # face; switch off to keep the mask on the target's landmarks.
    warp_mask_with_source: bool = True
    # Mask.
    mask_variants: tuple[str, ...] = MASK_VARIANTS  # drawn uniformly per pair
    # Chosen: the forehead variant lifts the brow points by this fraction of the brow-to-chin
    # distance (a forehead is about half of it); the range stays mostly below the hairline.
    forehead_extend: tuple[float, float] = (0.2, 0.4)
    # Chosen: elastic deformation as a smooth random displacement field with control points
    # every `elastic_spacing` and displacement std `elastic_std`, both as fractions of the face
    # size (landmark bounding-box side), so the wiggle does not depend on the image resolution.
    elastic_spacing: float = 0.08
    elastic_std: float = 0.01
    mask_resize: tuple[int, int] = (192, 256)  # random side lengths, each drawn separately
    blur_kernel: tuple[int, int] = (5, 25)  # random odd Gaussian kernel sizes, inclusive
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
    # Shared pair augmentation: the same colour jitter and JPEG on real and fake.
    pair_augment: bool = True  # False returns the pair before it (tests, visualisation)
    pair_color_p: float = 0.3  # chosen, as aug_color_p
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (40, 100)  # inclusive

    def __post_init__(self) -> None:
        # YAML gives lists; tuples keep the config hashable and immutable.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        unknown = set(self.mask_variants) - set(MASK_VARIANTS)
        if not self.mask_variants or unknown:
            raise ValueError(f"mask_variants must be a non-empty subset of {MASK_VARIANTS}, got {self.mask_variants}")
        lo, hi = self.blur_kernel
        if lo < 1 or hi < lo or lo % 2 == 0 or hi % 2 == 0:
            raise ValueError(f"blur_kernel must be odd sizes lo <= hi, got {self.blur_kernel}")
        if not self.ratios or not all(0.0 <= r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios must be non-empty and in [0, 1], got {self.ratios}")
        if not self.downscale_factors or min(self.downscale_factors) < 1:
            raise ValueError(f"downscale_factors must be >= 1, got {self.downscale_factors}")
        q_lo, q_hi = self.jpeg_quality
        if not 0 <= q_lo <= q_hi <= 100:
            raise ValueError(f"jpeg_quality must satisfy 0 <= lo <= hi <= 100, got {self.jpeg_quality}")
        if min(self.mask_resize) < 2 or self.mask_resize[0] > self.mask_resize[1]:
            raise ValueError(f"mask_resize must be lo <= hi, both >= 2, got {self.mask_resize}")


DEFAULT_SBI = SBIConfig()


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


def _draw_color_ops(rng: np.random.Generator, cfg: SBIConfig, p: float) -> list[tuple[str, np.ndarray]]:
    """Draw RGB shift, HSV shift and brightness/contrast, each with probability p, as LUTs.

    Drawing returns tables rather than applying them so the pair augmentation can apply one
    draw to both images. The draws happen whether or not an op fires, which keeps the
    stream of random numbers aligned across configs that only change probabilities.
    """
    ops: list[tuple[str, np.ndarray]] = []
    fire = rng.random(3) < p
    shift = rng.uniform(-cfg.rgb_shift, cfg.rgb_shift, 3)
    if fire[0]:
        ops.append(("rgb", _lut3(_BASE[None] + shift[:, None])))
    dh, ds, dv = rng.uniform(-1, 1, 3) * (cfg.hue_shift, cfg.sat_shift, cfg.val_shift)
    if fire[1]:
        # OpenCV's 8-bit hue runs 0-179 (2 degrees a step) and wraps around.
        hue = (np.round(_BASE + dh / 2.0) % 180).astype(np.float32)
        ops.append(("hsv", _lut3(np.stack([hue, _BASE + ds, _BASE + dv]))))
    gain = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    bias = rng.uniform(-cfg.brightness, cfg.brightness) * 255.0
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
    """Downscale by x2/x4 and back, or sharpen (50/50)."""
    h, w = img.shape[:2]
    use_downscale = rng.random() < 0.5
    factor = int(rng.choice(cfg.downscale_factors))
    alpha = rng.uniform(*cfg.sharpen_alpha)
    lightness = rng.uniform(*cfg.sharpen_lightness)
    if use_downscale:
        small = cv2.resize(img, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
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


def sbi_mask(
    landmarks: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator, cfg: SBIConfig = DEFAULT_SBI
) -> np.ndarray:
    """SBI blending mask M in [0, 1], float32 (H, W), before the blend ratio.

    Hull of the chosen variant -> elastic deformation -> resize to a random 192-256 size and
    back -> Gaussian blur -> erosion -> Gaussian blur -> scaled so its peak is 1.
    """
    lm = _check_landmarks(landmarks, "landmarks")
    h, w = shape[:2]
    variant = cfg.mask_variants[int(rng.integers(len(cfg.mask_variants)))]
    mask = _fill_hulls((h, w), _variant_groups(lm, variant, rng, cfg))
    size = float(np.ptp(lm, axis=0).max())
    mask = _smooth_remap(mask, cfg.elastic_spacing * size, cfg.elastic_std * size, rng, cv2.INTER_CUBIC)
    rw, rh = (int(v) for v in rng.integers(cfg.mask_resize[0], cfg.mask_resize[1] + 1, size=2))
    small = cv2.resize(mask, (rw, rh), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    k1 = _odd_kernel(rng, *cfg.blur_kernel)
    k2 = _odd_kernel(rng, *cfg.blur_kernel)
    blurred = cv2.GaussianBlur(mask, (k1, k1), 0)
    # Erosion: keep only pixels whose whole first-blur neighbourhood is inside the mask
    # (the blur reaches 1 there), so the second blur's soft edge starts inside the face.
    eroded = (blurred >= 1.0 - 1e-3).astype(np.float32)
    if not eroded.any():
        # A face smaller than the kernel would vanish; keep its unblurred hull instead.
        eroded = (mask > 0.5).astype(np.float32)
    return _peak_normalised(cv2.GaussianBlur(eroded, (k2, k2), 0))


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
    img: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator, cfg: SBIConfig = DEFAULT_SBI
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One self-blended pair (real, fake, mask) from a real face and its cached landmarks.

    `real` is the target copy (augmented when the coin picked the target), `fake` the source
    blended into it, `mask` the effective blend weight r*M in [0, 1] (float32, H x W): zero
    wherever `fake` equals `real` before the shared pair augmentation.
    """
    _check_image(img, "image")
    lm = _check_landmarks(landmarks, "landmarks")
    h, w = img.shape[:2]

    source = img
    target = img
    augment_source = rng.random() < 0.5
    ops = _draw_color_ops(rng, cfg, cfg.aug_color_p)
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
    pair_ops = _draw_color_ops(rng, cfg, cfg.pair_color_p)
    use_jpeg = rng.random() < cfg.jpeg_p
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    if cfg.pair_augment:
        real = _apply_color_ops(real, pair_ops)
        fake = _apply_color_ops(fake, pair_ops)
        if use_jpeg:
            real, fake = _jpeg(real, quality), _jpeg(fake, quality)
    return real, fake, mask * np.float32(ratio)


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
    the detector's mask head.
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
