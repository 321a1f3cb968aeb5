"""The data stage's input: the train images with their provenance, linked under `orig/`."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.folds import SOURCES_SEP
from core.data.labels import LabelError, read_labels, safe_join
from core.data.sources import DataPaths
from core.io import atomic_path
from core.progress import progress_bar

ORIG_DIR = "orig"
# An input manifest needs these; `sources` is optional there and always written here.
INPUT_MANIFEST_COLUMNS = ["img_name", "target", "method", "parent", "region"]


def read_originals(paths: DataPaths) -> pd.DataFrame:
    """The input train set as the prepared manifest sees it.

    Columns: img_name (prepared, under orig/), src_name (as in the input labels), path,
    target, method, parent, region, sources. Provenance comes from the input manifest when
    there is one (`sources` is optional there); otherwise reals are `real`, fakes
    `original`, each its own parent with no sources.
    """
    df = read_labels(paths.train_labels, paths.train_root)
    df = df.rename(columns={"img_name": "src_name"})
    df["method"] = np.where(df["target"] == 1, "original", "real")
    df["parent"] = df["src_name"]
    df["region"] = ""
    df["sources"] = ""
    if paths.manifest is not None and paths.manifest.is_file():
        man = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
        missing = [c for c in INPUT_MANIFEST_COLUMNS if c not in man.columns]
        if missing:
            raise LabelError(f"{paths.manifest}: missing column(s) {missing}")
        man = man.drop_duplicates("img_name").set_index("img_name")
        known = df["src_name"].isin(man.index)
        for col in ("method", "parent", "region", "sources"):
            if col not in man.columns:
                continue
            values = df.loc[known, "src_name"].map(man[col])
            if col in ("method", "parent"):
                values = values.replace("", np.nan).fillna(df.loc[known, col])
            df.loc[known, col] = values
    df["img_name"] = [f"{ORIG_DIR}/{n}" for n in df["src_name"]]
    df["parent"] = [f"{ORIG_DIR}/{p}" for p in df["parent"]]
    df["sources"] = [SOURCES_SEP.join(f"{ORIG_DIR}/{s}" for s in str(v).split(SOURCES_SEP) if s) for v in df["sources"]]
    cols = ["img_name", "src_name", "path", "target", "method", "parent", "region", "sources"]
    return df[cols].reset_index(drop=True)


def table_hash(df: pd.DataFrame) -> str:
    """A short hash of the originals' names and provenance: every step's fingerprint holds it."""
    text = df[["src_name", "target", "method", "parent", "region", "sources"]].to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def link_originals(table: pd.DataFrame, out: Path, mode: str, progress: bool) -> dict[str, int]:
    """Hard-link (or copy) every input image to out/orig/<img_name>; returns counts per action.

    An existing file is kept when it is the same file (a hard link) or has the same size and
    modification time (a copy); anything else is replaced.
    """
    counts = {"linked": 0, "copied": 0, "kept": 0}
    for src, name in progress_bar(
        list(zip(table["path"], table["img_name"], strict=True)), desc="originals", unit="img", disable=not progress
    ):
        src_p, dst = Path(src), safe_join(out, name)
        if dst.exists():
            s, d = src_p.stat(), dst.stat()
            if os.path.samefile(src_p, dst) or (s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns):
                counts["kept"] += 1
                continue
            dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if mode == "hardlink":
            try:
                os.link(src_p, dst)
                counts["linked"] += 1
                continue
            except OSError:
                pass  # another file system, or links not allowed: copy instead
        with atomic_path(dst) as tmp:
            shutil.copy2(src_p, tmp)
        counts["copied"] += 1
    return counts
