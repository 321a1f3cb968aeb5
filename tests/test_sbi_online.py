"""The sbi recipe's data side: online self-blends from a face cache, guidance inputs, collate.

A small "prepared set" is made on the fly from two real portraits that ship with installed
packages (scikit-image's astronaut, matplotlib's Grace Hopper): originals under orig/, their
faces cached by the data stage's own FaceAnalyzer, a derived real and a fake beside them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from matplotlib import cbook
from PIL import Image
from skimage import data

from core.config import ConfigError
from core.data.datasets import sample_seed
from data_prep.blending import load_sbi_config, sbi_sample
from data_prep.faces import Face, FaceAnalyzer, cache_path, load_face_cache
from data_prep.sbi_online import (
    ARCFACE_112,
    DlibEmbedder,
    EmbedderSpec,
    SBIPairs,
    aligned_face,
    collate_pairs,
    face_settings,
    read_real_faces,
    sbi_config,
    sbi_frames,
    sbi_pairs,
)

pytest.importorskip("dlib")

SIZE = 64  # network input in these tests: the blend itself runs at the photograph's size


def _grace() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as img:
        return np.asarray(img.convert("RGB").resize((256, 300)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """prep.out with 4 originals (3 with a face, 1 blank), a derived real and a fake, and the
    data stage's face cache of the originals."""
    out = tmp_path_factory.mktemp("prepared")
    (out / "orig").mkdir()
    (out / "edit").mkdir()
    astro = np.ascontiguousarray(data.astronaut()[:300, 60:360])
    images = {
        "a.png": astro,
        "b.png": _grace(),
        "c.png": np.ascontiguousarray(astro[:, ::-1]),
        "blank.png": np.full((120, 120, 3), 128, np.uint8),
    }
    for name, img in images.items():
        Image.fromarray(img).save(out / "orig" / name)
    Image.fromarray(astro).save(out / "edit" / "reencoded.png")
    Image.fromarray(_grace()[::-1]).save(out / "edit" / "fake.png")
    cfg = {"prep": {"out": str(out)}, "name": "sbi_test"}
    analyzer = FaceAnalyzer(embed=True, detector="hog", upsample=1, pick="score")
    assert analyzer.settings() == face_settings(cfg)  # the stage's defaults
    names = list(images)
    analyzer.analyze_files([out / "orig" / n for n in names], names, cache_dir=out / "faces", progress=False)
    rows = [(f"orig/{n}", 0, "real") for n in names]
    rows += [("edit/reencoded.png", 0, "edit:reencode"), ("edit/fake.png", 1, "edit:swap")]
    table = pd.DataFrame(rows, columns=["img_name", "target", "method"])
    table["path"] = [str(out / n) for n in table["img_name"]]
    return {"out": out, "table": table, "cfg": cfg, "images": images}


@pytest.fixture(scope="module")
def reals(prepared: dict) -> list:
    faces, _ = read_real_faces(prepared["table"], prepared["out"] / "faces", face_settings(prepared["cfg"]), False)
    return faces


@pytest.fixture(scope="module")
def recipe() -> object:
    return load_sbi_config(output_size=SIZE)


