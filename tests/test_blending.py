"""Property tests of SBI and the SLADD forgery space on real photographs.

Landmarks and face boxes come from dlib on two real portraits: scikit-image's astronaut and
matplotlib's Grace Hopper sample. Both ship with packages the project already installs.
"""

from __future__ import annotations

import importlib.util
from dataclasses import fields, replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from data_prep.blending import (
    BLEND_TYPES,
    LEFT_EYE,
    MASK_VARIANTS,
    RIGHT_EYE,
    SBI_RECIPE_FILE,
    SLADD_REGION_NAMES,
    SLADD_REGIONS,
    ColorJitter,
    SBIConfig,
    align_source,
    blend,
    color_transfer,
    face_crop_window,
    face_scale,
    load_sbi_config,
    precrop_window,
    region_mask,
    sbi_mask,
    sbi_mask_stages,
    sbi_pair,
    sbi_sample,
    sbi_test_crop,
    sladd_forge,
)
from data_prep.faces import flip_landmarks

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
def detector():
    """img -> (68 landmarks, face box (x0, y0, x1, y1), x1 and y1 exclusive) of the best-scoring face."""
    hog = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(_predictor_path()))

    def find(img: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        rects, scores, _ = hog.run(img, 0)
        assert len(rects) > 0, "dlib found no face in a test photograph"
        # The astronaut photo has a second weak detection on the suit's badge.
        rect = rects[int(np.argmax(scores))]
        shape = predictor(img, rect)
        lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        return lm, (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)

    return find


@pytest.fixture(scope="module")
def landmarker(detector):
    return lambda img: detector(img)[0]


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
def astronaut_face(detector):
    """The whole astronaut photograph (512 px), its landmarks and its face box."""
    from skimage.data import astronaut as load

    img = load()
    lm, box = detector(img)
    return img, lm, box


@pytest.fixture(scope="module")
def astronaut(astronaut_face):
    return astronaut_face[:2]


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


# The published recipe, as shipped with the member.
PUBLISHED = load_sbi_config()
# A recipe with the geometric randomness switched off, so mask bounds can be tight.
RIGID = replace(
    PUBLISHED,
    translate_x=0.0,
    translate_y=0.0,
    scale=(1.0, 1.0),
    elastic_std=0.0,
    mask_resize=(380, 380),
    pair_augment=False,
)
NO_COLOR = replace(PUBLISHED.source_color, rgb_p=0.0, hsv_p=0.0, brightness_contrast_p=0.0)
ALL_COLOR = replace(PUBLISHED.pair_color, rgb_p=1.0, hsv_p=1.0, brightness_contrast_p=1.0)
# Nothing random but the flip coin, the margins and the mask: the real image is the untouched
# target, cut and resized, so its pixels tell where the crops were taken.
PLAIN = replace(PUBLISHED, augment_source_p=1.0, flip_p=0.0, pair_augment=False)


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


# --------------------------------------------------------------------------- SBI config


def test_shipped_recipe_holds_the_published_numbers():
    c = PUBLISHED
    assert (c.precrop_side, c.precrop_top, c.precrop_bottom) == (0.5, 1.0, 0.4)
    assert (c.crop_margin, c.crop_margin_scale, c.test_margin_scale, c.output_size) == (0.25, (0.2, 0.8), 0.5, 380)
    assert (c.mask_resize, c.blur_kernel, c.blur2_sigma) == ((192, 256), (5, 25), (5, 45))
    assert (c.downscale_factors, c.downscale_down, c.downscale_up) == ((2, 4), "nearest", "linear")
    assert c.ratios == (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)
    assert (c.jpeg_p, c.jpeg_quality, c.flip_p) == (0.5, (40, 100), 0.5)


def test_every_config_field_is_in_the_yaml_with_a_comment():
    section = yaml.safe_load(SBI_RECIPE_FILE.read_text())["sbi"]
    assert set(section) == {f.name for f in fields(SBIConfig)}
    for name in ("source_color", "pair_color"):
        assert set(section[name]) == {f.name for f in fields(ColorJitter)}
    lines = [ln for ln in SBI_RECIPE_FILE.read_text().splitlines() if ln.startswith("  ") and ":" in ln]
    # A key whose value is a mapping carries its comments on its sub-keys.
    uncommented = [ln for ln in lines if "#" not in ln and not ln.rstrip().endswith(":")]
    assert not uncommented, f"constants without a reason: {uncommented}"


def test_load_sbi_config_names_the_file_and_the_keys(tmp_path):
    section = yaml.safe_load(SBI_RECIPE_FILE.read_text())["sbi"]
    bad = dict(section)
    del bad["jpeg_p"]
    bad["jpeg_prob"] = 0.5
    path = tmp_path / "member.yaml"
    path.write_text(yaml.safe_dump({"sbi": bad}))
    with pytest.raises(ValueError, match=r"member\.yaml.*lacks \['jpeg_p'\].*unknown keys \['jpeg_prob'\]"):
        load_sbi_config(path)
    path.write_text(yaml.safe_dump({"sbi": {**section, "pair_color": {"rgb_shift": 20}}}))
    with pytest.raises(ValueError, match=r"member\.yaml"):
        load_sbi_config(path)
    path.write_text(yaml.safe_dump({"model": {}}))
    with pytest.raises(ValueError, match="no `sbi:` section"):
        load_sbi_config(path)
    with pytest.raises(ValueError, match="blur_kernel"):
        load_sbi_config(blur_kernel=(4, 25))
    with pytest.raises(ValueError, match="mask_variants"):
        load_sbi_config(mask_variants=("ellipse",))
    with pytest.raises(ValueError, match="downscale_down"):
        load_sbi_config(downscale_down="lanczos")


def test_sbi_config_accepts_yaml_lists():
    cfg = replace(PUBLISHED, ratios=[0.5, 1.0], scale=[0.9, 1.1])
    assert cfg.ratios == (0.5, 1.0) and cfg.scale == (0.9, 1.1)
    hash(cfg)


# --------------------------------------------------------------------------- SBI mask


def _stages(lm, shape, seed, **overrides):
    return sbi_mask_stages(lm, shape, np.random.default_rng(seed), replace(PUBLISHED, **overrides))


@pytest.mark.parametrize("k", [5, 15, 25])
def test_erosion_runs_between_the_blurs_at_the_small_size(astronaut_crop, k):
    img, lm = astronaut_crop
    for seed in range(3):
        st = _stages(lm, img.shape, seed, blur_kernel=(k, k))
        h, w = st.hull.shape
        assert 192 <= h <= 256 and 192 <= w <= 256 and st.eroded.shape == st.hull.shape
        # Where the first blur keeps its peak: a k x k square erosion of the hull's full-strength part.
        square = cv2.erode((st.hull >= 1.0).astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
        eroded = st.eroded > 0
        assert (eroded ^ square).sum() <= 0.01 * square.sum()
        assert not (eroded & (st.hull == 0)).any()
        # The mask is that core blurred once more: full strength only inside it, none far from it.
        core = cv2.resize(st.eroded, img.shape[1::-1], interpolation=cv2.INTER_LINEAR) > 0.999
        assert not ((st.mask >= 0.999) & ~_dilate(core, 2)).any()


def test_mask_is_the_same_fraction_of_the_frame_at_any_resolution(astronaut_crop):
    """Resized first, blurred small: the mask of a face at 2x is the mask at 1x, scaled.
    Blurring at full resolution instead would give the 2x face edges half as wide."""
    img, lm = astronaut_crop
    big = cv2.resize(img, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    lm_big = lm * 2 + 0.5  # pixel centres: x in the 1x image sits at 2x + 0.5 in the 2x one
    widths = []
    for seed in range(4):
        small = _stages(lm, img.shape, seed)
        large = _stages(lm_big, big.shape, seed)
        # Same draws, same small-size mask; the frame size changes only the final resize.
        assert small.eroded.shape == large.eroded.shape
        assert (small.eroded != large.eroded).mean() < 0.01
        back = cv2.resize(large.mask, img.shape[1::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(back - small.mask).mean() < 0.005
        soft = lambda m: ((m > 0.1) & (m < 0.9)).sum()  # noqa: E731 - area of the edge band
        widths.append(soft(large.mask) / soft(small.mask))
    # An edge band twice as wide and twice as long: four times the area.
    assert 3.6 < np.median(widths) < 4.4


def test_sbi_mask_variants(astronaut_crop):
    img, lm = astronaut_crop
    brow_chin = np.linalg.norm(lm[17:27].mean(0) - lm[8])
    top_of_brows = lm[17:27, 1].min()
    rigid = dict(translate_x=0.0, translate_y=0.0, scale=(1.0, 1.0), elastic_std=0.0, mask_resize=(380, 380))
    for seed in range(3):
        # Same seed, same kernels: only the variant differs between the masks compared.
        masks = {
            v: sbi_mask(
                lm,
                img.shape,
                np.random.default_rng(seed),
                replace(PUBLISHED, mask_variants=(v,), blur_kernel=(9, 9), **rigid),
            )
            for v in MASK_VARIANTS
        }
        rows = {v: np.flatnonzero(m.any(axis=1)) for v, m in masks.items()}
        # The 68-point hull stops at the brows; the forehead variant climbs well above them.
        assert rows["hull68"][0] >= top_of_brows - 3
        assert rows["forehead"][0] < top_of_brows - 0.1 * brow_chin
        # Components are hulls of subsets of the 68 points: inside the full hull, and smaller.
        assert (masks["components"] <= masks["hull68"] + 1e-4).all()
        assert (masks["components"] > 0.5).sum() < 0.95 * (masks["hull68"] > 0.5).sum()


# --------------------------------------------------------------------------- SBI pair


@pytest.mark.parametrize("which", ["full", "crop"])
def test_sbi_shapes_dtypes_and_mask_range(which, astronaut, astronaut_crop):
    img, lm = astronaut if which == "full" else astronaut_crop
    for seed in range(6):
        real, fake, mask = sbi_pair(img, lm, np.random.default_rng(seed), PUBLISHED)
        assert real.dtype == np.uint8 and fake.dtype == np.uint8
        assert real.shape == img.shape and fake.shape == img.shape
        assert mask.dtype == np.float32 and mask.shape == img.shape[:2]
        assert mask.min() >= 0.0 and mask.max() <= 1.0
        # The mask peaks at 1 before the ratio, so its maximum is the drawn ratio.
        assert min(abs(mask.max() - r) for r in PUBLISHED.ratios) < 1e-5


def test_sbi_differences_lie_inside_mask(astronaut_crop):
    img, lm = astronaut_crop
    cfg = replace(PUBLISHED, pair_augment=False)
    h, w = img.shape[:2]
    # Bound on how far the mask can reach past the 68-point hull lifted over the forehead:
    # the source warp (translation, scale about the face centre), elastic wiggle (4 std), the
    # second blur's half-kernel at the small size seen in the frame, and resize rounding.
    brows = lm[17:27]
    lifted = np.concatenate([lm, brows + cfg.forehead_extend[1] * (brows.mean(0) - lm[8])])
    reach = np.abs(lifted - (lm.min(0) + lm.max(0)) / 2).max()
    margin = (
        cfg.translate_x * w
        + (cfg.scale[1] - 1) * reach
        + 4 * cfg.elastic_std * np.ptp(lm, axis=0).max()
        + (cfg.blur_kernel[1] // 2 + 1) * max(h, w) / cfg.mask_resize[0]
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
    cfg = replace(RIGID, mask_variants=("hull68",), blur_kernel=(9, 9))
    hull = _hull(img.shape, lm)
    for seed in range(4):
        real, fake, mask = sbi_pair(img, lm, np.random.default_rng(seed), cfg)
        # Equal kernels: the erosion takes back what the second blur spreads.
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


def test_downscale_is_nearest_down_then_linear_up(astronaut_crop):
    """Columns alternating black and white: nearest-neighbour keeps one of the two and the
    copy turns flat black or white; an averaging downscale would turn it grey."""
    _, lm = astronaut_crop
    stripes = np.zeros((380, 380, 3), np.uint8)
    stripes[:, 1::2] = 255
    cfg = replace(
        RIGID, augment_source_p=0.0, source_color=NO_COLOR, downscale_p=1.0, downscale_factors=(2,), ratios=(1.0,)
    )
    real, _, _ = sbi_pair(stripes, lm, np.random.default_rng(0), cfg)  # the real is the augmented target
    assert real.min() == real.max() and real.max() in (0, 255)
    grey = replace(cfg, downscale_down="area")
    real, _, _ = sbi_pair(stripes, lm, np.random.default_rng(0), grey)
    assert np.abs(real.astype(int) - 128).max() <= 1


@pytest.mark.parametrize("ratios", [(0.0,), (0.5, 0.0, 1.0)])
def test_a_blend_ratio_of_zero_is_refused(ratios):
    """Its fake would be its real bit for bit, labelled fake."""
    with pytest.raises(ValueError, match="ratios"):
        replace(PUBLISHED, ratios=ratios)


def test_sbi_shared_augmentation_adds_no_difference_outside_mask(astronaut_crop):
    img, lm = astronaut_crop
    no_pair_color = replace(ALL_COLOR, rgb_p=0.0, hsv_p=0.0, brightness_contrast_p=0.0)
    for seed in range(4):
        rng = np.random.default_rng
        _, fake0, _ = sbi_pair(img, lm, rng(seed), replace(PUBLISHED, pair_augment=False))
        # Colour jitter alone works pixel by pixel: outside the mask real and fake stay equal.
        real, fake, mask = sbi_pair(img, lm, rng(seed), replace(PUBLISHED, pair_color=ALL_COLOR, jpeg_p=0.0))
        assert not (_changed(real, fake) & (mask == 0)).any()
        assert not np.array_equal(fake, fake0), "the jitter never fired"
        # JPEG codes 16x16 blocks independently; chroma upsampling reaches 2 px further.
        real, fake, mask = sbi_pair(img, lm, rng(seed), replace(PUBLISHED, pair_color=no_pair_color, jpeg_p=1.0))
        assert not (_changed(real, fake) & ~_dilate(mask > 0, 34)).any()


def test_sbi_switch_does_not_shift_random_stream(astronaut_crop):
    img, lm = astronaut_crop
    no_pair_color = replace(ALL_COLOR, rgb_p=0.0, hsv_p=0.0, brightness_contrast_p=0.0)
    a = sbi_pair(img, lm, np.random.default_rng(5), replace(PUBLISHED, pair_augment=False))
    b = sbi_pair(img, lm, np.random.default_rng(5), replace(PUBLISHED, pair_color=no_pair_color, jpeg_p=0.0))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_sbi_seed_reproduces_and_differs(astronaut_crop):
    img, lm = astronaut_crop
    a = sbi_pair(img, lm, np.random.default_rng(11), PUBLISHED)
    b = sbi_pair(img, lm, np.random.default_rng(11), PUBLISHED)
    c = sbi_pair(img, lm, np.random.default_rng(12), PUBLISHED)
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


def test_sbi_rejects_bad_input(astronaut_crop):
    img, lm = astronaut_crop
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="68"):
        sbi_pair(img, lm[:67], rng, PUBLISHED)
    bad = lm.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sbi_pair(img, bad, rng, PUBLISHED)
    with pytest.raises(ValueError, match="uint8"):
        sbi_pair(img.astype(np.float32), lm, rng, PUBLISHED)
    with pytest.raises(ValueError, match="empty mask"):
        sbi_pair(img, lm + [2000.0, 0.0], rng, PUBLISHED)


# --------------------------------------------------------------------------- SBI crops and the training sample


def _coordinates(h: int, w: int) -> np.ndarray:
    """An image whose red channel is x // 2 and green channel y // 2: crops can be located."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs // 2, ys // 2, np.full_like(xs, 128)], axis=-1).astype(np.uint8)


def test_precrop_is_the_widened_landmark_box(astronaut_face):
    img, lm, _ = astronaut_face
    (x0, y0), (x1, y1) = lm.min(0), lm.max(0)
    w, h = x1 - x0, y1 - y0
    wx0, wy0, wx1, wy1 = precrop_window(lm, img.shape, PUBLISHED)
    expected = (x0 - w / 2, y0 - h, x1 + w / 2, y1 + 0.4 * h)
    got = (wx0, wy0, wx1, wy1)
    limits = (0, 0, img.shape[1], img.shape[0])
    for g, e, lim, side in zip(got, expected, limits, ("left", "top", "right", "bottom"), strict=True):
        clipped = max(e, lim) if side in ("left", "top") else min(e, lim)
        assert abs(g - clipped) <= 1, side


def test_test_crop_takes_half_margins(astronaut_face):
    img, _, box = astronaut_face
    coords = _coordinates(*img.shape[:2])
    x0, y0, x1, y1 = box
    mw, mh = (x1 - x0) / 8, (y1 - y0) / 8  # w/4 and h/4, halved at test time
    window = (int(np.floor(x0 - mw)), int(np.floor(y0 - mh)), int(np.ceil(x1 + mw)), int(np.ceil(y1 + mh)))
    assert face_crop_window(box, img.shape, np.full(4, 0.5), PUBLISHED) == window
    out = sbi_test_crop(coords, box, PUBLISHED)
    wx0, wy0, wx1, wy1 = window
    assert out.shape == (380, 380, 3)
    assert np.array_equal(out, cv2.resize(coords[wy0:wy1, wx0:wx1], (380, 380), interpolation=cv2.INTER_LINEAR))


def test_training_crop_margins_are_drawn_per_side(astronaut_face):
    img, lm, box = astronaut_face
    coords = _coordinates(*img.shape[:2])
    x0, y0, x1, y1 = box
    mw, mh = (x1 - x0) / 4, (y1 - y0) / 4
    seen = []
    for seed in range(20):
        real, fake, mask = sbi_sample(coords, lm, box, np.random.default_rng(seed), PLAIN)
        assert real.shape == fake.shape == (380, 380, 3) and mask.shape == (380, 380)
        # Outer rows and columns decode to the crop's edges (2 px a level, plus bilinear rounding).
        left, right = 2 * real[:, 0, 0].mean(), 2 * real[:, -1, 0].mean()
        top, bottom = 2 * real[0, :, 1].mean(), 2 * real[-1, :, 1].mean()
        margins = np.array([(x0 - left) / mw, (y0 - top) / mh, (right - x1) / mw, (bottom - y1) / mh])
        tol = 3.0 / min(mw, mh)
        assert (margins > 0.2 - tol).all() and (margins < 0.8 + tol).all(), margins
        seen.append(margins)
    seen = np.array(seen)
    assert (np.ptp(seen, axis=0) > 0.3).all(), "every side draws its own margin"
    assert np.abs(np.corrcoef(seen.T)[0, 2]) < 0.9  # left and right are not one draw


def test_training_crop_at_mid_margins_is_the_test_crop(astronaut_face):
    img, lm, box = astronaut_face
    cfg = replace(PLAIN, crop_margin_scale=(0.5, 0.5))
    real, _, _ = sbi_sample(img, lm, box, np.random.default_rng(0), cfg)
    assert np.array_equal(real, sbi_test_crop(img, box, cfg))


def test_flip_mirrors_image_landmarks_and_box(astronaut_face):
    img, lm, box = astronaut_face
    w = img.shape[1]
    mirrored = np.ascontiguousarray(img[:, ::-1])
    mirrored_box = (w - box[2], box[1], w - box[0], box[3])
    for seed in range(3):
        flipped = sbi_sample(img, lm, box, np.random.default_rng(seed), replace(PUBLISHED, flip_p=1.0))
        by_hand = sbi_sample(
            mirrored, flip_landmarks(lm, w), mirrored_box, np.random.default_rng(seed), replace(PUBLISHED, flip_p=0.0)
        )
        for a, b in zip(flipped, by_hand, strict=True):
            assert np.array_equal(a, b)


def test_sample_fake_equals_real_outside_its_mask(astronaut_face):
    img, lm, box = astronaut_face
    cfg = replace(PUBLISHED, pair_augment=False)
    for seed in range(4):
        real, fake, mask = sbi_sample(img, lm, box, np.random.default_rng(seed), cfg)
        assert real.dtype == fake.dtype == np.uint8 and mask.dtype == np.float32
        assert _changed(real, fake).any()
        assert not (_changed(real, fake) & (mask == 0)).any()
        assert 0.05 < (mask > 0).mean() < 0.95


def test_sample_rejects_a_box_off_the_image(astronaut_face):
    img, lm, _ = astronaut_face
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="outside"):
        sbi_sample(img, lm, (600, 10, 700, 90), rng, PUBLISHED)
    with pytest.raises(ValueError, match="x1 > x0"):
        sbi_test_crop(img, (50, 10, 40, 90), PUBLISHED)


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
