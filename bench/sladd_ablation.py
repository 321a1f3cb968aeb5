"""Ablation of the sladd member: forgeries from random configurations against the synthesizer's,
out of fold, over several seeds; and how the synthesizer's choices move over training (PNG).

  python -m bench.sladd_ablation                                  # demo member, every fold, seeds 0 1 2
  python -m bench.sladd_ablation --seeds 0 1 --folds 0 --out bench/results/sladd_ablation_demo.json \
      --plot bench/results/sladd_synthesizer_demo.png

Each setting trains the member on every chosen fold of a label-stratified split built first in
the work folder (bench.loss_ablation.split_work; nothing under outputs/ is read or written),
once per seed (`train.seed`: the initialisations, the batches, the sources, every forgery):

- `random`: `synthesizer.mode=random`, configurations drawn uniformly (regions, blend types,
  `none` included, mag in [mag_min, 1]) and never learnt;
- `learned`: the synthesizer trained by REINFORCE, which starts from that same uniform policy,
  with the published reward (the detector's loss on the whole batch, no baseline);
- `image_reward`: the same with each action paid the loss on the image it made, less a moving
  baseline (not the public code's; it pays `none` the loss on a real).

A setting's out-of-fold (OOF) predictions are its folds' oof.csv files together; rows give
their ROC-AUC and TPR at FPR = 1e-3 per seed, the summary the mean and sample standard
deviation over seeds. The plot reads the learnt runs' metrics.csv: per epoch, the mean
probability of each region and blend type under the synthesizer, and what its images became
(the share of fakes), averaged over seeds and folds. Prints a JSON object, then a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bench.loss_ablation import parse_with_overrides, split_work
from bench.output import run_and_publish
from bench.sbi_ablation import ablation_parser, ablation_result, markdown, train_setting
from core.config import load_config
from core.report import pyplot, save_figure

SETTINGS: dict[str, list[str]] = {
    "random": ["synthesizer.mode=random"],
    "learned": [],
    "image_reward": ["synthesizer.reward=image", "synthesizer.baseline_momentum=0.9"],
}
BLENDS = ("alpha", "poisson", "copy", "none")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ablation_parser(__doc__, "configs/members/sladd_demo.yaml", SETTINGS)
    p.add_argument("--plot", help="write the synthesizer's distributions over training here (PNG)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every setting")
    return parse_with_overrides(p, argv)


def run_one(args: argparse.Namespace, setting: str, seed: int, work: Path, folds_csv: Path, folds: list[int]) -> dict:
    """Train `setting` with `seed` on every fold; its OOF scores and the runs' histories."""
    out = work / f"{setting}-seed{seed}"
    row = train_setting(args, setting, SETTINGS[setting], seed, folds_csv, out, folds)
    name = load_config([args.config])["name"]
    history = [
        pd.read_csv(out / name / f"fold{k}" / "metrics.csv").assign(fold=k, seed=seed).to_dict("records") for k in folds
    ]
    return {**row, "history": [r for rows in history for r in rows]}


def synthesizer_trajectory(rows: list[dict]) -> pd.DataFrame:
    """Per learnt setting and epoch, the synthesizer's figures (synth_* columns) averaged over its
    runs' seeds and folds."""
    history = pd.DataFrame(
        [{**h, "setting": r["setting"]} for r in rows if r["setting"] != "random" for h in r["history"]]
    )
    if history.empty:
        return history
    columns = [c for c in history if c.startswith("synth_")]
    return history.groupby(["setting", "epoch"])[columns].mean().reset_index()


def plot_trajectory(trajectory: pd.DataFrame, path: str | Path, title: str) -> Path:
    """Three panels over the epochs, for the published reward (`learned`): region probabilities,
    blend-type probabilities (the per-image reward's dashed, where it ran), and the share of the
    synthesized images that were fakes (the rest the real unchanged)."""
    plt = pyplot()
    fig, (ax_r, ax_b, ax_f) = plt.subplots(1, 3, figsize=(14, 4))
    published = trajectory[trajectory["setting"] == "learned"]
    per_image = trajectory[trajectory["setting"] == "image_reward"]
    blend_cols = [f"synth_p_{b}" for b in BLENDS]
    region_cols = [c for c in trajectory if c.startswith("synth_p_") and c not in blend_cols]
    for col in region_cols:
        ax_r.plot(published["epoch"], published[col], marker=".", label=col.removeprefix("synth_p_"))
    ax_r.set(xlabel="epoch", ylabel="mean probability", title="region (published reward)")
    ax_r.legend(fontsize=7, ncol=2)
    for i, col in enumerate(blend_cols):
        name = col.removeprefix("synth_p_")
        ax_b.plot(published["epoch"], published[col], marker="o", color=f"C{i}", label=name)
        if not per_image.empty:
            ax_b.plot(per_image["epoch"], per_image[col], ls="--", color=f"C{i}", label=f"{name}, per-image reward")
    ax_b.set(xlabel="epoch", title="blend type")
    ax_b.legend(fontsize=7)
    for setting, rows, ls in (("", published, "-"), (", per-image reward", per_image, "--")):
        if rows.empty:
            continue
        ax_f.plot(rows["epoch"], rows["synth_fake"], ls=ls, marker="o", color="C0", label=f"fake{setting}")
        ax_f.plot(rows["epoch"], rows["synth_none"], ls=ls, marker="s", color="C1", label=f"none (real){setting}")
    ax_f.set(xlabel="epoch", ylim=(0, 1), title="what the synthesized images became")
    ax_f.legend(fontsize=7)
    return save_figure(fig, path, title)


def run(args: argparse.Namespace) -> dict:
    with split_work(args, "sladd_ablation_") as (work, folds_csv, folds):
        rows = [run_one(args, s, seed, work, folds_csv, folds) for s in args.settings for seed in args.seeds]
    cfg = load_config([args.data_config, args.config], args.overrides)
    trajectory = synthesizer_trajectory(rows)
    if args.plot and "learned" in args.settings:
        plot_trajectory(trajectory, args.plot, f"{cfg['name']}: the synthesizer over training (seeds {args.seeds})")
    runs = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    return {**ablation_result(args, cfg, folds, runs), "synthesizer_by_epoch": trajectory.to_dict("records")}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_publish(lambda: run(args), lambda result: markdown(result["summary"]), args.out)


if __name__ == "__main__":
    sys.exit(main())
