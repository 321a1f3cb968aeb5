"""Does a member catch a kind of forgery it never saw? Hold each one out, train on the rest, score it.

  python -m bench.generalization                               # the ensemble's members, 2 seeds, 4 epochs
  python -m bench.generalization --epochs 0 --seeds 0 1 2 --out generalization.json   # members' own epochs
  python -m bench.generalization --kinds methods --members configs/members/mff.yaml
  python -m bench.generalization data.use_prepared=false       # data or member overrides as key=value

Held-out kinds: every forgery method of the manifest (a method whose images are all fakes:
edit:faceswap, edit:swap, sbi, sd:...; label-keeping edits such as edit:degrade are not
forgeries) and every cluster of the cluster split (cv_split's k-means domains).

Protocol, per seed s: a label-stratified split that keeps every group of images sharing
pixels in one fold is built once (`cv_split.py`, split.mode=stratified); fold s is the
scored set H, fold s+1 the validation set V (epoch selection), the other folds the training
set T. For each member, a baseline is trained on T (selected on V) and, for each kind, a model
on T and V without that kind's images (selected on V without them, so neither training nor
selection sees the kind). Each model scores H. For a held-out method the AUC is taken over
H's reals and H's fakes of that method; for a held-out cluster over H's images in that
cluster. `unseen` is that AUC for the model trained without the kind, `seen` for the
baseline on the same images. The blend is the plain mean of the members' probabilities.
Spreads are the population std over seeds (held-out set, validation set and training seed
all change with the seed). Test answers are never read. Prints JSON, then a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import train
from bench.loss_ablation import make_split, split_work
from core.config import ConfigError, load_config
from core.data.folds import FoldError
from core.data.labels import LabelError
from core.data.sources import DataPaths, read_train_table, resolve_data
from core.io import write_csv, write_json
from core.metrics import roc_auc
from core.trained import blend_members

KINDS = ("both", "methods", "clusters")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--config", default="configs/ensemble.yaml", help="ensemble config naming the members")
    p.add_argument("--members", nargs="+", help="member configs (default: the members ensemble.py blends)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=4, help="train.epochs of every model; 0: the config's (default: 4)")
    p.add_argument("--kinds", choices=KINDS, default="both", help="hold out methods, clusters or both (default)")
    p.add_argument("--keep", help="work in this folder and keep it; a rerun reads the models it finished")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the data and member configs")
    args = p.parse_intermixed_args(argv)
    args.folds = None  # split_work: every fold of the split
    return args


@dataclass(frozen=True)
class HeldOut:
    """What a model never sees: nothing (the baseline), a forgery method, or a cluster."""

    kind: str  # "none" | "method" | "cluster"
    value: str = ""

    @property
    def label(self) -> str:
        return "nothing (baseline)" if self.kind == "none" else f"{self.kind} {self.value}"

    @property
    def slug(self) -> str:
        return "baseline" if self.kind == "none" else f"{self.kind}_{self.value}".replace(":", "-").replace("/", "-")

    def mask(self, table: pd.DataFrame) -> np.ndarray:
        """The table's images of this kind (what training and selection leave out)."""
        if self.kind == "method":
            return (table["method"] == self.value).to_numpy()
        if self.kind == "cluster":
            return (table["cluster"].astype(str) == self.value).to_numpy()
        return np.zeros(len(table), dtype=bool)

    def scored(self, table: pd.DataFrame) -> np.ndarray:
        """The images its AUC is taken over: the reals and this method's fakes, or the cluster's images."""
        if self.kind == "method":
            return (table["target"] == 0).to_numpy() | self.mask(table)
        return self.mask(table)


def forgery_methods(table: pd.DataFrame) -> list[str]:
    """Methods whose images are all fakes (a label-keeping edit, with reals and fakes, is not a forgery)."""
    fake_share = table.groupby("method")["target"].mean()
    return sorted(m for m, share in fake_share.items() if share == 1.0)


def held_out_kinds(table: pd.DataFrame, which: str) -> list[HeldOut]:
    kinds = []
    if which in ("both", "methods"):
        kinds += [HeldOut("method", m) for m in forgery_methods(table)]
    if which in ("both", "clusters"):
        kinds += [HeldOut("cluster", str(c)) for c in sorted(table["cluster"].unique())]
    return kinds


