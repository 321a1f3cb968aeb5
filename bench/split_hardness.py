"""Is the cluster split harder than the stratified one? Validation AUC per fold for both.

    python -m bench.split_hardness                          # demo sample, mff_demo, 2 epochs at 64 px
    python -m bench.split_hardness --epochs 6 --image-size 128 --out hardness.json
    python -m bench.split_hardness train.lr=1e-3            # data or member overrides as key=value
    python -m bench.split_hardness data.use_prepared=false  # the demo sample itself, not the data stage's output

Both splits are built from the same images with the data config's split settings
(cv_split's code); then the same member is trained on every fold of each by
`train.train_fold` under a temporary outputs folder. The member's `experts` list is dropped
so every fold trains the same backbone. A logistic-regression probe on the clustering
features is trained on the same folds too: it takes a second and shows the split's effect
apart from how far the small network got. Prints JSON, then a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

import cv_split
import train
from bench.output import publish
from core.config import load_config
from core.data.sources import read_train_table, resolve_data
from core.io import write_csv
from core.metrics import roc_auc

MODES = ("stratified", "clusters")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--member", default="configs/members/mff_demo.yaml", help="member config (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per fold (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="member input size (default: %(default)s)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the data and member configs")
    return p.parse_intermixed_args(argv)


def probe_auc(feats: np.ndarray, target: np.ndarray, folds: np.ndarray, fold: int, seed: int) -> float:
    """Validation AUC of a logistic regression on the features, trained on the other folds."""
    ok = np.isfinite(feats).all(axis=1)
    tr, va = ok & (folds != fold), ok & (folds == fold)
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(feats[tr], target[tr])
    return roc_auc(target[va], clf.predict_proba(feats[va])[:, 1])


def markdown(result: dict) -> str:
    modes = list(result["modes"])
    n = max(len(result["modes"][m]["folds"]) for m in modes)
    head = ["fold"] + [f"{m} AUC" for m in modes] + [f"{m} probe AUC" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]

    def cell(mode: str, k: int, key: str) -> str:
        folds = result["modes"][mode]["folds"]
        return f"{folds[k][key]:.3f}" if k < len(folds) else ""

    for k in range(n):
        row = [str(k)] + [cell(m, k, "auc") for m in modes] + [cell(m, k, "probe_auc") for m in modes]
        lines.append("| " + " | ".join(row) + " |")
    means = [f"**{result['modes'][m]['mean_auc']:.3f}**" for m in modes]
    means += [f"**{result['modes'][m]['mean_probe_auc']:.3f}**" for m in modes]
    lines.append("| mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    base = load_config([args.data_config, args.member], args.overrides)
    data = resolve_data(base)
    base = cv_split.resolve_split(base, data)
    table = cv_split.attach_identities(base, data, read_train_table(data))  # split.group_by as cv_split
    seed = int(base["split"]["seed"])
    result: dict = {
        "data": "demo sample" if data.is_demo else str(data.train_labels),
        "n_images": len(table),
        "member": args.member,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "overrides": args.overrides,
        "split": {k: base["split"][k] for k in ("n_folds", "k", "seed") if k in base["split"]},
        "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="split_hardness_") as tmp:
        feats = None
        for mode in MODES:
            out = Path(tmp) / mode
            cfg = copy.deepcopy(base)
            cfg["paths"] = {"outputs": str(out), "folds": str(out / "folds.csv")}
            cfg.pop("experts", None)  # the same backbone on every fold, in both modes
            cfg["train"].update(epochs=args.epochs, progress=False)
            cfg["data"]["image_size"] = args.image_size
            folds_df, mode_feats = cv_split.build_folds(cfg, table, mode)
            write_csv(folds_df[["img_name", "target", "cluster", "fold"]], cfg["paths"]["folds"])
            if mode_feats is not None:
                feats = mode_feats
            elif feats is None:
                feats = cv_split.image_features(cfg, table)  # the probe needs them in every mode
            rows = []
            for fold in sorted(folds_df["fold"].unique()):
                t0 = time.perf_counter()
                metrics = train.train_fold(cfg, int(fold))
                rows.append(
                    {
                        "fold": int(fold),
                        "n_val": int((folds_df["fold"] == fold).sum()),
                        "auc": round(float(metrics["auc"]), 4),
                        "tpr@fpr1e-3": round(float(metrics["tpr@fpr1e-3"]), 4),
                        "probe_auc": round(
                            probe_auc(feats, folds_df["target"].to_numpy(), folds_df["fold"].to_numpy(), fold, seed), 4
                        ),
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
                print(f"{mode} fold {fold}: {rows[-1]}", file=sys.stderr)
            result["modes"][mode] = {
                "folds": rows,
                "mean_auc": round(float(np.mean([r["auc"] for r in rows])), 4),
                "mean_probe_auc": round(float(np.mean([r["probe_auc"] for r in rows])), 4),
            }
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["host"] = {"platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    publish(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
