"""Held-out AUC of a clip member on its video clips, by kind of fake, from its finished folds.

  python -m bench.studies.clip_auc_by_kind                        # sta_demo on the demo sample
  python -m bench.studies.clip_auc_by_kind --out bench/studies/results/sta_demo_clips.json

Reads every finished fold's `oof.csv` (each clip scored by the fold that did not train on it) and
the videos' manifest (`data.video_manifest`, its `method` column), and reports the AUC of each
kind of fake clip against every real clip, of all clips pooled, and of the still images.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from bench.output import publish
from bench.studies import member_study_config
from core.data.sources import resolve_data
from core.imaging import is_video
from core.metrics import roc_auc
from core.trained import finished_folds


def auc_or_none(target: np.ndarray, score: np.ndarray) -> float | None:
    return roc_auc(target, score) if len(set(target)) == 2 else None


def by_kind(oof: pd.DataFrame, manifest: pd.DataFrame | None) -> dict:
    """AUC of the clips pooled, of each kind of fake clip against every real clip, and of the stills."""
    clips = oof[oof["img_name"].map(is_video)]
    stills = oof[~oof["img_name"].map(is_video)]
    methods = manifest.set_index("img_name")["method"] if manifest is not None else pd.Series(dtype=str)
    kinds = clips["img_name"].map(methods).fillna("fake")
    real = clips[clips["target"] == 0]
    rows = {"all clips": clips}
    for kind in sorted(set(kinds[clips["target"] == 1])):
        rows[kind] = pd.concat([real, clips[(clips["target"] == 1) & (kinds == kind)]])
    report = {
        name: {
            "real": int((part["target"] == 0).sum()),
            "fake": int((part["target"] == 1).sum()),
            "auc": auc_or_none(part["target"].to_numpy(), part["y_pred"].to_numpy()),
        }
        for name, part in rows.items()
    }
    report["stills"] = {
        "real": int((stills["target"] == 0).sum()),
        "fake": int((stills["target"] == 1).sum()),
        "auc": auc_or_none(stills["target"].to_numpy(), stills["y_pred"].to_numpy()),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    cfg, out = member_study_config(__doc__, argv)
    folds = finished_folds(cfg["paths"]["outputs"], cfg["name"])
    if not folds:
        print(f"clip_auc_by_kind: {cfg['name']} has no finished fold under {cfg['paths']['outputs']}", file=sys.stderr)
        return 1
    oof = pd.concat(
        [pd.read_csv(f"{cfg['paths']['outputs']}/{cfg['name']}/fold{k}/oof.csv") for k in folds], ignore_index=True
    )
    data = resolve_data(cfg)
    manifest = pd.read_csv(data.video_manifest) if data.video_manifest and data.video_manifest.is_file() else None
    result = {"member": cfg["name"], "folds": folds, "kinds": by_kind(oof, manifest)}
    lines = ["| clips | real | fake | held-out AUC |", "|---|---:|---:|---:|"]
    for name, row in result["kinds"].items():
        auc = "n/a" if row["auc"] is None else f"{row['auc']:.3f}"
        lines.append(f"| {name} | {row['real']} | {row['fake']} | {auc} |")
    publish(result, "\n".join(lines), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
