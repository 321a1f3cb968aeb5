"""`python infer.py image.jpg` on a CPU whose networks have verified exports imports neither
torch nor timm; a failed export is reported in one line and not tried again; --json prints one
object per input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import infer
import models
from core.checkpoint import save_weights
from core.infer.onnx_cache import tag_path
from models import onnx_export

SIZE = 32
# Runs infer.main in a fresh interpreter and says, on the last line of stderr, which heavy
# modules it imported.
PROBE = (
    "import json, sys, infer; rc = infer.main(sys.argv[1:]); "
    "print(json.dumps({'rc': rc, 'imported': [m for m in ('torch', 'timm', 'albumentations', 'pandas') "
    "if m in sys.modules]}), file=sys.stderr)"
)


def member_fold(root: Path, member: str, backbone: str = "test_resnet") -> Path:
    cfg = {"name": member, "model": {"name": "mff_expert", "backbone": backbone}, "data": {"image_size": SIZE}}
    folder = root / member / "fold0"
    weights = save_weights(models.build_model(cfg["model"]).state_dict(), folder / "model.safetensors")
    (folder / "meta.json").write_text(json.dumps({"complete": True, "config": cfg}))
    return weights


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Two members, each exported once (by a first infer.py run), and an image."""
    root = tmp_path_factory.mktemp("fast")
    weights = [member_fold(root, "alpha"), member_fold(root, "beta")]
    image = root / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(image)
    args = [str(image), *[a for w in weights for a in ("--weights", str(w))], "--device", "cpu"]
    assert infer.main(args) == 0
    return {"weights": weights, "image": image, "args": args}


def probe(args: list[str]) -> tuple[str, list[str], dict]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    return proc.stdout, lines[:-1], json.loads(lines[-1])


def test_scoring_with_verified_exports_imports_no_torch(exported):
    out, err, result = probe(exported["args"])
    assert result == {"rc": 0, "imported": []}
    assert err == []
    prob, path = out.strip().split("\t")
    assert 0.0 <= float(prob) <= 1.0 and path == str(exported["image"])


def test_help_imports_no_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, infer\ntry:\n infer.main(['--help'])\nexcept SystemExit:\n pass\n"
         "print(sorted(m for m in ('torch', 'timm', 'onnxruntime') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "--json" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"


def test_fast_path_scores_as_the_torch_runtime(exported, capsys):
    assert infer.main([*exported["args"], "--runtime", "torch"]) == 0
    torch_score = float(capsys.readouterr().out.split("\t")[0])
    out, _, _ = probe(exported["args"])
    assert float(out.split("\t")[0]) == pytest.approx(torch_score, abs=1e-4)


def test_a_failed_export_is_one_line_per_network_and_not_retried(tmp_path, monkeypatch, capsys):
    weights = member_fold(tmp_path, "alpha")
    image = tmp_path / "face.png"
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(image)
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("Constraints violated (batch)!\n" + "detail\n" * 300)

    monkeypatch.setattr(onnx_export, "export_onnx", fail)
    args = [str(image), "--weights", str(weights), "--device", "cpu"]
    assert infer.main(args) == 0
    assert json.loads(tag_path(weights).read_text())["verdict"] == "failed"
    first = capsys.readouterr().err.strip().splitlines()
    assert len(first) == 2 and "exporting to ONNX" in first[0] and "no ONNX export" in first[1]
    assert infer.main(args) == 0
    again = capsys.readouterr().err.strip().splitlines()
    assert len(calls) == 1
    assert (
        again == [again[0]] and "Constraints violated (batch)!, recorded in its tag); scoring with PyTorch" in again[0]
    )


def test_json_lines_one_object_per_input(exported, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    missing = tmp_path / "missing.png"
    args = [str(exported["image"]), str(broken), str(missing), "--json"]
    args += [a for w in exported["weights"] for a in ("--weights", str(w))]
    assert infer.main(args) == 1
    rows = {r["path"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert set(rows) == {str(exported["image"]), str(broken), str(missing)}
    good = rows[str(exported["image"])]
    assert set(good["members"]) == {"alpha", "beta"} and good["skipped"] is None
    assert good["probability"] == pytest.approx(np.mean(list(good["members"].values())))
    assert rows[str(broken)]["probability"] is None and rows[str(broken)]["skipped"].startswith("not an image")
    assert rows[str(missing)] == {
        "path": str(missing),
        "probability": None,
        "members": {},
        "skipped": "no such file or folder",
    }
