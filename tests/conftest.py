"""Shared fixtures: every test in a working folder of its own, tiny datasets made on the fly,
configs pointing at them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# What the stages write into the checkout (configs/data.yaml's demo_dir, prep.out, paths.outputs;
# the feature, face and ONNX caches live inside them) and hidden folders (git, tool caches, the
# environment): a working folder never links them.
NOT_LINKED = frozenset({"outputs", "data"})


def working_folder(where: Path) -> Path:
    """`where`, holding a link to every other top-level entry of the checkout, so relative paths
    to the project's files (configs/..., train.py) resolve while `outputs/` and `data/` are
    this folder's own, empty until a test writes them."""
    where.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name not in NOT_LINKED and not entry.name.startswith("."):
            (where / entry.name).symlink_to(entry)
    return where


@pytest.fixture(scope="session", autouse=True)
def _session_working_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Module- and session-scoped fixtures run here (before any test's own folder exists), and
    what the code keeps in the user's cache (`data_prep.faces.cache_dir`) goes to a folder of the
    session's, inherited by the commands tests run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FFDI_CACHE_DIR", str(tmp_path_factory.mktemp("user-cache")))
        yield from _inside(working_folder(tmp_path_factory.mktemp("session-cwd")))


@pytest.fixture(autouse=True)
def _test_working_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test runs in a working folder of its own: whatever the checkout's outputs/ and data/
    hold (after `bash run_all.sh`, a fitted blend, trained folds, the demo sample), no test reads
    or changes them, and no test sees another's. Not `tmp_path` itself: a test may make any name
    there, `configs` or `models` included."""
    yield from _inside(working_folder(tmp_path_factory.mktemp("cwd")))


def _inside(folder: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def make_image(rng: np.random.Generator, fake: bool, size: int = 48) -> np.ndarray:
    """A smooth random image; fakes carry a sharp bright patch, which a tiny model can learn."""
    base = rng.integers(40, 200, size=(6, 6, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((size, size), Image.BILINEAR)).copy()
    if fake:
        y, x = rng.integers(0, size // 2, size=2)
        img[y : y + size // 3, x : x + size // 3] = 255
    return img


def build_dataset(root: Path, n_parents: int = 12, n_test: int = 10, seed: int = 0) -> dict:
    """Reals with one derived fake each (same parent), a test list, answers and a manifest."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    rows = []
    for i in range(n_parents):
        real = f"real_{i:03d}.png"
        fake = f"fake_{i:03d}.png"
        Image.fromarray(make_image(rng, False)).save(root / "train" / real)
        Image.fromarray(make_image(rng, True)).save(root / "train" / fake)
        rows += [(real, 0, "real", real, ""), (fake, 1, "patch", real, "face")]
    manifest = pd.DataFrame(rows, columns=["img_name", "target", "method", "parent", "region"])
    manifest.to_csv(root / "manifest.csv", index=False)
    manifest[["img_name", "target"]].to_csv(root / "train_labels.csv", index=False)
    test = []
    for i in range(n_test):
        name = f"t_{i:03d}.png"
        Image.fromarray(make_image(rng, bool(i % 2))).save(root / "test" / name)
        test.append((name, i % 2))
    answers = pd.DataFrame(test, columns=["img_name", "target"])
    answers[["img_name"]].to_csv(root / "test_list.csv", index=False)
    answers.to_csv(root / "test_labels.csv", index=False)
    return {
        "train_labels": str(root / "train_labels.csv"),
        "train_root": str(root / "train"),
        "test_list": str(root / "test_list.csv"),
        "test_root": str(root / "test"),
        "test_labels": str(root / "test_labels.csv"),
        "manifest": str(root / "manifest.csv"),
    }


@pytest.fixture
def tiny_project(tmp_path: Path) -> dict:
    """A data config, a member config and an ensemble config over a tiny dataset under tmp_path."""
    data = build_dataset(tmp_path / "data")
    outputs = tmp_path / "outputs"
    data_cfg = {
        "data": {**data, "demo_dir": str(tmp_path / "unused")},
        "paths": {"outputs": str(outputs), "folds": str(outputs / "folds.csv")},
        "split": {"mode": "stratified", "n_folds": 2, "seed": 0},
    }
    member = yaml.safe_load(Path("configs/members/mff_demo.yaml").read_text())
    member["name"] = "tiny"
    member["data"]["image_size"] = 32
    member["train"].update(epochs=2, batch_size=4, num_workers=0, warmup_steps=1, progress=False)
    ensemble = {
        "members": ["tiny"],
        "demo_members": ["tiny"],
        "weights": None,
        "submission": str(outputs / "submission.csv"),
        "fill_missing": None,
    }
    paths = {"root": tmp_path, "outputs": outputs, **data}
    for name, cfg in (("data", data_cfg), ("member", member), ("ensemble", ensemble)):
        paths[f"{name}_cfg"] = tmp_path / f"{name}.yaml"
        paths[f"{name}_cfg"].write_text(yaml.safe_dump(cfg))
    return paths
