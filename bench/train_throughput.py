"""Training throughput: one optimiser step against the data loader that has to feed it.

  python -m bench.train_throughput                                  # demo member, demo sample
  python -m bench.train_throughput --config configs/members/mff.yaml model.pretrained=false
  python -m bench.train_throughput --config configs/members/mff.yaml model.pretrained=false --images photos
  python -m bench.train_throughput --steps 2 --batch-size 4 data.image_size=32    # smoke test

Prints one JSON object; `key=value` overrides apply to the merged data + member config.

- `step`: images/s of whole optimiser steps on tensors already on the device, through the
  Trainer's own code: the member's criterion (`models.build_criterion`; with a KL weight it
  forwards the clean batch and its noisy copy together, so a step forwards 2 x batch
  images), backward, gradient clipping, AdamW, the torch-ema update, and the per-step
  `loss.item()`. On a GPU: bf16 autocast (`core.device.autocast`) and channels_last.
  Images/s counts training images (the batch), not the noisy copies.
- `loader`: images/s of `make_loader` over `ImageDataset` with the real training transforms
  (`build_transform(cfg["data"], train=True)`), `train.num_workers` workers and the
  Trainer's batch sampler, decoding JPEG files: `data` = the configured train images (the
  demo sample when no competition data is configured), `photos` = JPEGs of 512-1024 px
  (the competition's sizes) made in a temporary folder from the photographs that
  scikit-image and matplotlib ship. The first batch (worker start-up) is timed separately.
- `loader_vs_step` = loader images/s / step images/s; `target_met` when it is >= 1.2,
  i.e. the loader has 20 % headroom to keep the step fed.

The two are measured one after the other in one process, each with the whole machine;
during training they share it (on a CPU the loader workers take cores from the step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

import models
from core.config import ConfigError, load_config
from core.data.datasets import ImageDataset, make_loader
from core.data.labels import LabelError
from core.data.sources import read_train_table, resolve_data
from core.data.transforms import build_transform
from core.device import pick_device
from core.distributed import DistInfo, GlobalBatchSampler
from core.train.trainer import Trainer, TrainSettings

TARGET = 1.2
PHOTO_SIDES = (512, 1024)  # competition images are around 512 px; some are larger


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/members/mff_demo.yaml", help="member config (default: %(default)s)")
    p.add_argument("--data-config", default="configs/data.yaml", help="data config (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: %(default)s")
    p.add_argument("--steps", type=int, default=10, help="timed optimiser steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    p.add_argument("--batch-size", type=int, help="default: train.batch_size of the config")
    p.add_argument("--threads", type=int, help="torch CPU threads for the step (default: torch's own choice)")
    p.add_argument(
        "--images",
        default="auto",
        choices=["auto", "data", "photos"],
        help="files the loader reads: the configured train images, or competition-sized photos "
        "(default auto: data when its label file exists, else photos)",
    )
    p.add_argument("--n-photos", type=int, default=64, help="distinct photo JPEGs to make (default: %(default)s)")
    p.add_argument("--loader-batches", type=int, default=20, help="timed loader batches (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.image_size=512")
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _photo(name: str) -> np.ndarray:
    if name == "astronaut":
        from skimage import data

        return np.ascontiguousarray(data.astronaut()[..., :3])
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` JPEGs of 512-1024 px: random square crops of the two photographs, resized,
    mirrored at random, saved at quality 85-95 (so no two files are the same)."""
    rng = np.random.default_rng(seed)
    photos = [_photo("astronaut"), _photo("grace_hopper")]
    paths = []
    for i in range(n):
        img = photos[i % 2]
        h, w = img.shape[:2]
        side = int(rng.integers(int(0.8 * min(h, w)), min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + side]
        out = int(rng.integers(PHOTO_SIDES[0], PHOTO_SIDES[1] + 1))
        crop = cv2.resize(crop, (out, out), interpolation=cv2.INTER_CUBIC if out > side else cv2.INTER_AREA)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        path = folder / f"photo_{i:04d}.jpg"
        quality = int(rng.integers(85, 96))
        if not cv2.imwrite(
            str(path), cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
        ):
            raise OSError(f"{path}: could not write the benchmark JPEG")
        paths.append(path)
    return paths


def loader_files(cfg: dict, images: str, n_photos: int, tmp: Path) -> tuple[list[str], list[int], str]:
    """Paths, targets and a description of the files the loader reads."""
    data = resolve_data(cfg)
    if images == "auto":
        images = "data" if data.train_labels.is_file() else "photos"
    if images == "data":
        table = read_train_table(data)
        what = f"{'demo sample' if data.is_demo else 'train images'} under {data.train_root} ({len(table)} files)"
        return table["path"].tolist(), table["target"].astype(int).tolist(), what
    paths = make_photos(tmp, n_photos)
    return [str(p) for p in paths], [i % 2 for i in range(len(paths))], f"{len(paths)} photo JPEGs, 512-1024 px"


def time_step(
    cfg: dict, settings: TrainSettings, device: torch.device, ds: ImageDataset, steps: int, warmup: int, tmp: Path
) -> dict:
    """Whole optimiser steps through the Trainer's criterion call and `_optimizer_step`."""
    b, size = settings.batch_size, int(cfg["data"]["image_size"])
    torch.manual_seed(settings.seed)
    model = models.build_model(cfg["model"])
    trainer = Trainer(model, models.build_criterion(cfg), ds, ds, settings, tmp / "unused", device)
    trainer.model.train()
    fmt = trainer.memory_format
    images = torch.randn(b, 3, size, size, device=device).contiguous(memory_format=fmt)
    batch = {"image": images, "target": (torch.arange(b) % 2).to(device)}  # half real: the contrastive term has anchors

    def one_step() -> float:
        loss, _ = trainer._backward(batch)
        trainer._optimizer_step([batch])
        return loss.item()  # the Trainer reads the loss every step, which waits for the device

    for _ in range(warmup):
        one_step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    _sync(device)
    wall = time.perf_counter() - start
    loss_cfg = cfg.get("loss", {})
    kl = loss_cfg.get("name") == "mff" and float(loss_cfg.get("kl", 1.0)) != 0
    out = {
        "backbone": cfg["model"].get("backbone", cfg["model"]["name"]),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "loss": {k: v for k, v in loss_cfg.items() if k in ("name", "ce", "nce", "kl")},
        "forward_images_per_step": 2 * b if kl else b,
        "steps": steps,
        "seconds_per_step": round(wall / steps, 4),
        "images_per_s": round(steps * b / wall, 2),
        "last_loss": round(loss, 4),
    }
    if device.type == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return out


def time_loader(ds: ImageDataset, batch_size: int, num_workers: int, n_batches: int, seed: int) -> dict:
    """The Trainer's loader: `n_batches` timed after a first batch that includes worker start-up."""
    sampler = GlobalBatchSampler(len(ds), batch_size, DistInfo(), seed)
    loader = make_loader(ds, batch_size, num_workers, batch_sampler=sampler)
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - start
    if first["errors"]:
        raise OSError(f"benchmark images failed to decode: {first['errors'][:3]}")
    n, t0 = 0, time.perf_counter()
    for _ in range(n_batches):
        batch = next(it)
        n += len(batch["image"])
    wall = time.perf_counter() - t0
    del it  # stops the workers
    return {
        "num_workers": num_workers,
        "batches": n_batches,
        "first_batch_s": round(first_s, 3),
        "seconds_per_batch": round(wall / n_batches, 4),
        "images_per_s": round(n / wall, 2),
        "image_shape": list(first["image"].shape[1:]),
    }


def run(args: argparse.Namespace) -> dict:
    cfg = load_config([args.data_config, args.config], args.overrides)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings.from_cfg(cfg["train"])
    changes: dict = {"progress": False, "accum_steps": 1}
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    if device.type == "cuda":
        changes["channels_last"] = True  # on a GPU every member trains in channels_last
    settings = dataclasses.replace(settings, **changes)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp_name:
        tmp = Path(tmp_name)
        paths, targets, what = loader_files(cfg, args.images, args.n_photos, tmp)
        # Enough items for the first batch and the timed ones: the file list repeated.
        need = (args.loader_batches + 1) * settings.batch_size
        reps = max(1, math.ceil(need / len(paths)))
        ds = ImageDataset(paths * reps, targets * reps, build_transform(cfg["data"], train=True), settings.seed)
        step = time_step(cfg, settings, device, ds, args.steps, args.warmup, tmp)
        loader = time_loader(ds, settings.batch_size, settings.num_workers, args.loader_batches, settings.seed)
    loader["files"] = what
    ratio = loader["images_per_s"] / step["images_per_s"]
    return {
        "config": args.config,
        "overrides": list(args.overrides),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "image_size": int(cfg["data"]["image_size"]),
        "batch_size": settings.batch_size,
        "bf16_autocast": bool(settings.amp and device.type == "cuda"),
        "channels_last": settings.channels_last,
        "step": step,
        "loader": loader,
        "loader_vs_step": round(ratio, 3),
        "target": TARGET,
        "target_met": ratio >= TARGET,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.loader_batches < 1:
        print("error: --steps and --loader-batches must be at least 1", file=sys.stderr)
        return 2
    try:
        result = run(args)
    except (ConfigError, LabelError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
