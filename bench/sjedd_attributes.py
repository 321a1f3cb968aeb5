"""Out-of-fold AUC of every attribute the sjedd member scores: does it say what was altered?

  python -m bench.sjedd_attributes                          # sjedd_demo, every finished fold
  python -m bench.sjedd_attributes --config configs/members/sjedd.yaml --data-config configs/data.yaml
  python -m bench.sjedd_attributes --out bench/results/sjedd_attributes_demo.json

Each finished fold's network (`outputs/<member>/fold<k>/`) scores the images of its own
validation fold, so every image is scored by the one network that never trained on it. An
attribute's labels are what the member trained on: the provenance mapping of its config
(`models.sjedd.attribute_labels`); fakes whose attributes are not recorded are left out. Two
AUCs per attribute: over all images (reals count as negatives, so this includes telling fakes
from reals) and among the fakes only (which alteration, given that the image is fake). Prints a
JSON object and a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.output import publish
from core.checkpoint import WEIGHTS_FILE
from core.config import ConfigError, load_config
from core.data.datasets import ImageDataset, make_loader
from core.data.folds import read_folds
from core.data.sources import read_train_table, resolve_data
from core.data.transforms import build_transform
from core.infer.attributes import ATTRIBUTE_PREFIX
from core.metrics import roc_auc
from core.trained import finished_folds
from models.hierarchy import Hierarchy
from models.sjedd import Provenance, attribute_labels
from models.zoo import load_trained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/members/sjedd_demo.yaml", help="member config (default: %(default)s)")
    p.add_argument("--data-config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


@torch.inference_mode()
def score_fold(weights: Path, paths: list[str], batch_size: int = 64) -> pd.DataFrame:
    """The fold network's fake probability and attribute probabilities for `paths`."""
    trained = load_trained(weights)
    transform = build_transform(trained.config["data"], train=False)
    loader = make_loader(ImageDataset(paths, transform=transform), batch_size, num_workers=0)
    rows = []
    for batch in loader:
        if "image" not in batch:
            continue
        out = trained.model(batch["image"])
        scores = {"fake": torch.softmax(out["logits"].double(), 1)[:, 1]}
        scores.update({k[len(ATTRIBUTE_PREFIX) :]: v for k, v in out.items() if k.startswith(ATTRIBUTE_PREFIX)})
        frame = pd.DataFrame({k: v.double().numpy() for k, v in scores.items()})
        frame.insert(0, "path", [paths[i] for i in batch["index"].tolist()])
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def auc_or_none(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc(labels, scores)) if 0 < labels.sum() < len(labels) else None


def attribute_table(oof: pd.DataFrame, labels: np.ndarray, known: np.ndarray, tree: Hierarchy) -> list[dict]:
    """Per node: positives among the scored images, AUC over all of them and among the fakes (the
    fake node over every image; an attribute over the images whose attributes are recorded)."""
    rows = []
    fake = labels[:, 0] == 1
    for i, node in enumerate(tree.nodes):
        use = known | (i == 0)
        y, s, among = labels[use, i], oof[node].to_numpy()[use], fake[use]
        rows.append(
            {
                "node": node,
                "positives": int(y.sum()),
                "auc_all": auc_or_none(y, s),
                "auc_fakes": None if i == 0 else auc_or_none(y[among], s[among]),
            }
        )
    return rows


def markdown(result: dict) -> str:
    """The docs' table: per node, positives and OOF AUC over all images and among the fakes."""
    lines = ["| node | positives | OOF AUC, all images | OOF AUC, among fakes |", "|---|---:|---:|---:|"]
    for r in result["attributes"]:
        cells = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("auc_all", "auc_fakes")]
        lines.append(f"| {r['node']} | {r['positives']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config([args.data_config, args.config])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    outputs = Path(cfg["paths"]["outputs"])
    folds = finished_folds(outputs, cfg["name"])
    if not folds:
        print(f"error: no finished fold of {cfg['name']} under {outputs}/: train it first", file=sys.stderr)
        return 2
    table = read_folds(cfg["paths"]["folds"], read_train_table(resolve_data(cfg)))
    tree = Hierarchy.from_config(cfg["model"]["hierarchy"])
    labels, known = attribute_labels(table, tree, Provenance.from_cfg(cfg["provenance"], tree), cfg["name"])
    parts = []
    for k in folds:
        val = table[table["fold"] == k]
        scored = score_fold(outputs / cfg["name"] / f"fold{k}" / WEIGHTS_FILE, val["path"].tolist())
        parts.append(scored.assign(row=scored["path"].map(dict(zip(val["path"], val.index, strict=True)))))
    oof = pd.concat(parts, ignore_index=True).sort_values("row")
    rows = oof["row"].to_numpy()
    result = {
        "member": cfg["name"],
        "folds": folds,
        "images": int(len(rows)),
        "fakes_with_unrecorded_attributes": int((~known[rows] & (labels[rows, 0] == 1)).sum()),
        "attributes": attribute_table(oof, labels[rows], known[rows], tree),
    }
    publish(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
