"""The bundled demo sample: a small labelled set in the competition's format, built offline.

    python -m data_prep.demo --out data/demo [--seed 0] [--n-real 160] [--n-test 80] [--size 256]

Sources are public-domain photographs that ship inside installed packages (scikit-image's
astronaut, matplotlib's Grace Hopper); nothing is downloaded. Reals are augmented views of
them; fakes are real manipulations of a real view (its "parent"):

- `edit:swap` (region eyes, eyebrows, nose or mouth): that region of the OTHER photograph,
  aligned to the parent's 68 landmarks, colour-matched and blended in (`edits.region_swap`);
- `edit:faceswap` (region face): the other photograph's inner face, warped onto the parent's
  landmarks, colour-matched and Poisson-cloned (`edits.face_swap`);
- `sbi` (region face): a self-blended image made by `blending.sbi_pair`, the parent blended
  with a warped copy of itself inside a blurred landmark mask, one of the two copies
  colour-shifted and blurred or sharpened. When SBI augments the target copy, that copy is
  the parent real the demo writes, so a fake equals its real outside the blend.

The swaps are the data stage's own edits (`data_prep.edits`), so the demo exercises the
code that prepares real data; method and region names are the manifest's. `sources` is
empty throughout: the pasted faces come from the photographs, not from images of the set.

Layout under `out` (image names are relative to their own image root, `train/` or `test/`):

    train/*.jpg  train_labels.csv (img_name,target)  manifest.csv (img_name,target,method,parent,region,sources)
    test/*.jpg   test_list.csv (img_name)  test_labels.csv (img_name,target)  test_manifest.csv
    videos/*.mp4       video_labels.csv (img_name videos/NNNNN.mp4,target)  video_manifest.csv
    video_test/*.mp4   video_test_labels.csv  video_test_manifest.csv
    DONE         the parameters, written last

The videos (`data_prep.demo_videos`): `n_videos` real clips of 16-32 frames at 128 px made from the
photographs with camera motion and lighting change, and as many fakes made from them (per-frame
image edits and video-level blends); a quarter as many of each for `video_test/`. Their names are
relative to `out` itself (`data.video_root`), so they never collide with image names.

Train has `n_real` reals and as many fakes; test has `n_test` images, half of each, drawn
from a separate random stream. Every real is the parent of at most one fake, and every
image is written once, as JPEG. The same parameters give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from core.io import write_csv, write_json, write_text
from core.progress import progress_bar
from data_prep.blending import load_sbi_config, sbi_pair
from data_prep.demo_photos import (
    FAKE_RECIPES,
    PHOTOS,
    DemoError,
    Photo,
    View,
    augment_view,
    load_photos,
    swap_region,
)
from data_prep.edits import encode_jpeg

# Bump whenever the recipe changes what gets written, so an old build is not taken as current.
RECIPE_VERSION = 5

JPEG_QUALITY = (70, 100)
MIN_SIZE = 64
# The published recipe, less the pair's shared colour jitter and JPEG: a demo view is already
# colour-jittered, and the demo writes every image once as JPEG itself.
DEMO_SBI = load_sbi_config(pair_augment=False)

DONE_FILE = "DONE"
BUILDING_FILE = ".building"
OUTPUT_FILES = (
    "train_labels.csv",
    "manifest.csv",
    "test_list.csv",
    "test_labels.csv",
    "test_manifest.csv",
    "video_labels.csv",
    "video_manifest.csv",
    "video_test_labels.csv",
    "video_test_manifest.csv",
)
OUTPUT_DIRS = ("train", "test", "videos", "video_test")


def _balanced(rng: np.random.Generator, n_options: int, n: int) -> np.ndarray:
    """`n` option indices, each used equally often (+-1), in random order; even tiny sets cover all."""
    return rng.permutation(np.resize(np.arange(n_options), n))


def self_blend(target: View, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An SBI forgery of `target` with itself: (real, fake, blend weight in [0, 1]), by `blending.sbi_pair`.

    `real` is `target`'s pixels, or its augmented copy when SBI augmented the target side;
    either way `fake` equals `real` wherever the weight is 0.
    """
    return sbi_pair(target.rgb, target.landmarks, rng, DEMO_SBI)


