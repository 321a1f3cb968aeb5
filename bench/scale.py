"""How each stage of the pipeline grows with the number of images; prints JSON and a table.

    python -m bench.scale                          # N = 2k, 10k, 40k train images
    python -m bench.scale --n 2000 10000 --out bench/results/scale.json
    python -m bench.scale --n 40000 --stages split train

For every N it builds a synthetic set shaped like the competition's (N train JPEGs of 96-128 px
listed as `img_name,target`, N/10 test JPEGs, `use_prepared: false`, the demo's tiny timm
encoder for the split) and runs the project's own commands on it, each in a process of its own:

- `split`: `cv_split.py` (features, k-means, folds, report; its t-SNE view, drawn up to 2000
  images only, is turned off so that it does not flatter the growth);
- `train`: `train.py --config configs/members/mff_demo.yaml --fold 0 train.epochs=1` (one epoch,
  then the fold's validation images and the test list scored);
- `infer_first`, `infer`: `infer.py` on the N/10 test images with that fold's weights, the first
  call (exporting the network to ONNX) and a second one (warm);
- `blend`: `ensemble.py` with its default config over 5 members whose out-of-fold and test
  predictions are drawn here for every fold of the split (N rows x 5 members).

Each stage reports wall seconds, CPU seconds and its process's peak resident memory (from
`os.wait4`: CPU time summed over the process and the children it waited for, such as loader
workers and export processes; `ru_maxrss` the largest of them), and, between consecutive N,
its growth per 4x N: (t2 / t1) ** (log 4 / log(N2 / N1)). The target: at most 4.8x per 4x N in
CPU time (linear within 20 %; wall time is reported too, but on a shared machine it also
measures the other jobs) and less than 4x in memory. Compare growth within one run, not
seconds across runs.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bench.output import publish
from core.config import load_config, save_config
from core.io import write_csv, write_json

SIZES = (2000, 10000, 40000)
STAGES = ("split", "train", "infer_first", "infer", "blend")
BLEND_MEMBERS = 5
TIME_TARGET = 4.8  # per 4x N: linear within 20 %
MEMBER_CONFIG = "configs/members/mff_demo.yaml"


def write_images(folder: Path, names: list[str], targets: np.ndarray, rng: np.random.Generator) -> None:
    """Smooth colour fields of 96-128 px saved as JPEG; a fake has a patch of another texture
    pasted in (what the networks see is beside the point here: only the amount of work counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in zip(names, targets, strict=True):
        side = int(rng.integers(96, 129))
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR)).copy()
        if target:
            top, left, size = *rng.integers(0, side // 2, 2), side // 3
            image[top : top + size, left : left + size] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / name, quality=90)


