"""infer.py with a member whose network takes clips: it scores a video as the clip its validation
read, a still as its clip setting says, and the blend takes it with the image members."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from skimage import data as skdata

import infer
import models
from core.checkpoint import save_weights
from core.data.clips import eval_dataset
from core.data.transforms import build_transform
from tests.test_infer_video import CFG as IMAGE_CFG
from tests.test_infer_video import write_video


def save_member(folder, cfg: dict) -> torch.nn.Module:
    folder.mkdir(parents=True)
    model = models.build_model(cfg["model"]).eval()
    save_weights(model.state_dict(), folder / "model.safetensors")
    (folder / "meta.json").write_text(json.dumps({"complete": True, "config": cfg}))
    return model


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """An image member and sta_demo's clip member (random weights), each one fold."""
    root = tmp_path_factory.mktemp("members")
    with open("configs/members/sta_demo.yaml") as fh:
        clip_cfg = yaml.safe_load(fh)
    clip_cfg["prep"] = {"out": str(root / "prepared")}
    torch.manual_seed(0)
    clip_model = save_member(root / "clip", clip_cfg)
    with torch.no_grad():  # the zero-initialised adapters and head would give every clip 0.5
        for p in clip_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_weights(clip_model.state_dict(), root / "clip" / "model.safetensors")
    image_model = save_member(root / "image", IMAGE_CFG)
    return {"root": root, "clip_cfg": clip_cfg, "clip_model": clip_model, "image_model": image_model}


def frames(n: int) -> list[np.ndarray]:
    face = skdata.astronaut()[:256, 96:352]
    return [np.ascontiguousarray(np.roll(face, 3 * i, axis=1)) for i in range(n)]


def expected(members, path) -> float:
    cfg = members["clip_cfg"]
    item = eval_dataset(cfg, [str(path)], None, build_transform(cfg["data"], train=False))[0]
    with torch.no_grad():
        logits = members["clip_model"](item["image"])["logits"]  # every clip of the input
    return torch.softmax(logits.double(), dim=1)[:, 1].mean().item()


def weights_args(members) -> list[str]:
    root = members["root"]
    return [
        "--weights",
        str(root / "clip" / "model.safetensors"),
        "--weights",
        str(root / "image" / "model.safetensors"),
    ]


def run_json(members, *inputs, capsys) -> dict[str, dict]:
    infer.main([*map(str, inputs), "--json", *weights_args(members)])
    return {o["path"]: o for o in map(json.loads, capsys.readouterr().out.splitlines())}


def test_a_clip_member_scores_a_video_as_its_clip_and_joins_the_blend(members, tmp_path, capsys):
    video = write_video(tmp_path / "v.avi", frames(12))
    out = run_json(members, video, capsys=capsys)[str(video)]
    clip_p = out["members"]["sta_demo"]
    assert clip_p == pytest.approx(expected(members, video), abs=1e-5)
    assert clip_p != pytest.approx(0.5, abs=1e-4)  # the clip network really ran
    # the image member scores the video's face crops; the plain mean blends both
    assert out["probability"] == pytest.approx((clip_p + out["members"]["tiny"]) / 2, abs=1e-6)


def test_a_clip_member_scores_a_still_as_its_clip_setting_says(members, tmp_path, capsys):
    still = tmp_path / "s.png"
    from PIL import Image

    Image.fromarray(frames(1)[0]).save(still)
    out = run_json(members, still, capsys=capsys)[str(still)]
    assert out["members"]["sta_demo"] == pytest.approx(expected(members, still), abs=1e-5)
    assert np.isfinite(out["members"]["tiny"])


def test_an_unreadable_video_is_reported_once_and_skipped(members, tmp_path, capsys):
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video at all")
    code = infer.main([str(bad), *weights_args(members)])
    err = capsys.readouterr().err
    assert code != 0 and err.count("bad.avi: cannot open as a video") == 1


def test_per_frame_writes_each_sampled_frame_of_the_image_members(members, tmp_path, capsys):
    video = write_video(tmp_path / "v.avi", frames(12))
    out_csv = tmp_path / "frames.csv"
    infer.main([str(video), "--json", "--frames", "4", "--per-frame", str(out_csv), *weights_args(members)])
    scored = json.loads(capsys.readouterr().out.splitlines()[0])
    rows = pd.read_csv(out_csv)
    assert list(rows.columns) == ["path", "frame", "member", "probability"]
    assert set(rows["member"]) == {"tiny"}  # the clip member scores the clip, not frames
    assert rows["frame"].tolist() == [0, 4, 7, 11]  # evenly spaced over the 12 frames
    # the video's image-member score is the mean of its frames' scores
    assert rows["probability"].mean() == pytest.approx(scored["members"]["tiny"], abs=1e-6)


