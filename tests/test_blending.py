"""Property tests of SBI and the SLADD forgery space on real photographs.

Landmarks come from dlib on two real portraits: scikit-image's astronaut and matplotlib's
Grace Hopper sample. Both ship with packages the project already installs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_prep.blending import (
    BLEND_TYPES,
    LEFT_EYE,
    MASK_VARIANTS,
    RIGHT_EYE,
    SLADD_REGION_NAMES,
    SLADD_REGIONS,
    SBIConfig,
    align_source,
    blend,
    color_transfer,
    face_scale,
    region_mask,
    sbi_mask,
    sbi_pair,
    sladd_forge,
)

dlib = pytest.importorskip("dlib")


def _predictor_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs pkg_resources.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("face_recognition_models is not installed")
    path = Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def landmarker():
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(_predictor_path()))

    def find(img: np.ndarray) -> np.ndarray:
        rects, scores, _ = detector.run(img, 0)
        assert len(rects) > 0, "dlib found no face in a test photograph"
        # The astronaut photo has a second weak detection on the suit's badge.
        shape = predictor(img, rects[int(np.argmax(scores))])
        return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)

    return find


def _face_crop(img: np.ndarray, lm: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square crop around the face resized to `size`, as a training Dataset would feed it."""
    centre = (lm.min(0) + lm.max(0)) / 2
    side = 1.6 * np.ptp(lm, axis=0).max()
    x0, y0 = np.maximum(np.floor(centre - side / 2), 0).astype(int)
    side_i = int(min(side, img.shape[0] - y0, img.shape[1] - x0))
    crop = img[y0 : y0 + side_i, x0 : x0 + side_i]
    scale = size / side_i
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA), (lm - [x0, y0]) * scale


@pytest.fixture(scope="module")
def astronaut(landmarker):
    from skimage.data import astronaut as load

    img = load()
    lm = landmarker(img)
    return img, lm


@pytest.fixture(scope="module")
def astronaut_crop(astronaut):
    return _face_crop(*astronaut, 380)


@pytest.fixture(scope="module")
def hopper(landmarker):
    from matplotlib.cbook import get_sample_data

    path = get_sample_data("grace_hopper.jpg", asfileobj=False)
    img = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (256, 300), interpolation=cv2.INTER_AREA)
    return img, landmarker(img)


def _hull(shape: tuple[int, ...], pts: np.ndarray) -> np.ndarray:
    out = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(out, cv2.convexHull(np.rint(pts).astype(np.int32)), 1)
    return out.astype(bool)


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    r = max(1, int(np.ceil(radius)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=-1)


# A recipe with the geometric randomness switched off, so mask bounds can be tight.
RIGID = SBIConfig(
    translate_x=0.0, translate_y=0.0, scale=(1.0, 1.0), elastic_std=0.0, mask_resize=(380, 380), pair_augment=False
)


# --------------------------------------------------------------------------- blend


def test_blend_limits_are_exact():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    tgt = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = rng.random((40, 50)).astype(np.float32)
    assert np.array_equal(blend(src, tgt, mask, 0.0), tgt)
    assert np.array_equal(blend(src, tgt, np.zeros_like(mask), 1.0), tgt)
    assert np.array_equal(blend(src, tgt, np.ones((40, 50, 1), np.float32), 1.0), src)


def test_blend_follows_formula():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    tgt = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = rng.random((32, 32)).astype(np.float32)
    mask[:8] = 0.0  # rows the bounding-box shortcut must leave alone
    r = 0.75
    m = (r * mask)[..., None]
    expected = m * src.astype(np.float64) + (1 - m) * tgt.astype(np.float64)
    out = blend(src, tgt, mask, r)
    assert out.dtype == np.uint8 and out.shape == tgt.shape
    assert np.abs(out.astype(np.float64) - expected).max() <= 0.5 + 1e-4
    assert np.array_equal(out[:8], tgt[:8])


def test_blend_rejects_bad_arguments():
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="ratio"):
        blend(img, img, np.ones((8, 8), np.float32), 1.5)
    with pytest.raises(ValueError, match="mask"):
        blend(img, img, np.ones((8, 9), np.float32), 0.5)
    with pytest.raises(ValueError, match="shape"):
        blend(img, np.zeros((8, 8, 3), np.uint8)[:4], np.ones((8, 8), np.float32), 0.5)


# --------------------------------------------------------------------------- SBI


