"""The data stage: originals -> faces -> image edits -> Stable Diffusion fakes -> manifest.

    python -m data_prep --config configs/data.yaml [key=value ...] [--force]

Input: the train labels and image root of `configs/data.yaml` (`core.data.sources.resolve_data`;
the demo sample when no competition data is configured), with their manifest when there is one.
Output, under `prep.out` (default `data/prepared/`):

    orig/<img_name>          the input images, hard-linked (copied where the file system refuses)
    edit/<kind>/NNNNNN.jpg   image edits (data_prep.edits)
    sd/<kind>/NNNNNN.jpg     Stable Diffusion fakes (data_prep.diffusion)
    train_labels.csv         img_name,target for originals and new images, names relative to prep.out
    manifest.csv             img_name,target,method,parent,region,sources
    provenance.csv           the manifest plus source, donor, donor_pool, seed and the drawn parameters
    face_embeddings.npz      the 128-d face embedding of every real original with a face (identity folds)
    data.yaml                a `data:` section pointing the rest of the pipeline here
    config.yaml              the resolved config;  summary.json  the counts printed at the end
    faces/                   per-image face cache (boxes, 68 landmarks, embeddings)
    steps/                   per step: inputs fingerprint, a line per finished output, a done marker
    DONE                     written last

Originals keep their provenance when the input has a manifest; otherwise a real is method
`real` and a fake `original`, each its own parent. `parent` of a new image is the real image
it was made from (the parent of its source); `sources` lists every image that gave it pixels
(the image edited, the face or background donor), so folds that keep images linked by
parent and sources together never show a validation image's pixels in training. Donors are
drawn within donor pools (a seeded partition of the originals), so those links cannot chain
most of the set into one group. Image names are prefixed with `orig/` for originals, parents
and sources likewise, so all names live under one root.

Every new image is a JPEG written here while originals keep their bytes; `edit:reencode`
writes copies of originals of the label that would otherwise be re-encoded less often, so
"written by the data stage" says nothing about the label (the summary checks the shares).

Resumable at two levels (data_prep/steps.py, the step engine): every output is written
atomically and skipped when it exists, and a step whose inputs fingerprint matches and whose
done marker exists is not re-run. A step whose inputs changed (other seed, counts, input
labels) is cleared and rebuilt. Each output's randomness comes from a seed derived from
(prep.seed, method, output index), so the result does not depend on the number of worker
processes, nor on the number of torchrun processes:

    torchrun --nproc_per_node K -m data_prep [...]          # K processes (GPUs) on one machine
    torchrun --nnodes N --node_rank R --rdzv_endpoint HOST:PORT --nproc_per_node K -m data_prep [...]

Every process plans the same jobs and makes every K-th unit of each step (an image's faces, an
edit, a batch of diffusion fakes on its own GPU), logging under steps/ in a log of its own; the
first writes the links, face embeddings, manifest and summary. The output folder must be one
that every node sees (a shared file system). A process that dies leaves its finished outputs,
which the rerun, with any number of processes, skips.

The steps: data_prep/stage_originals.py (the input, linked), stage_faces.py (faces, people,
donor pools), stage_edits.py (image edits and edit:reencode), stage_diffusion.py (Stable
Diffusion fakes), stage_manifest.py (the label files and the summary).
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.config import deep_merge, save_config
from core.data.folds import largest_group, split_groups
from core.data.sources import FACE_EMBEDDINGS_FILE, resolve_data
from core.distributed import DistInfo, barrier
from core.io import write_json, write_text
from core.log import get_logger
from data_prep import diffusion as sd
from data_prep import edits
from data_prep.stage_diffusion import run_diffusion
from data_prep.stage_edits import run_edits, run_reencode
from data_prep.stage_faces import assign_donor_pools, detect_faces, write_face_embeddings
from data_prep.stage_jobs import RECIPE_VERSION, PrepError
from data_prep.stage_manifest import MANIFEST_COLUMNS, print_summary, reencoded_shares, summary_table, write_manifest
from data_prep.stage_originals import ORIG_DIR, link_originals, read_originals, table_hash
from data_prep.steps import Steps, Workers

log = get_logger("data_prep")


MARKER = ".prep"
DONE_FILE = "DONE"

DEFAULTS: dict[str, Any] = {
    "prep": {
        "out": "data/prepared",
        "seed": 0,
        "workers": 2,
        "progress": True,
        "link": "hardlink",
        "jpeg_quality": [75, 100],
        "faces": {"detector": "hog", "upsample": 1, "pick": "score"},
        "counts": {"background": 40, "faceswap": 40, "swap": 40, "degrade": 40},
        "swap_regions": list(edits.SWAP_REGIONS),
        "identity_distance": 0.6,
        "donor_candidates": 8,
        "donor_pools": 16,
        "backgrounds": None,
        "synthetic_background_p": 0.3,
    },
    "diffusion": {
        "model": None,
        "inpaint_model": None,
        "local_files_only": False,
        "device": "auto",
        "batch_size": 8,
        "steps": 30,
        "guidance": 7.5,
        "max_side": 512,
        "txt2img_size": 512,
        "counts": {"inpaint": 40, "img2img": 40, "txt2img": 40},
        "inpaint_regions": list(sd.INPAINT_REGIONS),
        "inpaint_dilate": 0.15,
        "img2img_strength": [0.15, 0.35],
        "crop_txt2img": True,
        "crop_margin": 0.3,
        "negative_prompt": "cartoon, drawing, painting, illustration, deformed, blurry, text, watermark",
        "prompts": {
            "inpaint": {
                "eyes": "a photo of a human face, natural eyes, detailed",
                "eyebrows": "a photo of a human face, natural eyebrows, detailed",
                "nose": "a photo of a human face, natural nose, detailed",
                "mouth": "a photo of a human face, natural mouth and lips, detailed",
            },
            "img2img": ["a high quality photo of a human face"],
            "txt2img": ["a close-up portrait photo of a person, natural light, high detail"],
        },
    },
}


def prep_config(cfg: dict) -> dict:
    """The config with the stage's defaults filled in under `prep` and `diffusion`."""
    merged = deep_merge({k: copy.deepcopy(v) for k, v in DEFAULTS.items()}, cfg)
    counts = {**merged["prep"]["counts"], **merged["diffusion"]["counts"]}
    for kind, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise PrepError(f"counts.{kind} must be a whole number >= 0, not {n!r}")
    unknown = set(merged["prep"]["counts"]) - set(edits.EDIT_KINDS)
    unknown |= {f"diffusion.{k}" for k in set(merged["diffusion"]["counts"]) - set(sd.SD_KINDS)}
    if unknown:
        raise PrepError(
            f"unknown kinds in counts: {sorted(unknown)}; edits: {edits.EDIT_KINDS}, diffusion: {sd.SD_KINDS}"
        )
    bad = set(merged["prep"]["swap_regions"]) - set(edits.SWAP_REGIONS)
    bad |= set(merged["diffusion"]["inpaint_regions"]) - set(edits.SWAP_REGIONS)
    if bad:
        raise PrepError(f"unknown regions {sorted(bad)}; expected some of {edits.SWAP_REGIONS}")
    pools = merged["prep"]["donor_pools"]
    if not isinstance(pools, int) or isinstance(pools, bool) or pools < 1:
        raise PrepError(f"prep.donor_pools must be a whole number >= 1, not {pools!r}")
    if merged["prep"]["link"] not in ("hardlink", "copy"):
        raise PrepError(f"prep.link must be hardlink or copy, not {merged['prep']['link']!r}")
    q0, q1 = merged["prep"]["jpeg_quality"]
    if not 1 <= q0 <= q1 <= 100:
        raise PrepError(f"prep.jpeg_quality must be [lo, hi] with 1 <= lo <= hi <= 100, not {[q0, q1]}")
    return merged