def roles(folds: list[int], seed: int) -> tuple[int, int]:
    """The scored fold and the validation fold of `seed`; the other folds train."""
    if len(folds) < 3:
        raise FoldError(f"the protocol needs three folds or more (scored, validation, training); the split has {folds}")
    return folds[seed % len(folds)], folds[(seed + 1) % len(folds)]


def model_config(base: dict, data: DataPaths, run: Path, seed: int, epochs: int) -> dict:
    """The member's config trained on `run`/train_labels.csv (fold 0: validation, 1: training),
    scoring `run`/held.csv as its test list."""
    cfg = copy.deepcopy(base)
    cfg["data"].update(
        use_prepared=False,
        train_labels=str(run / "train_labels.csv"),
        train_root=str(data.train_root),
        manifest=str(data.manifest) if data.manifest else None,
        test_list=str(run / "held.csv"),
        test_root=str(data.train_root),
        test_labels=None,
    )
    cfg["paths"] = {"outputs": str(run), "folds": str(run / "folds.csv")}
    cfg["train"].update(progress=False, seed=int(cfg["train"].get("seed", 0)) + seed)
    if epochs:
        cfg["train"]["epochs"] = epochs
    return cfg


def train_and_score(
    cfg: dict, table: pd.DataFrame, train_rows: np.ndarray, val_rows: np.ndarray, held_rows: np.ndarray
):
    """Train on `train_rows`, select on `val_rows`, return (probabilities of `held_rows` by
    img_name, seconds). A model finished under the same config (a --keep folder) is read."""
    run = Path(cfg["paths"]["outputs"])
    out_dir = train.fold_dir(cfg, 0)
    start = time.perf_counter()
    if not (train.is_finished(out_dir) and not train.finished_config_changes(cfg, 0, out_dir)):
        rows = table[train_rows | val_rows]
        write_csv(rows[["img_name", "target"]], run / "train_labels.csv")
        folds = rows[["img_name", "target"]].assign(cluster=0, fold=np.where(val_rows[train_rows | val_rows], 0, 1))
        write_csv(folds, run / "folds.csv")
        write_csv(table.loc[held_rows, ["img_name"]], run / "held.csv")
        train.train_fold(cfg, 0)
    scores = pd.read_csv(out_dir / "test.csv", dtype={"img_name": str}).set_index("img_name")["y_pred"]
    return scores, time.perf_counter() - start


def kind_auc(held: pd.DataFrame, probs: pd.Series, kind: HeldOut) -> dict:
    rows = held[kind.scored(held)]
    target = rows["target"].to_numpy()
    return {
        "n_real": int((target == 0).sum()),
        "n_fake": int((target == 1).sum()),
        "auc": roc_auc(target, probs.reindex(rows["img_name"]).to_numpy()),
    }


def score_rows(seed: int, held: pd.DataFrame, probs: dict[str, dict[HeldOut, pd.Series]], kinds: list[HeldOut]):
    """Unseen and seen AUC of every member and of the blend (plain mean) on every kind."""
    models = {**probs, "blend": {}}
    for kind in [HeldOut("none"), *kinds]:
        models["blend"][kind] = pd.concat([probs[m][kind] for m in probs], axis=1).mean(axis=1)
    rows = []
    for model, by_kind in models.items():
        for kind in kinds:
            unseen = kind_auc(held, by_kind[kind], kind)
            seen = kind_auc(held, by_kind[HeldOut("none")], kind)
            rows.append(
                {
                    "seed": seed,
                    "model": model,
                    "held_out": kind.label,
                    "n_real": unseen["n_real"],
                    "n_fake": unseen["n_fake"],
                    "unseen_auc": unseen["auc"],
                    "seen_auc": seen["auc"],
                }
            )
    return rows


