"""Image edits of the data stage: background replacement, face swap, region swap, degradations.

Everything here is a pure function of numpy arrays, in the conventions of `data_prep.blending`:
RGB uint8 images (H, W, 3), dlib's 68 landmarks as (68, 2) float (x, y) pixels, and every
random choice drawn from an explicit `np.random.Generator`, so a seed reproduces the output
byte for byte. Each edit returns an `EditResult`:

- `rgb`: the edited image, same shape as the input;
- `mask`: the edit's weight, float32 (H, W) in [0, 1]; wherever it is 0 the output equals
  the input bit for bit (the tests rely on this, and so can a mask-supervised detector);
- `info`: the parameters drawn, JSON-serialisable, for the provenance log.

The edits and what they mean for the label (the stage records `method`, `parent`, `region`):

| function | method | label | region |
|---|---|---|---|
| `replace_background` | `edit:background` | kept from the source | the source's region plus `background` |
| `face_swap` | `edit:faceswap` | fake | `face` |
| `region_swap` | `edit:swap` | fake | `eyes`, `eyebrows`, `nose` or `mouth` |
| `degrade` | `edit:degrade` | kept from the source | the source's region (no content changes) |

Background replacement keeps the face and a margin around it bit for bit, so a fake stays
exactly as fake as it was and a real stays real; it is a type augmentation that teaches the
detectors to ignore the surroundings (the winning solution pasted faces onto new backgrounds).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from data_prep.blending import align_source, blend, color_transfer, face_scale

__all__ = [
    "DEGRADE_OPS",
    "EDIT_KINDS",
    "MASK_REGIONS",
    "SWAP_REGIONS",
    "EditResult",
    "degrade",
    "encode_jpeg",
    "face_hull_mask",
    "face_swap",
    "feather",
    "hull_mask",
    "make_background",
    "morph",
    "pose_distance",
    "region_mask",
    "region_swap",
    "replace_background",
    "seamless_clone",
    "synthetic_background",
    "to_uint8",
    "warp_triangles",
]

EDIT_KINDS = ("background", "faceswap", "swap", "degrade")
# Landmarks each region is built from (dlib's 68-point indices).
_REGION_POINTS = {
    "eyes": range(36, 48),
    "eyebrows": range(17, 27),
    "nose": range(27, 36),
    "mouth": range(48, 68),
    "face": range(0, 68),
}
SWAP_REGIONS = ("eyes", "eyebrows", "nose", "mouth")
MASK_REGIONS = (*SWAP_REGIONS, "face")
DEGRADE_OPS = ("jpeg", "resize", "blur", "noise")


class EditError(ValueError):
    """An edit cannot be made from these inputs (e.g. the landmarks give an empty mask)."""


@dataclass(eq=False)
class EditResult:
    rgb: np.ndarray
    mask: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- small helpers


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Round and clip to uint8."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def hull_mask(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 0/1 mask of the convex hull of `points`, filled at sub-pixel precision."""
    mask = np.zeros(shape[:2], dtype=np.uint8)
    hull = cv2.convexHull(np.rint(np.asarray(points, np.float64) * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    return mask


def morph(mask: np.ndarray, radius: float, op: int) -> np.ndarray:
    """Dilate or erode (`cv2.MORPH_DILATE` / `cv2.MORPH_ERODE`) with a disc of `radius` pixels."""
    r = int(round(radius))
    if r < 1:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.morphologyEx(mask, op, kernel)


def feather(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blurred float32 copy of a 0/1 mask, peak 1, weights under 1/512 set to 0.

    A weight under 1/512 moves a uint8 pixel by under half a level, which rounding undoes;
    zeroing them makes the support exactly the set of pixels that may change.
    """
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(float(sigma), 0.5))
    peak = float(soft.max())
    if peak <= 0:
        return np.zeros(mask.shape[:2], np.float32)
    soft /= peak
    soft[soft < 1.0 / 512] = 0.0
    return soft


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB image (cv2 encodes BGR, so the channels are swapped first)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise EditError(f"JPEG encoding failed at quality {quality}")
    return buf.tobytes()


def _jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = np.frombuffer(encode_jpeg(rgb, quality), np.uint8)
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def _check(img: np.ndarray, landmarks: np.ndarray | None, name: str) -> np.ndarray | None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise EditError(f"{name}: expected an RGB uint8 array (H, W, 3), got {desc}")
    if landmarks is None:
        return None
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2) or not np.isfinite(lm).all():
        raise EditError(f"{name}: expected 68 finite (x, y) landmarks, got shape {lm.shape}")
    return lm


# --------------------------------------------------------------------------- masks


def region_mask(landmarks: np.ndarray, region: str, shape: tuple[int, ...]) -> np.ndarray:
    """Hard uint8 0/1 mask of a named facial region from 68 landmarks.

    Feature regions are dilated by a fraction of the eye distance so a swap carries some skin
    around the feature with it, as a real region edit would; "face" is the inner face (brows
    to chin), pulled in from the jaw outline so hair and background stay the target's.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    iod = face_scale(lm)
    if region == "eyes":
        mask = hull_mask(lm[36:42], shape) | hull_mask(lm[42:48], shape)
        return morph(mask, 0.14 * iod, cv2.MORPH_DILATE)
    if region == "eyebrows":
        mask = hull_mask(lm[17:22], shape) | hull_mask(lm[22:27], shape)
        return morph(mask, 0.12 * iod, cv2.MORPH_DILATE)
    if region == "nose":
        return morph(hull_mask(lm[27:36], shape), 0.12 * iod, cv2.MORPH_DILATE)
    if region == "mouth":
        return morph(hull_mask(lm[48:60], shape), 0.12 * iod, cv2.MORPH_DILATE)
    if region == "face":
        return morph(hull_mask(lm, shape), 0.08 * iod, cv2.MORPH_ERODE)
    raise EditError(f"unknown region {region!r}; expected one of {MASK_REGIONS}")


def face_hull_mask(landmarks: np.ndarray, shape: tuple[int, ...], forehead: float = 0.0) -> np.ndarray:
    """uint8 0/1 hull of the 68 points, with the brows lifted by `forehead` x (brows - chin).

    "Up" is the face's own chin-to-brows axis, so a tilted face gets a tilted forehead.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    brows = lm[17:27]
    up = brows.mean(0) - lm[8]
    return hull_mask(np.concatenate([lm, brows + forehead * up]), shape)


def pose_distance(lm_a: np.ndarray, lm_b: np.ndarray) -> float:
    """Residual of the best similarity fit of `lm_a` onto `lm_b`, in units of b's eye distance.

    Small when two faces have the same pose and expression, which is what makes a swap
    between them look plausible; the stage picks donors by it.
    """
    a = np.asarray(lm_a, np.float64)
    b = np.asarray(lm_b, np.float64)
    a0, b0 = a - a.mean(0), b - b.mean(0)
    # Closed-form similarity (complex least squares): b ~ z * a with z = scale * rotation.
    za = a0[:, 0] + 1j * a0[:, 1]
    zb = b0[:, 0] + 1j * b0[:, 1]
    denom = float(np.vdot(za, za).real)
    if denom <= 0:
        return float("inf")
    z = np.vdot(za, zb) / denom
    resid = zb - z * za
    return float(np.sqrt(np.mean(np.abs(resid) ** 2)) / face_scale(b))


# --------------------------------------------------------------------------- warps and cloning


# The inner-lip points (60-67) are left out of the triangulation: an open mouth against a
# closed one collapses those triangles, while the outer lip still carries the mouth's shape.
_TRI_POINTS = np.array([i for i in range(68) if not 60 <= i < 68])


def _signed_area(tri: np.ndarray) -> float:
    (x0, y0), (x1, y1), (x2, y2) = np.asarray(tri, np.float64)
    return 0.5 * ((x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0))


def warp_triangles(
    src: np.ndarray, src_lm: np.ndarray, tgt_lm: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-affine warp of `src` onto the target landmarks' Delaunay triangles.

    Returns (warped, covered): the warped image (zeros where no triangle lands) and a uint8
    0/1 mask of the pixels the triangles cover (the target landmarks' hull, inside the image).
    Each triangle takes the source face's matching triangle, so the source takes the target
    face's outline and expression geometry, which a single similarity transform cannot do.
    """
    from scipy.spatial import Delaunay, QhullError

    h, w = shape[:2]
    s_lm = np.asarray(src_lm, np.float32)
    t_lm = np.asarray(tgt_lm, np.float32)
    warped = np.zeros((h, w, 3), np.uint8)
    covered = np.zeros((h, w), np.uint8)
    try:
        simplices = _TRI_POINTS[Delaunay(t_lm[_TRI_POINTS].astype(np.float64)).simplices]
    except (QhullError, ValueError):
        return warped, covered
    for tri in simplices:
        t = t_lm[tri]
        # A triangle that flips or collapses between the faces (a pose or expression the other
        # face does not share) would smear far-away pixels in; the similarity warp fills it.
        ratio = _signed_area(s_lm[tri]) / (_signed_area(t) or 1e-9)
        if not 0.2 < ratio < 5.0:
            continue
        x0, y0 = np.floor(t.min(0)).astype(int)
        x1, y1 = np.ceil(t.max(0)).astype(int) + 1
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        local = (t - [x0, y0]).astype(np.float32)
        mat = cv2.getAffineTransform(s_lm[tri], local)
        if not np.isfinite(mat).all():
            continue
        patch = cv2.warpAffine(src, mat, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        tri_mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillConvexPoly(tri_mask, np.rint(local * 16).astype(np.int32), 1, lineType=cv2.LINE_8, shift=4)
        inside = tri_mask > 0
        warped[y0:y1, x0:x1][inside] = patch[inside]
        covered[y0:y1, x0:x1] |= tri_mask
    return warped, covered


def seamless_clone(src: np.ndarray, tgt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Poisson (gradient-domain) clone of `src` into `tgt` inside the 0/1 `mask`, in place.

    cv2.seamlessClone needs the mask's box inside the image with a free frame around it and
    places the box by its centre; reflect-padding both images keeps masks that touch the
    border working and the source where it is. OpenCV also alters pixels around the mask, so
    callers blend the result back through a mask (as every edit here does).
    """
    pad = 8
    src_p = cv2.copyMakeBorder(src, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    tgt_p = cv2.copyMakeBorder(tgt, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    mask_p = cv2.copyMakeBorder((mask > 0).astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    if not mask_p.any():
        return tgt.copy()
    x, y, bw, bh = cv2.boundingRect(mask_p)
    centre = (x + bw // 2, y + bh // 2)
    out = cv2.seamlessClone(src_p, tgt_p, mask_p * 255, centre, cv2.NORMAL_CLONE)
    return out[pad:-pad, pad:-pad]


# --------------------------------------------------------------------------- swaps


def _check_donor_inside(src: np.ndarray, points: np.ndarray, what: str) -> None:
    """Refuse a donor whose pasted part runs off its image: the warp would paste mirrored border."""
    h, w = src.shape[:2]
    slack = 0.02 * max(h, w)
    lo, hi = points.min(0), points.max(0)
    if lo[0] < -slack or lo[1] < -slack or hi[0] > w - 1 + slack or hi[1] > h - 1 + slack:
        raise EditError(f"the donor's {what} runs off its image")


def face_swap(
    tgt: np.ndarray,
    tgt_lm: np.ndarray,
    src: np.ndarray,
    src_lm: np.ndarray,
    rng: np.random.Generator,
    feather_sigma: tuple[float, float] = (0.01, 0.025),
) -> EditResult:
    """Put `src`'s inner face onto `tgt`: landmark-aligned warp, colour transfer, seamless clone.

    The source is first aligned by a similarity transform (`blending.align_source`), then the
    inner face is re-warped triangle by triangle onto the target's landmarks. Its colours are
    matched to the target's inside the face (LAB mean and std), it is Poisson-cloned into the
    target, and the clone is blended back through the inner-face mask feathered by a sigma
    drawn from `feather_sigma` (eye-distance units). The feather is at most 3 sigma wide and
    the inner face is the hull eroded by 0.08, so nothing outside the landmark hull changes.
    """
    t_lm = _check(tgt, tgt_lm, "target")
    s_lm = _check(src, src_lm, "source")
    _check_donor_inside(src, s_lm, "face")
    h, w = tgt.shape[:2]
    hard = region_mask(t_lm, "face", (h, w))
    if not hard.any():
        raise EditError("face_swap: the target landmarks give an empty face mask")
    try:
        aligned, moved = align_source(src, s_lm, t_lm, (h, w))
    except ValueError as err:
        raise EditError(str(err)) from None
    tri, covered = warp_triangles(src, s_lm, t_lm, (h, w))
    aligned[covered > 0] = tri[covered > 0]
    aligned = color_transfer(aligned, tgt, hard.astype(np.float32))
    cloned = seamless_clone(aligned, tgt, hard)
    sigma = float(rng.uniform(*feather_sigma)) * face_scale(t_lm)
    # Erode by 3 sigma before feathering, so the soft edge ends at the hard mask's edge.
    core = morph(hard, 3.0 * sigma, cv2.MORPH_ERODE)
    weight = feather(core if core.any() else hard, sigma) * hard
    out = blend(cloned, tgt, weight, 1.0)
    return EditResult(out, weight, {"feather": round(sigma, 3), "triangles_px": int(covered.sum())})


def region_swap(
    tgt: np.ndarray,
    tgt_lm: np.ndarray,
    src: np.ndarray,
    src_lm: np.ndarray,
    region: str,
    rng: np.random.Generator,
    blend_modes: tuple[str, ...] = ("alpha", "poisson"),
    feather_sigma: tuple[float, float] = (0.04, 0.09),
) -> EditResult:
    """Paste one facial `region` of `src` onto `tgt`.

    The whole source face is aligned to the target by a similarity transform fitted to all
    68 points, so the region lands where the target's own feature was; it is colour-matched
    inside the region and blended either through the feathered region mask ("alpha") or by a
    Poisson clone blended back through the same mask ("poisson"), the mode drawn from
    `blend_modes`. The feather sigma is drawn from `feather_sigma` in eye-distance units.
    """
    if region not in SWAP_REGIONS and region != "face":
        raise EditError(f"unknown swap region {region!r}; expected one of {SWAP_REGIONS}")
    t_lm = _check(tgt, tgt_lm, "target")
    s_lm = _check(src, src_lm, "source")
    _check_donor_inside(src, s_lm[list(_REGION_POINTS[region])], region)
    h, w = tgt.shape[:2]
    hard = region_mask(t_lm, region, (h, w))
    if not hard.any():
        raise EditError(f"region_swap: the target landmarks give an empty {region} mask")
    mode = str(blend_modes[int(rng.integers(len(blend_modes)))])
    sigma = float(rng.uniform(*feather_sigma)) * face_scale(t_lm)
    try:
        aligned, _ = align_source(src, s_lm, t_lm, (h, w))
    except ValueError as err:
        raise EditError(str(err)) from None
    soft = feather(hard, sigma)
    matched = color_transfer(aligned, tgt, soft)
    if mode == "poisson":
        matched = seamless_clone(matched, tgt, soft > 0)
    elif mode != "alpha":
        raise EditError(f"unknown blend mode {mode!r}; expected alpha or poisson")
    out = blend(matched, tgt, soft, 1.0)
    return EditResult(out, soft, {"blend": mode, "feather": round(sigma, 3)})


# --------------------------------------------------------------------------- backgrounds


def synthetic_background(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A plausible, face-free backdrop: a smooth colour field, blurred shapes and sensor noise.

    Used when no donor image has enough face-free area (tight face crops) and no background
    folder is configured.
    """
    h, w = shape[:2]
    cells = int(rng.integers(2, 7))
    # Muted colours around one base tone: indoor walls, sky, studio backdrops, not a rainbow.
    base = rng.uniform(30, 220, 3)
    field_ = (base + rng.normal(0.0, 30.0, size=(cells, cells, 3))).astype(np.float32)
    img = cv2.resize(field_, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(int(rng.integers(0, 6))):
        colour = np.clip(base + rng.normal(0.0, 45.0, 3), 0, 255).tolist()
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x0, y0), (x1, y1), colour, -1)
        else:
            cv2.line(img, (x0, y0), (x1, y1), colour, max(1, int(rng.integers(1, max(2, w // 20)))))
    img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(1.0, 0.02 * max(h, w) + 1.0)))
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * float(rng.uniform(0.3, 1.0))
    img += rng.normal(0.0, float(rng.uniform(1.0, 5.0)), size=img.shape).astype(np.float32)
    return to_uint8(img)


def make_background(
    shape: tuple[int, ...],
    rng: np.random.Generator,
    donor: np.ndarray | None = None,
    donor_box: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, str]:
    """A background of `shape` and how it was made ("donor" or "synthetic").

    With a donor image, the largest face-free strip beside its face box (grown by a quarter
    of its size) is cropped at the target's aspect ratio, resized and mirrored at random, so
    the new background is a real scene without a second face. Without a donor, or when no
    strip is at least 16 px on its short side, a synthetic backdrop is drawn instead.
    """
    h, w = shape[:2]
    if donor is not None:
        dh, dw = donor.shape[:2]
        if donor_box is None:
            strips = [(0, 0, dw, dh)]
        else:
            x0, y0, x1, y1 = donor_box
            gx, gy = 0.25 * (x1 - x0), 0.25 * (y1 - y0)
            x0, x1 = int(max(0, x0 - gx)), int(min(dw, x1 + gx))
            y0, y1 = int(max(0, y0 - gy)), int(min(dh, y1 + gy))
            strips = [(0, 0, x0, dh), (x1, 0, dw, dh), (0, 0, dw, y0), (0, y1, dw, dh)]
        strips = [s for s in strips if min(s[2] - s[0], s[3] - s[1]) >= 16]
        if strips:
            sx0, sy0, sx1, sy1 = max(strips, key=lambda s: (s[2] - s[0]) * (s[3] - s[1]))
            sw, sh = sx1 - sx0, sy1 - sy0
            # The largest crop of the target's aspect ratio that fits, shrunk a little at random.
            scale = min(sw / w, sh / h) * float(rng.uniform(0.7, 1.0))
            cw, ch = max(int(w * scale), 1), max(int(h * scale), 1)
            cx = sx0 + int(rng.integers(0, sw - cw + 1))
            cy = sy0 + int(rng.integers(0, sh - ch + 1))
            crop = cv2.resize(donor[cy : cy + ch, cx : cx + cw], (w, h), interpolation=cv2.INTER_LINEAR)
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            return np.ascontiguousarray(crop), "donor"
    return synthetic_background(shape, rng), "synthetic"


def replace_background(
    img: np.ndarray,
    landmarks: np.ndarray,
    background: np.ndarray,
    rng: np.random.Generator,
    forehead: tuple[float, float] = (0.25, 0.5),
    margin: tuple[float, float] = (0.05, 0.25),
    feather_sigma: tuple[float, float] = (0.03, 0.08),
    harmonize_p: float = 0.5,
) -> EditResult:
    """Keep the face (and a margin around it) and put `background` everywhere else.

    The kept region is the landmark hull with a forehead, dilated by `margin` eye distances;
    it is copied bit for bit, so the label of the source holds. The background is blended in
    through a feathered edge that starts at the margin's outer boundary; with probability
    `harmonize_p` its colours are first matched to the image's own surroundings, so the
    lighting of the two parts agrees.
    """
    lm = _check(img, landmarks, "image")
    if background.shape != img.shape or background.dtype != np.uint8:
        raise EditError(f"replace_background: background {background.shape} does not match image {img.shape}")
    h, w = img.shape[:2]
    iod = face_scale(lm)
    lift = float(rng.uniform(*forehead))
    grow = float(rng.uniform(*margin))
    sigma = float(rng.uniform(*feather_sigma)) * iod
    harmonize = bool(rng.random() < harmonize_p)
    keep = morph(face_hull_mask(lm, (h, w), lift), grow * iod, cv2.MORPH_DILATE)
    # Feather outwards from the kept region: inside it the weight of the new background is 0.
    outside = (1 - keep).astype(np.uint8)
    core = morph(outside, 3.0 * sigma, cv2.MORPH_ERODE)
    weight = feather(core, sigma) * outside if core.any() else outside.astype(np.float32)
    if not weight.any():
        raise EditError("replace_background: the face fills the whole image; no background to replace")
    bg = color_transfer(background, img, weight) if harmonize else background
    out = blend(bg, img, weight, 1.0)
    info = {"forehead": round(lift, 3), "margin": round(grow, 3), "feather": round(sigma, 2), "harmonize": harmonize}
    return EditResult(out, weight.astype(np.float32), info)


# --------------------------------------------------------------------------- degradations


def degrade(
    img: np.ndarray,
    rng: np.random.Generator,
    p: float = 0.5,
    jpeg_quality: tuple[int, int] = (30, 95),
    max_jpeg: int = 3,
    resize_scale: tuple[float, float] = (0.35, 0.9),
    blur_sigma: tuple[float, float] = (0.4, 1.6),
    noise_sigma: tuple[float, float] = (1.5, 6.0),
) -> EditResult:
    """A label-keeping degradation chain: each op in DEGRADE_OPS with probability `p`, at least one,
    in random order.

    - jpeg: 1 to `max_jpeg` successive encodings, each at its own quality;
    - resize: down by a factor in `resize_scale` and back, with random interpolations;
    - blur: Gaussian with a sigma in `blur_sigma`, or a 3x3 median;
    - noise: Gaussian, per channel or on the luminance only.

    Reals and fakes get the same chains, so a degraded image says nothing about its label,
    and a detector that keyed on clean compression statistics is taught not to.
    """
    _check(img, None, "image")
    h, w = img.shape[:2]
    chosen = [op for op, fire in zip(DEGRADE_OPS, rng.random(len(DEGRADE_OPS)) < p, strict=True) if fire]
    if not chosen:
        chosen = [DEGRADE_OPS[int(rng.integers(len(DEGRADE_OPS)))]]
    order = [chosen[i] for i in rng.permutation(len(chosen))]
    out = img
    steps: list[str] = []
    interps = (cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC)
    for op in order:
        if op == "jpeg":
            for _ in range(int(rng.integers(1, max_jpeg + 1))):
                q = int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1))
                out = _jpeg_roundtrip(out, q)
                steps.append(f"jpeg{q}")
        elif op == "resize":
            s = float(rng.uniform(*resize_scale))
            down = interps[int(rng.integers(3))]
            up = interps[1 + int(rng.integers(2))]
            small = cv2.resize(out, (max(int(w * s), 8), max(int(h * s), 8)), interpolation=down)
            out = cv2.resize(small, (w, h), interpolation=up)
            steps.append(f"resize{s:.2f}")
        elif op == "blur":
            if rng.random() < 0.75:
                s = float(rng.uniform(*blur_sigma))
                out = cv2.GaussianBlur(out, (0, 0), s)
                steps.append(f"gauss{s:.2f}")
            else:
                out = cv2.medianBlur(out, 3)
                steps.append("median3")
        else:
            s = float(rng.uniform(*noise_sigma))
            if rng.random() < 0.5:
                noise = rng.normal(0.0, s, size=out.shape)
            else:
                noise = np.repeat(rng.normal(0.0, s, size=(h, w, 1)), 3, axis=2)
            out = to_uint8(out.astype(np.float64) + noise)
            steps.append(f"noise{s:.1f}")
    return EditResult(np.ascontiguousarray(out), np.ones((h, w), np.float32), {"ops": "+".join(steps)})