def _build_split(
    root: Path,
    rng: np.random.Generator,
    n_real: int,
    n_fake: int,
    size: int,
    photos: Sequence[Photo],
    progress: bool,
    desc: str,
) -> pd.DataFrame:
    """Write one split's images under `root`; return its manifest rows.

    Fakes are made first: a self-blend may hand its parent an augmented copy of the view,
    and the real must be written as its fake saw it. So no real parents two fakes.
    """
    if n_fake > n_real:
        raise DemoError(f"{n_fake} fakes need at least as many reals as parents, got {n_real}")
    total = n_real + n_fake
    width = max(5, len(str(total - 1)))
    # Opaque, shuffled names: the file order says nothing about the label or the parent.
    names = [f"{k:0{width}d}.jpg" for k in rng.permutation(total)]
    photo_idx = _balanced(rng, len(photos), n_real)
    views = [augment_view(photos[i], size, rng) for i in photo_idx]
    parents = _balanced(rng, n_real, n_fake)
    recipes = _balanced(rng, len(FAKE_RECIPES), n_fake)
    by_name = {p.name: p for p in photos}

    rows = []
    root.mkdir(parents=True, exist_ok=True)
    jobs = [("real", i, ("real", "")) for i in range(n_real)] + [
        ("fake", int(p), FAKE_RECIPES[r]) for p, r in zip(parents, recipes, strict=True)
    ]
    fakes_first = [*range(n_real, total), *range(n_real)]
    for k in progress_bar(fakes_first, desc=desc, unit="img", disable=not progress):
        kind, idx, (method, region) = jobs[k]
        view = views[idx]
        if kind == "real":
            rgb, parent = view.rgb, names[k]
        elif method == "sbi":
            # The parent is written as the pair's real: augmented when SBI picked the target side.
            view.rgb, rgb, _ = self_blend(view, rng)
            parent = names[idx]
        else:
            others = [n for n in PHOTOS if n != view.photo and n in by_name]
            source = by_name[others[int(rng.integers(len(others)))]]
            rgb, _ = swap_region(view, source, region, rng)
            parent = names[idx]
        # Fakes start from the parent's pixels before JPEG and get their own quality draw, so
        # reals and fakes share one compression history and "compressed twice" means nothing.
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        (root / names[k]).write_bytes(encode_jpeg(rgb, quality))
        rows.append(
            {
                "img_name": names[k],
                "target": int(kind == "fake"),
                "method": method,
                "parent": parent,
                "region": region,
                "sources": "",
            }
        )
    return pd.DataFrame(rows).sort_values("img_name").reset_index(drop=True)


def _params(seed: int, n_real: int, n_test: int, size: int, n_videos: int) -> dict[str, int]:
    return {
        "recipe": RECIPE_VERSION,
        "seed": seed,
        "n_real": n_real,
        "n_test": n_test,
        "size": size,
        "n_videos": n_videos,
    }


