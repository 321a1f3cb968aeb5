"""Still images for a clip member: one-frame clips or clips built from the image?

  python -m bench.studies.sta_still_mode                           # sta_demo, every finished fold
  python -m bench.studies.sta_still_mode --out bench/studies/results/sta_still_mode_demo.json

Each finished fold's network scores the still images of its own validation fold twice, with the same
weights: as one-frame clips (`clip.still: single`) and as clips built from the image (`clip.still:
clip`, a smooth camera drift), and the out-of-fold AUC and the CPU seconds of each are compared. The
networks were trained under the config's own `clip.still`, which favours that mode.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from bench.output import publish
from bench.studies import member_study_config
from core.checkpoint import WEIGHTS_FILE
from core.data.clips import ClipDataset, ClipSettings, with_videos
from core.data.datasets import make_loader
from core.data.folds import read_folds
from core.data.sources import read_train_table, resolve_data
from core.data.transforms import build_transform
from core.imaging import is_video
from core.metrics import score_report
from core.train.prediction import predict_loader
from core.trained import finished_folds
from models.zoo import load_trained


def score_mode(cfg: dict, still: str, folds: list[int], table, outputs: str) -> tuple[np.ndarray, float]:
    settings = ClipSettings(**{**ClipSettings.from_cfg(cfg).__dict__, "still": still})
    transform = build_transform(cfg["data"], train=False)
    probs = np.full(len(table), np.nan)
    seconds = 0.0
    for k in folds:
        rows = np.flatnonzero(table["fold"].to_numpy() == k)
        net = load_trained(f"{outputs}/{cfg['name']}/fold{k}/{WEIGHTS_FILE}").model
        ds = ClipDataset(table["path"].iloc[rows].tolist(), None, transform, settings, scoring=True)
        start = time.process_time()
        probs[rows] = predict_loader([net], make_loader(ds, 32, 0), torch.device("cpu"), progress=False)[:, 0]
        seconds += time.process_time() - start
    return probs, seconds


def main(argv: list[str] | None = None) -> int:
    cfg, out = member_study_config(__doc__, argv)
    data = resolve_data(cfg)
    table = with_videos(cfg, data, read_folds(cfg["paths"]["folds"], read_train_table(data)))
    stills = table[~table["path"].map(is_video)].reset_index(drop=True)
    outputs = cfg["paths"]["outputs"]
    folds = sorted(set(finished_folds(outputs, cfg["name"])) & set(stills["fold"]))
    stills = stills[stills["fold"].isin(folds)].reset_index(drop=True)
    rows = []
    for still in ("single", "clip"):
        probs, seconds = score_mode(cfg, still, folds, stills, outputs)
        per_fold = [score_report(g["target"], probs[g.index])["auc"] for _, g in stills.groupby("fold")]
        rows.append(
            {
                "still": still,
                "frames": 1 if still == "single" else int(cfg["clip"]["frames"]),
                **{f"pooled_{k}": v for k, v in score_report(stills["target"], probs).items()},
                "fold_auc_mean": float(np.mean(per_fold)),
                "fold_auc_std": float(np.std(per_fold)),
                "cpu_seconds": round(seconds, 2),
            }
        )
    result = {"member": cfg["name"], "trained_with": cfg["clip"]["still"], "folds": folds, "stills": len(stills)}
    result["modes"] = rows
    lines = ["| still | frames | pooled OOF AUC | per-fold AUC | CPU s |", "|---|---:|---:|---|---:|"]
    for r in rows:
        spread = f"{r['fold_auc_mean']:.3f} +- {r['fold_auc_std']:.3f}"
        lines.append(f"| {r['still']} | {r['frames']} | {r['pooled_auc']:.3f} | {spread} | {r['cpu_seconds']} |")
    publish(result, "\n".join(lines), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
