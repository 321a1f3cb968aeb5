"""How long `python ensemble.py` takes, and how much memory, as the out-of-fold rows grow; prints JSON.

    python -m bench.blend_scale                                  # 500k rows x 7 members: auto, weights, stack
    python -m bench.blend_scale --rows 20000 100000 --methods auto
    python -m bench.blend_scale --rows 20000 --baseline ../old   # also with another checkout's ensemble.py

Each size gets a synthetic project written once: `--members` members with out-of-fold
predictions in `--folds` folds (each fold's oof.csv, test.csv and meta.json as train.py leaves
them), a test list of `--test-rows` images and the checkout's own configs/ensemble.yaml. Members
are of graded strength, share part of their errors (images hard for every member) and some are
overconfident, so the weights search, stacking and calibration each have something to do.
Every run is `python ensemble.py` with the default config (`--methods auto`) or a forced
`ensemble.method`, in a process of its own: wall seconds, CPU seconds and peak RSS (from wait4)
are its own.

Per run the JSON gives the chosen method and weights, the calibration applied, and the nested
out-of-fold AUC of the chosen blend (oof_blend.csv's `blend`: pooled, and the mean over folds).
With `--baseline PATH`, the runs with at most `--baseline-max-rows` rows are repeated with the
ensemble.py of the checkout at PATH on the same files, and `ratios` gives baseline / this per run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import roc_auc_score

from bench.output import publish
from core.blend.applied import sigmoid

ROOT = Path(__file__).resolve().parents[1]


def synthetic_scores(rng: np.random.Generator, target: np.ndarray, members: int) -> np.ndarray:
    """(N, members) probabilities: strengths from 0.3 to 1.5, a shared hard-image term, and every
    other member three times overconfident."""
    signal = 2.0 * target - 1.0
    shared = rng.normal(size=len(target))
    columns = []
    for j, strength in enumerate(np.linspace(0.3, 1.5, members)):
        z = strength * signal + 0.7 * shared + rng.normal(size=len(target))
        columns.append(sigmoid(z * (3.0 if j % 2 else 1.0)))
    return np.stack(columns, axis=1)


def write_project(root: Path, rows: int, members: int, folds: int, test_rows: int, seed: int) -> Path:
    """A project folder with the members' fold outputs, the split, the test list and both configs."""
    rng = np.random.default_rng(seed)
    names = [f"m{j}" for j in range(members)]
    target = rng.integers(0, 2, rows)
    fold = rng.permutation(np.arange(rows) % folds)
    train = pd.DataFrame({"img_name": [f"i{i:07d}.png" for i in range(rows)], "target": target})
    train.to_csv(root / "train.csv", index=False)
    train.assign(cluster=0, fold=fold).to_csv(root / "folds.csv", index=False)
    test_root = root / "test"
    test_root.mkdir()
    test_names = [f"t{i:07d}.png" for i in range(test_rows)]
    for name in test_names:
        (test_root / name).touch()
    pd.DataFrame({"img_name": test_names}).to_csv(root / "test_list.csv", index=False)
    oof = synthetic_scores(rng, target, members)
    test_target = rng.integers(0, 2, test_rows)
    for k in range(folds):
        test = synthetic_scores(rng, test_target, members)  # fold k's models score the test images
        for j, member in enumerate(names):
            out = root / "outputs" / member / f"fold{k}"
            out.mkdir(parents=True)
            train[fold == k].assign(y_pred=oof[fold == k, j]).to_csv(out / "oof.csv", index=False)
            pd.DataFrame({"img_name": test_names, "y_pred": test[:, j]}).to_csv(out / "test.csv", index=False)
            (out / "meta.json").write_text(json.dumps({"complete": True}))
    data = {
        "data": {
            "train_labels": str(root / "train.csv"),
            "train_root": str(root),
            "test_list": str(root / "test_list.csv"),
            "test_root": str(test_root),
            "use_prepared": False,
        },
        "paths": {"outputs": str(root / "outputs"), "folds": str(root / "folds.csv")},
    }
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root


