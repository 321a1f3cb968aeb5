"""The sladd recipe's data side and the synthesizer's step on real portraits: forgeries change
only their region, carry the targets of the configuration that made them, and a fake is never
its real unchanged.

Faces: scikit-image's astronaut and matplotlib's Grace Hopper (both ship with installed
packages), their 68 landmarks from the data stage's own dlib FaceAnalyzer.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib import cbook
from PIL import Image
from skimage import data

import models
from core.config import ConfigError
from core.data.transforms import build_transform
from core.train.trainer import RESULT_NEUTRAL_KEYS
from data_prep.blending import BLEND_TYPES, face_scale, region_mask, sladd_forge
from data_prep.faces import FaceAnalyzer, flip_landmarks
from data_prep.sbi_online import RealFace
from data_prep.sladd_online import (
    OTHER_FAKE_TYPE,
    REAL_TYPE,
    TYPE_CLASSES,
    Entry,
    ForgeSettings,
    RecipeSettings,
    SLADDItems,
    changed_share,
    collate_sladd,
    forge_pair,
    mask_map,
    resize_face,
)
from models.sladd import SynthesizerPart, SynthSettings, build_synthesizer

pytest.importorskip("dlib")

SIZE = 128  # the forgeries run at the network's input size
DEMO = yaml.safe_load(Path("configs/members/sladd_demo.yaml").read_text())
FORGE = ForgeSettings.from_cfg(DEMO)
RECIPE = RecipeSettings.from_cfg(DEMO)


def _grace() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Square face crops of the two portraits as PNG files with their landmarks (RealFace)."""
    folder = tmp_path_factory.mktemp("faces")
    analyzer = FaceAnalyzer(embed=False, upsample=1)
    faces = {}
    for name, photo in (("astronaut", data.astronaut()), ("grace", _grace())):
        lm = analyzer.primary(photo).landmarks.astype(np.float64)
        centre, side = (lm.min(0) + lm.max(0)) / 2, 2.0 * float(np.ptp(lm, axis=0).max())
        x0, y0 = np.clip(np.rint(centre - side / 2), 0, None).astype(int)
        side_px = int(min(side, photo.shape[0] - y0, photo.shape[1] - x0))
        crop = np.ascontiguousarray(photo[y0 : y0 + side_px, x0 : x0 + side_px])
        path = folder / f"{name}.png"
        Image.fromarray(crop).save(path)
        faces[name] = RealFace(str(path), lm - (x0, y0), (0, 0, side_px, side_px), None)
    return faces


@pytest.fixture(scope="module")
def pair(photos: dict) -> tuple:
    """(target, target landmarks, source, source landmarks) at SIZE: Grace Hopper receives the astronaut's face."""
    tgt = resize_face(np.asarray(Image.open(photos["grace"].path)), photos["grace"].landmarks, SIZE, False)
    src = resize_face(np.asarray(Image.open(photos["astronaut"].path)), photos["astronaut"].landmarks, SIZE, False)
    return (*tgt, *src)


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    r = max(1, int(np.ceil(radius)))
    return cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)) > 0


# --------------------------------------------------------------------------- one forgery


@pytest.mark.parametrize("blend_type", ["alpha", "poisson", "copy"])
def test_a_forgery_changes_only_its_region_and_carries_its_configuration(pair: tuple, blend_type: str) -> None:
    tgt, tgt_lm, src, src_lm = pair
    for region in (0, 4, 8, 9):
        seed = 100 + region
        f = forge_pair(tgt, tgt_lm, src, src_lm, region, blend_type, 0.6, seed, FORGE)
        assert (f.label, f.status, TYPE_CLASSES[f.type_class]) == (1, "fake", blend_type)
        # The same configuration and seed, straight through the forgery space: the same image.
        ratio = 0.6 if blend_type == "copy" else 1.0
        fake, mask = sladd_forge(tgt, tgt_lm, src, src_lm, region, blend_type, ratio, np.random.default_rng(seed))
        assert np.array_equal(f.image, fake)
        np.testing.assert_allclose(f.mask_map, mask_map(mask / ratio, 16), atol=1e-6)
        assert (f.mag == 0.6) if blend_type == "copy" else math.isnan(f.mag)
        # Only the region moved: the landmark region drawn with that seed, widened by the alpha feather.
        soft = region_mask(tgt_lm, region, tgt.shape, np.random.default_rng(seed)) > 0
        band = 3 * FORGE.feather * face_scale(tgt_lm) + 1 if blend_type == "alpha" else 0
        changed = (f.image != tgt).any(-1)
        assert changed.any() and not (changed & ~_dilate(soft, band)).any(), f"{blend_type} region {region}"
        assert changed_share(tgt, f.image, mask, FORGE.min_delta) >= FORGE.min_changed
        # The map target is the region's blend weight, not scaled by the ratio (the public code's),
        # averaged to 16 x 16: empty far from the region.
        assert 0 < f.mask_map.max() <= 1 + 1e-6 and f.mask_map.min() == 0.0
        assert blend_type != "copy" or f.mask_map.max() > ratio


