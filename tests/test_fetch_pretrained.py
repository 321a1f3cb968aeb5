"""`python -m models.fetch_pretrained`, with the hub replaced by local files: every pretrained part
of the configured members downloaded once into one folder and checked against the hub's digest,
overrides that point each member (and the split encoder) at the files and that train.py's config
loader accepts, a rerun that needs no hub, and `--check` naming each member's present and missing
parts on one line without downloading."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import yaml

import models
from core.checkpoint import save_weights
from core.config import load_config
from models.fetch_pretrained import Hub, Remote, main


class LocalHub(Hub):
    """The hub as local files: each repository (or URL) serves one file; it counts downloads and
    can lie about a digest."""

    def __init__(self, files: dict[str, Path], wrong_digest: bool = False):
        self.files, self.wrong_digest, self.downloads = files, wrong_digest, []

    def resolve(self, remote: Remote) -> Remote:
        source = self.files[remote.url or remote.repo]
        digest = "0" * 64 if self.wrong_digest else hashlib.sha256(source.read_bytes()).hexdigest()
        return replace(remote, files=(remote.files[0],), revision="f00d" * 10, sha256=digest)

    def download(self, remote: Remote, folder: Path) -> Path:
        self.downloads.append(remote.url or remote.repo)
        folder.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.files[remote.url or remote.repo], folder / remote.files[0]))

    def cached(self, remote: Remote) -> Path | None:
        return None


class NoHub(LocalHub):
    def __init__(self):
        super().__init__({})

    def resolve(self, remote: Remote) -> Remote:
        raise AssertionError(f"the hub was asked for {remote}")


@pytest.fixture
def project(tmp_path: Path) -> dict:
    """Three members and a data config: a CNN member with two experts and a synthesizer-like second
    network of the same backbone, a CLIP member, a member whose part is a local file plus a
    face-recognition file that is missing; the split encoder an open_clip tag."""
    members = tmp_path / "members"
    members.mkdir()
    experts = [{"backbone": "test_resnet.r160_in1k"}, {"backbone": "test_resnet.r160_in1k"}]
    cnn = {
        "name": "cnn",
        "experts": experts,
        "model": {"name": "mff_expert", "backbone": "test_resnet.r160_in1k", "pretrained": True, "weights": None},
        "synthesizer": {"backbone": "test_resnet.r160_in1k", "pretrained": True, "weights": None},
    }
    clip = {"name": "clip", "model": {"name": "sjedd", "clip": "ViT-B-32", "pretrained": "openai", "quick_gelu": True}}
    local_file = save_weights(timm.create_model("test_resnet", num_classes=0).state_dict(), tmp_path / "mine.st")
    local = {
        "name": "local",
        "model": {"name": "sbi_fed", "backbone": "test_resnet", "pretrained": True, "weights": str(local_file)},
        "loss": {"embedder": {"kind": "torch", "file": str(tmp_path / "arcface.pt2")}},
    }
    for cfg in (cnn, clip, local):
        (members / f"{cfg['name']}.yaml").write_text(yaml.safe_dump(cfg))
    data = {"split": {"encoder": {"kind": "open_clip", "name": "ViT-L-14", "pretrained": "openai"}}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    served = tmp_path / "served"
    served.mkdir()
    resnet = save_weights(timm.create_model("test_resnet.r160_in1k").state_dict(), served / "resnet.safetensors")
    (served / "b32.safetensors").write_bytes(b"clip b32 weights")
    (served / "l14.safetensors").write_bytes(b"clip l14 weights")
    files = {
        "timm/test_resnet.r160_in1k": resnet,
        "timm/vit_base_patch32_clip_224.openai": served / "b32.safetensors",
        "timm/vit_large_patch14_clip_224.openai": served / "l14.safetensors",
    }
    common = [
        "--config-dir",
        str(members),
        "--data-config",
        str(tmp_path / "data.yaml"),
        "--out",
        str(tmp_path / "out"),
    ]
    return {"root": tmp_path, "members": members, "files": files, "args": common}


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_fetch_downloads_each_part_once_and_writes_overrides_the_configs_take(project, capsys):
    hub = LocalHub(project["files"])
    assert main([*project["args"], "--members", "cnn,clip"], hub) == 0
    assert sorted(hub.downloads) == sorted(project["files"])  # the shared backbone fetched once
    out = project["root"] / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    resnet = manifest["timm:test_resnet.r160_in1k"]
    assert resnet["file"] == "timm/test_resnet.r160_in1k/model.safetensors"
    assert resnet["sha256"] == hashlib.sha256(project["files"]["timm/test_resnet.r160_in1k"].read_bytes()).hexdigest()
    assert manifest["open_clip:ViT-B-32:openai"]["source"].startswith("timm/vit_base_patch32_clip_224.openai/")

    cnn = load_config([project["members"] / "cnn.yaml"], lines_of(out / "overrides" / "cnn.txt"))
    fetched = str((out / resnet["file"]).resolve())
    assert [e["weights"] for e in cnn["experts"]] == [fetched, fetched]
    assert cnn["synthesizer"]["weights"] == fetched
    expert = {**cnn["model"], **cnn["experts"][1]}
    net = models.build_model(expert)  # from the fetched file, no hub
    assert net.backbone.conv1[0].weight.shape[0] > 0
    clip = load_config([project["members"] / "clip.yaml"], lines_of(out / "overrides" / "clip.txt"))
    assert clip["model"]["pretrained"].endswith("open_clip/ViT-B-32-openai/open_clip_model.safetensors")
    data = load_config([project["root"] / "data.yaml"], lines_of(out / "overrides" / "data.txt"))
    assert data["split"]["encoder"]["pretrained"].endswith("open_clip/ViT-L-14-openai/open_clip_model.safetensors")
    assert data["split"]["encoder"]["quick_gelu"] is True  # the openai tag's QuickGELU, which a file cannot say
    printed = capsys.readouterr().out
    assert "bash run_all.sh --pretrained" in printed

    again = NoHub()  # present with their recorded digests: no hub asked, overrides written again
    assert main([*project["args"], "--members", "cnn,clip"], again) == 0
    assert again.downloads == []


def test_a_digest_the_hub_does_not_confirm_removes_the_file(project, capsys):
    assert main([*project["args"], "--members", "cnn"], LocalHub(project["files"], wrong_digest=True)) == 1
    err = capsys.readouterr().err
    assert "is not the hub's 0000" in err and "removed" in err
    assert not (project["root"] / "out" / "timm" / "test_resnet.r160_in1k" / "model.safetensors").exists()


def test_check_says_per_member_what_is_present_and_missing_without_downloading(project, capsys):
    def checked(members: str, hub: Hub) -> tuple[int, dict[str, str]]:
        code = main([*project["args"], "--members", members, "--check"], hub)
        lines = capsys.readouterr().out.splitlines()
        return code, {line.split(":", 1)[0]: line for line in lines}

    code, lines = checked("cnn,clip,local", NoHub())
    hint = lines.pop("fetch the hub parts on a connected machine")
    assert code == 1 and set(lines) == {"cnn", "clip", "local", "data"}  # one line each
    assert hint.endswith(f"python -m models.fetch_pretrained --out {project['root'] / 'out'}")
    assert "present: none" in lines["cnn"] and "experts.1 (timm test_resnet.r160_in1k)" in lines["cnn"]
    assert "synthesizer (timm test_resnet.r160_in1k)" in lines["cnn"]
    assert "missing: none" not in lines["clip"] and "model (open_clip ViT-B-32 openai)" in lines["clip"]
    present, missing = lines["local"].split(" | ")
    assert "model (timm test_resnet) at" in present and "arcface.pt2" in missing

    assert main([*project["args"], "--members", "cnn,clip"], LocalHub(project["files"])) == 0
    capsys.readouterr()
    code, lines = checked("cnn,clip", NoHub())
    assert code == 0 and all(line.endswith("missing: none") for line in lines.values())

    class CachedHub(NoHub):
        def cached(self, remote: Remote) -> Path | None:
            return Path("/hub/cache") / remote.files[0]

    shutil.rmtree(project["root"] / "out")
    code, lines = checked("cnn", CachedHub())
    assert code == 0 and "at hub cache /hub/cache/model.safetensors" in lines["cnn"]


def test_demo_members_have_nothing_to_fetch(capsys, tmp_path):
    assert main(["--demo", "--check", "--out", str(tmp_path / "none")], NoHub()) == 0  # dlib's file: a package
    lines = capsys.readouterr().out.splitlines()
    demo = yaml.safe_load(Path("configs/ensemble.yaml").read_text())["demo_members"]
    for member in ("mff_demo", "sladd_demo", "sjedd_demo", "sta_demo"):
        assert f"{member}: nothing pretrained (every part starts from random weights)" in lines
    assert {line.split(":", 1)[0] for line in lines} == {*demo, "data"}


def test_an_unknown_member_is_one_line(project, capsys):
    assert main([*project["args"], "--members", "nosuch"], NoHub()) == 2
    assert capsys.readouterr().err.strip().endswith("nosuch.yaml: no such config file")
