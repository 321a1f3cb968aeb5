"""Out-of-fold gain of test-time augmentation, and what it costs per image in infer.py.

  python -m bench.tta_gain                                           # mff_demo's finished folds
  python -m bench.tta_gain --data-config d.yaml --out bench/results/tta_gain_demo.json
  python -m bench.tta_gain --rounds 1 --images 8                     # a shorter timing

Reads a member's finished folds (train.py's outputs under paths.outputs, folds of paths.folds)
and scores each fold's validation images with that fold's own selected weights under every mode
of core/data/tta.py (none, flip, 6view), as train.py scores them with `predict.tta`: the same
checkpoints, so the modes differ only in the views. Per mode, what ensemble.py reports for a
member: pooled out-of-fold AUC and TPR at FPR = 1e-3, and the per-fold AUC, mean +- std
(min..max); against none, the gain in pooled AUC and the per-fold AUC gains (mean +- std, folds
improved). `none` is checked against the folds' oof.csv (the same weights without views).

Then the cost: infer.py's CPU path (`infer.Scorer` at infer.py's CPU defaults: ONNX Runtime, one
image at a time) with every finished fold's network, over the test images, seconds per image for
each mode, in rounds of alternating order after one untimed pass per mode (exports made, files
read); medians over rounds, and the ratio to none within each round. Each run records the share
of the machine's CPU time other processes took meanwhile (`others_cpu_share`): on a shared
machine the absolute seconds move, the ratios less. Prints one JSON object, then a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import infer
from bench.infer_throughput import machine_busy_seconds
from bench.output import publish
from core.blend.predictions import metrics_table
from core.config import ConfigError, load_config
from core.data.folds import FoldError, read_folds
from core.data.labels import LabelError
from core.data.sources import read_test_table, read_train_table, resolve_data
from core.data.transforms import build_transform
from core.data.tta import TTA_MODES
from core.metrics import roc_auc
from core.train.prediction import predict_paths
from core.trained import CheckpointError, SubmissionError, expected_folds, finished_folds
from models.zoo import load_trained

MODES = list(TTA_MODES)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/members/mff_demo.yaml", help="member config (default: %(default)s)")
    p.add_argument("--data-config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of the three modes (default: %(default)s)")
    p.add_argument("--images", type=int, help="time on the first N test images (default: all)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. paths.outputs=...")
    return p.parse_args(argv)


def fold_weights(cfg: dict) -> dict[int, Path]:
    """Every finished fold of the member, by fold number; an error when the member has none."""
    outputs = Path(cfg["paths"]["outputs"])
    folds = finished_folds(outputs, cfg["name"])
    expected = expected_folds(cfg["paths"]["folds"])
    if not folds:
        raise FoldError(f"no finished fold of {cfg['name']} under {outputs}/: train it first (train.py --fold all)")
    if expected is not None and set(folds) != set(expected):
        print(f"note: {cfg['name']} has folds {folds} of {expected} finished; using those", file=sys.stderr)
    return {k: outputs / cfg["name"] / f"fold{k}" / "model.safetensors" for k in folds}


def score_fold(weights: Path, paths: list[str], mode: str) -> np.ndarray:
    """The fold's selected weights on `paths` under `mode`, as train.py scores with predict.tta (on the CPU)."""
    trained = load_trained(weights)
    transform = build_transform(trained.config["data"], train=False)
    device = torch.device("cpu")
    return predict_paths(
        [trained.model], paths, transform, device, batch_size=64, num_workers=0, progress=False, tta=mode
    )[:, 0]


def out_of_fold(cfg: dict, weights: dict[int, Path]) -> tuple[dict[str, pd.DataFrame], float]:
    """Per mode, the OOF predictions (img_name, target, fold, y_pred) of every finished fold; and the
    largest difference between mode none and the folds' own oof.csv."""
    table = read_folds(cfg["paths"]["folds"], read_train_table(resolve_data(cfg)))
    oofs: dict[str, list[pd.DataFrame]] = {m: [] for m in MODES}
    check = 0.0
    for k, path in weights.items():
        val = table[table["fold"] == k]
        for mode in MODES:
            probs = score_fold(path, val["path"].tolist(), mode)
            oofs[mode].append(val[["img_name", "target", "fold"]].assign(y_pred=probs))
        written = pd.read_csv(path.parent / "oof.csv", dtype={"img_name": str}).set_index("img_name")["y_pred"]
        none = oofs["none"][-1].set_index("img_name")["y_pred"]
        check = max(check, float((none - written.reindex(none.index)).abs().max()))
    return {m: pd.concat(frames, ignore_index=True) for m, frames in oofs.items()}, check