def build_set(root: Path, n: int, seed: int) -> Path:
    """N train and N/10 test images with their lists under `root`, and the data config naming them."""
    rng = np.random.default_rng(seed)
    train = pd.DataFrame({"img_name": [f"{i:07d}.jpg" for i in range(n)], "target": rng.integers(0, 2, n)})
    test = pd.DataFrame({"img_name": [f"{i:07d}.jpg" for i in range(max(1, n // 10))]})
    write_images(root / "trainset", train["img_name"].tolist(), train["target"].to_numpy(), rng)
    write_images(root / "valset", test["img_name"].tolist(), np.zeros(len(test), dtype=int), rng)
    write_csv(train, root / "trainset_label.txt")
    write_csv(test, root / "valset_list.txt")
    cfg = load_config(["configs/data.yaml"])
    cfg["data"].update(
        train_labels=str(root / "trainset_label.txt"),
        train_root=str(root / "trainset"),
        test_list=str(root / "valset_list.txt"),
        test_root=str(root / "valset"),
        use_prepared=False,
    )
    cfg["paths"] = {"outputs": str(root / "outputs"), "folds": str(root / "outputs" / "folds.csv")}
    cfg["split"]["encoder"] = dict(cfg["split"]["demo"]["encoder"])  # the tiny encoder: no hub here
    cfg["split"]["progress"] = False
    cfg["split"]["tsne_max"] = (
        0  # the report's t-SNE runs up to 2000 images only: a fixed cost that would flatter growth
    )
    return save_config(cfg, root / "data.yaml")


def run_stage(cmd: list[str], log: Path) -> dict:
    """Wall seconds and peak resident memory of `cmd` (output to `log`); an error names the log."""
    with open(log, "w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen does not wait again
    if proc.returncode not in (0, 1):  # infer.py: 1 when some input was skipped
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}; see {log}")
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),  # with the children it waited for
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
    }


def draw_members(root: Path, data_cfg: Path, members: list[str], seed: int) -> None:
    """Out-of-fold and test predictions of `members` for every fold of the split, as train.py
    writes them (oof.csv, test.csv, a complete meta.json): the target plus noise, squashed."""
    cfg = load_config([data_cfg])
    folds = pd.read_csv(cfg["paths"]["folds"], dtype={"img_name": str})
    test = pd.read_csv(cfg["data"]["test_list"], dtype={"img_name": str})
    rng = np.random.default_rng(seed)
    for m, member in enumerate(members):
        for k, part in folds.groupby("fold"):
            out = Path(cfg["paths"]["outputs"]) / member / f"fold{k}"
            logit = (0.3 + 0.2 * m) * (2 * part["target"].to_numpy() - 1) + rng.standard_normal(len(part))
            oof = part[["img_name", "target"]].assign(y_pred=1 / (1 + np.exp(-logit)))
            write_csv(oof, out / "oof.csv")
            write_csv(test.assign(y_pred=rng.random(len(test))), out / "test.csv")
            write_json({"complete": True, "config": {"name": member}}, out / "meta.json")


def measure(n: int, root: Path, stages: list[str], seed: int) -> dict:
    """Every stage of `stages` on a set of `n` images built under `root`."""
    t0 = time.perf_counter()
    data_cfg = str(build_set(root, n, seed))
    row: dict = {"n": n, "test_images": max(1, n // 10), "build_seconds": round(time.perf_counter() - t0, 1)}
    outputs = root / "outputs"
    py = sys.executable
    weights = outputs / "mff_demo" / "fold0" / "model.safetensors"
    infer = [py, "infer.py", str(root / "valset"), "--weights", str(weights), "--data-config", data_cfg]
    members = [f"drawn{m}" for m in range(BLEND_MEMBERS)]
    commands = {
        "split": [py, "cv_split.py", "--config", data_cfg],
        "train": [py, "train.py", "--config", MEMBER_CONFIG, "--data-config", data_cfg, "--fold", "0"]
        + ["train.epochs=1"],
        "infer_first": [*infer, "--out", str(root / "preds_first.csv")],
        "infer": [*infer, "--out", str(root / "preds.csv")],
        "blend": [py, "ensemble.py", "--data-config", data_cfg, "--members", ",".join(members)]
        + ["--out", str(root / "submission.csv")],
    }
    for stage in stages:
        if stage == "blend":
            draw_members(root, Path(data_cfg), members, seed)
        row[stage] = run_stage(commands[stage], root / f"{stage}.log")
        print(f"n={n} {stage}: {row[stage]}", file=sys.stderr)
    row["load_average_after"] = [round(x, 1) for x in os.getloadavg()]  # how shared the machine was
    return row


def per_4x(small: float, large: float, n_small: int, n_large: int) -> float:
    """The ratio large / small scaled to a 4x step in N (as if the growth were a power of N)."""
    return round((large / small) ** (math.log(4) / math.log(n_large / n_small)), 2)


def growth(rows: list[dict], stages: list[str]) -> list[dict]:
    """Each stage's growth per 4x N between consecutive sizes, and whether it meets the target."""
    out = []
    for a, b in zip(rows, rows[1:], strict=False):
        for stage in stages:
            step = {"stage": stage, "from_n": a["n"], "to_n": b["n"]}
            for key, name in (("seconds", "time"), ("cpu_seconds", "cpu"), ("peak_rss_mb", "memory")):
                step[f"{name}_per_4x"] = per_4x(a[stage][key], b[stage][key], a["n"], b["n"])
            # CPU seconds decide where the machine is shared: wall time then measures the other jobs too
            step["meets_target"] = step["cpu_per_4x"] <= TIME_TARGET and step["memory_per_4x"] < 4
            out.append(step)
    return out


def cell(measured: dict) -> str:
    return f"{measured['seconds']:.1f} s ({measured['cpu_seconds']:.1f} CPU s), {measured['peak_rss_mb'] / 1024:.2f} GB"


def table(result: dict) -> str:
    stages = result["stages"]
    lines = [
        "| stage | " + " | ".join(f"N = {r['n']}" for r in result["rows"]) + " | growth per 4x N: wall (CPU), memory |"
    ]
    lines.append("|---|" + "---:|" * len(result["rows"]) + "---|")
    for stage in stages:
        cells = [cell(r[stage]) for r in result["rows"]]
        steps = [g for g in result["growth"] if g["stage"] == stage]
        grown = "; ".join(f"{g['time_per_4x']}x ({g['cpu_per_4x']}x), {g['memory_per_4x']}x" for g in steps) or "-"
        lines.append(f"| `{stage}` | " + " | ".join(cells) + f" | {grown} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=list(SIZES), help="train images per set (default: %(default)s)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="(default: all, in order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="folder for the sets, their outputs and logs, kept (default: a temporary one)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if ("infer" in args.stages or "infer_first" in args.stages) and "train" not in args.stages:
        p.error("the infer stages score with the fold the train stage trains: add train")
    if "train" in args.stages and "split" not in args.stages:
        p.error("the train stage trains on the split's folds: add split")
    if "blend" in args.stages and "split" not in args.stages:
        p.error("the blend stage draws predictions for the split's folds: add split")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stages = [s for s in STAGES if s in args.stages]
    if args.work:  # kept: each stage's log is there
        rows = [measure(n, Path(args.work) / f"n{n}", stages, args.seed) for n in sorted(args.n)]
    else:
        with tempfile.TemporaryDirectory(prefix="scale_") as work:
            rows = [measure(n, Path(work) / f"n{n}", stages, args.seed) for n in sorted(args.n)]
    result = {
        "stages": stages,
        "rows": rows,
        "growth": growth(rows, stages),
        "target": {"time_per_4x_at_most": TIME_TARGET, "memory_per_4x_below": 4},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
    }
    result["all_meet_target"] = all(g["meets_target"] for g in result["growth"])
    publish(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