def _member_cfg(prepared: dict, **recipe: object) -> dict:
    member = yaml.safe_load(Path("configs/members/sbi_fed.yaml").read_text())
    member["sbi"]["output_size"] = SIZE
    return {
        **prepared["cfg"],
        "sbi": member["sbi"],
        "data": {"image_size": SIZE, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "recipe": {"name": "sbi", **recipe},
        "loss": {"embedder": {"kind": "dlib"}},
        "train": {"progress": False},
    }


# --------------------------------------------------------------------------- sbi_frames


def test_the_seeds_below_cover_both_orientations(recipe: object) -> None:
    # sbi_sample's first draw decides the flip
    assert {bool(np.random.default_rng(s).random() < recipe.flip_p) for s in range(6)} == {True, False}


@pytest.mark.parametrize("seed", range(6))
def test_sbi_frames_gives_sbi_sample_byte_for_byte(reals: list, recipe: object, seed: int) -> None:
    real = reals[0]
    img = np.asarray(Image.open(real.path).convert("RGB"))
    expected = sbi_sample(img, real.landmarks, real.box, np.random.default_rng(seed), recipe)
    got = sbi_frames(img, real.landmarks, real.box, np.random.default_rng(seed), recipe)
    for a, b in zip(expected, got[:3], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", range(6))  # flip p = 0.5: both orientations occur among these seeds
def test_blended_frame_is_in_the_photographs_orientation(reals: list, recipe: object, seed: int) -> None:
    """With the target untouched and no pair augmentation the frame's real is a plain cut of the
    photograph: its landmarks are the photograph's shifted by the cut, never mirrored."""
    real = reals[0]
    img = np.asarray(Image.open(real.path).convert("RGB"))
    plain = replace(recipe, augment_source_p=1.0, pair_augment=False)
    s = sbi_frames(img, real.landmarks, real.box, np.random.default_rng(seed), plain)
    offset = real.landmarks - s.frame_landmarks
    np.testing.assert_allclose(offset, np.broadcast_to(offset[0], offset.shape), atol=1e-4)
    ox, oy = np.rint(offset[0]).astype(int)
    h, w = s.frame_real.shape[:2]
    np.testing.assert_array_equal(s.frame_real, img[oy : oy + h, ox : ox + w])
    assert (s.frame_fake != s.frame_real).any()


# --------------------------------------------------------------------------- the reals


def test_reals_without_a_usable_face_are_skipped_and_counted(prepared: dict, tmp_path: Path) -> None:
    table = prepared["table"].copy()
    # A stale cache: the image changed after the data stage read it.
    moved = tmp_path / "c.png"
    Image.fromarray(prepared["images"]["c.png"][:-4]).save(moved)
    table.loc[table["img_name"] == "orig/c.png", "path"] = str(moved)
    faces, skipped = read_real_faces(table, prepared["out"] / "faces", face_settings(prepared["cfg"]), False)
    assert sorted(Path(f.path).name for f in faces) == ["a.png", "b.png"]
    assert skipped == {
        "no face found by the data stage": 1,
        "derived by the data stage (no face of its own in the cache)": 1,
        "no face cache for this image (stale or missing: rerun python -m data_prep)": 1,
    }
    hit, face = load_face_cache(
        cache_path(prepared["out"] / "faces", "a.png"),
        (moved.stat().st_size, moved.stat().st_mtime_ns, face_settings(prepared["cfg"])),
    )
    assert not hit and face is None


def test_recipe_logs_the_skips_and_refuses_a_set_without_faces(prepared: dict, capsys: pytest.CaptureFixture) -> None:
    cfg = _member_cfg(prepared)
    ds = sbi_pairs(cfg, prepared["table"], lambda img, seed: torch.zeros(3, SIZE, SIZE), 0, guided=False)
    assert len(ds) == 3
    logged = capsys.readouterr().err
    assert "3 reals with a cached face" in logged and "1 no face found" in logged
    only_blank = prepared["table"][prepared["table"]["img_name"] == "orig/blank.png"]
    with pytest.raises(ConfigError, match="none of the 1 training reals has a cached face"):
        sbi_pairs(cfg, only_blank, lambda img, seed: None, 0, guided=False)
    with pytest.raises(ConfigError, match="no face cache"):
        sbi_pairs({**cfg, "prep": {"out": str(prepared["out"] / "nowhere")}}, prepared["table"], None, 0, False)


def test_sbi_section_must_match_the_input_size(prepared: dict) -> None:
    cfg = _member_cfg(prepared)
    assert sbi_config(cfg).output_size == SIZE
    with pytest.raises(ConfigError, match=r"sbi.output_size \(64\) must equal data.image_size \(96\)"):
        sbi_config({**cfg, "data": {"image_size": 96}})
    broken = {k: v for k, v in cfg["sbi"].items() if k != "jpeg_p"}
    with pytest.raises(ConfigError, match=r"lacks \['jpeg_p'\]"):
        sbi_config({**cfg, "sbi": broken})


# --------------------------------------------------------------------------- items and batches


def _pairs(reals: list, recipe: object, **kwargs: object) -> SBIPairs:
    return SBIPairs(reals, recipe, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), seed=3, **kwargs)


def test_items_depend_only_on_seed_epoch_and_index(reals: list, recipe: object) -> None:
    ds = _pairs(reals, recipe)
    ds.set_epoch(2)
    first = [ds[i] for i in (2, 0, 1)]
    again = _pairs(reals, recipe)  # a fresh dataset, as a resumed run or another worker builds
    again.set_epoch(2)
    for item in first:
        other = again[item["index"]]
        assert torch.equal(item["real"], other["real"]) and torch.equal(item["fake"], other["fake"])
    again.set_epoch(3)
    assert not torch.equal(again[0]["fake"], first[1]["fake"])


def test_batches_do_not_depend_on_the_number_of_workers(reals: list, recipe: object) -> None:
    from torch.utils.data import DataLoader

    ds = _pairs(reals * 2, recipe, embedder=EmbedderSpec(kind="torch", file="unused.pt2", size=16, share=0.5))
    ds.set_epoch(1)
    batches = [[2, 0], [5, 1], [3, 4]]
    runs = [
        list(DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate_pairs)) for workers in (0, 2)
    ]
    for one, other in zip(*runs, strict=True):
        assert one.keys() == other.keys()
        for key in ("image", "target", "guided", "face", "index"):
            assert torch.equal(one[key], other[key])


