"""The data stage's Stable Diffusion steps: inpainted, img2img and txt2img fakes planned up front
from the seed, generated batch by batch; under several processes each GPU takes every K-th batch."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.distributed import DistInfo
from core.imaging import ImageDecodeError, decode_image
from core.log import get_logger
from core.progress import progress_bar
from data_prep import diffusion as sd
from data_prep.faces import Face, FaceAnalyzer, align_crop
from data_prep.stage_jobs import Job, balanced, fingerprint, new_job, plan_rng, provenance_rows, write_jpeg
from data_prep.steps import Result, Steps, run_step

log = get_logger("data_prep")


def _sd_edit_job(method: str, k: int, seed: int, quality: tuple[int, int], src: Any, region: str, args: dict) -> Job:
    """A diffusion fake made from the real `src` (a row of the reals table): it joins src's parent group."""
    return new_job(
        method,
        k,
        seed,
        quality,
        target=1,
        parent=src.parent,
        region=region,
        source=src.img_name,
        source_path=src.path,
        donor_pool=int(src.donor_pool),
        sources=[src.img_name],
        args=args,
    )


def plan_diffusion(table: pd.DataFrame, faces: dict[str, Face | None], cfg: dict) -> dict[str, list[Job]]:
    """Every Stable Diffusion job: sources, regions, prompts, strengths and seeds, decided up front."""
    p, d = cfg["prep"], cfg["diffusion"]
    seed, quality = int(p["seed"]), tuple(p["jpeg_quality"])
    reals = table[(table["target"] == 0) & table["src_name"].isin(faces)].reset_index(drop=True)
    reals_face = reals[reals["src_name"].map(lambda n: faces.get(n) is not None)].reset_index(drop=True)
    prompts = d["prompts"]
    plans: dict[str, list[Job]] = {}
    for kind in sd.SD_KINDS:
        method, n = f"sd:{kind}", int(d["counts"].get(kind, 0))
        rng = plan_rng(seed, method)
        jobs: list[Job] = []
        if kind == "inpaint":
            regions = list(d["inpaint_regions"])
            for k, (i, r) in enumerate(
                zip(balanced(rng, len(reals_face), n), balanced(rng, len(regions), n), strict=True)
            ):
                src, region = reals_face.iloc[int(i)], regions[int(r)]
                args = {"landmarks": faces[src.src_name].landmarks, "prompt": prompts["inpaint"][region]}
                jobs.append(_sd_edit_job(method, k, seed, quality, src, region, args))
        elif kind == "img2img":
            lo, hi = d["img2img_strength"]
            for k, i in enumerate(balanced(rng, len(reals), n)):
                src = reals.iloc[int(i)]
                prompt = prompts["img2img"][int(rng.integers(len(prompts["img2img"])))]
                # Two decimals: diffusers takes one strength per call, so batches group by it.
                strength = round(float(rng.uniform(lo, hi)), 2)
                args = {"prompt": prompt, "strength": strength}
                jobs.append(_sd_edit_job(method, k, seed, quality, src, "global", args))
        else:
            for k in range(n):
                prompt = prompts["txt2img"][int(rng.integers(len(prompts["txt2img"])))]
                job = new_job(
                    method, k, seed, quality, target=1, parent="", region="synthesis", args={"prompt": prompt}
                )
                job.parent = job.name  # generated from nothing: its own group
                jobs.append(job)
        plans[method] = jobs
    return plans


