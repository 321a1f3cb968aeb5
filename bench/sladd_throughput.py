"""SLADD's CPU work per forged pair at 256 px, beside the detector's step rate; prints JSON.

    python -m bench.sladd_throughput [--n 200] [--out bench/results/sladd_throughput.json]

A training step of the `sladd` member does two kinds of CPU work:

- in the loader workers, per item (`data_prep.sladd_online.SLADDPairs`): decode the real, its
  forgery source and a training fake (512 px JPEG face crops, as the competition's images),
  resize each to 256 px, mirror;
- in the training process, per pair, after the synthesizer has drawn its configuration
  (`forge_pair`: align the source by landmarks, colour-transfer it inside the region, blend,
  check that the fake changed, the 16 x 16 mask target), run by `recipe.forge_threads` threads.
  `prepare` adds stacking the batch; here, on a CPU, it also normalises the images (on a
  GPU that is device work).

Configurations are drawn as the untrained synthesizer draws them (uniform regions and blend
types, `none` included, mag uniform in [mag_min, 1]); each blend type is also timed alone.
Everything runs on one thread (rates per CPU-second, robust on a shared machine); the thread
scaling of the forging pool is wall-clock. The detector's step: its CPU rate here (fp32,
legacy_xception with the synthesizer, `--cpu-step`), and an assumed H100 rate, whose source is
in the JSON (`gpu_step`); `workers` divides it by the per-core rates.
"""

from __future__ import annotations

import os

# One core means one thread for every library that could spread out, set before they load;
# only as a program: importing the module (its test does) must not change the environment
# that later subprocesses inherit.
if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from core.config import load_config  # noqa: E402
from core.io import write_json  # noqa: E402
from data_prep.blending import BLEND_TYPES  # noqa: E402
from data_prep.faces import FaceAnalyzer  # noqa: E402
from data_prep.sbi_online import RealFace  # noqa: E402
from data_prep.sladd_online import ForgeSettings, RecipeSettings, SLADDPairs, collate_sladd, forge_pair  # noqa: E402
from models.sladd import SynthesizerPart, SynthSettings, build_synthesizer  # noqa: E402

CONFIG = "configs/members/sladd.yaml"
SIZE = 256
# Images per second one H100 trains legacy_xception on at 256 px in bf16 (assumed: no GPU here).
GPU_STEP = {
    "images_per_s": 2400,
    "source": (
        "timm's published training benchmark: xception (today's legacy_xception, 22.86 M parameters) at 299 px, "
        "AMP, channels_last, RTX 3090: 497.6 img/s (results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv); "
        "x (299/256)^2 for 256 px = 679; x the memory-bandwidth ratio H100 SXM / RTX 3090 (3.35 / 0.936 TB/s), "
        "as bench/sbi_loader_throughput.py scales B4 = 2430. Cross-check: its RTX 5090 inference benchmark, "
        "legacy_xception 2877.5 img/s at 299 px (benchmark-infer-amp-nchw-pt291-cu130-5090.csv) x (299/256)^2 / 3 "
        "for forward + backward x 3.35 / 1.79 TB/s = 2447"
    ),
    "images_per_item": 4,
    "images_per_item_why": (
        "the detector trains on 3 images per item (the real, its synthesized image, a training fake) and the "
        "synthesizer, an Xception of the same size, on 1 pair"
    ),
}


def _faces(workdir: Path) -> list[RealFace]:
    """Two 512 px JPEG face crops with their landmarks, as the data stage caches them."""
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as img:
        grace = np.asarray(img.convert("RGB"))
    analyzer = FaceAnalyzer(embed=False, upsample=0)
    out = []
    for name, photo in (("astronaut", data.astronaut()), ("grace", grace)):
        lm = analyzer.primary(photo).landmarks.astype(np.float64)
        centre, side = (lm.min(0) + lm.max(0)) / 2, 1.8 * float(np.ptp(lm, axis=0).max())
        x0, y0 = np.clip(np.rint(centre - side / 2), 0, None).astype(int)
        side_px = int(min(side, photo.shape[0] - y0, photo.shape[1] - x0))
        crop = cv2.resize(photo[y0 : y0 + side_px, x0 : x0 + side_px], (512, 512), interpolation=cv2.INTER_AREA)
        path = workdir / f"{name}.jpg"
        Image.fromarray(crop).save(path, quality=95)
        out.append(RealFace(str(path), (lm - (x0, y0)) * 512 / side_px, (0, 0, 512, 512), None))
    return out


def _per_cpu_second(fn, n: int) -> dict:
    """fn(i) for i < n on this thread: per CPU-second, and the wall-clock ratio beside it."""
    for i in range(3):  # warm caches, look-up tables
        fn(i)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "per_cpu_s": round(n / cpu, 1),
        "cpu_ms_each": round(1000 * cpu / n, 2),
        "cpu_over_wall": round(cpu / wall, 2),
    }


def _configurations(n: int, forge: ForgeSettings, blend_type: str | None) -> list[tuple[int, str, float]]:
    rng = np.random.default_rng(0)
    return [
        (int(rng.integers(10)), blend_type or BLEND_TYPES[int(rng.integers(4))], float(rng.uniform(forge.mag_min, 1)))
        for _ in range(n)
    ]