def test_item_is_the_normalised_sbi_sample(reals: list, recipe: object) -> None:
    ds = SBIPairs(reals, recipe, (0.5, 0.25, 0.0), (0.5, 0.5, 0.25), seed=3)
    item = ds[1]
    img = np.asarray(Image.open(reals[1].path).convert("RGB"))

    real, fake, _ = sbi_sample(
        img, reals[1].landmarks, reals[1].box, np.random.default_rng(sample_seed(3, 0, 1)), recipe
    )
    mean, std = np.array([0.5, 0.25, 0.0]), np.array([0.5, 0.5, 0.25])
    expected = torch.from_numpy(((fake / 255.0 - mean) / std).transpose(2, 0, 1)).float()
    torch.testing.assert_close(item["fake"], expected)
    assert item["real"].shape == (3, SIZE, SIZE) and item["guided"] == [False, False]


def test_a_broken_real_is_an_error_item_and_the_batch_keeps_the_rest(
    reals: list, recipe: object, tmp_path: Path
) -> None:
    gone = replace(reals[0], path=str(tmp_path / "deleted.png"))
    outside = replace(reals[1], landmarks=reals[1].landmarks + 5000.0)
    ds = _pairs([gone, outside, reals[2]], recipe)
    items = [ds[i] for i in range(3)]
    assert "deleted.png" in items[0]["error"] and "no such file" in items[0]["error"]
    assert reals[1].path in items[1]["error"]
    batch = collate_pairs(items)
    assert len(batch["errors"]) == 2
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["index"].tolist() == [2]
    assert collate_pairs(items[:2]).keys() == {"errors", "index"}


def test_collate_puts_reals_first_then_their_fakes(reals: list, recipe: object) -> None:
    ds = _pairs(reals, recipe)
    items = [ds[i] for i in range(3)]
    batch = collate_pairs(items)
    assert batch["target"].tolist() == [0, 0, 0, 1, 1, 1]
    for i, item in enumerate(items):
        assert torch.equal(batch["image"][i], item["real"]) and torch.equal(batch["image"][i + 3], item["fake"])
    assert not batch["guided"].any()  # no embedder, no embeddings
    guided = collate_pairs([_pairs(reals, recipe, embedder=EmbedderSpec())[i] for i in range(3)])
    assert guided["guided"].all() and guided["embedding"].shape == (6, 128)


def test_mix_ratio_swaps_that_share_of_fakes_and_leaves_the_rest_alone(
    reals: list, recipe: object, prepared: dict
) -> None:
    marker = torch.full((3, SIZE, SIZE), 7.0)
    pure = _pairs(reals * 10, recipe)
    fake = str(prepared["out"] / "edit" / "fake.png")
    mixed = _pairs(reals * 10, recipe, mix_fakes=[fake], mix_ratio=0.5, mix_transform=lambda img, seed: marker)
    items = [mixed[i] for i in range(30)]
    swapped = [torch.equal(it["fake"], marker) for it in items]
    assert 8 <= sum(swapped) <= 22
    for i, it in enumerate(items):
        assert it["guided"] == [False, False]  # no embedder here
        assert torch.equal(it["real"], pure[i]["real"])
        if not swapped[i]:
            assert torch.equal(it["fake"], pure[i]["fake"])
    with pytest.raises(ConfigError, match="no other fakes"):
        _pairs(reals, recipe, mix_ratio=0.2)


