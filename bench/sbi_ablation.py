"""Ablation of the sbi_fed member: plain SBI, SBI + guidance, each guidance loss off, and the
winning solution's NCE and KL terms added (`loss.add`), out of fold, over several seeds.

  python -m bench.sbi_ablation                                    # demo member, every fold, seeds 0 1 2
  python -m bench.sbi_ablation --seeds 0 --folds 0 1 --settings plain guided
  python -m bench.sbi_ablation --out bench/results/sbi_ablation_demo.json --keep ablation_runs

Each setting trains the member on every chosen fold of a label-stratified split built first
in the work folder (as bench.loss_ablation does; nothing under outputs/ is read or written),
once per seed (`train.seed`: the network's initialisation, every self-blend and the batch
order). A setting's out-of-fold (OOF) predictions are its folds' oof.csv files together; the
rows give their ROC-AUC and TPR at FPR = 1e-3 per seed, and the summary their mean and
sample standard deviation over seeds. Only validation folds are scored. Prints a JSON object,
then a markdown table. `key=value` overrides apply to every setting (e.g. train.epochs=4).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

import train
from bench.loss_ablation import parse_with_overrides, split_work
from bench.output import run_and_publish
from core.blend.predictions import member_predictions
from core.checkpoint import META_FILE
from core.config import load_config
from core.data.sources import resolve_data
from core.metrics import score_report

NO_GUIDANCE = ["model.guidance=false"]
# The winning solution's weights for its NCE and KL terms (configs/members/mff.yaml).
NCE_KL = ["+loss.add.nce=0.1", "+loss.add.kl=1.0"]
SETTINGS: dict[str, list[str]] = {
    "plain": NO_GUIDANCE,
    "guided": [],
    "guided-distill": ["loss.distill=0"],
    "guided-recon": ["loss.recon=0"],
    "guided-artifact_ce": ["loss.artifact_ce=0"],
    "guided-residual_ce": ["loss.residual_ce=0"],
    "plain+nce+kl": NO_GUIDANCE + NCE_KL,
    "guided+nce+kl": NCE_KL,
}


def ablation_parser(doc: str, config: str, settings: Sequence[str]) -> argparse.ArgumentParser:
    """The options the sbi and sladd ablations share; the caller adds its own, then `overrides`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=config, help="member config (default: %(default)s)")
    p.add_argument("--data-config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values (default: 0 1 2)")
    p.add_argument("--folds", type=int, nargs="+", help="validation folds to run (default: all)")
    p.add_argument("--settings", nargs="+", choices=list(settings), default=list(settings), help="default: all")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder, removed)")
    p.add_argument("--out", help="also write the JSON here")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ablation_parser(__doc__, "configs/members/sbi_fed_demo.yaml", SETTINGS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every setting")
    return parse_with_overrides(p, argv)


def fold_result(cfg: dict, fold: int) -> tuple[float, float]:
    """The fold's validation AUC and its epochs' seconds (from its meta.json, so a fold read
    back counts as much as one trained now); trained unless it finished under the same config
    (a --keep folder resumes an interrupted ablation)."""
    out_dir = train.fold_dir(cfg, fold)
    if not (train.is_finished(out_dir) and not train.finished_config_changes(cfg, fold, out_dir)):
        train.train_fold(cfg, fold)
    meta = json.loads((out_dir / META_FILE).read_text())
    return float(meta["val"]["auc"]), float(sum(epoch.get("seconds", 0.0) for epoch in meta["history"]))


def train_setting(
    args: argparse.Namespace,
    setting: str,
    setting_overrides: list[str],
    seed: int,
    folds_csv: Path,
    out: Path,
    folds: list[int],
) -> dict:
    """Train a setting (`setting_overrides` on top of the command line's) with `seed` on every
    fold under `out`; its OOF scores. The sbi and sladd ablations share it."""
    overrides = [
        *args.overrides,
        *setting_overrides,
        f"train.seed={seed}",
        f"paths.outputs={out}",
        f"paths.folds={folds_csv}",
        "+train.progress=false",
    ]
    cfg = load_config([args.data_config, args.config], overrides)
    results = {str(k): fold_result(cfg, k) for k in folds}
    oof, _ = member_predictions(out, cfg["name"], folds)
    scored = oof["y_pred"].notna()  # a member scored on face crops leaves images without a face unscored
    report = score_report(oof["target"][scored], oof["y_pred"][scored])
    return {
        "setting": setting,
        "seed": seed,
        "overrides": setting_overrides,
        "n_oof": len(oof),
        "n_unscored": int((~scored).sum()),
        "oof_auc": report["auc"],
        "oof_tpr@fpr1e-3": report["tpr@fpr1e-3"],
        "fold_auc": {k: auc for k, (auc, _) in results.items()},
        "train_seconds": round(sum(seconds for _, seconds in results.values()), 1),
    }


def run_one(args: argparse.Namespace, setting: str, seed: int, work: Path, folds_csv: Path, folds: list[int]) -> dict:
    """Train `setting` with `seed` on every fold; its OOF scores."""
    return train_setting(args, setting, SETTINGS[setting], seed, folds_csv, work / f"{setting}-seed{seed}", folds)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds, per setting, in the order run."""
    table = pd.DataFrame(rows)
    out = []
    for setting, group in table.groupby("setting", sort=False):
        entry = {"setting": setting, "seeds": len(group)}
        for key in ("oof_auc", "oof_tpr@fpr1e-3"):
            values = group[key].to_numpy(dtype=float)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        entry["train_seconds"] = float(group["train_seconds"].mean())
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    lines = [
        "| setting | seeds | OOF AUC (mean +- std) | OOF TPR@FPR=1e-3 (mean +- std) | train s / seed |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['setting']} | {s['seeds']} | {s['oof_auc']:.4f} +- {s['oof_auc_std']:.4f} "
            f"| {s['oof_tpr@fpr1e-3']:.4f} +- {s['oof_tpr@fpr1e-3_std']:.4f} | {s['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def ablation_result(args: argparse.Namespace, cfg: dict, folds: list[int], rows: list[dict]) -> dict:
    """The JSON of an ablation (sbi's, sladd's): what ran, on which data, each run and their summary."""
    return {
        "config": args.config,
        "overrides": list(args.overrides),
        "epochs": cfg["train"]["epochs"],
        "folds": folds,
        "seeds": args.seeds,
        "split": "stratified",
        "train_labels": str(resolve_data(cfg).train_labels),
        "summary": summarise(rows),
        "rows": rows,
    }


def run(args: argparse.Namespace) -> dict:
    with split_work(args, "sbi_ablation_") as (work, folds_csv, folds):
        rows = [run_one(args, s, seed, work, folds_csv, folds) for s in args.settings for seed in args.seeds]
    return ablation_result(args, load_config([args.data_config, args.config], args.overrides), folds, rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_publish(lambda: run(args), lambda result: markdown(result["summary"]), args.out)


if __name__ == "__main__":
    sys.exit(main())
