"""A tiny labelled face set with its faces cached where the data stage puts them, and configs
for the sladd_demo member shrunk to train on it in seconds (tests of training, resume, benches)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib import cbook
from PIL import Image
from skimage import data

from data_prep.faces import FaceAnalyzer


def _grace() -> np.ndarray:
    with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as img:
        return np.asarray(img.convert("RGB").resize((300, 350)))


def face_project(tmp_path: Path, n: int = 4) -> dict:
    """`n` reals (shifted crops of the astronaut) and `n` fakes (crops of Grace Hopper with a
    pasted patch), a one-image test list, their faces cached, a data config (stratified, 2 folds)
    and a member config: sladd_demo at 48 px, 2 epochs, 2 items a batch, no loader workers,
    2 forging threads."""
    root, prep = tmp_path / "data", tmp_path / "prepared"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    astro, grace = data.astronaut(), _grace()
    rows = []
    for i in range(n):
        real = np.ascontiguousarray(astro[8 * i : 300 + 8 * i, 60 + 6 * i : 360 + 6 * i])
        fake = np.ascontiguousarray(grace[6 * i : 300 + 6 * i, :300]).copy()
        fake[200:240, 100:160] = 255
        Image.fromarray(real).save(root / "train" / f"r{i}.png")
        Image.fromarray(fake).save(root / "train" / f"f{i}.png")
        rows += [(f"r{i}.png", 0), (f"f{i}.png", 1)]
    labels = pd.DataFrame(rows, columns=["img_name", "target"])
    labels.to_csv(root / "train_labels.csv", index=False)
    Image.fromarray(astro[:300, 60:360]).save(root / "test" / "t0.png")
    pd.DataFrame({"img_name": ["t0.png"]}).to_csv(root / "test_list.csv", index=False)
    names = labels["img_name"].tolist()
    # upsample 0: the faces are large, and detection is four times faster (the config says so too)
    FaceAnalyzer(embed=True, detector="hog", upsample=0, pick="score").analyze_files(
        [root / "train" / name for name in names], names, cache_dir=prep / "faces", progress=False
    )
    data_cfg = {
        "data": {
            "train_labels": str(root / "train_labels.csv"),
            "train_root": str(root / "train"),
            "test_list": str(root / "test_list.csv"),
            "test_root": str(root / "test"),
            "use_prepared": False,
        },
        "prep": {"out": str(prep), "faces": {"upsample": 0}},
        "paths": {"outputs": str(tmp_path / "outputs"), "folds": str(tmp_path / "outputs" / "folds.csv")},
        "split": {"mode": "stratified", "n_folds": 2, "seed": 0},
    }
    member = yaml.safe_load(Path("configs/members/sladd_demo.yaml").read_text())
    member["data"]["image_size"] = 48
    member["synthesizer"]["image_size"] = 32
    member["recipe"]["forge_threads"] = 2
    member["train"].update(epochs=2, batch_size=2, num_workers=0, progress=False)
    paths = {"data_cfg": tmp_path / "data.yaml", "member_cfg": tmp_path / "member.yaml"}
    paths["data_cfg"].write_text(yaml.safe_dump(data_cfg))
    paths["member_cfg"].write_text(yaml.safe_dump(member))
    return {**paths, "outputs": tmp_path / "outputs", "n_train": len(labels)}
