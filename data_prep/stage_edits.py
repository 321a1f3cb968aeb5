"""The data stage's edit steps: every image edit planned up front from the seed (sources, donors,
regions), run in the worker pool, and `edit:reencode`, which levels the labels' shares of
re-encoded images once every other new image is known."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.imaging import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from data_prep import edits
from data_prep.faces import Face
from data_prep.stage_jobs import (
    Job,
    PrepError,
    balanced,
    fingerprint,
    join_region,
    new_job,
    plan_rng,
    provenance_rows,
    write_jpeg,
)
from data_prep.steps import Result, Steps, Workers, run_step

REENCODE = "edit:reencode"


def _identity_ok(a: Face, b: Face, threshold: float) -> bool:
    if a.embedding is None or b.embedding is None:
        return True
    return float(np.linalg.norm(a.embedding - b.embedding)) > threshold


def _pick_donor(
    rng: np.random.Generator,
    target: pd.Series,
    reals: pd.DataFrame,
    faces: dict[str, Face | None],
    threshold: float,
    candidates: int,
) -> pd.Series | None:
    """A real of `reals` (the target's donor pool) of another identity and parent, with the
    closest pose among a few random draws."""
    face = faces[target.src_name]
    best, best_d = None, float("inf")
    found = 0
    # Bounded tries: in a big set nearly every draw is another person, in a tiny one few are.
    for i in rng.permutation(len(reals))[: 20 * candidates]:
        row = reals.iloc[int(i)]
        if row.parent == target.parent or not _identity_ok(face, faces[row.src_name], threshold):
            continue
        d = edits.pose_distance(faces[row.src_name].landmarks, face.landmarks)
        if d < best_d:
            best, best_d = row, d
        found += 1
        if found >= candidates:
            break
    return best


def _background_files(folder: str | None) -> list[str]:
    if not folder:
        return []
    root = Path(folder)
    if not root.is_dir():
        raise PrepError(f"prep.backgrounds: {root} is not a folder")
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PrepError(f"prep.backgrounds: no images in {root}")
    return files


def plan_edits(table: pd.DataFrame, faces: dict[str, Face | None], cfg: dict) -> dict[str, list[Job]]:
    """Every edit job, decided up front from the seed: sources, donors, regions, seeds, names.

    `table` carries each original's `donor_pool`; donors come from the target's pool only.
    """
    p = cfg["prep"]
    seed, quality = int(p["seed"]), tuple(p["jpeg_quality"])
    has_face = table[table["src_name"].map(lambda n: faces.get(n) is not None)].reset_index(drop=True)
    reals = has_face[has_face["target"] == 0].reset_index(drop=True)
    readable = table[table["src_name"].isin(faces)].reset_index(drop=True)
    bg_files = _background_files(p.get("backgrounds"))
    with_face_in = {k: g.reset_index(drop=True) for k, g in has_face.groupby("donor_pool")}
    reals_in = {k: g.reset_index(drop=True) for k, g in reals.groupby("donor_pool")}
    plans: dict[str, list[Job]] = {}

    def lm(name: str) -> np.ndarray:
        return faces[name].landmarks

    for kind in edits.EDIT_KINDS:
        method, n = f"edit:{kind}", int(p["counts"].get(kind, 0))
        rng = plan_rng(seed, method)
        jobs: list[Job] = []
        if kind == "degrade":
            for k, i in enumerate(balanced(rng, len(readable), n)):
                src = readable.iloc[int(i)]
                jobs.append(
                    new_job(
                        method,
                        k,
                        seed,
                        quality,
                        target=int(src.target),
                        parent=src.parent,
                        region=src.region,
                        source=src.img_name,
                        source_path=src.path,
                        donor_pool=int(src.donor_pool),
                        sources=[src.img_name],
                    )
                )
        elif kind == "background":
            for k, i in enumerate(balanced(rng, len(has_face), n)):
                src = has_face.iloc[int(i)]
                job = new_job(
                    method,
                    k,
                    seed,
                    quality,
                    target=int(src.target),
                    parent=src.parent,
                    region=join_region(src.region, "background"),
                    source=src.img_name,
                    source_path=src.path,
                    donor_pool=int(src.donor_pool),
                    sources=[src.img_name],
                    args={"landmarks": lm(src.src_name)},
                )
                draw = rng.random()
                if bg_files:
                    # A background photograph is not a train image: it links nothing.
                    job.donor_path = bg_files[int(rng.integers(len(bg_files)))]
                    job.donor = job.donor_path
                elif draw >= float(p["synthetic_background_p"]) and len(has_face) > 1:
                    pool = with_face_in[src.donor_pool]
                    others = pool[pool["parent"] != src.parent]
                    if len(others):
                        d = others.iloc[int(rng.integers(len(others)))]
                        job.donor, job.donor_path = d.img_name, d.path
                        job.sources.append(d.img_name)
                        job.args["donor_box"] = faces[d.src_name].box
                jobs.append(job)
        else:
            regions = list(p["swap_regions"]) if kind == "swap" else ["face"]
            picks = balanced(rng, len(reals), n)
            region_idx = balanced(rng, len(regions), n)
            for k, (i, r) in enumerate(zip(picks, region_idx, strict=True)):
                tgt = reals.iloc[int(i)]
                pool = reals_in[tgt.donor_pool]
                donor = _pick_donor(rng, tgt, pool, faces, float(p["identity_distance"]), int(p["donor_candidates"]))
                job = new_job(
                    method,
                    k,
                    seed,
                    quality,
                    target=1,
                    parent=tgt.parent,
                    region=regions[int(r)],
                    source=tgt.img_name,
                    source_path=tgt.path,
                    donor_pool=int(tgt.donor_pool),
                    sources=[tgt.img_name],
                )
                if donor is None:
                    job.args["error"] = (
                        "no real of another identity in its donor pool (fewer prep.donor_pools give more)"
                    )
                else:
                    job.donor, job.donor_path = donor.img_name, donor.path
                    job.sources.append(donor.img_name)
                    job.args.update(landmarks=lm(tgt.src_name), donor_landmarks=lm(donor.src_name))
                jobs.append(job)
        plans[method] = jobs
    return plans


def run_edit(job: Job, out: str) -> Result:
    """Make one edited image and write it to out/job.name; a bad input gives a failed Result."""
    if "error" in job.args:
        return Result(job.name, False, job.args["error"])
    rng = np.random.default_rng(job.seed)
    kind = job.method.split(":", 1)[1]
    try:
        img = decode_image(job.source_path)
        if kind == "reencode":
            # The same pixels through the same writer: only the compression history changes.
            res = edits.EditResult(rgb=img, mask=np.zeros(img.shape[:2], np.float32))
        elif kind == "degrade":
            res = edits.degrade(img, rng)
        elif kind == "background":
            if job.donor_path:
                donor = decode_image(job.donor_path)
                background, how = edits.make_background(img.shape, rng, donor, job.args.get("donor_box"))
            else:
                background, how = edits.make_background(img.shape, rng)
            res = edits.replace_background(img, job.args["landmarks"], background, rng)
            res.info["background"] = how
        else:
            donor = decode_image(job.donor_path)
            if kind == "faceswap":
                res = edits.face_swap(img, job.args["landmarks"], donor, job.args["donor_landmarks"], rng)
            else:
                res = edits.region_swap(img, job.args["landmarks"], donor, job.args["donor_landmarks"], job.region, rng)
    except (ImageDecodeError, edits.EditError, ValueError) as err:
        return Result(job.name, False, str(err))
    write_jpeg(Path(out) / job.name, res.rgb, job.quality)
    return Result(job.name, True, details={**res.info, "quality": job.quality})


def _edit_task(item: tuple[Job, str]) -> Result:
    return run_edit(*item)


def run_edits(
    table: pd.DataFrame,
    faces: dict[str, Face | None],
    cfg: dict,
    out: Path,
    steps: Steps,
    pool: Workers,
    progress: bool,
    table_hash: str,
) -> tuple[list[dict], list[dict]]:
    """Plan and run every edit kind; return provenance rows and failures."""
    p = cfg["prep"]
    keys = {k: p[k] for k in ("seed", "jpeg_quality", "swap_regions", "identity_distance", "donor_candidates")}
    keys["donor_pools"] = p["donor_pools"]
    keys.update(faces=p["faces"], backgrounds=p.get("backgrounds"), synthetic_p=p["synthetic_background_p"])
    rows: list[dict] = []
    failures: list[dict] = []
    for method, jobs in plan_edits(table, faces, cfg).items():
        r, f = _run_edit_step(method, jobs, {**keys, "count": len(jobs)}, out, steps, pool, progress, table_hash)
        rows += r
        failures += f
    return rows, failures


def _run_edit_step(
    method: str,
    jobs: list[Job],
    keys: dict[str, Any],
    out: Path,
    steps: Steps,
    pool: Workers,
    progress: bool,
    table_hash: str,
) -> tuple[list[dict], list[dict]]:
    """Run one edit method's jobs (unless done for this fingerprint); return provenance rows and failures."""
    kind = method.split(":", 1)[1]
    if steps.begin(method, fingerprint(method, table_hash, keys), out / "edit" / kind):
        results = steps.results(method)
    else:

        def runner(units: list[list[Job]]) -> Iterable[Result]:
            return pool.map(_edit_task, [(job, str(out)) for (job,) in units], method, progress)

        results = run_step(method, jobs, out, steps, runner)
        ok = sum(r.ok for r in results.values())
        steps.finish(method, {"ok": ok, "failed": len(results) - ok})
    return provenance_rows(jobs, results)


def reencode_count(originals: dict[int, int], new: dict[int, int]) -> tuple[int, int]:
    """(label, n): write n originals of `label` again so both labels have the same share of
    images written by the data stage (`new` per label among originals + new), as close as
    whole images allow. n is at most the label's originals; 0 when a label has no images."""
    totals = {t: originals.get(t, 0) + new.get(t, 0) for t in (0, 1)}
    if not all(totals.values()):
        return 0, 0
    share = {t: new.get(t, 0) / totals[t] for t in (0, 1)}
    label = 0 if share[0] < share[1] else 1
    goal = share[1 - label]
    if goal >= 1.0:
        return label, originals.get(label, 0)
    # (new + n) / (total + n) = goal, solved for n.
    n = round((goal * totals[label] - new.get(label, 0)) / (1.0 - goal))
    return label, int(min(max(n, 0), originals.get(label, 0)))


def plan_reencode(table: pd.DataFrame, faces: dict[str, Face | None], new_rows: list[dict], cfg: dict) -> list[Job]:
    """`edit:reencode` jobs: readable originals of the lagging label, each at most once, drawn from the seed.

    Each keeps its original's label, parent, region and donor pool and is written by
    `write_jpeg` at a quality drawn like every new image's, so it has the compression history
    of the stage's other outputs and nothing else of them.
    """
    p = cfg["prep"]
    seed, quality = int(p["seed"]), tuple(p["jpeg_quality"])
    readable = table[table["src_name"].isin(faces)].reset_index(drop=True)
    new = pd.Series([int(r["target"]) for r in new_rows], dtype=np.int64).value_counts().to_dict()
    label, n = reencode_count(readable["target"].value_counts().to_dict(), new)
    eligible = readable[readable["target"] == label].reset_index(drop=True)
    picks = plan_rng(seed, REENCODE).permutation(len(eligible))[:n]
    jobs = []
    for k, i in enumerate(picks):
        src = eligible.iloc[int(i)]
        jobs.append(
            new_job(
                REENCODE,
                k,
                seed,
                quality,
                target=label,
                parent=src.parent,
                region=src.region,
                source=src.img_name,
                source_path=src.path,
                donor_pool=int(src.donor_pool),
                sources=[src.img_name],
            )
        )
    return jobs


def run_reencode(
    table: pd.DataFrame,
    faces: dict[str, Face | None],
    new_rows: list[dict],
    cfg: dict,
    out: Path,
    steps: Steps,
    pool: Workers,
    progress: bool,
    table_hash: str,
) -> tuple[list[dict], list[dict]]:
    """Plan and run `edit:reencode` after every other new image is known; return rows and failures."""
    jobs = plan_reencode(table, faces, new_rows, cfg)
    p = cfg["prep"]
    label = jobs[0].target if jobs else -1
    keys = {"seed": p["seed"], "jpeg_quality": p["jpeg_quality"], "count": len(jobs), "label": label}
    return _run_edit_step(REENCODE, jobs, keys, out, steps, pool, progress, table_hash)