def ensemble_config(root: Path, repo: Path, code: str, members: int) -> Path:
    """`repo`'s configs/ensemble.yaml as it ships, with the synthetic members and submission path."""
    cfg = yaml.safe_load((repo / "configs" / "ensemble.yaml").read_text())
    cfg.update(members=[f"m{j}" for j in range(members)], submission=str(root / "outputs" / "submission.csv"))
    path = root / f"ensemble_{code}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_ensemble(root: Path, repo: Path, code: str, members: int, method: str) -> dict:
    """One `python ensemble.py` of `repo` on the project: wall seconds, peak RSS, what it chose."""
    config = ensemble_config(root, repo, code, members)
    argv = [
        sys.executable,
        str(repo / "ensemble.py"),
        "--config",
        str(config),
        "--data-config",
        str(root / "data.yaml"),
    ]
    if method != "auto":
        argv.append(f"ensemble.method={method}")
    start = time.perf_counter()
    with open(root / "ensemble.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (root / "ensemble.log").read_text()[-2000:]
        raise RuntimeError(f"{repo / 'ensemble.py'} ensemble.method={method} failed ({proc.returncode}):\n{tail}")
    fit = json.loads((root / "outputs" / "ensemble_fit.json").read_text())
    blend = pd.read_csv(root / "outputs" / "oof_blend.csv")
    per_fold = [roc_auc_score(part["target"], part["blend"]) for _, part in blend.groupby("fold")]
    return {
        "method": method,
        "chosen": fit["method"],
        "weights": [round(w, 4) for w in fit["params"].get("weights", [])] or None,
        "calibration": fit["calibration"]["method"],
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),  # what other work on a shared machine changes less
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "blend_nested_auc": round(float(roc_auc_score(blend["target"], blend["blend"])), 5),
        "blend_fold_auc_mean": round(float(np.mean(per_fold)), 5),
    }


def bench(args: argparse.Namespace) -> dict:
    runs = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="blend_scale_") as tmp:
            root = write_project(Path(tmp), rows, args.members, args.folds, args.test_rows, args.seed)
            for method in args.methods:
                checkouts = {"this": ROOT}
                if args.baseline and rows <= args.baseline_max_rows:
                    checkouts["baseline"] = Path(args.baseline).resolve()
                for code, repo in checkouts.items():
                    row = {"rows": rows, "members": args.members, "folds": args.folds, "code": code}
                    runs.append({**row, **run_ensemble(root, repo, code, args.members, method)})
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    ratios = [
        {
            "rows": a["rows"],
            "method": a["method"],
            "wall_baseline_over_this": round(b["wall_s"] / a["wall_s"], 2),
            "peak_rss_baseline_over_this": round(b["peak_rss_mb"] / a["peak_rss_mb"], 2),
            "auc_this_minus_baseline": round(a["blend_nested_auc"] - b["blend_nested_auc"], 5),
        }
        for a in runs
        if a["code"] == "this"
        for b in runs
        if b["code"] == "baseline" and (b["rows"], b["method"]) == (a["rows"], a["method"])
    ]
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "shared": args.shared}
    return {"runs": runs, "ratios": ratios, "machine": machine}


def table(result: dict) -> str:
    lines = [
        "| rows | code | ensemble.method | chosen | wall s | CPU s | peak RSS MB | nested AUC | per-fold AUC |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['rows']} | {r['code']} | {r['method']} | {r['chosen']} | {r['wall_s']} | {r['cpu_s']} "
            f"| {r['peak_rss_mb']} | {r['blend_nested_auc']:.5f} | {r['blend_fold_auc_mean']:.5f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[500_000], help="out-of-fold rows (default: %(default)s)")
    p.add_argument("--members", type=int, default=7, help="members blended (default: %(default)s)")
    p.add_argument("--folds", type=int, default=5, help="folds (default: %(default)s)")
    p.add_argument("--test-rows", type=int, default=10_000, help="test images (default: %(default)s)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["auto", "weights", "stack"],
        help="ensemble.method per run (default: %(default)s)",
    )
    p.add_argument("--baseline", help="another checkout whose ensemble.py runs the same projects")
    p.add_argument("--baseline-max-rows", type=int, default=20_000, help="largest size the baseline runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared", action="store_true", help="record that other work shared the machine")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = bench(args)
    publish(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
