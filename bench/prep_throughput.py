"""Data-stage throughput per CPU core, on the bundled demo photographs; prints one JSON.

    python -m bench.prep_throughput [--n 30] [--faces-n 12] [--sbi-n 200] [--no-sbi] [--target 2000]

- faces: images/s through what the stage's faces step does per image (dlib HOG detection,
  68 landmarks, 128-d embedding), on the two photographs as shipped (512 x 512 and
  600 x 512) and on face crops at 256 and 512 px, HOG upsampling 0 and 1;
- edits: images/s of each `data_prep.edits` kind at 256 and 512 px (astronaut face as target,
  Grace Hopper's as donor), with and without the JPEG encoding the stage writes;
- decode: JPEG decodes/s at 512 px (`core.imaging.decode_image`), the floor of any loader;
- sbi: the JSON of `python -m bench.prep_sbi` (SBI pairs/s, SLADD forgeries/s), run as a
  child process so it keeps its own one-core settings;
- feed_b4: cores each operation would need to keep up with an EfficientNet-B4 training step
  consuming `--target` images/s (assumed, see docs/data.md).

Every rate is measured on one thread. `per_s` is wall-clock; `per_cpu_s` divides by the
process's CPU time, which stays right on a machine shared with other jobs (where
`cpu_over_wall` falls below 1); core counts use `per_cpu_s`.
"""

from __future__ import annotations

import os

# One core means one thread for every library that could spread out, set before they load.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from core.imaging import decode_image  # noqa: E402
from data_prep import demo, edits  # noqa: E402
from data_prep.faces import FaceAnalyzer  # noqa: E402


def _rate(fn: Callable[[], object], n: int, warmup: int = 2) -> dict:
    for _ in range(warmup):  # lazily loaded models and tables
        fn()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "per_s": round(n / wall, 1),
        "per_cpu_s": round(n / max(cpu, 1e-9), 1),
        "ms_each": round(1000 * wall / n, 2),
        "cpu_over_wall": round(cpu / wall, 2),
    }


def _crop(photo: demo.Photo, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square face crop (1.6 x the landmark extent) resized to `size`, as competition images are."""
    lm = photo.landmarks.astype(np.float64)
    centre = (lm.min(0) + lm.max(0)) / 2
    side = 1.6 * float(np.ptp(lm, axis=0).max())
    x0, y0 = np.maximum(np.floor(centre - side / 2), 0).astype(int)
    side_i = int(min(side, photo.rgb.shape[0] - y0, photo.rgb.shape[1] - x0))
    crop = photo.rgb[y0 : y0 + side_i, x0 : x0 + side_i]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA), (lm - [x0, y0]) * (size / side_i)


def bench_faces(photos: tuple[demo.Photo, ...], n: int) -> dict:
    out: dict = {}
    images = {p.name: p.rgb for p in photos}
    for size in (256, 512):
        images[f"{photos[0].name}_crop{size}"] = _crop(photos[0], size)[0]
    for up in (0, 1):
        analyzer = FaceAnalyzer(detector="hog", upsample=up, embed=True, pick="score")
        for name, rgb in images.items():
            found = analyzer.primary(rgb) is not None
            out[f"{name}_{rgb.shape[1]}x{rgb.shape[0]}_up{up}"] = {
                **_rate(lambda a=analyzer, r=rgb: a.primary(r), n),
                "found": found,
            }
    return out


def bench_edits(photos: tuple[demo.Photo, ...], n: int) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {}
    for size in (256, 512):
        tgt, tgt_lm = _crop(photos[0], size)
        src, src_lm = _crop(photos[1], size)
        background = edits.synthetic_background(tgt.shape, rng)
        ops: dict[str, Callable[[], edits.EditResult]] = {
            "background": lambda t=tgt, lm=tgt_lm, b=background: edits.replace_background(t, lm, b, rng),
            "faceswap": lambda t=tgt, lm=tgt_lm, s=src, slm=src_lm: edits.face_swap(t, lm, s, slm, rng),
            "swap": lambda t=tgt, lm=tgt_lm, s=src, slm=src_lm: edits.region_swap(
                t, lm, s, slm, edits.SWAP_REGIONS[int(rng.integers(4))], rng
            ),
            "degrade": lambda t=tgt: edits.degrade(t, rng),
        }
        for kind, fn in ops.items():
            out[f"{kind}_{size}"] = _rate(fn, n)
            out[f"{kind}_{size}_with_jpeg"] = _rate(lambda f=fn: edits.encode_jpeg(f().rgb, 90), n)
    return out


def bench_decode(photos: tuple[demo.Photo, ...], n: int) -> dict:
    rgb = _crop(photos[0], 512)[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "face512.jpg"
        path.write_bytes(edits.encode_jpeg(rgb, 90))
        return {"jpeg_512": _rate(lambda: decode_image(path), 10 * n)}


def bench_sbi(n: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.prep_sbi", "--n", str(n)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"bench.prep_sbi exited with {proc.returncode}: {tail[0]}"}
    return json.loads(proc.stdout)


def feeding(result: dict, target: float) -> dict:
    """Cores to keep a training step that eats `target` images/s fed, per operation."""

    def cores(per_image_s: float) -> float:
        return round(target / per_image_s, 1)

    faces = result["faces"]
    dec = result["decode"]["jpeg_512"]["per_cpu_s"]
    feed = {
        "target_img_per_s": target,
        "decode_jpeg_512": cores(dec),
        "faces_512_crop_up0": cores(faces["astronaut_crop512_512x512_up0"]["per_cpu_s"]),
        "edit_faceswap_512": cores(result["edits"]["faceswap_512_with_jpeg"]["per_cpu_s"]),
        "edit_swap_512": cores(result["edits"]["swap_512_with_jpeg"]["per_cpu_s"]),
    }
    sbi = result.get("sbi", {}).get("sbi", {})
    if "face_crop_380" in sbi:
        # prep_sbi reports wall-clock rates; dividing by its cpu/wall gives the rate per busy core.
        pairs = sbi["face_crop_380"]["pairs"]["per_s"] / max(sbi["face_crop_380"]["pairs"]["cpu_over_wall"], 1e-3)
        # A pair is two training images (the real and its blend) made from one decoded image.
        per_image = 1.0 / (1.0 / (2.0 * pairs) + 1.0 / (2.0 * dec))
        feed["sbi_380_pairs_plus_decode"] = cores(per_image)
    return feed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="timed iterations per edit measurement")
    parser.add_argument("--faces-n", type=int, default=12, help="timed iterations per face measurement")
    parser.add_argument("--sbi-n", type=int, default=200, help="iterations passed to bench.prep_sbi")
    parser.add_argument("--no-sbi", action="store_true", help="leave out bench.prep_sbi")
    parser.add_argument("--target", type=float, default=2000.0, help="images/s a B4 training step consumes")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    photos = demo.load_photos()
    result: dict = {
        "threads": cv2.getNumThreads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    result["faces"] = bench_faces(photos, args.faces_n)
    result["edits"] = bench_edits(photos, args.n)
    result["decode"] = bench_decode(photos, args.n)
    if not args.no_sbi:
        result["sbi"] = bench_sbi(args.sbi_n)
    result["feed_b4"] = feeding(result, args.target)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