@pytest.mark.parametrize("which", ["full", "crop"])
def test_sbi_shapes_dtypes_and_mask_range(which, astronaut, astronaut_crop):
    img, lm = astronaut if which == "full" else astronaut_crop
    cfg = SBIConfig()
    for seed in range(6):
        real, fake, mask = sbi_pair(img, lm, np.random.default_rng(seed))
        assert real.dtype == np.uint8 and fake.dtype == np.uint8
        assert real.shape == img.shape and fake.shape == img.shape
        assert mask.dtype == np.float32 and mask.shape == img.shape[:2]
        assert mask.min() >= 0.0 and mask.max() <= 1.0
        # The mask peaks at 1 before the ratio, so its maximum is the drawn ratio.
        assert min(abs(mask.max() - r) for r in cfg.ratios) < 1e-5


def test_sbi_differences_lie_inside_mask(astronaut_crop):
    img, lm = astronaut_crop
    cfg = SBIConfig(pair_augment=False)
    h, w = img.shape[:2]
    # Bound on how far the mask can reach past the 68-point hull lifted over the forehead:
    # the source warp (translation, scale about the face centre), elastic wiggle (4 std), the
    # second blur's half-kernel and resize rounding.
    brows = lm[17:27]
    lifted = np.concatenate([lm, brows + cfg.forehead_extend[1] * (brows.mean(0) - lm[8])])
    reach = np.abs(lifted - (lm.min(0) + lm.max(0)) / 2).max()
    margin = (
        cfg.translate_x * w
        + (cfg.scale[1] - 1) * reach
        + 4 * cfg.elastic_std * np.ptp(lm, axis=0).max()
        + cfg.blur_kernel[1] // 2
        + 3
    )
    allowed = _dilate(_hull(img.shape, lifted), margin)
    assert allowed.mean() < 0.9  # the bound itself must leave room to fail
    for seed in range(8):
        real, fake, mask = sbi_pair(img, lm, np.random.default_rng(seed), cfg)
        diff = _changed(real, fake)
        assert diff.any(), f"seed {seed}: fake equals real"
        assert not (diff & (mask == 0)).any(), f"seed {seed}: pixels changed outside the mask"
        assert not ((mask > 0) & ~allowed).any(), f"seed {seed}: mask reaches past the face"


def test_sbi_rigid_mask_hugs_the_hull(astronaut_crop):
    img, lm = astronaut_crop
    cfg = SBIConfig(
        mask_variants=("hull68",),
        translate_x=0.0,
        translate_y=0.0,
        scale=(1.0, 1.0),
        elastic_std=0.0,
        mask_resize=(380, 380),
        blur_kernel=(9, 9),
        pair_augment=False,
    )
    hull = _hull(img.shape, lm)
    for seed in range(4):
        real, fake, mask = sbi_pair(img, lm, np.random.default_rng(seed), cfg)
        # Equal kernels: the erosion takes back exactly what the second blur spreads.
        assert not ((mask > 0) & ~_dilate(hull, 2)).any()
        # The erosion pulls the full-strength core inside the hull, but not far.
        core = mask >= mask.max() - 1e-6
        assert core.sum() > 0.3 * hull.sum()


def test_sbi_fake_is_the_blend_of_source_and_target(astronaut_crop):
    img, lm = astronaut_crop
    checked = 0
    for seed in range(12):
        real, fake, mask = sbi_pair(img, lm, np.random.default_rng(seed), RIGID)
        if np.array_equal(real, img):
            continue  # the source was the augmented copy, unknown from outside
        # Target augmented, source = the untouched photo (the rigid warp is the identity).
        ratio = float(mask.max())
        expected = blend(img, real, mask / ratio, ratio)
        assert np.abs(expected.astype(int) - fake.astype(int)).max() <= 1
        soft = (mask > 0) & (mask < ratio - 1e-3)
        assert soft.sum() > 100, "the mask has no soft edge"
        checked += 1
    assert checked >= 2


def test_sbi_ratio_zero_returns_target(astronaut_crop):
    img, lm = astronaut_crop
    for pair_augment in (False, True):
        cfg = SBIConfig(ratios=(0.0,), pair_augment=pair_augment, jpeg_p=1.0, pair_color_p=1.0)
        real, fake, mask = sbi_pair(img, lm, np.random.default_rng(3), cfg)
        # With the augmentation on this also shows it is one draw applied to both images.
        assert np.array_equal(real, fake)
        assert not mask.any()