def _done_params(out: Path) -> dict[str, int] | None:
    try:
        return json.loads((out / DONE_FILE).read_text())["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clear(out: Path) -> None:
    """Remove a previous (finished or half-built) demo's outputs, and nothing else."""
    (out / DONE_FILE).unlink(missing_ok=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _counts(df: pd.DataFrame) -> str:
    per = df[df.target == 1].groupby("method").size()
    return ", ".join(f"{m} {int(c)}" for m, c in per.items())


def build_demo(
    out_dir: str | Path,
    seed: int = 0,
    n_real: int = 160,
    n_test: int = 80,
    size: int = 256,
    progress: bool = True,
    force: bool = False,
    n_videos: int = 16,
) -> Path:
    """Build the demo sample under `out_dir` (see the module docstring); return `out_dir`.

    Does nothing when `out_dir/DONE` records the same parameters, unless `force`. A folder holding a
    half-built or differently-parametrised demo is cleared and rebuilt; a non-empty folder
    that is not a demo build is refused, so real data is never deleted.
    """
    if n_real < 1:
        raise DemoError(f"n_real must be >= 1, not {n_real}")
    if n_test < 2:
        raise DemoError(f"n_test must be >= 2 (one real, one fake), not {n_test}")
    if size < MIN_SIZE:
        raise DemoError(f"size must be >= {MIN_SIZE}, not {size}")
    out = Path(out_dir)
    params = _params(seed, n_real, n_test, size, n_videos)
    if _done_params(out) == params and not force:
        print(f"demo: {out} is already built with {params}; nothing to do")
        return out
    ours = (out / DONE_FILE).exists() or (out / BUILDING_FILE).exists()
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise DemoError(f"{out}: folder exists, is not empty and holds no demo build; refusing to write into it")

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # Marks the folder as ours before anything is deleted or written, so an interrupted
    # build is recognised (and cleared) next time.
    write_text(json.dumps(params) + "\n", out / BUILDING_FILE)
    _clear(out)

    photos = load_photos()
    # children 0 and 1 are what spawn(2) gave before the videos: the images stay byte-identical
    train_ss, test_ss, video_ss, video_test_ss = np.random.SeedSequence(seed).spawn(4)
    train = _build_split(
        out / "train", np.random.default_rng(train_ss), n_real, n_real, size, photos, progress, "demo train"
    )
    n_test_real = (n_test + 1) // 2
    test = _build_split(
        out / "test",
        np.random.default_rng(test_ss),
        n_test_real,
        n_test - n_test_real,
        size,
        photos,
        progress,
        "demo test",
    )

    from data_prep.demo_videos import build_videos  # it builds on this module's views and edits

    n_video_test = max(1, n_videos // 4)
    videos = build_videos(out, "videos", np.random.default_rng(video_ss), n_videos, n_videos, photos, progress)
    video_test = build_videos(
        out, "video_test", np.random.default_rng(video_test_ss), n_video_test, n_video_test, photos, progress
    )
    write_csv(videos[["img_name", "target"]], out / "video_labels.csv")
    write_csv(videos, out / "video_manifest.csv")
    write_csv(video_test[["img_name", "target"]], out / "video_test_labels.csv")
    write_csv(video_test, out / "video_test_manifest.csv")

    write_csv(train[["img_name", "target"]], out / "train_labels.csv")
    write_csv(train, out / "manifest.csv")
    write_csv(test[["img_name"]], out / "test_list.csv")
    write_csv(test[["img_name", "target"]], out / "test_labels.csv")
    write_csv(test, out / "test_manifest.csv")
    counts = {
        "train": {"real": int((train.target == 0).sum()), "fake": int((train.target == 1).sum())},
        "test": {"real": int((test.target == 0).sum()), "fake": int((test.target == 1).sum())},
    }
    counts["videos"] = {"real": int((videos.target == 0).sum()), "fake": int((videos.target == 1).sum())}
    write_json({"params": params, "photos": list(PHOTOS), "counts": counts}, out / DONE_FILE)
    (out / BUILDING_FILE).unlink(missing_ok=True)

    for split, df in (("train", train), ("test", test), ("videos", videos)):
        c = counts[split]
        kind = "clips" if split == "videos" else "images"
        print(f"demo: wrote {len(df)} {split} {kind} ({c['real']} real, {c['fake']} fake: {_counts(df)})")
    print(f"demo: {out} built in {time.perf_counter() - start:.1f}s with {params}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-real", type=int, default=160, help="real training images (as many fakes are added)")
    parser.add_argument("--n-test", type=int, default=80, help="test images in all, half real and half fake")
    parser.add_argument("--size", type=int, default=256, help="side of the square images in pixels")
    parser.add_argument("--n-videos", type=int, default=16, help="real training clips (as many fakes are added)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds this build")
    args = parser.parse_args(argv)
    try:
        build_demo(
            args.out,
            args.seed,
            args.n_real,
            args.n_test,
            args.size,
            progress=not args.no_progress,
            force=args.force,
            n_videos=args.n_videos,
        )
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