def _forge_rates(ds: SLADDPairs, forge: ForgeSettings, n: int) -> dict:
    items = [ds[i % len(ds)] for i in range(8)]
    out = {}
    for label, blend_type in (("uniform", None), *((b, b) for b in BLEND_TYPES[:3])):
        configs = _configurations(n + 3, forge, blend_type)

        def one(i: int, configs=configs) -> None:
            it = items[i % len(items)]
            region, kind, mag = configs[i]
            forge_pair(it["real"], it["real_lm"], it["source"], it["source_lm"], region, kind, mag, i, forge)

        out[label] = _per_cpu_second(one, n)
    return out


def _prepare_rate(ds: SLADDPairs, cfg: dict, threads: int, batches: int, batch_items: int = 32) -> dict:
    """`SynthesizerPart.prepare` (random configurations, no network) on collated batches: pairs
    per wall-second with `threads` forging threads, and per CPU-second."""
    s, forge = SynthSettings.from_cfg(cfg), ForgeSettings.from_cfg(cfg)
    recipe = replace(RecipeSettings.from_cfg(cfg), forge_threads=threads)
    part = SynthesizerPart(None, replace(s, mode="random"), forge, recipe, [0.5] * 3, [0.5] * 3, amp=False)
    part.to(torch.device("cpu"))
    collated = [collate_sladd([ds[(b * batch_items + i) % len(ds)] for i in range(batch_items)]) for b in range(2)]
    part.prepare(collated[0], learn=True)  # start the pool
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for b in range(batches):
        part.prepare(collated[b % 2], learn=True)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = batches * batch_items
    return {"threads": threads, "pairs_per_wall_s": round(n / wall, 1), "pairs_per_cpu_s": round(n / cpu, 1)}


def _cpu_step(cfg: dict, items: int, steps: int) -> dict:
    """Detector (forward, the sladd loss, backward, Adam) and synthesizer (forward, REINFORCE,
    backward, Adam) on `items` items of random pixels at 256 px, fp32 on this CPU."""
    torch.manual_seed(0)
    net = models.build_model(cfg["model"], pretrained=False).train()
    criterion = models.build_criterion(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, weight_decay=5e-4)
    synth = build_synthesizer(replace(SynthSettings.from_cfg(cfg), pretrained=False))
    synth_opt = torch.optim.Adam(synth.parameters(), lr=5e-5)
    n = 3 * items
    batch = {
        "image": torch.randn(n, 3, SIZE, SIZE),
        "target": torch.tensor([0, 1, 1] * items),
        "type_target": torch.tensor([3, 0, 4] * items),
        "mag_target": torch.full((n,), 0.5),
        "mag_valid": torch.zeros(n, dtype=torch.bool),
        "map_target": torch.zeros(n, 1, 16, 16),
        "map_valid": torch.ones(n, dtype=torch.bool),
    }
    pair = torch.randn(items, 6, SIZE, SIZE)

    def step() -> None:
        out = synth(pair)
        (out["region_logits"].sum() + out["blend_logits"].sum()).backward()
        synth_opt.step()
        synth_opt.zero_grad()
        loss, _, _ = criterion(net, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return {"items": items, "threads": torch.get_num_threads(), "items_per_s": round(items / seconds, 2)}


def run(n: int, cpu_step: bool, step_items: int = 2, step_count: int = 2, batch_items: int = 32) -> dict:
    cfg = load_config([CONFIG])
    forge = ForgeSettings.from_cfg(cfg)
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    with tempfile.TemporaryDirectory(prefix="sladd_throughput_") as tmp:
        faces = _faces(Path(tmp))
        recipe = RecipeSettings.from_cfg(cfg)
        ds = SLADDPairs(faces * 8, faces * 8, faces, [f.path for f in faces], SIZE, recipe, seed=0)
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        try:
            loader = _per_cpu_second(lambda i: ds[i % len(ds)], n)
            forging = _forge_rates(ds, forge, n)
            prepare = [_prepare_rate(ds, cfg, t, max(2, n // batch_items), batch_items) for t in (1, 2)]
        finally:
            cv2.setNumThreads(cv_threads)
            torch.set_num_threads(threads)
        step = _cpu_step(cfg, step_items, step_count) if cpu_step else None
    gpu_items = GPU_STEP["images_per_s"] / GPU_STEP["images_per_item"]
    return {
        "size": SIZE,
        "n": n,
        "cpu": platform.processor() or platform.machine(),
        "cores_here": os.cpu_count(),
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "loader_items_per_cpu_s": loader,
        "forge_pairs_per_cpu_s": forging,
        "prepare": prepare,
        "cpu_step": step,
        "gpu_step": GPU_STEP,
        "gpu_items_per_s": gpu_items,
        "workers": {
            "loader_workers": round(gpu_items / loader["per_cpu_s"], 1),
            "forge_threads": round(gpu_items / forging["uniform"]["per_cpu_s"], 1),
            "forge_threads_with_cpu_prepare": round(gpu_items / prepare[0]["pairs_per_cpu_s"], 1),
            "note": "cores for one H100 at the assumed rate: loader workers (decode + resize) and forging threads "
            "(forge_pair per CPU-second; with_cpu_prepare: the whole prepare on this CPU, normalisation included, "
            "which a GPU does on the device); forging runs in the training process, so its threads need cores "
            "of their own beside the loader's",
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="timed items, pairs per blend type")
    parser.add_argument("--cpu-step", action="store_true", help="also time the detector + synthesizer step on this CPU")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = run(args.n, args.cpu_step)
    if args.out:
        write_json(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