def test_a_mixed_in_fake_is_cut_to_its_face_as_evaluation_cuts_images(
    reals: list, recipe: object, prepared: dict
) -> None:
    fake = str(prepared["out"] / "edit" / "fake.png")
    seen = []

    def transform(img: np.ndarray, seed: int) -> torch.Tensor:
        seen.append(img.shape)
        return torch.full((3, SIZE, SIZE), 7.0)

    def crop(img: np.ndarray) -> list[np.ndarray]:  # the largest face first, as FaceCropper gives them
        return [img[:12, :10], img[:4, :4]]

    cut = _pairs(reals * 10, recipe, mix_fakes=[fake], mix_ratio=0.5, mix_transform=transform, mix_crop=crop)
    swapped = [torch.equal(cut[i]["fake"], torch.full((3, SIZE, SIZE), 7.0)) for i in range(30)]
    assert 8 <= sum(swapped) <= 22 and set(seen) == {(12, 10, 3)}  # the largest face's crop, never the image
    no_face = {"mix_fakes": [fake], "mix_ratio": 0.5, "mix_transform": transform, "mix_crop": lambda img: []}
    faceless = _pairs(reals * 10, recipe, **no_face)
    pure = _pairs(reals * 10, recipe)
    for i in range(30):  # no face in the fake: the item keeps its self-blend
        assert torch.equal(faceless[i]["fake"], pure[i]["fake"])


def test_the_recipe_cuts_mixed_in_fakes_with_the_members_face_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    import data_prep.sbi_online as online

    made = []
    monkeypatch.setattr(online, "member_face_cropper", lambda cfg: made.append(cfg["name"]) or "cropper")
    monkeypatch.setattr(online, "read_real_faces", lambda *a: ([object()], {}))
    monkeypatch.setattr(online, "faces_dir", lambda cfg: Path("."))
    table = pd.DataFrame({"path": ["a.png", "b.png"], "target": [0, 1]})
    for ratio, expected in ((0.0, None), (0.3, "cropper")):
        cfg = {"name": "sbi_fed_demo", "recipe": {"mix_ratio": ratio}, "data": {}, "train": {"progress": False}}
        monkeypatch.setattr(online, "sbi_config", lambda cfg: None)
        assert online.sbi_pairs(cfg, table, lambda img, seed: None, 0, guided=False).mix_crop == expected
    assert made == ["sbi_fed_demo"]  # built only where fakes are mixed in


# --------------------------------------------------------------------------- guidance inputs