def test_none_a_face_forged_into_itself_and_a_failed_forgery_are_the_real_labelled_real(pair: tuple) -> None:
    tgt, tgt_lm, src, src_lm = pair
    none = forge_pair(tgt, tgt_lm, src, src_lm, 9, "none", 0.7, 0, FORGE)
    itself = forge_pair(tgt, tgt_lm, tgt, tgt_lm, 9, "poisson", 1.0, 0, FORGE)  # moves pixels by 1 level
    failed = forge_pair(tgt, tgt_lm - [0.0, 5000.0], src, src_lm, 9, "copy", 0.7, 0, FORGE)
    assert (none.status, itself.status, failed.status) == ("none", "unchanged", "failed")
    assert "empty" in failed.reason
    for f in (none, itself, failed):
        assert f.label == 0 and f.type_class == REAL_TYPE and math.isnan(f.mag)
        assert np.array_equal(f.image, tgt) and not f.mask_map.any()


def test_no_sample_labelled_fake_is_its_real(pair: tuple) -> None:
    """Random configurations over two sources, the target itself among them, and mags down to
    the floor: every fake differs from its real inside the region; every real is the real."""
    tgt, tgt_lm, src, src_lm = pair
    rng = np.random.default_rng(0)
    labels = []
    for i in range(40):
        source, source_lm = (tgt, tgt_lm) if i % 3 == 0 else (src, src_lm)
        blend_type = BLEND_TYPES[int(rng.integers(4))]
        mag = float(rng.uniform(FORGE.mag_min, 1.0)) if i % 2 else FORGE.mag_min
        f = forge_pair(tgt, tgt_lm, source, source_lm, int(rng.integers(10)), blend_type, mag, i, FORGE)
        labels.append(f.label)
        if f.label == 1:
            assert not np.array_equal(f.image, tgt) and f.mask_map.any()
        else:
            assert np.array_equal(f.image, tgt)
    assert 0 < sum(labels) < len(labels)


def test_forge_and_recipe_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="forge.mag_min must be in"):
        ForgeSettings.from_cfg({"forge": {**DEMO["forge"], "mag_min": 0.0}})
    with pytest.raises(ConfigError, match="forge.min_changed"):
        ForgeSettings.from_cfg({"forge": {**DEMO["forge"], "min_changed": 0.0}})
    with pytest.raises(ConfigError, match=r"forge.mag_types: \['none'\]"):
        ForgeSettings.from_cfg({"forge": {**DEMO["forge"], "mag_types": ["none"]}})
    with pytest.raises(ConfigError, match=r"`forge:` lacks \['min_delta'\]"):
        ForgeSettings.from_cfg({"forge": {k: v for k, v in DEMO["forge"].items() if k != "min_delta"}})
    with pytest.raises(ConfigError, match="recipe.flip_p must be a probability"):
        RecipeSettings.from_cfg({"recipe": {**DEMO["recipe"], "flip_p": 2}})


# --------------------------------------------------------------------------- the loader's items


def test_faces_are_resized_like_the_evaluation_transform_and_flipped_with_their_landmarks(photos: dict) -> None:
    face = photos["grace"]
    img = np.asarray(Image.open(face.path))
    out, lm = resize_face(img, face.landmarks, SIZE, False)
    expected = build_transform({"image_size": SIZE, "mean": [0.0] * 3, "std": [1.0] * 3}, train=False)(img, 0)
    torch.testing.assert_close(torch.from_numpy(out).permute(2, 0, 1).float() / 255, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lm, (face.landmarks + 0.5) * SIZE / img.shape[0] - 0.5)
    mirrored, mirrored_lm = resize_face(img, face.landmarks, SIZE, True)
    assert np.array_equal(mirrored, out[:, ::-1])
    np.testing.assert_allclose(mirrored_lm, flip_landmarks(lm, SIZE), atol=1e-4)