def test_sbi_shared_augmentation_adds_no_difference_outside_mask(astronaut_crop):
    img, lm = astronaut_crop
    for seed in range(4):
        _, fake0, _ = sbi_pair(img, lm, np.random.default_rng(seed), SBIConfig(pair_augment=False))
        # Colour jitter alone works pixel by pixel: outside the mask real and fake stay equal.
        real, fake, mask = sbi_pair(img, lm, np.random.default_rng(seed), SBIConfig(pair_color_p=1.0, jpeg_p=0.0))
        assert not (_changed(real, fake) & (mask == 0)).any()
        assert not np.array_equal(fake, fake0), "the jitter never fired"
        # JPEG codes 16x16 blocks independently; chroma upsampling reaches 2 px further.
        real, fake, mask = sbi_pair(img, lm, np.random.default_rng(seed), SBIConfig(pair_color_p=0.0, jpeg_p=1.0))
        assert not (_changed(real, fake) & ~_dilate(mask > 0, 34)).any()


def test_sbi_switch_does_not_shift_random_stream(astronaut_crop):
    img, lm = astronaut_crop
    a = sbi_pair(img, lm, np.random.default_rng(5), SBIConfig(pair_augment=False))
    b = sbi_pair(img, lm, np.random.default_rng(5), SBIConfig(pair_color_p=0.0, jpeg_p=0.0))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_sbi_seed_reproduces_and_differs(astronaut_crop):
    img, lm = astronaut_crop
    a = sbi_pair(img, lm, np.random.default_rng(11))
    b = sbi_pair(img, lm, np.random.default_rng(11))
    c = sbi_pair(img, lm, np.random.default_rng(12))
    for x, y in zip(a, b, strict=True):
        assert x.tobytes() == y.tobytes()
    assert a[1].tobytes() != c[1].tobytes()


def test_sbi_does_not_modify_input(astronaut_crop):
    img, lm = astronaut_crop
    before = img.copy()
    real, fake, _ = sbi_pair(img, lm, np.random.default_rng(0), RIGID)
    assert np.array_equal(img, before)
    real[:] = 0  # the returned arrays must not alias the input
    assert np.array_equal(img, before)


def test_sbi_mask_variants(astronaut_crop):
    img, lm = astronaut_crop
    brow_chin = np.linalg.norm(lm[17:27].mean(0) - lm[8])
    top_of_brows = lm[17:27, 1].min()
    for seed in range(3):
        masks = {
            v: sbi_mask(lm, img.shape, np.random.default_rng(seed), SBIConfig(mask_variants=(v,), **_rigid_kwargs()))
            for v in MASK_VARIANTS
        }
        rows = {v: np.flatnonzero(m.any(axis=1)) for v, m in masks.items()}
        # The 68-point hull stops at the brows; the forehead variant climbs well above them.
        assert rows["hull68"][0] >= top_of_brows - 3
        assert rows["forehead"][0] < top_of_brows - 0.1 * brow_chin
        # Components are hulls of subsets of the 68 points: inside the full hull, and smaller.
        assert (masks["components"] <= masks["hull68"] + 1e-4).all()
        assert (masks["components"] > 0.5).sum() < 0.95 * (masks["hull68"] > 0.5).sum()


def _rigid_kwargs() -> dict:
    # Same seed, same kernels: only the variant differs between the masks compared.
    return dict(
        translate_x=0.0, translate_y=0.0, scale=(1.0, 1.0), elastic_std=0.0, mask_resize=(380, 380), blur_kernel=(9, 9)
    )


def test_sbi_rejects_bad_input(astronaut_crop):
    img, lm = astronaut_crop
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="68"):
        sbi_pair(img, lm[:67], rng)
    bad = lm.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sbi_pair(img, bad, rng)
    with pytest.raises(ValueError, match="uint8"):
        sbi_pair(img.astype(np.float32), lm, rng)
    with pytest.raises(ValueError, match="empty mask"):
        sbi_pair(img, lm + [2000.0, 0.0], rng)
    with pytest.raises(ValueError, match="blur_kernel"):
        SBIConfig(blur_kernel=(4, 25))
    with pytest.raises(ValueError, match="mask_variants"):
        SBIConfig(mask_variants=("ellipse",))


