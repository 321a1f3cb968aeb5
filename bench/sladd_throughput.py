"""SLADD's CPU work per forged pair at 256 px, beside the detector's step rate; prints JSON.

    python -m bench.sladd_throughput [--n 200] [--out bench/results/sladd_throughput.json]

A training step of the `sladd` member does two kinds of CPU work:

- in the loader workers, per item (`data_prep.sladd_online.SLADDItems`): a real with a face
  (a target) decodes itself and its forgery source, any other image itself (512 px JPEG face
  crops, as the competition's images), each resized to 256 px and mirrored;
- in the training process, per target, after the synthesizer has drawn its configuration
  (`forge_pair`: align the source by landmarks, colour-transfer it inside the region, blend,
  check that the fake changed, the 16 x 16 mask target), run by `recipe.forge_threads` threads.
  `prepare` adds stacking the batch; here, on a CPU, it also normalises the images (on a
  GPU that is device work).

`overlap`: the trainer starts forging the next batch (`SynthesizerPart.ahead`, on a thread)
while the detector steps on this one; its gain against forging inside `prepare`, measured in
one run (wall-clock seconds per training step, the two ways alternating), with a stand-in for
the GPU that holds no CPU for as long as forging a batch takes.

Configurations are drawn as the untrained synthesizer draws them (uniform regions and blend
types, `none` included, mag uniform in [mag_min, 1]); each blend type is also timed alone.
Everything runs on one thread (rates per CPU-second, robust on a shared machine); the thread
scaling of the forging pool is wall-clock. The detector's step: its CPU rate here (fp32,
legacy_xception with the synthesizer, `--cpu-step`), and an assumed H100 rate, whose source is
in the JSON (`gpu_step`); `workers` divides it by the per-core rates, for a training set whose
share `--target-share` of images are reals with a face (each costs the GPU three images: itself,
its synthesized image, and the synthesizer's pass over the pair).
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
from data_prep.sladd_online import (  # noqa: E402
    Entry,
    ForgeSettings,
    RecipeSettings,
    SLADDItems,
    collate_sladd,
    forge_pair,
)
from models.sladd import SynthesizerPart, SynthSettings, build_synthesizer  # noqa: E402

CONFIG = "configs/members/sladd.yaml"
DEMO_CONFIG = "configs/members/sladd_demo.yaml"
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
    "images_per_target": 3,
    "images_per_target_why": (
        "the detector trains on the real and its synthesized image, and the synthesizer, an Xception of the "
        "same size, on the pair; any other training image is 1"
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


def _forge_rates(ds: SLADDItems, forge: ForgeSettings, n: int) -> dict:
    items = [ds[i] for i in range(8)]  # targets
    out = {}
    for label, blend_type in (("uniform", None), *((b, b) for b in BLEND_TYPES[:3])):
        configs = _configurations(n + 3, forge, blend_type)

        def one(i: int, configs=configs) -> None:
            it = items[i % len(items)]
            region, kind, mag = configs[i]
            forge_pair(it["real"], it["real_lm"], it["source"], it["source_lm"], region, kind, mag, i, forge)

        out[label] = _per_cpu_second(one, n)
    return out


def _prepare_rate(ds: SLADDItems, cfg: dict, threads: int, batches: int, batch_items: int = 32) -> dict:
    """`SynthesizerPart.prepare` (random configurations, no network) on collated batches: pairs
    per wall-second with `threads` forging threads, and per CPU-second."""
    s, forge = SynthSettings.from_cfg(cfg), ForgeSettings.from_cfg(cfg)
    recipe = replace(RecipeSettings.from_cfg(cfg), forge_threads=threads)
    part = SynthesizerPart(None, replace(s, mode="random"), forge, recipe, [0.5] * 3, [0.5] * 3, amp=False)
    part.to(torch.device("cpu"))
    collated = [collate_sladd([ds[(b * batch_items + i) % 16] for i in range(batch_items)]) for b in range(2)]
    part.prepare(collated[0], learn=True)  # start the pool
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for b in range(batches):
        part.prepare(collated[b % 2], learn=True)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n = batches * batch_items
    return {"threads": threads, "pairs_per_wall_s": round(n / wall, 1), "pairs_per_cpu_s": round(n / cpu, 1)}


def _overlap(ds: SLADDItems, cfg: dict, rounds: int, batch_items: int, run_steps: int = 4) -> dict:
    """Training steps in the trainer's order (`prepare`, the detector's forward, REINFORCE and the
    synthesizer's step, `ahead`, the detector's backward and step) on 256 px batches of
    `batch_items` (half targets), one forging thread, the demo member's small synthesizer. The
    detector is a stand-in for a GPU: it holds no CPU and takes as long as forging one batch
    takes here (a third for its forward, two thirds for its backward and step), the case
    `recipe.forge_threads` is sized for: forging just keeps up with the device. `sequential`
    forges in `prepare`, `overlapped` forges the next batch in `ahead` on a thread while the
    device steps. The two ways alternate, `rounds` runs of `run_steps` steps each, so that a
    shared machine's load falls on both alike; a run's first step, which has no batch forged
    ahead (as an epoch's first), is left out of the timing. Wall-clock seconds per step and
    their ratio."""
    demo = load_config([DEMO_CONFIG])
    s = SynthSettings.from_cfg(demo)
    forge, recipe = ForgeSettings.from_cfg(cfg), replace(RecipeSettings.from_cfg(cfg), forge_threads=1)
    torch.manual_seed(0)
    part = SynthesizerPart(build_synthesizer(s), s, forge, recipe, [0.5] * 3, [0.5] * 3, amp=False)
    part.to(torch.device("cpu"))
    batches = [collate_sladd([ds[(b * batch_items + i) % 32] for i in range(batch_items)]) for b in range(2)]
    start = time.perf_counter()
    for batch in batches:
        part.prepare(batch, learn=False)
    device_s = (time.perf_counter() - start) / len(batches)

    def steps(overlap: bool) -> float:
        start = 0.0
        for k in range(run_steps):
            if k == 1:
                start = time.perf_counter()
            out = part.prepare(batches[k % 2], learn=True)
            time.sleep(device_s / 3)  # the detector's forward on the device
            n_images = len(out["image"])
            part.backward(out, {"loss": torch.tensor(1.0), "sample_loss": torch.ones(n_images)}, 1.0)
            part.step()
            if overlap and k + 1 < run_steps:
                part.ahead(batches[(k + 1) % 2])
            time.sleep(2 * device_s / 3)  # its backward and Adam step
        return time.perf_counter() - start

    seconds = {"sequential": 0.0, "overlapped": 0.0}
    for _ in range(rounds):
        for way in seconds:
            seconds[way] += steps(way == "overlapped")
    per_step = {way: t / ((run_steps - 1) * rounds) for way, t in seconds.items()}
    return {
        "batch_items": batch_items,
        "targets_per_batch": batch_items // 2,
        "device_s_per_step": round(device_s, 4),
        "steps_each": (run_steps - 1) * rounds,
        "sequential_s_per_step": round(per_step["sequential"], 4),
        "overlapped_s_per_step": round(per_step["overlapped"], 4),
        "speedup": round(per_step["sequential"] / per_step["overlapped"], 3),
    }


def _cpu_step(cfg: dict, items: int, steps: int) -> dict:
    """Detector (forward, the sladd loss, backward, Adam) and synthesizer (forward, REINFORCE,
    backward, Adam) on `items` targets, each with its synthesized image and one image passing
    through (a target share of one half), random pixels at 256 px, fp32 on this CPU."""
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
    return {
        "targets": items,
        "threads": torch.get_num_threads(),
        "training_images_per_s": round(2 * items / seconds, 3),
        "gpu_images_per_s_equivalent": round(4 * items / seconds, 3),
    }


def run(
    n: int,
    cpu_step: bool,
    target_share: float = 0.5,
    step_items: int = 2,
    step_count: int = 2,
    batch_items: int = 32,
    overlap_rounds: int = 5,
) -> dict:
    cfg = load_config([CONFIG])
    forge = ForgeSettings.from_cfg(cfg)
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    with tempfile.TemporaryDirectory(prefix="sladd_throughput_") as tmp:
        faces = _faces(Path(tmp))
        recipe = RecipeSettings.from_cfg(cfg)
        # 16 targets, then 16 images that pass through
        entries = [Entry(f.path, 0, f) for f in faces * 8] + [Entry(f.path, 1, None) for f in faces * 8]
        ds = SLADDItems(entries, faces, faces, SIZE, recipe, seed=0)
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        try:
            loader = {
                "target": _per_cpu_second(lambda i: ds[i % 16], n),
                "other": _per_cpu_second(lambda i: ds[16 + i % 16], n),
            }
            forging = _forge_rates(ds, forge, n)
            prepare = [_prepare_rate(ds, cfg, t, max(2, n // batch_items), batch_items) for t in (1, 2)]
            overlap = _overlap(ds, cfg, overlap_rounds, batch_items)
        finally:
            cv2.setNumThreads(cv_threads)
            torch.set_num_threads(threads)
        step = _cpu_step(cfg, step_items, step_count) if cpu_step else None
    # Per training image: 1 + 2 r GPU images; r / target rate + (1 - r) / other rate loader CPU-seconds.
    r = target_share
    items = GPU_STEP["images_per_s"] / (1 + (GPU_STEP["images_per_target"] - 1) * r)
    loader_cpu = r / loader["target"]["per_cpu_s"] + (1 - r) / loader["other"]["per_cpu_s"]
    return {
        "size": SIZE,
        "n": n,
        "cpu": platform.processor() or platform.machine(),
        "cores_here": os.cpu_count(),
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "loader_items_per_cpu_s": loader,
        "target_share": r,
        "forge_pairs_per_cpu_s": forging,
        "prepare": prepare,
        "overlap": overlap,
        "cpu_step": step,
        "gpu_step": GPU_STEP,
        "gpu_training_images_per_s": round(items, 1),
        "gpu_targets_per_s": round(items * r, 1),
        "workers": {
            "loader_workers": round(items * loader_cpu, 1),
            "forge_threads": round(items * r / forging["uniform"]["per_cpu_s"], 1),
            "forge_threads_with_cpu_prepare": round(items * r / prepare[0]["pairs_per_cpu_s"], 1),
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
    parser.add_argument(
        "--target-share", type=float, default=0.5, help="share of training images that are reals with a face"
    )
    parser.add_argument("--overlap-rounds", type=int, default=5, help="rounds of 4 sequential + 4 overlapped steps")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = run(args.n, args.cpu_step, args.target_share, overlap_rounds=args.overlap_rounds)
    if args.out:
        write_json(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