def summarise(scores: list[dict]) -> list[dict]:
    """Per held-out kind and model: AUC mean and std over seeds, unseen and seen."""
    df = pd.DataFrame(scores)
    out = []
    for (kind, model), part in df.groupby(["held_out", "model"], sort=False):
        row = {"held_out": kind, "model": model, "seeds": len(part), "n_fake": part["n_fake"].tolist()}
        for col in ("unseen_auc", "seen_auc"):
            values = part[col].dropna()
            row[f"{col}_mean"] = float(values.mean()) if len(values) else float("nan")
            row[f"{col}_std"] = float(values.std(ddof=0)) if len(values) else float("nan")
        out.append(row)
    return out


def markdown(table: list[dict], models: list[str]) -> str:
    def cell(r: dict, col: str) -> str:
        m, s = r[f"{col}_auc_mean"], r[f"{col}_auc_std"]
        return "-" if np.isnan(m) else f"{m:.3f} +- {s:.3f}"

    head = ["held out", "fakes scored per seed", *(f"{m} unseen (seen)" for m in models), "best on unseen"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * len(models) + "---|"]
    for kind in dict.fromkeys(r["held_out"] for r in table):
        rows = {r["model"]: r for r in table if r["held_out"] == kind}
        cells = [f"{cell(rows[m], 'unseen')} ({cell(rows[m], 'seen')})" for m in models]
        members = {m: rows[m]["unseen_auc_mean"] for m in models if m != "blend"}
        best = max((m for m in members if not np.isnan(members[m])), key=members.get, default="-")
        fakes = "/".join(map(str, rows[models[0]]["n_fake"]))
        lines.append("| " + " | ".join([kind, fakes, *cells, best]) + " |")
    return "\n".join(lines)


def member_configs(args: argparse.Namespace) -> list[str]:
    if args.members:
        return list(args.members)
    cfg = load_config([args.data_config, args.config])
    return [f"configs/members/{m}.yaml" for m in blend_members(cfg, resolve_data(cfg, prepared=False).is_demo)]


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    members = member_configs(args)
    bases = {path: load_config([args.data_config, path], args.overrides) for path in members}
    data = resolve_data(next(iter(bases.values())))
    names = {path: cfg["name"] for path, cfg in bases.items()}
    runs, scores = [], []
    with split_work(args, "generalization_") as (work, folds_csv, folds):
        table = read_train_table(data).merge(pd.read_csv(folds_csv, usecols=["img_name", "fold"]), on="img_name")
        if args.kinds != "methods":
            clusters = make_split(work, args.data_config, args.overrides, mode="clusters", name="clusters.csv")
            table = table.merge(pd.read_csv(clusters, usecols=["img_name", "cluster"]), on="img_name")
        else:
            table["cluster"] = -1
        kinds = held_out_kinds(table, args.kinds)
        for seed in args.seeds:
            held_fold, val_fold = roles(folds, seed)
            held, val = (table["fold"] == held_fold).to_numpy(), (table["fold"] == val_fold).to_numpy()
            trainable = ~held & ~val
            probs: dict[str, dict[HeldOut, pd.Series]] = {}
            for path, base in bases.items():
                probs[names[path]] = {}
                for kind in [HeldOut("none"), *kinds]:
                    drop = kind.mask(table)
                    cfg = model_config(base, data, work / f"seed{seed}" / names[path] / kind.slug, seed, args.epochs)
                    p, seconds = train_and_score(cfg, table, trainable & ~drop, val & ~drop, held)
                    probs[names[path]][kind] = p
                    runs.append(
                        {"seed": seed, "member": names[path], "held_out": kind.label, "seconds": round(seconds, 1)}
                    )
                    print(f"seed {seed} {names[path]} without {kind.label}: {seconds:.0f} s", file=sys.stderr)
            scores += score_rows(seed, table[held].reset_index(drop=True), probs, kinds)
    return {
        "data": "demo sample" if data.is_demo else str(data.train_labels),
        "n_images": len(table),
        "members": members,
        "epochs": args.epochs or "each member's config",
        "seeds": args.seeds,
        "overrides": args.overrides,
        "split": {"mode": "stratified", "folds": folds},
        "held_out": [k.label for k in kinds],
        "runs": runs,
        "scores": scores,
        "table": summarise(scores),
        "models": [*names.values(), "blend"],
        "seconds": round(time.perf_counter() - start, 1),
        "host": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ConfigError, LabelError, FoldError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    print()
    print(markdown(result["table"], result["models"]))
    if args.out:
        write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