def _items(photos: dict, **settings) -> SLADDItems:
    """Both portraits as targets, then the astronaut again as a fake that passes through."""
    faces = list(photos.values())
    entries = [Entry(f.path, 0, f) for f in faces] + [Entry(photos["astronaut"].path, 1, None)]
    return SLADDItems(entries, faces, faces[:1], SIZE, replace(RECIPE, **settings), seed=3)


def test_items_depend_only_on_seed_epoch_and_index_and_never_source_themselves(photos: dict) -> None:
    ds = _items(photos)
    ds.set_epoch(2)
    again = _items(photos)
    again.set_epoch(2)
    for i in range(2):
        a, b = ds[i], again[i]
        assert all(np.array_equal(a[k], b[k]) for k in ("real", "source", "real_lm")) and a["seed"] == b["seed"]
    assert np.array_equal(ds[2]["other"], again[2]["other"]) and ds[2]["label"] == 1 and "real" not in ds[2]
    ds.set_epoch(3)
    assert ds[0]["seed"] != again[0]["seed"]
    faces = list(photos.values())
    reals_only = SLADDItems([Entry(f.path, 0, f) for f in faces], faces, [], SIZE, RECIPE, seed=0)
    for epoch in range(6):
        reals_only.set_epoch(epoch)
        item = reals_only[0]
        assert not np.array_equal(item["source"], item["real"][:, ::-1]) and not np.array_equal(
            item["source"], item["real"]
        )


