"""Loss ablation of the mff member: CE alone, CE + NCE, CE + KL, all three, out of fold.

  python -m bench.loss_ablation                          # demo member, every fold, its epochs
  python -m bench.loss_ablation --epochs 3 --folds 0 1   # shorter
  python -m bench.loss_ablation --settings all train.lr=1e-3 --keep ablation_runs

Each setting trains the member on every chosen fold of a label-stratified split that is
built first in a temporary folder (`cv_split.py` with split.mode=stratified), so nothing
under outputs/ is read or written. The training set is the one train.py would use (the
data stage's output when data.use_prepared is on; data.use_prepared=false: the demo
sample itself). The out-of-fold (OOF) predictions of a setting are its
folds' oof.csv files concatenated; the table gives their ROC-AUC and TPR at FPR = 1e-3
(the competition's metrics) and the mean of the per-fold validation AUCs. Only validation
folds are scored: the test answers are never looked at. Prints a JSON object, then a
markdown table. `key=value` overrides apply to every setting (e.g. train.lr=1e-3).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

import cv_split
import train
from bench.output import run_and_publish
from core.blend.predictions import member_predictions
from core.config import load_config, read_yaml
from core.data.folds import FoldError
from core.data.sources import resolve_data
from core.metrics import score_report

# setting -> which of the auxiliary terms are on (CE is always on)
SETTINGS: dict[str, tuple[bool, bool]] = {
    "ce": (False, False),
    "ce+nce": (True, False),
    "ce+kl": (False, True),
    "all": (True, True),
}
DEFAULT_WEIGHTS = {"nce": 0.1, "kl": 1.0}  # used when the member config turns a term off


def parse_with_overrides(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse `argv` with `p`, whose last positional is `overrides`: key=value words are overrides
    wherever they stand (after `--folds 0 1` too, where argparse would take them as folds)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in argv if a not in overrides])
    args.overrides = [*args.overrides, *overrides]
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/members/mff_demo.yaml", help="member config (default: %(default)s)")
    p.add_argument("--data-config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="train.epochs for every setting (default: the config's)")
    p.add_argument("--folds", type=int, nargs="+", help="validation folds to run (default: all)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), help="default: all four")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder, removed)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every setting")
    return parse_with_overrides(p, argv)


def loss_overrides(cfg: dict, setting: str) -> list[str]:
    """`loss.nce` / `loss.kl` for a setting: the member's weight when on (its default if the
    member has it at 0), 0 when off."""
    on = dict(zip(("nce", "kl"), SETTINGS[setting], strict=True))
    out = []
    for term, enabled in on.items():
        weight = float(cfg["loss"].get(term, 0.0)) or DEFAULT_WEIGHTS[term]
        out.append(f"loss.{term}={weight if enabled else 0.0}")
    return out


def _has_key(cfg: dict, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def make_split(
    work: Path, data_config: str, overrides: Sequence[str], mode: str = "stratified", name: str = "folds.csv"
) -> Path:
    """A split (`mode`: stratified or clusters) written to `work`/`name`; the overrides of keys
    the data config has (e.g. data.use_prepared) apply to it as they do to training."""
    data_cfg = read_yaml(data_config)
    folds = work / name
    argv = [
        "--config",
        data_config,
        "--force",
        *[o for o in overrides if _has_key(data_cfg, o.split("=", 1)[0].lstrip("+"))],
        f"split.mode={mode}",
        f"paths.outputs={work}",
        f"paths.folds={folds}",
    ]
    if cv_split.main(argv) != 0:
        raise FoldError(f"cv_split.py could not build the {mode} split in {work}")
    return folds


@contextmanager
def split_work(args: argparse.Namespace, prefix: str) -> Iterator[tuple[Path, Path, list[int]]]:
    """The ablation's work folder (`args.keep`, kept; else a temporary one, removed afterwards),
    its stratified split, and the folds to run (`args.folds`, checked against the split; or all)."""
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        folds_csv = make_split(work, args.data_config, args.overrides)
        available = sorted(pd.read_csv(folds_csv, usecols=["fold"])["fold"].unique().tolist())
        folds = args.folds if args.folds is not None else available
        unknown = sorted(set(folds) - set(available))
        if unknown:
            raise FoldError(f"fold(s) {unknown} not in the split (folds: {available})")
        yield work, folds_csv, folds
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run_setting(args: argparse.Namespace, setting: str, work: Path, folds_csv: Path, folds: list[int]) -> dict:
    base = load_config([args.data_config, args.config], args.overrides)
    out = work / setting
    overrides = [
        *args.overrides,
        *loss_overrides(base, setting),
        f"paths.outputs={out}",
        f"paths.folds={folds_csv}",
        "+train.progress=false",
    ]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    cfg = load_config([args.data_config, args.config], overrides)
    start = time.perf_counter()
    fold_auc = {}
    for k in folds:
        fold_auc[k] = train.train_fold(cfg, k)["auc"]
    seconds = time.perf_counter() - start
    oof, _ = member_predictions(out, cfg["name"], folds)
    n_folds = len(folds)
    report = score_report(oof["target"], oof["y_pred"])
    return {
        "setting": setting,
        "loss": {k: float(cfg["loss"][k]) for k in ("ce", "nce", "kl")},
        "folds": n_folds,
        "n_oof": len(oof),
        "oof_auc": report["auc"],
        "oof_tpr@fpr1e-3": report["tpr@fpr1e-3"],
        "mean_fold_auc": float(np.mean(list(fold_auc.values()))),
        "fold_auc": {str(k): v for k, v in fold_auc.items()},
        "train_seconds": round(seconds, 1),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| setting | w_ce | w_nce | w_kl | OOF AUC | OOF TPR@FPR=1e-3 | mean fold AUC | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        w = r["loss"]
        lines.append(
            f"| {r['setting']} | {w['ce']:g} | {w['nce']:g} | {w['kl']:g} | {r['oof_auc']:.4f} "
            f"| {r['oof_tpr@fpr1e-3']:.4f} | {r['mean_fold_auc']:.4f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    with split_work(args, "loss_ablation_") as (work, folds_csv, folds):
        rows = [run_setting(args, s, work, folds_csv, folds) for s in args.settings]
    cfg = load_config([args.data_config, args.config], args.overrides)
    return {
        "config": args.config,
        "overrides": list(args.overrides),
        "epochs": args.epochs or cfg["train"]["epochs"],
        "folds": folds,
        "split": "stratified",
        "train_labels": str(resolve_data(cfg).train_labels),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_publish(lambda: run(args), lambda result: markdown(result["rows"]), None)


if __name__ == "__main__":
    sys.exit(main())