def test_sbi_config_accepts_yaml_lists():
    cfg = SBIConfig(ratios=[0.5, 1.0], scale=[0.9, 1.1])
    assert cfg.ratios == (0.5, 1.0) and cfg.scale == (0.9, 1.1)
    hash(cfg)


# --------------------------------------------------------------------------- SLADD


def test_sladd_tables():
    assert len(SLADD_REGIONS) == len(SLADD_REGION_NAMES) == 10
    assert BLEND_TYPES == ("alpha", "poisson", "copy", "none")
    for groups in SLADD_REGIONS:
        for g in groups:
            assert all(0 <= i < 68 for i in g)


def test_every_region_mask_is_nonempty_and_on_the_face(hopper):
    img, lm = hopper
    unit = face_scale(lm)
    face = _dilate(_hull(img.shape, lm), 0.2 * unit)
    for idx, groups in enumerate(SLADD_REGIONS):
        mask = region_mask(lm, idx, img.shape, np.random.default_rng(idx))
        name = SLADD_REGION_NAMES[idx]
        assert mask.dtype == np.float32 and mask.shape == img.shape[:2]
        assert mask.max() == pytest.approx(1.0) and mask.min() >= 0.0
        assert (mask > 0.5).sum() > 50, name
        assert not ((mask > 0) & ~face).any(), f"{name} leaves the face"
        # Each component is covered, and nothing lies far from the components.
        own = np.zeros(img.shape[:2], bool)
        for g in groups:
            cx, cy = np.rint(lm[list(g)].mean(0)).astype(int)
            assert mask[cy, cx] > 0.5, f"{name}: component around ({cx}, {cy}) not covered"
            own |= _hull(img.shape, lm[list(g)])
        assert not ((mask > 0) & ~_dilate(own, (0.15 + 4 * 0.03 + 3 * 0.05) * unit + 2)).any(), name


def test_region_masks_pick_the_right_side(hopper):
    img, lm = hopper
    rng = np.random.default_rng(0)
    left = region_mask(lm, SLADD_REGION_NAMES.index("left_eye"), img.shape, rng, warp=False)
    right = region_mask(lm, SLADD_REGION_NAMES.index("right_eye"), img.shape, rng, warp=False)
    both = region_mask(lm, SLADD_REGION_NAMES.index("eyes"), img.shape, rng, warp=False)
    xs = np.arange(img.shape[1])
    # dlib's left eye (42-47) is the subject's, on the right of the photograph.
    assert (left.sum(0) * xs).sum() / left.sum() > (right.sum(0) * xs).sum() / right.sum()
    assert lm[list(LEFT_EYE), 0].mean() > lm[list(RIGHT_EYE), 0].mean()
    assert not ((left > 0.5) & (right > 0.5)).any()
    assert np.allclose(np.maximum(left, right), both, atol=1e-5)


def test_region_mask_randomness(hopper):
    img, lm = hopper
    a = region_mask(lm, 9, img.shape, np.random.default_rng(1))
    b = region_mask(lm, 9, img.shape, np.random.default_rng(1))
    c = region_mask(lm, 9, img.shape, np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    d = region_mask(lm, 9, img.shape, np.random.default_rng(1), warp=False)
    e = region_mask(lm, 9, img.shape, np.random.default_rng(2), warp=False)
    assert np.array_equal(d, e)
    with pytest.raises(ValueError, match="region_index"):
        region_mask(lm, 10, img.shape, np.random.default_rng(0))


def test_align_source_recovers_a_similarity(hopper):
    img, lm = hopper
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 12.0, 0.8)
    m[:, 2] += (10.0, -6.0)
    src = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    src_lm = lm @ m[:, :2].T + m[:, 2]
    aligned, moved = align_source(src, src_lm, lm, img.shape)
    assert aligned.shape == img.shape and aligned.dtype == np.uint8
    assert np.abs(moved - lm).max() < 0.05
    face = _hull(img.shape, lm)
    err = np.abs(aligned.astype(int) - img.astype(int))[face].mean()
    assert err < 8.0
    # Against an unaligned source the same comparison is far worse.
    assert np.abs(src.astype(int) - img.astype(int))[face].mean() > 3 * err


