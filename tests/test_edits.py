"""Image edits on the bundled photographs: what changes, where, and reproducibly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_prep import demo, edits
from data_prep.blending import face_scale


@pytest.fixture(scope="module")
def photos() -> tuple[demo.Photo, ...]:
    return demo.load_photos()


@pytest.fixture(scope="module")
def views(photos: tuple[demo.Photo, ...]) -> tuple[demo.View, demo.View]:
    rng = np.random.default_rng(3)
    return demo.augment_view(photos[0], 192, rng), demo.augment_view(photos[1], 192, rng)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=2)


def _near_hull(landmarks: np.ndarray, shape: tuple[int, ...], grow: float) -> np.ndarray:
    hull = edits.hull_mask(landmarks, shape)
    return edits.morph(hull, grow * face_scale(landmarks) + 1, cv2.MORPH_DILATE) > 0


@pytest.mark.parametrize("direction", [0, 1])
def test_face_swap_on_full_photographs_stays_inside_the_face_hull(photos: tuple, direction: int) -> None:
    tgt, src = (photos[0], photos[1]) if direction == 0 else (photos[1], photos[0])
    res = edits.face_swap(tgt.rgb, tgt.landmarks, src.rgb, src.landmarks, np.random.default_rng(0))
    assert res.rgb.shape == tgt.rgb.shape and res.rgb.dtype == np.uint8
    changed = _changed(res.rgb, tgt.rgb)
    # Not a pixel outside the landmark hull grown by 5% of the eye distance.
    assert not (changed & ~_near_hull(tgt.landmarks, tgt.rgb.shape, 0.05)).any()
    # And the face really is another person's: the inner face changed a lot.
    inner = edits.region_mask(tgt.landmarks, "face", tgt.rgb.shape) > 0
    assert changed[inner].mean() > 0.9
    assert np.abs(res.rgb[inner].astype(int) - tgt.rgb[inner].astype(int)).mean() > 8
    # The reported mask is exactly where pixels may change.
    np.testing.assert_array_equal(res.rgb[res.mask == 0], tgt.rgb[res.mask == 0])


def test_face_swap_is_reproducible(views: tuple) -> None:
    a, b = views
    r1 = edits.face_swap(a.rgb, a.landmarks, b.rgb, b.landmarks, np.random.default_rng(5))
    r2 = edits.face_swap(a.rgb, a.landmarks, b.rgb, b.landmarks, np.random.default_rng(5))
    np.testing.assert_array_equal(r1.rgb, r2.rgb)
    assert r1.info == r2.info


@pytest.mark.parametrize("region", edits.SWAP_REGIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_region_swap_changes_only_its_region(views: tuple, region: str, seed: int) -> None:
    a, b = views
    res = edits.region_swap(a.rgb, a.landmarks, b.rgb, b.landmarks, region, np.random.default_rng(seed))
    changed = _changed(res.rgb, a.rgb)
    assert not (changed & (res.mask == 0)).any()
    # The soft mask stays around the region: within its hard mask grown by 3 feather sigmas.
    hard = edits.region_mask(a.landmarks, region, a.rgb.shape)
    sigma = res.info["feather"]
    assert not ((res.mask > 0) & (edits.morph(hard, 3 * sigma + 2, cv2.MORPH_DILATE) == 0)).any()
    core = res.mask > 0.9
    assert core.sum() > 20 and changed[core].mean() > 0.5
    assert res.info["blend"] in ("alpha", "poisson")


def test_regions_do_not_overlap_much(views: tuple) -> None:
    a = views[0]
    masks = {r: edits.region_mask(a.landmarks, r, a.rgb.shape) > 0 for r in edits.SWAP_REGIONS}
    assert (masks["eyes"] & masks["mouth"]).sum() == 0
    assert (masks["eyebrows"] & masks["mouth"]).sum() == 0
    with pytest.raises(edits.EditError, match="unknown region"):
        edits.region_mask(a.landmarks, "ears", a.rgb.shape)


@pytest.mark.parametrize("seed", [1, 2])
def test_background_replacement_keeps_the_face_bit_for_bit(photos: tuple, seed: int) -> None:
    a = photos[0]
    rng = np.random.default_rng(seed)
    background = edits.synthetic_background(a.rgb.shape, rng)
    res = edits.replace_background(a.rgb, a.landmarks, background, rng)
    face = edits.face_hull_mask(a.landmarks, a.rgb.shape, forehead=0.25) > 0
    np.testing.assert_array_equal(res.rgb[face], a.rgb[face])
    np.testing.assert_array_equal(res.rgb[res.mask == 0], a.rgb[res.mask == 0])
    # Away from the face the new background has replaced the old one.
    far = res.mask > 0.99
    assert far.mean() > 0.5
    assert np.abs(res.rgb[far].astype(int) - a.rgb[far].astype(int)).mean() > 5
    assert res.info["forehead"] >= 0.25


def test_background_from_a_donor_avoids_its_face() -> None:
    # A donor whose face box is red and everything else blue: the background is all blue.
    donor = np.zeros((120, 160, 3), np.uint8)
    donor[...] = (0, 0, 255)
    box = (60, 30, 110, 90)
    donor[box[1] : box[3], box[0] : box[2]] = (255, 0, 0)
    for seed in range(5):
        bg, how = edits.make_background((64, 64, 3), np.random.default_rng(seed), donor, box)
        assert how == "donor" and bg.shape == (64, 64, 3)
        assert bg[..., 0].max() == 0 and bg[..., 2].min() == 255
    # A face that fills the donor leaves no strip: a synthetic backdrop instead.
    _, how = edits.make_background((64, 64, 3), np.random.default_rng(0), donor, (5, 5, 155, 115))
    assert how == "synthetic"


def test_degrade_is_label_free_and_reproducible(views: tuple) -> None:
    a = views[0]
    seen = set()
    for seed in range(12):
        r1 = edits.degrade(a.rgb, np.random.default_rng(seed))
        r2 = edits.degrade(a.rgb, np.random.default_rng(seed))
        np.testing.assert_array_equal(r1.rgb, r2.rgb)
        assert r1.rgb.shape == a.rgb.shape and r1.rgb.dtype == np.uint8
        assert _changed(r1.rgb, a.rgb).mean() > 0.2
        seen.update(op.rstrip("0123456789.") for op in r1.info["ops"].split("+"))
    assert {"jpeg", "resize", "gauss", "noise"} <= seen


def test_pose_distance() -> None:
    lm = demo.load_photos()[0].landmarks.astype(np.float64)
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    moved = 1.7 * lm @ rot.T + [40, -12]
    assert edits.pose_distance(lm, moved) < 1e-6
    other = demo.load_photos()[1].landmarks
    assert edits.pose_distance(other, lm) > 0.02


def test_triangle_warp_is_identity_for_equal_landmarks(views: tuple) -> None:
    a = views[0]
    warped, covered = edits.warp_triangles(a.rgb, a.landmarks, a.landmarks, a.rgb.shape)
    inside = covered > 0
    assert inside.sum() > 0.8 * (edits.hull_mask(a.landmarks, a.rgb.shape) > 0).sum()
    assert np.abs(warped[inside].astype(int) - a.rgb[inside].astype(int)).max() <= 1


def test_bad_inputs_are_refused(views: tuple) -> None:
    a, b = views
    with pytest.raises(edits.EditError, match="68"):
        edits.face_swap(a.rgb, a.landmarks[:10], b.rgb, b.landmarks, np.random.default_rng(0))
    with pytest.raises(edits.EditError, match="uint8"):
        edits.degrade(a.rgb.astype(np.float32), np.random.default_rng(0))
    # A donor face cut off by its image border would paste mirrored border pixels.
    cut = np.ascontiguousarray(b.rgb[:, : int(b.landmarks[:, 0].max()) - 10])
    with pytest.raises(edits.EditError, match="runs off"):
        edits.face_swap(a.rgb, a.landmarks, cut, b.landmarks, np.random.default_rng(0))
    edits.region_swap(a.rgb, a.landmarks, cut, b.landmarks, "nose", np.random.default_rng(0))  # the nose is inside
    with pytest.raises(edits.EditError, match="does not match"):
        edits.replace_background(a.rgb, a.landmarks, b.rgb[:10], np.random.default_rng(0))