def _refuse_foreign(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not a prepared set (never delete user data)."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise PrepError(f"{out}: folder exists, is not empty and is not a prepared set; refusing to write into it")


def _open_out(out: Path, force: bool) -> None:
    """Mark `out` as a prepared set; with `force`, drop every output but the face cache."""
    out.mkdir(parents=True, exist_ok=True)
    write_text("prepared by python -m data_prep\n", out / MARKER)
    if force:
        for sub in ("edit", "sd", "steps", ORIG_DIR):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    (out / DONE_FILE).unlink(missing_ok=True)


def prepare(
    cfg: dict,
    force: bool = False,
    progress: bool | None = None,
    workers: int | None = None,
    dist: DistInfo | None = None,
) -> dict | None:
    """Run the whole stage for `cfg` (a loaded data config); return the summary it prints.

    Under torchrun (`dist` of several processes) every process makes its share of each step,
    the first one alone writes and returns the summary; the others return None.
    """
    dist = dist or DistInfo()
    cfg = prep_config(cfg)
    p = cfg["prep"]
    progress = (bool(p["progress"]) if progress is None else progress) and dist.is_main
    out = Path(p["out"])
    start = time.perf_counter()

    paths = resolve_data(cfg, prepared=False)
    if dist.is_main and paths.is_demo and not paths.train_labels.is_file():
        from data_prep.demo import build_demo

        log.info("no competition data configured and no demo sample at %s: building it", paths.train_labels.parent)
        build_demo(paths.train_labels.parent, progress=progress)
    barrier(dist)
    table = read_originals(paths)
    log.info("read %d train images (%d fake) from %s", len(table), int(table["target"].sum()), paths.train_labels)
    _refuse_foreign(out)
    barrier(dist)  # every process has looked before the first writes
    link_counts: dict[str, int] = {}
    if dist.is_main:
        _open_out(out, force)
        # Every run checks every original (a stat each), so a link removed by hand comes back.
        link_counts = link_originals(table, out, str(p["link"]), progress)
        log.info("originals: %s under %s", link_counts, out / ORIG_DIR)
    barrier(dist)
    steps = Steps(out, dist)
    input_hash = table_hash(table)

    pool = Workers(int(p["workers"] if workers is None else workers))
    try:
        # Faces are cached per image, so this step always runs and is quick on a rerun.
        faces, unreadable = detect_faces(table, out, dict(p["faces"]), pool, progress, dist)
        no_face = sorted(n for n, f in faces.items() if f is None)
        n_found = len(faces) - len(no_face)
        log.info("faces: %d found, %d images without one, %d unreadable", n_found, len(no_face), len(unreadable))
        if dist.is_main:
            write_face_embeddings(table, faces, out / FACE_EMBEDDINGS_FILE)
        table["donor_pool"] = assign_donor_pools(table, faces, p)
        rows, failures = run_edits(table, faces, cfg, out, steps, pool, progress, input_hash)
        sd_rows, sd_failures, sd_status = run_diffusion(table, faces, cfg, out, steps, progress, input_hash)
        # Last: how many copies level the re-encoded shares depends on every other new image.
        re_rows, re_failures = run_reencode(table, faces, rows + sd_rows, cfg, out, steps, pool, progress, input_hash)
    finally:
        pool.close()
    if not dist.is_main:
        return None
    failures = [
        *({"method": "faces", "img_name": f"{ORIG_DIR}/{n}", "reason": why} for n, why in unreadable.items()),
        *failures,
        *sd_failures,
        *re_failures,
    ]

    provenance = write_manifest(table, rows + sd_rows + re_rows, out)
    data = {
        "train_labels": str(out / "train_labels.csv"),
        "train_root": str(out),
        "manifest": str(out / "manifest.csv"),
        "test_list": str(paths.test_list),
        "test_root": str(paths.test_root),
        "test_labels": str(paths.test_labels) if paths.test_labels else None,
    }
    save_config({"data": data}, out / "data.yaml")
    save_config(cfg, out / "config.yaml")

    table_counts = summary_table(provenance[MANIFEST_COLUMNS], len(table))
    reasons = pd.DataFrame(failures, columns=["method", "img_name", "reason"])
    groups = split_groups(provenance[MANIFEST_COLUMNS])
    n_largest, largest_share = largest_group(groups)
    summary = {
        "out": str(out),
        "images": len(provenance),
        "originals": len(table),
        "new": len(provenance) - len(table),
        "originals_linked": link_counts,
        "no_face": len(no_face),
        "unreadable": len(unreadable),
        "counts": table_counts.to_dict(orient="records"),
        "reencoded": reencoded_shares(provenance, len(table)),
        "groups": {
            "n": int(len(np.unique(groups))),
            "largest": n_largest,
            "largest_share": round(largest_share, 4),
            "donor_pools": int(p["donor_pools"]),
        },
        "failures": reasons.groupby(["method", "reason"]).size().reset_index(name="n").to_dict(orient="records"),
        # The one place a missing model is reported: a single line, whatever the number of kinds.
        "diffusion": sd_status,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(summary, out / "summary.json")
    write_json({"recipe": RECIPE_VERSION, "input": input_hash}, out / DONE_FILE)
    print_summary(summary, table_counts)
    return summary