def test_color_transfer_matches_lab_statistics(hopper, astronaut_crop):
    tgt, lm = hopper
    src = cv2.resize(astronaut_crop[0], (tgt.shape[1], tgt.shape[0]))
    mask = region_mask(lm, 9, tgt.shape, np.random.default_rng(0), warp=False)

    def stats(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lab = cv2.cvtColor(img.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)[mask > 0.5]
        return lab.mean(0), lab.std(0)

    out = color_transfer(src, tgt, mask)
    (mu_t, sd_t), (mu_s, _), (mu_o, sd_o) = stats(tgt), stats(src), stats(out)
    assert np.abs(mu_t - mu_s).max() > 5  # the images really differ in colour
    assert np.abs(mu_o - mu_t).max() < 2.0
    assert np.abs(sd_o - sd_t).max() < 2.0
    assert np.array_equal(color_transfer(src, tgt, np.zeros(mask.shape, np.float32)), src)


@pytest.fixture(scope="module")
def forge_pair(hopper, astronaut):
    tgt, tgt_lm = hopper
    src, src_lm = astronaut
    return tgt, tgt_lm, src, src_lm


def test_blend_type_none_returns_target(forge_pair):
    tgt, tgt_lm, src, src_lm = forge_pair
    fake, mask = sladd_forge(tgt, tgt_lm, src, src_lm, 4, "none", 1.0, np.random.default_rng(0))
    assert np.array_equal(fake, tgt) and fake is not tgt
    assert mask.shape == tgt.shape[:2] and not mask.any()


@pytest.mark.parametrize("blend_type", ["alpha", "poisson", "copy"])
def test_forgeries_change_only_near_mask(blend_type, forge_pair):
    tgt, tgt_lm, src, src_lm = forge_pair
    for region in (0, 4, 9):
        fake, mask = sladd_forge(tgt, tgt_lm, src, src_lm, region, blend_type, 0.9, np.random.default_rng(region))
        assert fake.dtype == np.uint8 and fake.shape == tgt.shape
        assert mask.dtype == np.float32 and mask.max() == pytest.approx(0.9)
        diff = _changed(fake, tgt)
        assert diff.sum() > 0.3 * (mask > 0.45).sum(), f"{blend_type} {region}: too little changed"
        assert not (diff & (mask == 0)).any(), f"{blend_type} {region}: changed outside its mask"


@pytest.mark.parametrize("blend_type", ["alpha", "poisson", "copy"])
def test_forge_mag_zero_returns_target(blend_type, forge_pair):
    tgt, tgt_lm, src, src_lm = forge_pair
    fake, mask = sladd_forge(tgt, tgt_lm, src, src_lm, 8, blend_type, 0.0, np.random.default_rng(0))
    assert np.array_equal(fake, tgt) and not mask.any()


def test_poisson_with_mask_on_the_border(forge_pair):
    tgt, tgt_lm, src, src_lm = forge_pair
    # Cut the target just below the nose tip, so the mouth/nose mask runs off the bottom edge.
    bottom = int(tgt_lm[33, 1]) + 4
    cut = np.ascontiguousarray(tgt[:bottom])
    fake, mask = sladd_forge(cut, tgt_lm, src, src_lm, 8, "poisson", 1.0, np.random.default_rng(0))
    assert mask[-1].any(), "the test must put the mask on the border"
    assert fake.shape == cut.shape
    diff = _changed(fake, cut)
    assert diff[-1].any() and not (diff & (mask == 0)).any()


def test_sladd_rejects_bad_arguments(forge_pair):
    tgt, tgt_lm, src, src_lm = forge_pair
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="blend_type"):
        sladd_forge(tgt, tgt_lm, src, src_lm, 0, "laplacian", 0.5, rng)
    with pytest.raises(ValueError, match="mag"):
        sladd_forge(tgt, tgt_lm, src, src_lm, 0, "alpha", 1.5, rng)
    with pytest.raises(ValueError, match="empty"):
        sladd_forge(tgt, tgt_lm - [0.0, 5000.0], src, src_lm, 0, "copy", 0.5, rng)


def test_sladd_seed_reproduces_and_differs(forge_pair):
    tgt, tgt_lm, src, src_lm = forge_pair
    a = sladd_forge(tgt, tgt_lm, src, src_lm, 7, "poisson", 0.6, np.random.default_rng(4))
    b = sladd_forge(tgt, tgt_lm, src, src_lm, 7, "poisson", 0.6, np.random.default_rng(4))
    c = sladd_forge(tgt, tgt_lm, src, src_lm, 7, "poisson", 0.6, np.random.default_rng(5))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()