def test_dlib_guidance_gives_the_fakes_embedding_and_the_cached_real(reals: list, recipe: object) -> None:
    ds = _pairs(reals, recipe, embedder=EmbedderSpec(kind="dlib", real="cached"))
    online = _pairs(reals, recipe, embedder=EmbedderSpec(kind="dlib", real="online"))
    item, item_online = ds[0], online[0]
    e_real, e_fake = item["embedding"]
    np.testing.assert_array_equal(e_real.numpy(), reals[0].embedding)
    assert torch.equal(e_fake, item_online["embedding"][1])

    def shift(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(1 - torch.nn.functional.cosine_similarity(a, b, dim=0))

    # The same person: the augmented real stays close to its cached embedding, and the blend moves the fake.
    assert shift(e_real, item_online["embedding"][0]) < 0.05
    assert 0 < shift(e_real, e_fake) < 0.2
    batch = collate_pairs([ds[0], ds[1]])
    assert batch["embedding"].shape == (4, 128)
    assert torch.equal(batch["embedding"][2], e_fake)


def test_share_embeds_that_share_of_fakes_and_no_other(reals: list, recipe: object, prepared: dict) -> None:
    fake = str(prepared["out"] / "edit" / "fake.png")
    spec = EmbedderSpec(kind="torch", file="unused.pt2", size=16, share=0.5)  # cheap crops, the same draws
    ds = _pairs(reals * 10, recipe, embedder=spec, mix_fakes=[fake], mix_ratio=0.3, mix_transform=lambda i, s: None)
    full = _pairs(reals * 10, recipe, embedder=replace(spec, share=1.0))
    items = [ds[i] for i in range(30)]
    chosen = [it["guided"][1] for it in items]
    assert all(it["guided"][0] for it in items) and 6 <= sum(chosen) <= 24
    for i, it in enumerate(items):
        if it["fake"] is None:  # mixed in: never embedded
            assert not chosen[i]
        elif chosen[i]:
            assert torch.equal(it["face"][1], full[i]["face"][1])
        else:
            assert not it["face"][1].any()
        assert torch.equal(it["real"], full[i]["real"])
    with pytest.raises(ConfigError, match="share must be in"):
        EmbedderSpec.from_cfg({"share": 0})


def test_dlib_embedder_separates_people(reals: list) -> None:
    embed = DlibEmbedder()
    a, b = (np.asarray(Image.open(r.path).convert("RGB")) for r in reals[:2])
    ea, eb = embed(a, reals[0].landmarks), embed(b, reals[1].landmarks)
    np.testing.assert_allclose(ea, reals[0].embedding, atol=0.02)  # what the data stage cached
    assert np.linalg.norm(ea - eb) > 0.6 > np.linalg.norm(ea - reals[0].embedding)


def test_torch_guidance_gives_aligned_face_crops(reals: list, recipe: object) -> None:
    ds = _pairs(reals, recipe, embedder=EmbedderSpec(kind="torch", file="unused.pt2", size=56))
    item = ds[1]
    assert [f.shape for f in item["face"]] == [(3, 56, 56)] * 2 and item["face"][0].dtype == torch.uint8
    assert "embedding" not in item
    assert collate_pairs([item])["face"].shape == (2, 3, 56, 56)


def test_aligned_face_puts_the_eyes_on_the_template(reals: list) -> None:
    img = np.asarray(Image.open(reals[0].path).convert("RGB"))
    lm = reals[0].landmarks
    face = Face(box=reals[0].box, landmarks=lm)
    crop = aligned_face(img, lm, 112)
    assert crop.shape == (112, 112, 3)
    right, left = face.eye_centers()
    from data_prep.faces import estimate_similarity, transform_points

    points = np.stack([right, left, lm[30], lm[48], lm[54]])
    moved = transform_points(points, estimate_similarity(points, ARCFACE_112))
    assert np.abs(moved[:2] - ARCFACE_112[:2]).max() < 6  # eyes within a few pixels of the template


def test_embedder_spec_refuses_bad_settings() -> None:
    assert EmbedderSpec.from_cfg(None) == EmbedderSpec()
    assert EmbedderSpec.from_cfg({"kind": "torch", "file": "f.pt2", "mean": [0, 0, 0]}).mean == (0, 0, 0)
    with pytest.raises(ConfigError, match="kind must be one of"):
        EmbedderSpec.from_cfg({"kind": "arcface"})
    with pytest.raises(ConfigError, match="file"):
        EmbedderSpec.from_cfg({"kind": "torch"})
    with pytest.raises(ConfigError, match="unknown key"):
        EmbedderSpec.from_cfg({"kind": "dlib", "dim": 128})
    with pytest.raises(ConfigError, match="real must be one of"):
        EmbedderSpec.from_cfg({"real": "never"})


@pytest.mark.parametrize("guidance", [False, True])
def test_the_registered_recipe_builds_these_pairs(prepared: dict, guidance: bool) -> None:
    import models

    cfg = {**_member_cfg(prepared), "model": {"guidance": guidance}}
    data = models.build_train_data(cfg, prepared["table"], lambda img, seed: None, 5)
    assert isinstance(data.dataset, SBIPairs) and data.collate is collate_pairs
    assert len(data.dataset) == 3 and data.dataset.seed == 5
    assert (data.dataset.embedder is not None) == guidance
