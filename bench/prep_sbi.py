"""Throughput of the online blending recipes on one CPU core; prints JSON.

    python -m bench.prep_sbi [--n 300] [--seed 0]

- SBI: pairs/s at 380 px from landmarks computed once beforehand, on the astronaut photograph
  resized to 380 (as asked of a Dataset worker: the face is small in the frame) and on a face
  crop resized to 380 (what a face-crop training set feeds; the mask covers more pixels);
  and whole training samples (`sbi_sample`: flip, cut, pair, crop, resize to 380) from the
  512 px photograph and from the same photograph at 1024 px.
- SLADD: forgeries/s at 256 px (the method's input size) for each blend type, the Grace
  Hopper face pasted onto the astronaut's, cycling through the ten regions.

Landmark detection is outside every timed loop: the Dataset reads cached landmarks.
"""

from __future__ import annotations

import os

# One core means one thread for every library that could spread out, set before they load.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from data_prep.blending import (  # noqa: E402
    BLEND_TYPES,
    SLADD_REGIONS,
    load_sbi_config,
    region_mask,
    sbi_pair,
    sbi_sample,
    sladd_forge,
)


def _landmarker() -> Callable[[np.ndarray], tuple[np.ndarray, tuple[int, int, int, int]]]:
    import dlib

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("face_recognition_models is not installed: it ships the 68-landmark model")
    path = Path(spec.submodule_search_locations[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(path))

    def find(img: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """68 landmarks and the face box (x1, y1 exclusive) of the best-scoring face."""
        rects, scores, _ = detector.run(img, 0)
        if not rects:
            raise SystemExit("no face found in a benchmark photograph")
        rect = rects[int(np.argmax(scores))]
        shape = predictor(img, rect)
        lm = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        return lm, (rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1)

    return find


def _resize(img: np.ndarray, lm: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[:2]
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return out, lm * [size / w, size / h]


def _face_crop(img: np.ndarray, lm: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    centre = (lm.min(0) + lm.max(0)) / 2
    side = 1.6 * np.ptp(lm, axis=0).max()
    x0, y0 = np.maximum(np.floor(centre - side / 2), 0).astype(int)
    side_i = int(min(side, img.shape[0] - y0, img.shape[1] - x0))
    crop = img[y0 : y0 + side_i, x0 : x0 + side_i]
    return _resize(crop, lm - [x0, y0], size)


def _rate(fn: Callable[[], object], n: int) -> dict:
    for _ in range(max(5, n // 20)):  # warm caches and lazily built tables
        fn()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    # cpu/wall near 1 confirms the loop really ran on one core.
    return {"per_s": round(n / wall, 1), "ms_each": round(1000 * wall / n, 2), "cpu_over_wall": round(cpu / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="timed iterations per measurement")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cv2.setNumThreads(1)

    from matplotlib.cbook import get_sample_data
    from skimage.data import astronaut

    find = _landmarker()
    astro = astronaut()
    astro_lm, astro_box = find(astro)
    hopper = cv2.cvtColor(cv2.imread(str(get_sample_data("grace_hopper.jpg", asfileobj=False))), cv2.COLOR_BGR2RGB)
    hopper_lm, _ = find(hopper)

    rng = np.random.default_rng(args.seed)
    recipe = load_sbi_config()
    no_pair_augment = load_sbi_config(pair_augment=False)
    result: dict = {
        "threads": cv2.getNumThreads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "n": args.n,
        "sbi": {},
        "sladd": {},
    }

    full, full_lm = _resize(astro, astro_lm, 380)
    crop, crop_lm = _face_crop(astro, astro_lm, 380)
    for name, (img, lm) in {"astronaut_380": (full, full_lm), "face_crop_380": (crop, crop_lm)}.items():
        result["sbi"][name] = {
            "pairs": _rate(lambda img=img, lm=lm: sbi_pair(img, lm, rng, recipe), args.n),
            "pairs_no_pair_augment": _rate(lambda img=img, lm=lm: sbi_pair(img, lm, rng, no_pair_augment), args.n),
        }
    big = cv2.resize(astro, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR)
    big_box = tuple(2 * v for v in astro_box)
    for name, (img, lm, box) in {
        "sample_from_photo_512": (astro, astro_lm, astro_box),
        "sample_from_photo_1024": (big, astro_lm * 2 + 0.5, big_box),
    }.items():
        result["sbi"][name] = _rate(lambda img=img, lm=lm, box=box: sbi_sample(img, lm, box, rng, recipe), args.n)

    tgt, tgt_lm = _face_crop(astro, astro_lm, 256)
    src, src_lm = _face_crop(hopper, hopper_lm, 256)
    counter = iter(range(10**9))
    result["sladd"]["size"] = 256
    result["sladd"]["region_mask"] = _rate(
        lambda: region_mask(tgt_lm, next(counter) % len(SLADD_REGIONS), tgt.shape, rng), args.n
    )
    for blend_type in BLEND_TYPES:
        result["sladd"][f"forge_{blend_type}"] = _rate(
            lambda bt=blend_type: sladd_forge(
                tgt, tgt_lm, src, src_lm, next(counter) % len(SLADD_REGIONS), bt, 0.8, rng
            ),
            args.n,
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
