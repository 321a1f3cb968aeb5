"""A trained fold travels: trained from local pretrained files, it is scored, exported, explained,
asked for attributes and served on a machine where those files are gone. Every part a member
builds (backbone, CLIP towers, whatever a config names) is rebuilt without its pretrained source,
since the fold's own safetensors hold every tensor."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import timm
import yaml
from starlette.testclient import TestClient

import cv_split
import infer
import models
import train
from core.checkpoint import save_weights
from tests.test_clip_towers import openai_archive, reference

CLIP_CFG = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
    "text_cfg": {"context_length": 24, "width": 16, "heads": 2, "layers": 1},
}
DEMO_CONFIGS = sorted(Path("configs/members").glob("*_demo.yaml"))


def member(base: str, name: str, **model) -> dict:
    cfg = yaml.safe_load(Path(base).read_text())
    cfg["name"] = name
    cfg["model"].update(model)
    cfg["data"]["image_size"] = 32
    cfg["train"].update(epochs=1, batch_size=4, num_workers=0, warmup_steps=1, progress=False, ema_bn="average")
    return cfg


def trained_fold(p: dict, cfg: dict) -> Path:
    path = p["root"] / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["--config", str(path), "--data-config", str(p["data_cfg"]), "--fold", "0"]
    assert train.main(args) == 0
    return p["outputs"] / cfg["name"] / "fold0" / "model.safetensors"


def infer_json(args: list[str]) -> list[dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert infer.main([*args, "--json"]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.slow
def test_folds_trained_from_local_files_are_scored_after_the_files_are_deleted(tiny_project, monkeypatch, tmp_path):
    p = tiny_project
    starts = tmp_path / "pretrained"
    resnet = timm.create_model("test_resnet.r160_in1k", num_classes=0)
    cnn_file = save_weights(resnet.state_dict(), starts / "test_resnet.safetensors")
    clip_file = starts / "ViT-B-32.pt"
    openai_archive(reference(cfg=CLIP_CFG), clip_file)
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    cnn = trained_fold(p, member("configs/members/mff_demo.yaml", "cnn", weights=str(cnn_file)))
    sjedd_cfg = member("configs/members/sjedd_demo.yaml", "sj", model_cfg=CLIP_CFG, pretrained=str(clip_file))
    sjedd_cfg["provenance"]["methods"]["patch"] = ["physical", "skin"]  # conftest's fakes
    sjedd_cfg["train"].pop("ema_bn_batches", None)
    sj = trained_fold(p, sjedd_cfg)
    recorded = json.loads((cnn.parent / "meta.json").read_text())["pretrained"]
    assert [(s["stage"], s["origin"], s["location"]) for s in recorded] == [("model", "file", str(cnn_file))]
    (clip_source,) = json.loads((sj.parent / "meta.json").read_text())["pretrained"]
    assert clip_source["sha256"] == hashlib.sha256(clip_file.read_bytes()).hexdigest()
    assert clip_source["layout"] == "OpenAI's TorchScript archive"

    shutil.rmtree(starts)
    image = str(Path(p["test_root"]) / "t_000.png")
    weights = ["--weights", str(cnn), "--weights", str(sj)]
    (scored,) = infer_json([image, *weights])  # the CPU path: both exported to ONNX first
    assert set(scored["members"]) == {"cnn", "sj"} and 0 <= scored["probability"] <= 1
    (explained,) = infer_json([image, *weights, "--attributes", "--runtime", "torch"])
    assert explained["probability"] == pytest.approx(scored["probability"], abs=1e-5)
    assert set(explained["attributes"]) == {"sj"}
    assert infer.main([image, "--weights", str(cnn), "--explain", str(tmp_path / "cams")]) == 0
    assert {f.name for f in (tmp_path / "cams").iterdir()} == {"t_000__cnn.png", "t_000__blend.png"}

    served = {}

    def serve_once(model, host, port, max_upload_mb, batch_window_ms) -> int:
        from core.infer.service import build_app

        with TestClient(build_app(model, 2**20, 0.001)) as client:
            response = client.post("/predict", files={"file": ("t_000.png", Path(image).read_bytes())})
        served.update(response.json())
        return 0 if response.status_code == 200 else 1

    monkeypatch.setattr("core.infer.service.run_server", serve_once)
    assert infer.main(["--serve", *weights]) == 0
    assert served["probability"] == pytest.approx(scored["probability"], abs=1e-5)


@pytest.mark.parametrize("path", DEMO_CONFIGS, ids=lambda p: p.stem)
def test_rebuilding_for_a_checkpoint_reads_no_pretrained_source(path, tmp_path):
    """Every member, its model config pointing at pretrained files that are not there (a local
    file, the hub): rebuilt for a checkpoint, it reads none of them."""
    model = dict(yaml.safe_load(path.read_text())["model"])
    absent = str(tmp_path / "gone" / "weights.pth")
    model.update({k: absent for k in ("weights",) if k in model})
    model["pretrained"] = absent if "model_cfg" in model else True
    with pytest.raises(ValueError, match="no such weights file"):
        models.build_model(model)  # as training builds it: the file is asked for
    net = models.build_model(model, pretrained=False)
    assert sum(p.numel() for p in net.parameters()) > 0
