"""What the data stage's edit and diffusion steps plan: one job per new image, with its seed,
JPEG quality and file name fixed up front, and the provenance rows of the finished ones."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.data.folds import SOURCES_SEP
from core.io import atomic_path
from data_prep import edits
from data_prep.steps import Result


class PrepError(RuntimeError):
    """The stage cannot run; the message says why."""


# Bump when a recipe changes what gets written, so old outputs are not taken as current.
RECIPE_VERSION = 2


@dataclass
class Job:
    """One new image to make: what, from which image(s), with which seed, written where."""

    method: str  # edit:<kind> or sd:<kind>
    index: int  # position within the method's plan; fixes the seed and the file name
    name: str  # output img_name, relative to the prepared root
    target: int
    parent: str
    region: str
    seed: int
    quality: int  # JPEG quality of the written file
    donor_pool: int = -1  # the pool of the source's group (-1: generated from nothing)
    sources: list[str] = field(default_factory=list)  # prepared img_names that give the output pixels
    source: str = ""  # prepared img_name of the image edited ("" for txt2img)
    source_path: str = ""
    donor: str = ""  # image the swapped face or background came from
    donor_path: str = ""
    args: dict[str, Any] = field(default_factory=dict)  # inputs the edit needs (landmarks, region, prompt)


def job_seed(seed: int, method: str, index: int) -> int:
    """A 32-bit seed for output `index` of `method`, independent of every other output."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(method.encode()), int(index)])
    return int(ss.generate_state(1)[0])


def plan_rng(seed: int, method: str) -> np.random.Generator:
    # Each method plans from its own stream, so changing one method's count leaves the others alone.
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(f"plan:{method}".encode())]))


def balanced(rng: np.random.Generator, n_options: int, n: int) -> np.ndarray:
    """`n` indices into `n_options`, each used equally often (+-1), in random order."""
    if n_options <= 0 or n <= 0:
        return np.zeros(0, dtype=int)
    return rng.permutation(np.resize(np.arange(n_options), n))


def join_region(*parts: str) -> str:
    """Regions joined with "+", empty parts and repeats dropped ("mouth", "background" -> "mouth+background")."""
    seen: list[str] = []
    for part in parts:
        for p in str(part).split("+"):
            if p and p not in seen:
                seen.append(p)
    return "+".join(seen)


def new_job(method: str, k: int, seed: int, quality: tuple[int, int], **fields_: Any) -> Job:
    kind = method.split(":", 1)[1]
    s = job_seed(seed, method, k)
    q = int(np.random.default_rng(s ^ 0x5EED).integers(quality[0], quality[1] + 1))
    folder = "edit" if method.startswith("edit:") else "sd"
    return Job(method=method, index=k, name=f"{folder}/{kind}/{k:06d}.jpg", seed=s, quality=q, **fields_)


def write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    """Write atomically, so an existing output file is always a complete one."""
    data = edits.encode_jpeg(rgb, quality)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def fingerprint(step: str, table_hash: str, keys: dict[str, Any]) -> dict:
    """What a step's outputs depend on: the recipe version, the input table and the step's settings."""
    return {"recipe": RECIPE_VERSION, "step": step, "input": table_hash, **keys}


def provenance_rows(jobs: list[Job], results: dict[str, Result]) -> tuple[list[dict], list[dict]]:
    """Provenance rows of the jobs that made their image and failure rows of those that did not."""
    rows, failures = [], []
    for job in jobs:
        res = results.get(job.name)
        if res is None:
            continue
        if not res.ok:
            failures.append({"method": job.method, "img_name": job.name, "reason": res.reason})
            continue
        # A background edit may fall back to a synthetic backdrop: then no image was used.
        synthetic = res.details.get("background") == "synthetic"
        sources = [s for s in job.sources if not (synthetic and s == job.donor)]
        rows.append(
            {
                "img_name": job.name,
                "target": job.target,
                "method": job.method,
                "parent": job.parent,
                "region": job.region,
                "sources": SOURCES_SEP.join(sources),
                "source": job.source,
                "donor": "" if synthetic else job.donor,
                "donor_pool": job.donor_pool if job.donor_pool >= 0 else "",
                "seed": job.seed,
                "details": json.dumps(res.details, sort_keys=True, default=str),
            }
        )
    return rows, failures