def accuracy_report(oofs: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """ensemble.py's scores of each mode (its table, less the blend row), and the gains over none."""
    table = metrics_table(oofs, oofs["none"]).set_index("member").drop(index="blend")
    per_fold = {m: [roc_auc(g["target"], g["y_pred"]) for _, g in oofs[m].groupby("fold")] for m in MODES}
    report: dict[str, Any] = {"modes": {}, "gain_vs_none": {}}
    for m in MODES:
        row = table.loc[m]
        report["modes"][m] = {
            "pooled_auc": round(float(row["pooled_auc"]), 4),
            "pooled_tpr@fpr1e-3": round(float(row["pooled_tpr@fpr1e-3"]), 4),
            "fold_auc_mean": round(float(row["fold_auc_mean"]), 4),
            "fold_auc_std": round(float(row["fold_auc_std"]), 4),
            "fold_auc_min": round(float(row["fold_auc_min"]), 4),
            "fold_auc_max": round(float(row["fold_auc_max"]), 4),
            "fold_auc": [round(a, 4) for a in per_fold[m]],
        }
        if m == "none":
            continue
        gains = np.subtract(per_fold[m], per_fold["none"])
        report["gain_vs_none"][m] = {
            "pooled_auc": round(float(row["pooled_auc"] - table.loc["none", "pooled_auc"]), 4),
            "fold_auc_gain_mean": round(float(gains.mean()), 4),
            "fold_auc_gain_std": round(float(gains.std()), 4),  # population std, as the per-fold spread
            "folds_improved": f"{int((gains > 0).sum())}/{len(gains)}",
        }
    return report


def print_problem(message: str) -> None:
    print(f"skipped: {message}", file=sys.stderr)


def timed_pass(scorer: infer.Scorer, paths: list[Path]) -> dict[str, float | None]:
    """Seconds per image of one `Scorer.score` pass, and the share of the machine's CPU time
    other processes used meanwhile."""
    busy0, own0 = machine_busy_seconds(), time.process_time()
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        probs = scorer.score(paths)
    wall = time.perf_counter() - start
    own = time.process_time() - own0
    if np.isnan(probs).any():
        raise RuntimeError("infer.Scorer left test images unscored")
    busy1 = machine_busy_seconds()
    others = None
    if busy0 is not None and busy1 is not None:
        others = round(max(0.0, busy1 - busy0 - own) / (wall * (os.cpu_count() or 1)), 3)
    return {"s_per_image": wall / len(paths), "others_cpu_share": others}


def cost_report(weights: dict[int, Path], images: list[Path], rounds: int) -> dict[str, Any]:
    """infer.py's CPU path over `images` with every fold's network, per mode."""
    scorers = {}
    for m in MODES:
        args = infer.parse_args(
            ["x", *[a for w in weights.values() for a in ("--weights", str(w))], "--device", "cpu", "--tta", m]
        )
        scorers[m] = infer.Scorer(infer.load_ensemble(args), args, report=print_problem)
        timed_pass(scorers[m], images)  # untimed: exports made and loaded, files in the page cache
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(rounds):
        for m in MODES if r % 2 == 0 else MODES[::-1]:
            runs[m].append({"round": r, **timed_pass(scorers[m], images)})
    per_image = {m: statistics.median(x["s_per_image"] for x in runs[m]) for m in MODES}
    ratios = {
        m: statistics.median(a["s_per_image"] / b["s_per_image"] for a, b in zip(runs[m], runs["none"], strict=True))
        for m in MODES
    }
    return {
        "path": "infer.Scorer, CPU defaults: ONNX Runtime, batch 1, decoding in a read-ahead thread",
        "networks": len(weights),
        "images": len(images),
        "rounds": rounds,
        "seconds_per_image": {m: round(v, 4) for m, v in per_image.items()},
        "ratio_to_none": {m: round(v, 2) for m, v in ratios.items()},
        "seconds_per_image_runs": {m: [round(x["s_per_image"], 4) for x in runs[m]] for m in MODES},
        "others_cpu_share_runs": {m: [x["others_cpu_share"] for x in runs[m]] for m in MODES},
    }


def markdown(result: dict) -> str:
    lines = [
        "| tta | views | pooled OOF AUC | pooled TPR@1e-3 | per-fold AUC, mean +- std (min..max) "
        "| per-fold gain vs none | folds improved | s / image (infer, CPU) | x none |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for m in MODES:
        a, c = result["accuracy"]["modes"][m], result["cost"]
        g = result["accuracy"]["gain_vs_none"].get(m)
        gain = f"{g['fold_auc_gain_mean']:+.4f} +- {g['fold_auc_gain_std']:.4f}" if g else "-"
        lines.append(
            f"| {m} | {len(TTA_MODES[m])} | {a['pooled_auc']:.4f} | {a['pooled_tpr@fpr1e-3']:.4f} "
            f"| {a['fold_auc_mean']:.4f} +- {a['fold_auc_std']:.4f} ({a['fold_auc_min']:.4f}..{a['fold_auc_max']:.4f}) "
            f"| {gain} | {g['folds_improved'] if g else '-'} | {c['seconds_per_image'][m]:.4f} "
            f"| {c['ratio_to_none'][m]:.2f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config([args.data_config, args.config], args.overrides)
    weights = fold_weights(cfg)
    oofs, check = out_of_fold(cfg, weights)
    test = read_test_table(resolve_data(cfg))
    images = [Path(p) for p in test["path"]][: args.images]
    return {
        "member": cfg["name"],
        "folds": sorted(weights),
        "oof_images": len(oofs["none"]),
        "none_max_abs_diff_vs_oof_csv": check,
        "accuracy": accuracy_report(oofs),
        "cost": cost_report(weights, images, args.rounds),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ConfigError, LabelError, FoldError, SubmissionError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    publish(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
