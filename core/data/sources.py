"""Where the data lives: the competition's files when configured, else the demo sample."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from core.data.labels import LabelError, read_labels

# pandas is imported where a table is read (see core.data.labels): infer.py resolves the data
# config without reading one.
if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class DataPaths:
    train_labels: Path
    train_root: Path
    test_list: Path
    test_root: Path
    test_labels: Path | None  # answers, when known: only for reporting
    manifest: Path | None  # provenance (method, parent, region, sources) of prepared samples
    is_demo: bool
    # Face embeddings of the original images, written by the data stage (names and 128-d vectors)
    face_embeddings: Path | None = None
    # Labelled videos for members that take clips (core.data.clips): labels, root, manifest
    video_labels: Path | None = None
    video_root: Path | None = None
    video_manifest: Path | None = None


# Written by the data stage beside its manifest; read by the split for identity grouping.
FACE_EMBEDDINGS_FILE = "face_embeddings.npz"


class PreparedDataMissing(LabelError):
    """`data.use_prepared` is on but the data stage has not finished."""


def resolve_data(cfg: dict, *, prepared: bool = True) -> DataPaths:
    """Read the config's `data` section; with no `train_labels` it points at the demo sample.

    With `data.use_prepared: true` the training set is the data stage's output under
    `prep.out` (originals plus edits and diffusion fakes, with provenance); the test list
    stays the original one. `prepared=False` gives the data stage its own input.
    """
    original = _resolve_original(cfg["data"])
    if not (prepared and cfg["data"].get("use_prepared")):
        return original
    out = Path(cfg["prep"]["out"])
    if not (out / "DONE").is_file():
        raise PreparedDataMissing(
            f"{out}: the data stage has not finished; run `python -m data_prep` or set data.use_prepared=false"
        )
    return replace(
        original,
        train_labels=out / "train_labels.csv",
        train_root=out,
        manifest=out / "manifest.csv",
        face_embeddings=out / FACE_EMBEDDINGS_FILE,
    )


def _resolve_original(d: dict) -> DataPaths:
    def opt(key: str) -> Path | None:
        return Path(d[key]) if d.get(key) else None

    if d.get("train_labels"):
        missing = [k for k in ("train_root", "test_list", "test_root") if not d.get(k)]
        if missing:
            raise LabelError(f"data config: train_labels is set but {missing} are not")
        return DataPaths(
            Path(d["train_labels"]),
            Path(d["train_root"]),
            Path(d["test_list"]),
            Path(d["test_root"]),
            opt("test_labels"),
            opt("manifest"),
            is_demo=False,
            video_labels=opt("video_labels"),
            video_root=opt("video_root"),
            video_manifest=opt("video_manifest"),
        )
    demo = Path(d.get("demo_dir", "data/demo"))
    return DataPaths(
        demo / "train_labels.csv",
        demo / "train",
        demo / "test_list.csv",
        demo / "test",
        demo / "test_labels.csv",
        demo / "manifest.csv",
        is_demo=True,
        video_labels=demo / "video_labels.csv",
        video_root=demo,
        video_manifest=demo / "video_manifest.csv",
    )


def read_train_table(paths: DataPaths) -> pd.DataFrame:
    """Train labels joined with provenance: `img_name,target,path,method,parent,region,sources`.

    Without a manifest every image is its own parent (nothing derived from anything).
    `sources` (the other images that gave an image pixels, `;`-joined) is optional in a
    manifest and empty where absent.
    """
    import pandas as pd

    df = read_labels(paths.train_labels, paths.train_root)
    if paths.manifest and paths.manifest.is_file():
        man = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
        cols = ["img_name", "method", "parent", "region"]
        missing = [c for c in cols if c not in man.columns]
        if missing:
            raise LabelError(f"{paths.manifest}: missing column(s) {missing}")
        optional = ["sources"] if "sources" in man.columns else []
        df = df.merge(man[cols + optional], on="img_name", how="left")
    for col, default in (("method", None), ("parent", None), ("region", ""), ("sources", "")):
        if col not in df.columns:
            df[col] = default
    df["method"] = df["method"].fillna(df["target"].map({0: "real", 1: "fake"}))
    df["parent"] = df["parent"].replace("", None).fillna(df["img_name"])
    df["region"] = df["region"].fillna("")
    df["sources"] = df["sources"].fillna("")
    return df


def read_test_table(paths: DataPaths) -> pd.DataFrame:
    """The test list in its order, with `target` when answers are configured."""
    df = read_labels(paths.test_list, paths.test_root, require_target=False)
    if paths.test_labels and paths.test_labels.is_file() and "target" not in df.columns:
        answers = read_labels(paths.test_labels, paths.test_root, check_files=False)
        df = df.merge(answers[["img_name", "target"]], on="img_name", how="left")
    return df
