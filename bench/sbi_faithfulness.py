"""How the SBI generator's masks compare with the reference recipe's; prints JSON.

    python -m bench.sbi_faithfulness [--n 100] [--sizes 380 512] [--seed 0] [--out FILE]

Inputs: the two bundled portraits (scikit-image's astronaut, matplotlib's Grace Hopper),
each at every input size, framed two ways: "photo", the whole photograph scaled so its
longer side is the size, and "face", a square around the face 1.6 times the landmarks'
extent, resized to the size. dlib (data_prep.faces.FaceAnalyzer) finds the face box and
the 68 landmarks again at each size.

For each input, `--n` masks are drawn by the published recipe (configs/members/sbi_fed.yaml)
in three frames:

- "input": `sbi_mask_stages` on the whole input image. The issue's reference figures were
  measured this way, by another party against the public code (its mask function applied
  to 380-512 px images), so this is the like-with-like row.
- "cut": `sbi_mask_stages` on the cut that `sbi_sample` blends in (the landmark box widened
  by w/2, h above, 0.4h below), the frame the recipe really blends in.
- "output": the mask that `sbi_sample` returns, on the 380 px network input after the
  face-box crop (divided by its blend ratio).

Definitions (M: the mask scaled to peak 1; pixels of the frame it lives in):

- edge width: along the normal of M's 0.5 level line, the distance between the points where
  M falls to 0.1 outward and rises to 0.9 inward. Normals come from the gradient of M at
  contour points 3 px apart; rays that reach a 0.1 or 0.9 level only outside the image, or
  not within a quarter of the frame, are left out. One value per mask: the median over rays.
- eroded share: 1 - area(eroded) / area(hull), both at the small working size (192-256 px)
  where the erosion runs, the hull after the elastic deformation and the resize.
- coverage: area(M > 0) / frame area (weights under 1/512, which cannot move a uint8 pixel,
  count as 0).

The JSON gives percentiles (5, 25, 50, 75, 95) and the extremes per input size, framing
("all": both framings pooled) and frame, with the reference figures beside them. Edge
widths are found to 0.25 px.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import cv2
import numpy as np

from core.io import write_json
from data_prep.blending import (
    SBIConfig,
    SBIMask,
    load_sbi_config,
    precrop_window,
    sbi_mask_stages,
    sbi_sample,
)
from data_prep.faces import FaceAnalyzer

PERCENTILES = (5, 25, 50, 75, 95)
# Measured by another party against the public SBI code on 380-512 px faces (the text).
REFERENCE = {
    "edge_width_px": [9, 46],
    "eroded_share": [0.16, 0.70],
    "note": "range measured on 380-512 px images with the reference mask function; compare with the 'input' frame",
}
# The previous generator of this project (blur at full resolution), measured the same way.
PREVIOUS = {"edge_width_px": [4, 15], "eroded_share": [0.08, 0.38]}

Face = tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]  # image, landmarks, box


# --------------------------------------------------------------------------- measures


def edge_width(mask: np.ndarray, step: int = 3) -> float:
    """Median distance between M's 0.1 and 0.9 levels along the normal of its 0.5 level line (NaN if none)."""
    m = mask.astype(np.float32) / max(float(mask.max()), 1e-12)
    h, w = m.shape
    contours, _ = cv2.findContours((m >= 0.5).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return float("nan")
    pts = np.concatenate([c[:, 0, :] for c in contours])[::step].astype(np.float32)
    # Contour points on the image border follow the border, not the blend edge.
    pts = pts[(pts[:, 0] > 1) & (pts[:, 0] < w - 2) & (pts[:, 1] > 1) & (pts[:, 1] < h - 2)]
    gy, gx = np.gradient(cv2.GaussianBlur(m, (0, 0), 1.0))
    g = np.stack([gx, gy], axis=-1)[pts[:, 1].astype(int), pts[:, 0].astype(int)]
    norm = np.linalg.norm(g, axis=1)
    keep = norm > 1e-6
    pts, out = pts[keep], -g[keep] / norm[keep, None]  # outward: where M falls
    reach = max(h, w) / 4
    t = np.arange(0.0, reach, 0.25, dtype=np.float32)
    outward = _profiles(m, pts, out, t)
    inward = _profiles(m, pts, -out, t)
    t_out = _first(outward <= 0.1, t)
    t_in = _first(inward >= 0.9, t)
    widths = t_out + t_in
    widths = widths[np.isfinite(widths)]
    return float(np.median(widths)) if widths.size else float("nan")


def _profiles(m: np.ndarray, pts: np.ndarray, direction: np.ndarray, t: np.ndarray) -> np.ndarray:
    """M sampled (bilinear) along each ray pts + t * direction; NaN outside the image."""
    xs = pts[:, None, 0] + t[None] * direction[:, None, 0]
    ys = pts[:, None, 1] + t[None] * direction[:, None, 1]
    vals = cv2.remap(m, xs.astype(np.float32), ys.astype(np.float32), cv2.INTER_LINEAR, borderValue=np.nan)
    return vals


def _first(hit: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per row, the t of the first hit (NaN where there is none)."""
    any_hit = hit.any(axis=1)
    return np.where(any_hit, t[np.argmax(hit, axis=1)], np.nan)


def eroded_share(stages: SBIMask) -> float:
    """1 - area(eroded) / area(hull), both at the small size where the erosion runs."""
    hull = float(stages.hull.sum())
    return float(1.0 - stages.eroded.sum() / hull) if hull > 0 else float("nan")


def coverage(mask: np.ndarray) -> float:
    return float((mask > 0).mean())


def summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return {"n": 0}
    out = {f"p{p}": round(float(np.percentile(v, p)), 3) for p in PERCENTILES}
    return {"n": int(v.size), "min": round(float(v.min()), 3), **out, "max": round(float(v.max()), 3)}


# --------------------------------------------------------------------------- inputs


def _photographs() -> dict[str, np.ndarray]:
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    with cbook.get_sample_data("grace_hopper.jpg") as fh, Image.open(fh) as img:
        hopper = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return {"astronaut": np.ascontiguousarray(data.astronaut()[..., :3]), "grace_hopper": hopper}


def _framings(rgb: np.ndarray, analyzer: FaceAnalyzer, size: int) -> dict[str, np.ndarray]:
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    photo = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    face = analyzer.primary(rgb)
    if face is None:
        raise SystemExit("dlib found no face in a bundled photograph")
    lm = face.landmarks
    centre = (lm.min(0) + lm.max(0)) / 2
    half = 0.8 * float(np.ptp(lm, axis=0).max())
    x0, y0 = np.maximum(np.floor(centre - half), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(centre + half), (w, h)).astype(int)
    crop = cv2.resize(rgb[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_AREA)
    return {"photo": photo, "face": crop}


def load_inputs(sizes: list[int]) -> dict[int, dict[str, Face]]:
    """{size: {"<photo>/<framing>": (image, landmarks, box)}}, faces found again at each size."""
    analyzer = FaceAnalyzer(detector="hog", upsample=1, embed=False, pick="score")
    inputs: dict[int, dict[str, Face]] = {s: {} for s in sizes}
    for name, rgb in _photographs().items():
        for size in sizes:
            for framing, img in _framings(rgb, analyzer, size).items():
                face = analyzer.primary(img)
                if face is None:
                    raise SystemExit(f"dlib found no face in {name} framed as {framing} at {size} px")
                inputs[size][f"{name}/{framing}"] = (img, face.landmarks.astype(np.float64), face.box)
    return inputs


# --------------------------------------------------------------------------- measurement


def measure(face: Face, n: int, rng: np.random.Generator, cfg: SBIConfig) -> dict[str, dict[str, list[float]]]:
    img, lm, box = face
    x0, y0, x1, y1 = precrop_window(lm, img.shape, cfg)
    cut_shape = (y1 - y0, x1 - x0)
    rows: dict[str, dict[str, list[float]]] = {
        "input": {"edge_width_px": [], "eroded_share": [], "coverage": []},
        "cut": {"edge_width_px": [], "eroded_share": [], "coverage": []},
        "output": {"edge_width_px": [], "coverage": []},
    }
    for _ in range(n):
        for frame, (points, shape) in {"input": (lm, img.shape), "cut": (lm - (x0, y0), cut_shape)}.items():
            stages = sbi_mask_stages(points, shape, rng, cfg)
            rows[frame]["edge_width_px"].append(edge_width(stages.mask))
            rows[frame]["eroded_share"].append(eroded_share(stages))
            rows[frame]["coverage"].append(coverage(stages.mask))
        _, _, mask = sbi_sample(img, lm, box, rng, cfg)
        rows["output"]["edge_width_px"].append(edge_width(mask))
        rows["output"]["coverage"].append(coverage(mask))
    return rows


def run(sizes: list[int], n: int, seed: int) -> dict:
    cfg = load_sbi_config()
    rng = np.random.default_rng(seed)
    inputs = load_inputs(sizes)
    result: dict = {
        "recipe": "configs/members/sbi_fed.yaml",
        "n_per_input": n,
        "seed": seed,
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "reference": REFERENCE,
        "previous_generator": PREVIOUS,
        "sizes": {},
    }
    for size in sizes:
        pooled: dict[str, dict[str, dict[str, list[float]]]] = {"all": {}, "photo": {}, "face": {}}
        faces = {}
        for name, face in inputs[size].items():
            img, lm, _ = face
            faces[name] = {"image": list(img.shape[:2]), "face_extent_px": round(float(np.ptp(lm, axis=0).max()), 1)}
            framing = name.split("/")[1]
            for frame, metrics in measure(face, n, rng, cfg).items():
                for metric, values in metrics.items():
                    for group in ("all", framing):
                        pooled[group].setdefault(frame, {}).setdefault(metric, []).extend(values)
        result["sizes"][str(size)] = {
            "inputs": faces,
            **{
                group: {frame: {m: summary(v) for m, v in metrics.items()} for frame, metrics in frames.items()}
                for group, frames in pooled.items()
            },
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="masks drawn per input (default: %(default)s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[380, 512], help="input sizes (default: 380 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args.sizes, args.n, args.seed)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        write_json(result, args.out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