def test_a_clip_members_folds_read_each_video_once(members, tmp_path, capsys, monkeypatch):
    import shutil

    import core.clip_reading

    second = tmp_path / "fold1"
    shutil.copytree(members["root"] / "clip", second)  # another fold of the same member
    reads = []
    real_read = core.clip_reading.read_window
    monkeypatch.setattr(
        core.clip_reading, "read_window", lambda path, window: reads.append(path) or real_read(path, window)
    )
    video = write_video(tmp_path / "v.avi", frames(12))
    infer.main([str(video), "--json", *weights_args(members), "--weights", str(second / "model.safetensors")])
    out = json.loads(capsys.readouterr().out.splitlines()[0])
    assert len(reads) == 1
    assert out["members"]["sta_demo"] == pytest.approx(expected(members, video), abs=1e-5)  # both folds alike


def listed_scores(cfg: dict, model: torch.nn.Module, paths: list) -> np.ndarray:
    """A member's scores of `paths` as train.py writes its test.csv: the whole list in one dataset, batched."""
    from core.data.datasets import make_loader
    from core.train.prediction import predict_loader

    dataset = eval_dataset(cfg, [str(p) for p in paths], None, build_transform(cfg["data"], train=False))
    loader = make_loader(dataset, 3, 0)
    return predict_loader([model], loader, torch.device("cpu"), amp=False, progress=False)[:, 0]


def test_infer_equals_the_listed_test_scores_for_every_member_on_every_image(members, tmp_path, capsys):
    """infer.py scores each input alone; train.py scores the test list in batches. Every member's
    probability agrees on every image, wherever the image sits in the list (a still's clip is a
    function of its pixels), so the blend of the submission row is infer.py's."""
    from PIL import Image

    face = skdata.astronaut()
    stills = []
    for i in range(5):
        stills.append(tmp_path / f"{i:05d}.png")
        Image.fromarray(np.ascontiguousarray(face[16 * i : 16 * i + 256, 80 + 8 * i : 336 + 8 * i])).save(stills[-1])
    video = write_video(tmp_path / "v.avi", frames(20))
    out = run_json(members, *stills, video, capsys=capsys)
    clip = listed_scores(members["clip_cfg"], members["clip_model"], [*stills, video])
    image = listed_scores(IMAGE_CFG, members["image_model"], stills)
    for k, path in enumerate(stills):
        assert out[str(path)]["members"]["sta_demo"] == pytest.approx(clip[k], abs=1e-4), path
        assert out[str(path)]["members"]["tiny"] == pytest.approx(image[k], abs=1e-4), path
    assert out[str(video)]["members"]["sta_demo"] == pytest.approx(clip[-1], abs=1e-4)
    assert len({round(float(p), 6) for p in clip}) == len(clip)  # the clips really differ from image to image


def test_a_clip_network_exports_with_a_free_clip_length(members):
    from core.infer.onnx_cache import VERIFIED, OrtNetwork, lookup
    from models.onnx_export import onnx_network

    cfg, model = members["clip_cfg"], members["clip_model"].eval()
    size, frames = cfg["data"]["image_size"], cfg["clip"]["frames"]
    weights = members["root"] / "clip" / "model.safetensors"
    network = onnx_network(model, size, weights, frames=frames)
    assert isinstance(network, OrtNetwork) and lookup(weights, size).state == VERIFIED  # checked once, cached
    for shape in ((2, frames, 3, size, size), (1, 2, 3, size, size), (3, 1, 3, size, size)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected_logits = model(x)["logits"].numpy()
        assert network(x.numpy())["logits"] == pytest.approx(expected_logits, abs=1e-4), shape


def test_scoring_stills_and_videos_with_a_clip_member_imports_no_torch(members, tmp_path):
    from PIL import Image

    from tests.test_infer_fast import probe

    still = tmp_path / "s.png"
    Image.fromarray(frames(1)[0]).save(still)
    video = write_video(tmp_path / "v.avi", frames(12))
    args = [str(still), str(video), "--json", *weights_args(members), "--device", "cpu"]
    assert infer.main(args) == 0  # exports what is not exported yet
    out, err, result = probe(args)
    assert result == {"rc": 0, "imported": []}, err
    scored = [json.loads(line) for line in out.splitlines()]
    assert all(np.isfinite(o["members"]["sta_demo"]) for o in scored)


def test_the_torch_runtime_scores_clip_members_as_onnx_does(members, tmp_path, capsys):
    video = write_video(tmp_path / "v.avi", frames(12))
    onnx = run_json(members, video, capsys=capsys)[str(video)]["members"]["sta_demo"]
    infer.main([str(video), "--json", "--runtime", "torch", *weights_args(members)])
    torch_p = json.loads(capsys.readouterr().out.splitlines()[0])["members"]["sta_demo"]
    assert torch_p == pytest.approx(onnx, abs=1e-4) and torch_p == pytest.approx(expected(members, video), abs=1e-5)