def _image_size(path: str) -> tuple[int, int]:
    """(h, w) from the file header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
    except (OSError, UnidentifiedImageError) as err:
        raise ImageDecodeError(f"{path}: {err}") from None
    return h, w


def sd_batches(jobs: list[Job], d: dict, unreadable: dict[str, str]) -> list[list[Job]]:
    """The diffusion steps' units: batches of jobs that share a working size (one tensor shape per
    pipeline call), first a unit of its own for each job whose source cannot be read (the reason
    goes to `unreadable`). Made from the same jobs, every process makes the same batches, so a
    fake comes out of the same batch whichever process generates it."""
    groups: dict[tuple[int, int], list[Job]] = {}
    alone: list[list[Job]] = []
    for job in jobs:
        if job.source:
            try:
                key = sd.working_size(*_image_size(job.source_path), int(d["max_side"]))
            except ImageDecodeError as err:
                unreadable[job.name] = str(err)
                alone.append([job])
                continue
        else:
            key = (int(d["txt2img_size"]), int(d["txt2img_size"]))
        groups.setdefault(key, []).append(job)
    size = max(1, int(d["batch_size"]))
    return alone + [g[i : i + size] for _, g in sorted(groups.items()) for i in range(0, len(g), size)]


def run_diffusion_batches(
    kind: str,
    batches: list[list[Job]],
    unreadable: dict[str, str],
    models: sd.DiffusionModels,
    d: dict,
    out: Path,
    progress: bool,
) -> Iterable[Result]:
    """Generate, composite (inpainting), crop (txt2img) and write each job's image, batch by batch
    (`sd_batches`; a job in `unreadable` fails with its reason).

    Source images are decoded one batch at a time, so memory does not grow with the job count.
    """
    pipe = getattr(models, kind)
    analyzer = FaceAnalyzer(embed=False) if kind == "txt2img" and d["crop_txt2img"] else None
    for job in (job for batch in batches for job in batch if job.name in unreadable):
        yield Result(job.name, False, unreadable[job.name])
    batches = [batch for batch in batches if batch[0].name not in unreadable]
    common = {"steps": int(d["steps"]), "guidance": float(d["guidance"]), "negative_prompt": d.get("negative_prompt")}
    details = {"model": models.sources.get(kind, ""), "steps": common["steps"], "guidance": common["guidance"]}
    bar = progress_bar(total=sum(map(len, batches)), desc=f"sd:{kind}", unit="img", disable=not progress)
    for batch in batches:
        images: dict[str, np.ndarray] = {}
        masks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        run: list[Job] = []
        for job in batch:
            try:
                if job.source:
                    images[job.name] = decode_image(job.source_path)
                if kind == "inpaint":
                    lm, region = job.args["landmarks"], job.region
                    masks[job.name] = sd.inpaint_masks(lm, region, images[job.name].shape, float(d["inpaint_dilate"]))
                    if not masks[job.name][0].any():
                        # Compositing would give back the real image, labelled fake.
                        raise ValueError(f"the landmarks give an empty {region} mask")
                run.append(job)
            except (ImageDecodeError, ValueError) as err:
                bar.update(1)
                yield Result(job.name, False, str(err))
        if not run:
            continue
        seeds = [j.seed for j in run]
        prompts = [j.args["prompt"] for j in run]
        srcs = [images[j.name] for j in run] if kind != "txt2img" else []
        if kind == "inpaint":
            size = sd.working_size(*srcs[0].shape[:2], int(d["max_side"]))
            grown = [masks[j.name][1] for j in run]
            outs = sd.run_inpaint(pipe, srcs, grown, prompts, seeds, size, **common)
        elif kind == "img2img":
            size = sd.working_size(*srcs[0].shape[:2], int(d["max_side"]))
            strengths = [j.args["strength"] for j in run]
            outs = sd.run_img2img(pipe, srcs, prompts, seeds, strengths, size, **common)
        else:
            side = int(d["txt2img_size"])
            outs = sd.run_txt2img(pipe, prompts, seeds, (side, side), **common)
        for job, rgb in zip(run, outs, strict=True):
            bar.update(1)
            if (out / job.name).is_file():
                continue  # made by an earlier run: its batch ran again for the others
            info = {**details, "prompt": job.args["prompt"], "quality": job.quality}
            if kind == "inpaint":
                rgb, _ = sd.composite(images[job.name], rgb, *masks[job.name])
            elif kind == "img2img":
                info["strength"] = job.args["strength"]
            elif analyzer is not None:
                face = analyzer.primary(rgb)
                if face is None:
                    yield Result(job.name, False, "no face found in the generated image")
                    continue
                rgb = align_crop(rgb, face, side, float(d["crop_margin"]))
                info["cropped"] = True
            write_jpeg(out / job.name, rgb, job.quality)
            yield Result(job.name, True, details=info)
    bar.close()


def _run_kind(
    method: str, jobs: list[Job], models: sd.DiffusionModels, d: dict, out: Path, steps: Steps, progress: bool
) -> dict[str, Result]:
    """Run one diffusion kind's missing fakes, this process's share of the batches."""
    kind = method.split(":", 1)[1]
    unreadable: dict[str, str] = {}

    def units(todo: list[Job]) -> list[list[Job]]:
        return sd_batches(todo, d, unreadable)

    def runner(batches: list[list[Job]]) -> Iterable[Result]:
        return run_diffusion_batches(kind, batches, unreadable, models, d, out, progress)

    return run_step(method, jobs, out, steps, runner, units)


def rank_device(device: str, dist: DistInfo) -> str:
    """This process's device: under several processes on GPUs, `cuda` (or `auto`) is the GPU of
    its local rank, so each GPU generates its own share of the batches."""
    if not dist.enabled:
        return device
    resolved = sd.pick_device(device)
    return f"cuda:{dist.local_rank}" if resolved == "cuda" else resolved


def run_diffusion(
    table: pd.DataFrame,
    faces: dict[str, Face | None],
    cfg: dict,
    out: Path,
    steps: Steps,
    progress: bool,
    table_hash: str,
) -> tuple[list[dict], list[dict], str]:
    """Plan and run the Stable Diffusion kinds; return provenance rows, failures and the status line.

    Models are loaded only when some output is missing, so a finished stage reruns without a GPU.
    """
    p, d = cfg["prep"], cfg["diffusion"]
    wanted = {m: jobs for m, jobs in plan_diffusion(table, faces, cfg).items() if jobs}
    if not wanted:
        return [], [], "no images requested"
    keys = {k: d[k] for k in ("model", "inpaint_model", "steps", "guidance", "max_side", "txt2img_size", "prompts")}
    keys.update({k: d[k] for k in ("inpaint_dilate", "img2img_strength", "crop_txt2img", "crop_margin")})
    keys.update(negative=d["negative_prompt"], seed=p["seed"], jpeg_quality=p["jpeg_quality"], faces=p["faces"])
    results: dict[str, dict[str, Result]] = {}
    pending: dict[str, list[Job]] = {}
    for method, jobs in wanted.items():
        kind = method.split(":", 1)[1]
        if steps.begin(method, fingerprint(method, table_hash, {**keys, "count": len(jobs)}), out / "sd" / kind):
            results[method] = steps.results(method)
        else:
            pending[method] = jobs
    status = "ran"
    if pending:
        kinds = [m.split(":", 1)[1] for m in pending]
        try:
            device = rank_device(str(d["device"]), steps.dist)
            models = sd.load_models(d["model"], d["inpaint_model"], device, bool(d["local_files_only"]), kinds)
        except sd.DiffusionUnavailable as err:
            models, status = None, f"skipped ({err})"
        if models is not None:
            log.info("diffusion: %s on %s (%s)", models.sources, models.device, models.dtype)
            if models.missing:
                status = "; ".join(f"sd:{k} skipped ({why})" for k, why in models.missing.items())
            for method, jobs in pending.items():
                kind = method.split(":", 1)[1]
                if getattr(models, kind) is None:
                    continue
                results[method] = _run_kind(method, jobs, models, d, out, steps, progress)
                steps.finish(method, {"ok": sum(r.ok for r in results[method].values())})
    rows: list[dict] = []
    failures: list[dict] = []
    for method, res in results.items():
        r, f = provenance_rows(wanted[method], res)
        rows += r
        failures += f
    return rows, failures, status
