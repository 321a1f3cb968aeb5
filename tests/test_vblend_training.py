"""Video-level blending in training (models/recipes.py `clips`, data_prep/vblend_clips.py): the
training batches of a clip member with a `vblend:` section hold blends of its real video clips,
made online, each equal to its real clip outside the blend mask; landmarks cached per frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from skimage import data as skdata

import models
import train
from core.data.datasets import make_loader
from core.distributed import DistInfo, GlobalBatchSampler
from data_prep.clip_landmarks import ClipLandmarks, fill_missing
from data_prep.vblend_clips import VideoBlendClips, blend_count
from tests.test_infer_video import write_video
from tests.test_video_blending import face_landmarks

VBLEND = yaml.safe_load(Path("configs/members/sta.yaml").read_text())["vblend"]


def clip_cfg(tmp_path, **clip) -> dict:
    return {
        "name": "clipper",
        "clip": {"frames": 4, "still": "clip", **clip},
        "vblend": VBLEND,
        "recipe": {"name": "clips"},
        "prep": {"out": str(tmp_path / "prepared")},
    }


def video_rows(tmp_path, n_real: int = 3, n_fake: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_real + n_fake):
        base = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
        path = write_video(tmp_path / f"v{i}.avi", [np.roll(base, t, axis=1) for t in range(10)])
        rows.append({"path": str(path), "target": int(i >= n_real)})
    return pd.DataFrame(rows)


@pytest.fixture
def fake_detector(monkeypatch):
    """dlib replaced by a face laid out in the middle of every frame; counts its calls."""
    calls = []

    def detect(self, frame):
        calls.append(frame.shape)
        h, w = frame.shape[:2]
        return face_landmarks(w / 2, h / 2).astype(np.float32)

    monkeypatch.setattr(ClipLandmarks, "_detect", detect)
    return calls


def test_training_batches_hold_video_blends_equal_to_their_real_clip_outside_the_mask(tmp_path, fake_detector):
    table = video_rows(tmp_path)
    data = models.build_train_data(clip_cfg(tmp_path), table, None, seed=7)
    ds = data.dataset
    assert isinstance(ds, VideoBlendClips) and len(ds) == len(table) + 1  # share 0.5 of one fake: one blend
    sampler = GlobalBatchSampler(len(ds), 5, DistInfo(), seed=7)
    for epoch in range(3):
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        (batch,) = list(make_loader(ds, 5, 0, batch_sampler=sampler, collate=data.collate))
        assert not batch["errors"]
        blends = [k for k, i in enumerate(batch["index"].tolist()) if i >= len(table)]
        assert len(blends) == 1
        k = blends[0]
        index = int(batch["index"][k])
        assert batch["target"][k] == 1
        real, fake, weights = ds.blend(index)
        image = batch["image"][k].permute(0, 2, 3, 1).numpy()  # (T, H, W, 3) uint8: no transform here
        assert np.array_equal(image, np.stack(fake))
        for r, f, w in zip(real, image, weights, strict=True):
            assert np.array_equal(f[w == 0], r[w == 0])  # the real clip outside the mask
            assert (w > 0).any() and not np.array_equal(f[w > 0], r[w > 0])  # and blended inside
        assert ds.source(index) == epoch % 3  # the epochs cycle through the real videos
    # the table's own clips come through unchanged
    assert torch.equal(ds[0]["image"], ds.base[0]["image"])


def test_landmarks_are_searched_once_per_frame_then_cached(tmp_path, fake_detector):
    table = video_rows(tmp_path)
    ds = models.build_train_data(clip_cfg(tmp_path), table, None, seed=7).dataset
    ds.blend(len(table))
    searched = len(fake_detector)
    assert searched == 4  # the clip's frames
    ds.blend(len(table))
    assert len(fake_detector) == searched  # the same frames: all from the cache
    assert len(list((tmp_path / "prepared" / "clip_landmarks").glob("*.npy"))) == 4


def test_dlib_finds_the_landmarks_of_a_real_face():
    face = skdata.astronaut()[:256, 96:352]
    found = ClipLandmarks(None)([face, np.zeros_like(face)])
    assert found[0].shape == (68, 2) and found[1] is None
    assert [p is found[0] for p in fill_missing(found)] == [True, True]
    assert fill_missing([None, None]) is None


def test_blend_count_meets_the_share_of_fake_clips():
    assert blend_count(0.5, 10, 4) == 10 and blend_count(0.25, 9, 4) == 3
    assert blend_count(0.5, 0, 4) == 4  # no fakes: one blend per real video
    assert blend_count(0.0, 10, 4) == 0 and blend_count(0.5, 10, 0) == 0


def test_a_member_without_vblend_gets_its_table_alone(tmp_path):
    cfg = clip_cfg(tmp_path)
    del cfg["vblend"]
    table = video_rows(tmp_path)
    assert len(models.build_train_data(cfg, table, None, seed=0).dataset) == len(table)


def write_videos(p: dict) -> None:
    """Four labelled videos beside the tiny project's images, named in its data config."""
    root = p["root"] / "videos"
    root.mkdir()
    rows = []
    for i in range(4):
        frames = [np.full((32, 32, 3), 40 * i + t, np.uint8) for t in range(6)]
        write_video(root / f"v{i}.avi", frames)
        rows.append({"img_name": f"v{i}.avi", "target": i % 2})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    data_cfg = yaml.safe_load(p["data_cfg"].read_text())
    data_cfg["data"].update(video_labels=str(root / "labels.csv"), video_root=str(root))
    p["data_cfg"].write_text(yaml.safe_dump(data_cfg))


def test_every_config_check_runs_before_a_network_is_built(tiny_project, monkeypatch, capsys):
    """The shipped sta.yaml's clip settings with `still: single` on a table of videos and stills: one
    line, before the network (ViT-L/14 with sta.yaml) is built or its weights fetched; the shipped
    `still: clip` passes every check and reaches the network."""
    import cv_split

    p = tiny_project
    write_videos(p)
    cfg = yaml.safe_load(Path("configs/members/sta.yaml").read_text())
    cfg["train"].update(num_workers=0, progress=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the network is built")

    monkeypatch.setattr(models, "build_model", no_network)
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    member = p["root"] / "sta.yaml"
    args = ["--config", str(member), "--data-config", str(p["data_cfg"]), "--fold", "0"]

    member.write_text(yaml.safe_dump({**cfg, "clip": {**cfg["clip"], "still": "single"}}))
    assert train.main(args) != 0
    assert "mixes videos and still images, but clip.still is 'single'" in capsys.readouterr().err

    member.write_text(yaml.safe_dump({**cfg, "vblend": {**cfg["vblend"], "share": 1.5}}))
    assert train.main(args) != 0
    assert "vblend.share must lie in [0, 1)" in capsys.readouterr().err

    member.write_text(yaml.safe_dump(cfg))  # as shipped
    with pytest.raises(AssertionError, match="the network is built"):
        train.main(args)