def test_a_broken_image_is_an_error_item_and_collate_keeps_the_rest(photos: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    faces = list(photos.values())
    entries = [Entry(f.path, 0, f) for f in faces]
    entries += [Entry(str(broken), 0, RealFace(str(broken), photos["grace"].landmarks, (0, 0, 9, 9), None))]
    entries += [Entry(photos["astronaut"].path, 1, None), Entry(photos["grace"].path, 0, None)]
    ds = SLADDItems(entries, faces, [], SIZE, RECIPE, seed=0)
    items = [ds[i] for i in range(5)]
    assert "error" in items[2] and str(broken) in items[2]["error"]
    batch = collate_sladd(items)
    assert batch["errors"] == [items[2]["error"]] and batch["real"].shape == (2, SIZE, SIZE, 3)
    assert batch["real_lm"].shape == (2, 68, 2) and batch["seed"].shape == (2,)
    assert batch["other"].shape == (2, SIZE, SIZE, 3) and batch["other_target"].tolist() == [1, 0]
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["target"].tolist() == [0, 0, 1, 0]
    assert torch.equal(batch["image"][2], batch["other"][0].permute(2, 0, 1))
    only_others = collate_sladd(items[3:])
    assert only_others["real"].shape == (0, SIZE, SIZE, 3) and only_others["target"].tolist() == [1, 0]
    shuffled = collate_sladd([items[3], items[0], items[4], items[1]])  # as a sampler orders them
    assert shuffled["target"].tolist() == [0, 0, 1, 0] and torch.equal(shuffled["real"], batch["real"])


# --------------------------------------------------------------------------- the synthesizer's step


def _part(mode: str = "learned", **synth) -> SynthesizerPart:
    torch.manual_seed(0)
    s = SynthSettings.from_cfg({"synthesizer": {**DEMO["synthesizer"], "mode": mode, **synth}})
    net = build_synthesizer(s) if mode == "learned" else None
    part = SynthesizerPart(net, s, FORGE, RECIPE, [0.5] * 3, [0.5] * 3, amp=False)
    part.to(torch.device("cpu"))
    return part


def _batch(photos: dict) -> dict:
    return collate_sladd([_items(photos)[i] for i in range(3)])  # two targets, one fake passing through


@pytest.mark.parametrize("mode", ["learned", "random"])
def test_every_target_matches_the_configuration_that_made_the_image(photos: dict, mode: str) -> None:
    part = _part(mode)
    batch = _batch(photos)
    torch.manual_seed(7)
    out = part.prepare(batch, learn=True)
    actions, b = part.pending
    assert b == 2 and len(out["image"]) == 2 * b + 1
    real, source = batch["real"].numpy(), batch["source"].numpy()
    real_lm, source_lm = batch["real_lm"].numpy(), batch["source_lm"].numpy()
    for i in range(b):
        f = forge_pair(
            real[i], real_lm[i], source[i], source_lm[i], int(actions.region[i]), BLEND_TYPES[int(actions.blend[i])],
            float(actions.mag[i]), int(batch["seed"][i]), part.forge,
        )  # fmt: skip
        j = b + i
        image = torch.from_numpy(f.image).permute(2, 0, 1).float() / 255 * 2 - 1
        torch.testing.assert_close(out["image"][j], image, rtol=0, atol=1e-6)
        assert (int(out["target"][j]), int(out["type_target"][j])) == (f.label, f.type_class)
        assert bool(out["mag_valid"][j]) == (not math.isnan(f.mag))
        if not math.isnan(f.mag):
            assert float(out["mag_target"][j]) == pytest.approx(f.mag)
        np.testing.assert_allclose(out["map_target"][j, 0].numpy(), f.mask_map)
    # Reals first, with nothing blended; the images that pass through last, their masks unknown.
    torch.testing.assert_close(out["image"][0], torch.from_numpy(real[0]).permute(2, 0, 1).float() / 255 * 2 - 1)
    assert out["target"][:b].tolist() == [0] * b and out["type_target"][:b].tolist() == [REAL_TYPE] * b
    assert not out["map_target"][:b].any() and out["map_valid"][: 2 * b].all() and not out["map_valid"][2 * b :].any()
    assert out["target"][2 * b :].tolist() == [1] and out["type_target"][2 * b :].tolist() == [OTHER_FAKE_TYPE]
    torch.testing.assert_close(out["image"][-1], batch["other"][0].permute(2, 0, 1).float() / 255 * 2 - 1)
    assert not out["mag_valid"][:b].any() and not out["mag_valid"][2 * b :].any()


def test_the_synthesizer_learns_from_the_rewards_of_its_own_images(photos: dict) -> None:
    part = _part(reward="image", baseline_momentum=0.9)
    before = {k: v.clone() for k, v in part.net.state_dict().items()}
    batch = _batch(photos)
    out = part.prepare(batch, learn=True)
    n = len(out["image"])
    logs = {"sample_loss": torch.arange(n, dtype=torch.float32)}
    part.backward(out, logs, scale=1.0)
    assert part.baseline == pytest.approx(float(logs["sample_loss"][2:4].mean()))  # the slots' rewards
    assert torch.count_nonzero(part.net.blend.weight.grad) > 0  # the blend type's log-probability always counts
    part.step()
    after = part.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    summary = part.summary()
    assert sum(v for k, v in summary.items() if k.startswith("synth_p_") and k[8:] in BLEND_TYPES) == pytest.approx(1)
    assert summary["synth_reward"] == pytest.approx(2.5) and summary["synth_baseline"] == part.baseline
    # The state goes into the training state and comes back.
    state = part.state_dict()
    other = _part(reward="image", baseline_momentum=0.9)
    other.load_state_dict(state)
    assert other.baseline == part.baseline
    assert all(torch.equal(v, other.net.state_dict()[k]) for k, v in part.net.state_dict().items())
    # Without the sladd loss's per-image losses there is nothing to learn from.
    part.prepare(batch, learn=True)
    with pytest.raises(ConfigError, match="loss.name: sladd"):
        part.backward(out, {"ce": torch.tensor(1.0)}, scale=1.0)


class _CallsEverythingReal(torch.nn.Module):
    """A detector sure that every image is real: its loss is high on a fake and near 0 on a real,
    so the synthesizer's paying actions are the forgeries and its worst is `none` (a real)."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = len(images)
        return {
            "logits": torch.tensor([[4.0, -4.0]]).expand(n, 2),
            "mask_map": torch.zeros(n, 1, FORGE.map_size, FORGE.map_size),
            "type_logits": torch.zeros(n, len(TYPE_CLASSES)),
            "mag": torch.full((n,), 0.5),
        }


def _targets(photos: dict, copies: int) -> dict:
    """`copies` x both portraits as targets, then one fake that passes through."""
    items = [_items(photos)[i] for i in range(3)]
    return collate_sladd(items[:2] * copies + items[2:])


def test_reinforce_end_to_end_moves_the_policy_towards_the_actions_the_detector_gets_wrong(photos: dict) -> None:
    """prepare -> the sladd criterion -> backward -> step, four pairs a step, each action paid
    the loss on its own image (`reward: image`): within ten steps the synthesizer draws fewer
    `none` (the real, which the detector gets right) and more forgeries (which it gets wrong).
    A flipped update moves it the other way, rewards paired with the wrong actions not at all.
    The published reward (the batch's loss for every action, no baseline) is too noisy to move
    it reliably in a few steps (its direction is pinned exactly by the next test)."""
    part = _part(reward="image", baseline_momentum=0.9, lr=1e-3, image_size=32)
    criterion = models.build_criterion(DEMO)
    detector = _CallsEverythingReal()
    batch = _targets(photos, copies=2)
    torch.manual_seed(0)
    p_none = []
    for _ in range(10):
        out = part.prepare(batch, learn=True)
        p_none.append(float(part.pending[0].blend_probs[:, BLEND_TYPES.index("none")].mean()))
        _, _, logs = criterion(detector, out)
        part.backward(out, logs, scale=1.0)
        part.step()
    assert p_none[0] == pytest.approx(0.25, abs=0.01)  # the uniform start
    assert p_none[-1] < 0.24 and part.summary()["synth_p_none"] < 0.25


@pytest.mark.parametrize("reward", ["batch", "image"])
def test_each_action_is_credited_with_its_own_reward(photos: dict, reward: str) -> None:
    """Several pairs, distinct per-image losses: the gradient on the blend head is exactly
    -1/B sum_i A_i (onehot(blend_i) - p) (at the start the blend logits are the head's bias), with
    A_i the batch loss for every pair (published) or pair i's own image loss less the baseline;
    rewards shifted by one pair give another gradient, so the test tells the pairings apart."""
    part = _part(reward=reward, baseline_momentum=0.9 if reward == "image" else None, entropy_weight=0.0)
    batch = _targets(photos, copies=3)
    torch.manual_seed(3)
    out = part.prepare(batch, learn=True)
    actions, b = part.pending
    assert b == 6 and len(set(actions.blend.tolist())) >= 3
    n = len(out["image"])
    sample = torch.linspace(0.5, 3.0, n) ** 2  # every image its own loss
    logs = {"loss": torch.tensor(1.7), "sample_loss": sample}
    part.backward(out, logs, scale=1.0)
    own = sample[b : 2 * b]
    advantage = torch.full((b,), 1.7) if reward == "batch" else own - own.mean()  # the baseline starts at the mean

    def blend_grad(a: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(part.net.blend.bias.detach(), 0)
        return -(a[:, None] * (torch.nn.functional.one_hot(actions.blend, 4) - p)).mean(0)

    torch.testing.assert_close(part.net.blend.bias.grad, blend_grad(advantage), rtol=1e-4, atol=1e-6)
    if reward == "image":
        for shifted in (advantage.roll(1), (sample[b - 1 : 2 * b - 1] - own.mean())):
            assert not torch.allclose(blend_grad(shifted), blend_grad(advantage), atol=1e-3)


def test_forging_threads_change_nothing_but_speed(photos: dict) -> None:
    batch = _batch(photos)
    outputs = []
    for threads in (1, 3):
        part = _part()
        part.recipe = replace(RECIPE, forge_threads=threads)
        torch.manual_seed(5)
        outputs.append(part.prepare(batch, learn=False))
    for key in ("image", "target", "type_target", "map_target"):
        assert torch.equal(outputs[0][key], outputs[1][key]), key
    assert "recipe.forge_threads" in RESULT_NEUTRAL_KEYS  # so a resume may change it


def test_forging_ahead_changes_nothing_but_when(photos: dict) -> None:
    """`ahead` draws the next batch's configurations after the step and forges them on a thread
    while the detector steps; `prepare` picks them up: the same images, targets and update as
    drawing and forging them in `prepare`."""
    first, second = _targets(photos, copies=1), _targets(photos, copies=2)
    runs = []
    for overlap in (False, True):
        part = _part()
        torch.manual_seed(11)
        out = part.prepare(first, learn=True)
        part.backward(out, {"loss": torch.tensor(2.0), "sample_loss": torch.ones(len(out["image"]))}, scale=1.0)
        part.step()
        if overlap:
            part.ahead(second)
            assert part.upcoming is not None and part.upcoming[0] is second
        out = part.prepare(second, learn=True)
        assert part.upcoming is None
        part.backward(out, {"loss": torch.tensor(3.0), "sample_loss": torch.ones(len(out["image"]))}, scale=1.0)
        part.step()
        runs.append((out, part.net.state_dict(), part.summary()))
    (a, net_a, summary_a), (b, net_b, summary_b) = runs
    for key in ("image", "target", "type_target", "map_target", "mag_target"):
        assert torch.equal(a[key].nan_to_num(-1), b[key].nan_to_num(-1)), key
    assert all(torch.equal(v, net_b[k]) for k, v in net_a.items()) and summary_a == pytest.approx(
        summary_b, nan_ok=True
    )


def test_a_batch_with_one_target_or_none_is_forged(photos: dict) -> None:
    """One target: the synthesizer's BatchNorm still has two values per channel (its pair at 32 px
    ends in a 1 x 1 map); no target: nothing to forge, nothing to learn, and the step goes on."""
    part = _part(image_size=32)
    items = [_items(photos)[i] for i in range(3)]
    one = part.prepare(collate_sladd(items[1:]), learn=True)
    assert one["target"].tolist()[:1] == [0] and len(one["image"]) == 3 and part.pending[1] == 1
    part.backward(one, {"loss": torch.tensor(1.0), "sample_loss": torch.ones(3)}, scale=1.0)
    none = part.prepare(collate_sladd(items[2:]), learn=True)
    assert none["target"].tolist() == [1] and none["type_target"].tolist() == [OTHER_FAKE_TYPE]
    part.backward(none, {"loss": torch.tensor(1.0), "sample_loss": torch.ones(1)}, scale=1.0)
    part.step()


def test_the_batchnorm_pass_forges_without_learning(photos: dict) -> None:
    part = _part()
    with torch.no_grad():
        out = part.prepare(_batch(photos), learn=False)
    assert part.pending is None and len(out["image"]) == 5
    assert part.summary()["synth_fake"] == 0.0  # nothing recorded


def test_the_registered_recipe_builds_the_dataset_and_the_synthesizer(photos: dict, tmp_path: Path) -> None:
    """Every training image is an item: the reals with a cached face are targets, the fake (with a
    face: a source too) and a real the data stage derived (no face of its own) pass through."""
    prep = tmp_path / "prepared"
    rows = [("astronaut.png", 0, "real"), ("grace.png", 0, "real"), ("fake.png", 1, "fake")]
    rows += [("reencoded.png", 0, "edit:reencode")]
    for name, src in zip([r[0] for r in rows], ["astronaut", "grace", "grace", "astronaut"], strict=True):
        Image.open(photos[src].path).save(tmp_path / name)
    names = [r[0] for r in rows[:3]]
    FaceAnalyzer(embed=True, detector="hog", upsample=1, pick="score").analyze_files(
        [tmp_path / n for n in names], names, cache_dir=prep / "faces", progress=False
    )
    table = pd.DataFrame(rows, columns=["img_name", "target", "method"])
    table["path"] = [str(tmp_path / n) for n in table["img_name"]]
    cfg = {**DEMO, "prep": {"out": str(prep)}, "data": {**DEMO["data"], "image_size": 64}, "train": {"progress": False}}
    data = models.build_train_data(cfg, table, None, seed=0)
    ds = data.dataset
    assert [e.face is not None for e in ds.entries] == [True, True, False, False] and len(ds) == 4
    assert [f.path for f in ds.fake_sources] == [str(tmp_path / "fake.png")] and len(ds.real_sources) == 2
    assert [ds[i]["label"] for i in (2, 3)] == [1, 0]
    assert isinstance(data.auxiliary, SynthesizerPart) and data.auxiliary.net is not None
    with pytest.raises(ConfigError, match=r"forge.map_size \(8\) must equal model.map_size"):
        models.build_train_data({**cfg, "forge": {**cfg["forge"], "map_size": 8}}, table, None, seed=0)
    with pytest.raises(ConfigError, match="no face cache"):
        models.build_train_data({**cfg, "prep": {"out": str(tmp_path / "nowhere")}}, table, None, seed=0)
