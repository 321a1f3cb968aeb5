"""CLIP weights in every format the CLIP-based members' users download, each built here as a tiny
file of that format: OpenAI's TorchScript archives (what SJEDD's and StA's `clip.load` fetch),
open_clip state dicts (files and hub folders), transformers' CLIPModel, and an open_clip tag from
the local hub cache. Each must give the same embeddings as the network it was saved from."""

from __future__ import annotations

import copy
import pickle
import zipfile

import open_clip
import pytest
import torch
from open_clip.model import CLIP

import models
from core.checkpoint import CheckpointError, save_weights
from models.clip_towers import build_clip, build_visual
from models.provenance import recording

TINY = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 2, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 16, "heads": 2, "layers": 2},
}
IMAGES = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
# Token rows whose end-of-text token (the largest id, where CLIP pools) sits at different places.
TOKENS = torch.tensor([[1, 5, 9, 63, 0, 0, 0, 0, 0, 0, 0, 0], [2, 7, 7, 7, 7, 3, 63, 0, 0, 0, 0, 0]])


def reference(seed: int = 0, cfg: dict = TINY) -> CLIP:
    """The tiny CLIP with every tensor random (layer norms and the temperature included)."""
    torch.manual_seed(seed)
    model = CLIP(**cfg, quick_gelu=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name == "logit_scale":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def embeddings(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(IMAGES), model.encode_text(TOKENS)


def assert_same(model: torch.nn.Module, expected: torch.nn.Module, tol: float = 1e-5) -> None:
    for got, want in zip(embeddings(model.eval()), embeddings(expected), strict=True):
        assert (got - want).abs().max().item() < tol


def openai_archive(model: CLIP, path) -> CLIP:
    """OpenAI's release as `clip.load` downloads it: the scripted model saved by torch.jit.save, in
    half precision, with the integer buffers input_resolution, context_length and vocab_size that
    are no weights of open_clip's. Returns the network the file holds, in float."""
    scripted = copy.deepcopy(model).half()
    for name, value in (("input_resolution", 16), ("context_length", 12), ("vocab_size", 64)):
        if hasattr(scripted, name):
            delattr(scripted, name)  # open_clip keeps two of them as plain ints
        scripted.register_buffer(name, torch.tensor(value))
    torch.jit.save(torch.jit.script(scripted), str(path))
    return copy.deepcopy(model).half().float().eval()


def test_openai_torchscript_clip_loads_for_both_clip_members(tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    held = openai_archive(reference(), path)
    sources = []
    with recording("model", sources):
        clip = build_clip(None, TINY, str(path), quick_gelu=True)
        visual = build_visual(None, TINY, str(path), quick_gelu=True)
    assert_same(clip, held)
    with torch.no_grad():
        assert torch.allclose(visual.eval()(IMAGES), held.encode_image(IMAGES), atol=1e-5)
    assert [s.layout for s in sources] == ["OpenAI's TorchScript archive"] * 2
    assert all(s.origin == "file" and s.location == str(path) and len(s.sha256) == 64 for s in sources)


def test_the_members_take_an_openai_file_as_model_pretrained(tmp_path):
    """sjedd (both towers) and sta (the image tower) built from their demo configs with an OpenAI
    file as model.pretrained hold its weights (the text tower's context fits sjedd's prompts)."""
    cfg = {**TINY, "text_cfg": {"context_length": 24, "width": 16, "heads": 2, "layers": 1}}
    path = tmp_path / "ViT-L-14.pt"
    held = openai_archive(reference(cfg=cfg), path)
    sjedd_cfg = yaml_model("configs/members/sjedd_demo.yaml") | {"model_cfg": cfg, "pretrained": str(path)}
    sjedd = models.build_model({**sjedd_cfg, "quick_gelu": True})
    assert all(torch.equal(v, held.state_dict()[k]) for k, v in sjedd.clip.state_dict().items())
    sta_cfg = yaml_model("configs/members/sta_demo.yaml") | {"model_cfg": cfg, "pretrained": str(path)}
    sta = models.build_model({**sta_cfg, "quick_gelu": True, "frames": 2})
    kept = held.visual.state_dict()  # the tower's parts outside its blocks, which sta runs with adapters
    assert all(torch.equal(v, kept[k]) for k, v in sta.visual.state_dict().items())


def yaml_model(path: str) -> dict:
    import yaml

    with open(path) as fh:
        return yaml.safe_load(fh)["model"]


def test_open_clip_state_dicts_load_from_a_file_or_a_hub_folder(tmp_path):
    held = reference(seed=1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in held.state_dict().items()}}, tmp_path / "epoch_32.pt")
    assert_same(build_clip(None, TINY, str(tmp_path / "epoch_32.pt"), quick_gelu=True), held)
    folder = tmp_path / "vit_tiny_clip.openai"
    save_weights(held.state_dict(), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text("{}")
    assert_same(build_clip(None, TINY, str(folder), quick_gelu=True), held)


def test_transformers_clip_model_converts_to_open_clip(tmp_path):
    """openai/clip-vit-* as transformers saves it (a folder with model.safetensors): its layers
    renamed, q/k/v joined, projections transposed, and the same embeddings as transformers computes."""
    from transformers import CLIPConfig, CLIPModel

    vision, text = TINY["vision_cfg"], TINY["text_cfg"]
    config = CLIPConfig(
        text_config={
            "vocab_size": text["vocab_size"],
            "hidden_size": text["width"],
            "intermediate_size": 4 * text["width"],
            "num_attention_heads": text["heads"],
            "num_hidden_layers": text["layers"],
            "max_position_embeddings": text["context_length"],
            "hidden_act": "quick_gelu",
            "eos_token_id": text["vocab_size"] - 1,
        },
        vision_config={
            "hidden_size": vision["width"],
            "intermediate_size": 4 * vision["width"],
            "num_attention_heads": vision["width"] // vision["head_width"],
            "num_hidden_layers": vision["layers"],
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "hidden_act": "quick_gelu",
        },
        projection_dim=TINY["embed_dim"],
    )
    torch.manual_seed(3)
    hf = CLIPModel(config).eval()
    hf.save_pretrained(tmp_path / "clip-vit-tiny")
    clip = build_clip(None, TINY, str(tmp_path / "clip-vit-tiny"), quick_gelu=True).eval()
    with torch.no_grad():
        want_image = hf.get_image_features(pixel_values=IMAGES)
        want_text = hf.get_text_features(input_ids=TOKENS, attention_mask=(TOKENS > 0).long())
    got_image, got_text = embeddings(clip)
    want_image = getattr(want_image, "pooler_output", want_image)
    want_text = getattr(want_text, "pooler_output", want_text)
    assert (got_image - want_image).abs().max().item() < 1e-5
    assert (got_text - want_text).abs().max().item() < 1e-5


def test_an_open_clip_tag_loads_from_the_local_hub_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from tests.test_backbones import hub_cache

    held = reference(seed=4)
    commit = hub_cache(tmp_path, "someorg/tiny-clip", "open_clip_model.safetensors", held.state_dict())
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test-clip", copy.deepcopy(TINY))
    tag = {"hf_hub": "someorg/tiny-clip/", "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-test-clip", {"tinytag": tag})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    sources = []
    with recording("model", sources):
        clip = build_clip("tiny-test-clip", None, "tinytag", quick_gelu=True)
    assert_same(clip, held)
    (source,) = sources
    assert (source.origin, source.revision) == ("hub", commit)
    assert source.location == "someorg/tiny-clip/open_clip_model.safetensors"


def test_an_open_clip_tag_the_hub_cannot_give_says_what_to_do(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(CheckpointError, match="model.pretrained=<path>.*python -m models.fetch_pretrained"):
        build_clip("ViT-B-32", None, "openai", quick_gelu=True)
    with pytest.raises(CheckpointError, match="no pretrained weights 'nosuchtag' for 'ViT-B-32'"):
        build_clip("ViT-B-32", None, "nosuchtag", quick_gelu=True)


def test_unreadable_files_are_one_line_naming_them(tmp_path):
    garbage = tmp_path / "ViT-B-32.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    missing = tmp_path / "absent" / "ViT-L-14.pt"
    other = tmp_path / "linear.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(other))
    for path, reason in ((garbage, "cannot read it"), (missing, "no such weights file"), (other, "does not fit")):
        with pytest.raises(CheckpointError) as err:
            build_clip(None, TINY, str(path), quick_gelu=True)
        message = str(err.value)
        assert message.startswith(str(path)) and reason in message and "\n" not in message


def test_a_torchscript_archive_that_asks_for_other_classes_is_refused(tmp_path):
    """The archive's pickle is read with tensors and TorchScript's own classes only: a pickle that
    names anything else (here a callable that would run on load) is refused, not called."""
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(print))
        archive.writestr("evil/code/__torch__/evil.py", "")
    with pytest.raises(CheckpointError, match="evil.pt: not a readable TorchScript archive .*needs builtins.print"):
        build_clip(None, TINY, str(path), quick_gelu=True)


def test_the_split_encoder_takes_an_openai_file(tmp_path):
    from models.encoders import build_encoder

    path = tmp_path / "ViT-L-14.pt"
    held = openai_archive(reference(), path)
    encoder = build_encoder({"kind": "open_clip", "model_cfg": TINY, "pretrained": str(path), "quick_gelu": True})
    with torch.no_grad():
        assert torch.allclose(encoder.module(IMAGES), held.encode_image(IMAGES), atol=1e-5)
