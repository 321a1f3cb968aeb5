"""Parameters and peak memory of the sta member: what the adapters add to a frozen CLIP.

  python -m bench.sta_memory                                  # ViT-L-14 (random weights) and the demo model
  python -m bench.sta_memory --configs configs/members/sta_demo.yaml --frames 8
  python -m bench.sta_memory --out bench/results/sta_memory_cpu.json

For every member config: trainable and total parameters, and the peak memory of one clip of
`--frames` frames at the config's `data.image_size` (224 for sta.yaml; the demo tower takes 48 only),
in training (forward, cross-entropy, backward, an Adam step) and in inference (forward under
inference_mode), each in a fresh process so one does not hide the other. Weights are random
(open_clip's architecture from its config, nothing downloaded): memory does not depend on their
values. On a GPU the peak is torch.cuda.max_memory_allocated (tensors only, the network's weights
included); on a CPU the process's peak resident set (ru_maxrss) minus its resident set before the
network was built, so it includes the allocator's slack. Prints a JSON object and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from bench.output import publish
from core.config import load_config

DEFAULT_CONFIGS = ("configs/members/sta.yaml", "configs/members/sta_demo.yaml")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(config: str, mode: str, frames: int, size: int, device: str) -> dict:
    """One measurement in this process: the member's network with random weights, one clip."""
    import models

    cfg = load_config([config])
    model_cfg = {**cfg["model"], "pretrained": None, "frames": max(frames, int(cfg["model"]["frames"]))}
    dev = torch.device(device)
    before = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    net = models.build_model(model_cfg).to(dev)
    clip = torch.randn(1, frames, 3, size, size, device=dev)
    if mode == "train":
        net.train()
        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=1e-4)
        loss = torch.nn.functional.cross_entropy(net(clip)["logits"], torch.tensor([1], device=dev))
        loss.backward()
        opt.step()
    else:
        net.eval()
        with torch.inference_mode():
            net(clip)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = _rss_mb() - before
    return {
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in net.parameters()),
        "peak_mb": round(peak, 1),
    }


def measure_in_child(config: str, mode: str, frames: int, size: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "bench.sta_memory", "--child", config, mode, str(frames), str(size), device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{config} {mode}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| config | architecture | input | trainable / total parameters | train peak MB | inference peak MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        share = f"{r['trainable_params'] / 1e6:.2f} M / {r['total_params'] / 1e6:.2f} M ({r['trainable_share']:.1%})"
        lines.append(
            f"| `{r['config']}` | {r['architecture']} | {r['size']} px | {share} | {r['train_peak_mb']} | "
            f"{r['infer_peak_mb']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        config, mode, frames, size, device = sys.argv[2:7]
        print(json.dumps(measure(config, mode, int(frames), int(size), device)))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="member configs (default: %(default)s)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    rows = []
    for config in args.configs:
        cfg = load_config([config])
        model, size = cfg["model"], int(cfg["data"]["image_size"])
        train = measure_in_child(config, "train", args.frames, size, args.device)
        infer = measure_in_child(config, "infer", args.frames, size, args.device)
        rows.append(
            {
                "config": config,
                "architecture": model.get("clip") or "inline model_cfg",
                "size": size,
                "trainable_params": train["trainable_params"],
                "total_params": train["total_params"],
                "trainable_share": train["trainable_params"] / train["total_params"],
                "train_peak_mb": train["peak_mb"],
                "infer_peak_mb": infer["peak_mb"],
            }
        )
    result = {
        "frames": args.frames,
        "device": args.device,
        "torch": torch.__version__,
        "peak": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss growth",
        "weights": "random (architecture only)",
        "members": rows,
    }
    publish(result, table(rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
