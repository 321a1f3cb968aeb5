"""Self-blend loader throughput per core at 380 px, guidance on and off; prints JSON.

    python -m bench.sbi_loader_throughput [--n 200] [--out bench/results/sbi_loader_throughput.json]

What one loader worker does per item of the `sbi` recipe (data_prep.sbi_online.SBIPairs):
decode the real's file, blend it (blending.sbi_sample's steps, 380 px output), normalise
both images, and for guidance the face-embedding inputs; items are collated 16 pairs a
batch as the trainer's loader does. One item is one pair, two training images. Modes:

- `off`: no guidance (the published SBI recipe);
- `dlib_cached`: the fake's dlib embedding computed, the real's read from the face cache (default);
- `dlib_online`: both embedded (`loss.embedder.real: online`);
- `torch`: aligned 112 px face crops of both for a torch embedder that runs on the device.

Sources: JPEG face crops of 512 px (the competition's images are face crops around 512 px)
cut from scikit-image's astronaut and matplotlib's Grace Hopper; landmarks and embeddings
from dlib once, outside the timed loops, as the data stage caches them.

Everything runs on one thread; rates are per CPU-second (`cpu_over_wall` under 1 says the
machine was shared). `cores_to_feed` divides an assumed H100 training-step rate by the
images per CPU-second; the rates assumed and where
they come from are in the JSON (`step_rates`).
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
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.io import write_json  # noqa: E402
from data_prep.blending import load_sbi_config  # noqa: E402
from data_prep.faces import FaceAnalyzer  # noqa: E402
from data_prep.sbi_online import DlibEmbedder, EmbedderSpec, RealFace, SBIPairs, collate_pairs  # noqa: E402

BATCH_PAIRS = 16  # the published batch: 16 reals and their 16 self-blends
MODES: dict[str, EmbedderSpec | None] = {
    "off": None,
    "dlib_cached": EmbedderSpec(kind="dlib", real="cached"),
    "dlib_online": EmbedderSpec(kind="dlib", real="online"),
    "torch": EmbedderSpec(kind="torch", file="on-the-device", size=112),
}
# Images/s that one H100 trains EfficientNet-B4 at 380 px in bf16 (assumed: no GPU here).
STEP_RATES = {
    "adamw_step": {
        "images_per_s": 1000,
        "source": (
            "timm's published training benchmark: tf_efficientnet_b4_ap at 380 px, AMP, channels_last, RTX 3090: "
            "242 img/s (results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv), times the memory-bandwidth "
            "ratio H100 SXM / RTX 3090 (3.35 / 0.936 TB/s; B4's depthwise convolutions and BatchNorm are "
            "bandwidth-bound) = 866; and its RTX 5090 inference benchmark (1657 img/s, "
            "benchmark-infer-amp-nchw-pt291-cu130-5090.csv) / 3 for forward + backward x 3.35 / 1.79 TB/s = 1034"
        ),
    },
    "sam_step": {
        "images_per_s": 500,
        "source": "the published SBI optimiser, SAM: two forward-backward passes per update, half the adamw_step rate",
    },
}


def _faces(workdir: Path) -> list[RealFace]:
    """Two 512 px JPEG face crops with their landmarks, box and embedding, as the data stage caches them."""
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as img:
        grace = np.asarray(img.convert("RGB"))
    analyzer = FaceAnalyzer(embed=False, upsample=0)
    embed = DlibEmbedder()
    out = []
    for name, photo in (("astronaut", data.astronaut()), ("grace", grace)):
        face = analyzer.primary(photo)
        lm = face.landmarks.astype(np.float64)
        centre, side = (lm.min(0) + lm.max(0)) / 2, 1.8 * float(np.ptp(lm, axis=0).max())
        x0, y0 = np.clip(np.rint(centre - side / 2), 0, None).astype(int)
        side_px = int(min(side, photo.shape[0] - y0, photo.shape[1] - x0))
        crop = cv2.resize(photo[y0 : y0 + side_px, x0 : x0 + side_px], (512, 512), interpolation=cv2.INTER_AREA)
        path = workdir / f"{name}.jpg"
        Image.fromarray(crop).save(path, quality=95)
        scale = 512 / side_px
        crop_lm = (lm - (x0, y0)) * scale
        bx0, by0, bx1, by1 = face.box
        box = tuple(
            int(np.clip(round((v - o) * scale), 0, 512)) for v, o in ((bx0, x0), (by0, y0), (bx1, x0), (by1, y0))
        )
        out.append(RealFace(str(path), crop_lm, box, embed(crop, crop_lm)))
    return out


def _rate(dataset: SBIPairs, n: int) -> dict:
    """Pairs and images per CPU-second of items plus their collate, on this thread (per
    CPU-second, so that other work on a shared machine does not lower them; wall-clock
    rates beside them)."""
    for i in range(4):  # load the dlib model, warm look-up tables
        dataset[i]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    items = []
    for i in range(n):
        items.append(dataset[i])
        if len(items) == BATCH_PAIRS:
            collate_pairs(items)
            items = []
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "pairs_per_cpu_s": round(n / cpu, 2),
        "images_per_cpu_s": round(2 * n / cpu, 2),
        "cpu_ms_per_pair": round(1000 * cpu / n, 1),
        "images_per_wall_s": round(2 * n / wall, 2),
        "cpu_over_wall": round(cpu / wall, 2),
    }


def _descriptor_ms(face: RealFace, n: int) -> float:
    """CPU milliseconds of one dlib face descriptor (the 512 px crop, its 68 landmarks)."""
    embed = DlibEmbedder()
    img = cv2.cvtColor(cv2.imread(face.path), cv2.COLOR_BGR2RGB)
    embed(img, face.landmarks)
    start = time.process_time()
    for _ in range(n):
        embed(img, face.landmarks)
    return round(1000 * (time.process_time() - start) / n, 1)


def run(n: int, size: int, descriptor_n: int = 20) -> dict:
    """Every mode's rates on one thread; the caller's thread settings come back afterwards."""
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        return _run(n, size, descriptor_n)
    finally:
        cv2.setNumThreads(cv_threads)
        torch.set_num_threads(threads)


def _run(n: int, size: int, descriptor_n: int) -> dict:
    recipe = load_sbi_config(output_size=size)
    with tempfile.TemporaryDirectory(prefix="sbi_loader_") as tmp:
        faces = _faces(Path(tmp))
        reals = faces * (n // len(faces) + 8)
        modes = {}
        for mode, spec in MODES.items():
            modes[mode] = _rate(SBIPairs(reals, recipe, (0, 0, 0), (1, 1, 1), seed=0, embedder=spec), n)
        descriptor = _descriptor_ms(faces[0], descriptor_n)
    cores = {
        mode: {step: round(s["images_per_s"] / r["images_per_cpu_s"], 1) for step, s in STEP_RATES.items()}
        for mode, r in modes.items()
    }
    return {
        "output_size": size,
        "batch_pairs": BATCH_PAIRS,
        "n_pairs": n,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opencv": cv2.__version__,
        "modes": modes,
        "dlib_descriptor_cpu_ms": descriptor,
        "step_rates": STEP_RATES,
        "cores_to_feed": cores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="timed pairs per mode")
    parser.add_argument("--size", type=int, default=380, help="network input size (sbi.output_size)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = run(args.n, args.size)
    if args.out:
        write_json(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
