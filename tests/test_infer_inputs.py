"""infer.py's inputs: every decodable file in a folder, and --weights in any order."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import infer
import models
from core.checkpoint import save_weights

CFG = {"name": "tiny", "model": {"name": "mff_expert", "backbone": "test_resnet"}, "data": {"image_size": 32}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folders = []
    for k in range(2):
        folder = tmp_path_factory.mktemp(f"fold{k}")
        model = models.build_model(CFG["model"])
        save_weights(model.state_dict(), folder / "model.safetensors")
        (folder / "meta.json").write_text(json.dumps({"complete": True, "config": CFG}))
        folders.append(folder / "model.safetensors")
    return folders


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "inbox"
    (root / "sub").mkdir(parents=True)
    pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "a.png")
    Image.fromarray(pixels).convert("P").save(root / "sub" / "b.gif")
    Image.fromarray(pixels).save(root / "no_extension", format="PNG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / "labels.csv").write_text("img_name,target\n")
    (root / "sub" / "readme.txt").write_text("still not an image")
    return root


def test_folder_scan_keeps_every_decodable_file_and_counts_the_rest(folder, capsys):
    found = infer.expand_inputs([str(folder)], report=pytest.fail)
    assert [p.relative_to(folder).as_posix() for p in found] == ["a.png", "broken.jpg", "no_extension", "sub/b.gif"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ignored 3 file(s) that are not images or videos: .csv 1, .txt 2"]


def test_gif_in_a_folder_is_scored_like_the_gif_named_directly(folder, weights, capsys):
    assert infer.main([str(folder / "sub" / "b.gif"), "--weights", str(weights[0])]) == 0
    direct = capsys.readouterr().out.split("\t")[0]
    assert infer.main(["--weights", str(weights[0]), str(folder)]) == 1  # broken.jpg is skipped
    out, err = capsys.readouterr()
    scored = dict(line.split("\t")[::-1] for line in out.strip().splitlines())
    assert scored[str(folder / "sub" / "b.gif")] == direct
    assert set(scored) == {str(folder / n) for n in ("a.png", "no_extension", "sub/b.gif")}
    assert f"skipped: {folder / 'broken.jpg'}" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--weights", "W0", "face.jpg"],
        ["face.jpg", "--weights", "W0"],
        ["--weights", "W0", "--weights", "W1", "face.jpg", "other.png"],
    ],
)
def test_weights_do_not_eat_the_inputs(argv):
    args = infer.parse_args(argv)
    assert args.inputs == [a for a in argv if "." in a]
    assert args.weights == [a for a in argv if a.startswith("W")]


def test_two_weights_files_before_the_image_are_both_used(folder, weights, capsys):
    image = str(folder / "a.png")
    assert infer.main(["--weights", str(weights[0]), "--weights", str(weights[1]), image, "--runtime", "torch"]) == 0
    both = float(capsys.readouterr().out.split("\t")[0])
    singles = []
    for w in weights:
        assert infer.main(["--weights", str(w), image, "--runtime", "torch"]) == 0
        singles.append(float(capsys.readouterr().out.split("\t")[0]))
    assert both == pytest.approx(np.mean(singles), abs=1e-4)
