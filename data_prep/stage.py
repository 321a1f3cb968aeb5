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

Resumable at two levels: every output is written atomically and skipped when it exists, and
a step whose inputs fingerprint matches and whose done marker exists is not re-run. A step
whose inputs changed (other seed, counts, input labels) is cleared and rebuilt. Each output's
randomness comes from a seed derived from (prep.seed, method, output index), so the result
does not depend on the number of worker processes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.config import deep_merge, save_config
from core.data.folds import SOURCES_SEP, identity_labels, largest_group, split_groups
from core.data.labels import LabelError, read_labels, safe_join
from core.data.sources import FACE_EMBEDDINGS_FILE, DataPaths, resolve_data
from core.imaging import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from core.io import atomic_path, write_csv, write_json, write_text
from core.log import get_logger
from core.progress import progress_bar
from data_prep import diffusion as sd
from data_prep import edits
from data_prep.faces import EMBEDDING_DIM, Face, FaceAnalyzer, FaceModelError, align_crop, cache_path

log = get_logger("data_prep")

# Bump when a recipe changes what gets written, so old outputs are not taken as current.
RECIPE_VERSION = 2

# An input manifest needs these; `sources` is optional there and always written here.
INPUT_MANIFEST_COLUMNS = ["img_name", "target", "method", "parent", "region"]
MANIFEST_COLUMNS = [*INPUT_MANIFEST_COLUMNS, "sources"]
PROVENANCE_COLUMNS = [*MANIFEST_COLUMNS, "source", "donor", "donor_pool", "seed", "details"]
REENCODE = "edit:reencode"
# The summary flags re-encoded shares per label further apart than this (percentage points).
REENCODE_TOLERANCE = 5.0
ORIG_DIR = "orig"
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


class PrepError(RuntimeError):
    """The stage cannot run; the message says why."""


# --------------------------------------------------------------------------- jobs and results


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


@dataclass
class Result:
    name: str
    ok: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def job_seed(seed: int, method: str, index: int) -> int:
    """A 32-bit seed for output `index` of `method`, independent of every other output."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(method.encode()), int(index)])
    return int(ss.generate_state(1)[0])


def _plan_rng(seed: int, method: str) -> np.random.Generator:
    # Each method plans from its own stream, so changing one method's count leaves the others alone.
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(f"plan:{method}".encode())]))


def _balanced(rng: np.random.Generator, n_options: int, n: int) -> np.ndarray:
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


def write_jpeg(path: Path, rgb: np.ndarray, quality: int) -> None:
    """Write atomically, so an existing output file is always a complete one."""
    data = edits.encode_jpeg(rgb, quality)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# --------------------------------------------------------------------------- config and inputs


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


def read_originals(paths: DataPaths) -> pd.DataFrame:
    """The input train set as the prepared manifest sees it.

    Columns: img_name (prepared, under orig/), src_name (as in the input labels), path,
    target, method, parent, region, sources. Provenance comes from the input manifest when
    there is one (`sources` is optional there); otherwise reals are `real`, fakes
    `original`, each its own parent with no sources.
    """
    df = read_labels(paths.train_labels, paths.train_root)
    df = df.rename(columns={"img_name": "src_name"})
    df["method"] = np.where(df["target"] == 1, "original", "real")
    df["parent"] = df["src_name"]
    df["region"] = ""
    df["sources"] = ""
    if paths.manifest is not None and paths.manifest.is_file():
        man = pd.read_csv(paths.manifest, dtype=str, keep_default_na=False)
        missing = [c for c in INPUT_MANIFEST_COLUMNS if c not in man.columns]
        if missing:
            raise LabelError(f"{paths.manifest}: missing column(s) {missing}")
        man = man.drop_duplicates("img_name").set_index("img_name")
        known = df["src_name"].isin(man.index)
        for col in ("method", "parent", "region", "sources"):
            if col not in man.columns:
                continue
            values = df.loc[known, "src_name"].map(man[col])
            if col in ("method", "parent"):
                values = values.replace("", np.nan).fillna(df.loc[known, col])
            df.loc[known, col] = values
    df["img_name"] = [f"{ORIG_DIR}/{n}" for n in df["src_name"]]
    df["parent"] = [f"{ORIG_DIR}/{p}" for p in df["parent"]]
    df["sources"] = [SOURCES_SEP.join(f"{ORIG_DIR}/{s}" for s in str(v).split(SOURCES_SEP) if s) for v in df["sources"]]
    cols = ["img_name", "src_name", "path", "target", "method", "parent", "region", "sources"]
    return df[cols].reset_index(drop=True)


def donor_pools(table: pd.DataFrame, n_pools: int, seed: int, identity: bool = False) -> np.ndarray:
    """Donor pool (0 .. n_pools-1) of every original: a seeded partition of its groups.

    Swapped faces and other images' backgrounds are drawn only from the target's pool, so
    every image that shares pixels with another stays inside one pool: random donors across
    a whole small set chain most of it into one group that no split can keep apart. A group
    of the input (linked by parent and sources and, with `identity`, by the `identity`
    column: one person's photographs) never spans two pools. Groups go, in a seeded random
    order, to the pool holding the fewest reals (then the fewest images), so pools hold
    about as many donor candidates each.
    """
    groups = split_groups(table, identity)
    is_real = (table["target"] == 0).to_numpy()
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    reals = np.bincount(groups, weights=is_real, minlength=n_groups)
    images = np.bincount(groups, minlength=n_groups)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(b"donor_pools")]))
    pool_reals, pool_images = np.zeros(n_pools), np.zeros(n_pools)
    pool_of_group = np.zeros(n_groups, dtype=np.int64)
    for g in rng.permutation(n_groups):
        p = int(np.lexsort((pool_images, pool_reals))[0])
        pool_of_group[g] = p
        pool_reals[p] += reals[g]
        pool_images[p] += images[g]
    return pool_of_group[groups]


def real_identities(table: pd.DataFrame, faces: dict[str, Face | None], distance: float) -> pd.Series:
    """Person label per original ("" for fakes and faces without an embedding): the reals' face
    embeddings joined within `distance`, transitively (`core.data.folds.identity_labels`)."""
    embedded = [
        i
        for i, (src, target) in enumerate(zip(table["src_name"], table["target"], strict=True))
        if target == 0 and faces.get(src) is not None and faces[src].embedding is not None
    ]
    vectors = np.array([faces[table["src_name"].iloc[i]].embedding for i in embedded], dtype=np.float32)
    labels = identity_labels(vectors.reshape(len(embedded), EMBEDDING_DIM), distance)
    people = pd.Series("", index=table.index)
    people.iloc[embedded] = [f"person{k}" for k in labels]
    return people


def _table_hash(df: pd.DataFrame) -> str:
    text = df[["src_name", "target", "method", "parent", "region", "sources"]].to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- step bookkeeping


class Steps:
    """Fingerprints, per-output logs and done markers under `out/steps/`."""

    def __init__(self, out: Path) -> None:
        self.dir = out / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, step: str, suffix: str) -> Path:
        return self.dir / f"{step.replace(':', '_')}.{suffix}"

    def begin(self, step: str, fingerprint: dict, outputs: Path | None) -> bool:
        """Start `step`; True if it is already done for this fingerprint.

        A fingerprint different from the stored one clears the step's outputs, log and marker.
        """
        fp_file = self._file(step, "json")
        try:
            stored = json.loads(fp_file.read_text())
        except (OSError, ValueError):
            stored = None
        if stored != fingerprint:
            if stored is not None:
                log.info("%s: inputs changed since the last run; rebuilding it", step)
            self._file(step, "done").unlink(missing_ok=True)
            self._file(step, "jsonl").unlink(missing_ok=True)
            if outputs is not None and outputs.is_dir():
                shutil.rmtree(outputs)
            write_json(fingerprint, fp_file)
            return False
        return self._file(step, "done").is_file()

    def finish(self, step: str, summary: dict) -> None:
        write_json(summary, self._file(step, "done"))

    def results(self, step: str) -> dict[str, Result]:
        """The last logged result per output name (a torn last line from a kill is ignored)."""
        found: dict[str, Result] = {}
        path = self._file(step, "jsonl")
        if not path.is_file():
            return found
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                found[rec["name"]] = Result(**rec)
            except (ValueError, KeyError, TypeError):
                continue
        return found

    def appender(self, step: str) -> Callable[[Result], None]:
        path = self._file(step, "jsonl")
        # A run killed mid-line leaves a torn last line; end it, so the next record parses.
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as fh:
                fh.write("\n")

        def append(res: Result) -> None:
            with open(path, "a") as fh:
                fh.write(json.dumps(asdict(res), default=str) + "\n")

        return append


class Workers:
    """A spawn pool started on first use and shared by the faces and edits steps.

    spawn, not fork: the parent may hold torch or dlib threads, which fork can deadlock.
    Starting the pool once saves each step the workers' imports and model loading.
    """

    def __init__(self, n: int) -> None:
        self.n = max(1, int(n))
        self._pool: Any = None

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str, progress: bool) -> Iterable[Any]:
        """fn over items, in the pool when there are several workers; results in completion order."""
        bar = progress_bar(total=len(items), desc=desc, unit="img", disable=not progress)
        try:
            if self.n == 1 or len(items) <= 1:
                for item in items:
                    yield fn(item)
                    bar.update(1)
                return
            if self._pool is None:
                self._pool = multiprocessing.get_context("spawn").Pool(self.n)
            chunk = max(1, min(16, len(items) // (4 * self.n)))
            for res in self._pool.imap_unordered(fn, items, chunksize=chunk):
                yield res
                bar.update(1)
        finally:
            bar.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


# --------------------------------------------------------------------------- originals


def link_originals(table: pd.DataFrame, out: Path, mode: str, progress: bool) -> dict[str, int]:
    """Hard-link (or copy) every input image to out/orig/<img_name>; returns counts per action.

    An existing file is kept when it is the same file (a hard link) or has the same size and
    modification time (a copy); anything else is replaced.
    """
    counts = {"linked": 0, "copied": 0, "kept": 0}
    for src, name in progress_bar(
        list(zip(table["path"], table["img_name"], strict=True)), desc="originals", unit="img", disable=not progress
    ):
        src_p, dst = Path(src), safe_join(out, name)
        if dst.exists():
            s, d = src_p.stat(), dst.stat()
            if os.path.samefile(src_p, dst) or (s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns):
                counts["kept"] += 1
                continue
            dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        if mode == "hardlink":
            try:
                os.link(src_p, dst)
                counts["linked"] += 1
                continue
            except OSError:
                pass  # another file system, or links not allowed: copy instead
        with atomic_path(dst) as tmp:
            shutil.copy2(src_p, tmp)
        counts["copied"] += 1
    return counts


# --------------------------------------------------------------------------- faces

# One analyzer per process and settings; its dlib models load on first use.
_ANALYZERS: dict[str, FaceAnalyzer] = {}


def _faces_task(item: tuple[str, str, str, dict]) -> tuple[str, Face | None, str]:
    name, path, cache, settings = item
    key = json.dumps(settings, sort_keys=True)
    if key not in _ANALYZERS:
        _ANALYZERS[key] = FaceAnalyzer(embed=True, **settings)
    try:
        face, _ = _ANALYZERS[key].analyze_file(path, cache)
    except (ImageDecodeError, LabelError) as err:
        return name, None, str(err)
    return name, face, ""


def detect_faces(
    table: pd.DataFrame, out: Path, settings: dict, workers: Workers, progress: bool
) -> tuple[dict[str, Face | None], dict[str, str]]:
    """Primary face of every original (src_name -> Face or None) and unreadable images (name -> reason).

    Results are cached per image under out/faces/, so a rerun reads them back.
    """
    try:
        FaceAnalyzer(embed=True, **settings)  # fail here, once, if a model file is missing
    except FaceModelError as err:
        raise PrepError(str(err)) from None
    cache_dir = out / "faces"
    items = [
        (n, p, str(cache_path(cache_dir, n)), settings) for n, p in zip(table["src_name"], table["path"], strict=True)
    ]
    faces: dict[str, Face | None] = {}
    errors: dict[str, str] = {}
    for name, face, err in workers.map(_faces_task, items, "faces", progress):
        if err:
            errors[name] = err
        else:
            faces[name] = face
    return faces, errors


# --------------------------------------------------------------------------- planning edits


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


def _new_job(method: str, k: int, seed: int, quality: tuple[int, int], **fields_: Any) -> Job:
    kind = method.split(":", 1)[1]
    s = job_seed(seed, method, k)
    q = int(np.random.default_rng(s ^ 0x5EED).integers(quality[0], quality[1] + 1))
    folder = "edit" if method.startswith("edit:") else "sd"
    return Job(method=method, index=k, name=f"{folder}/{kind}/{k:06d}.jpg", seed=s, quality=q, **fields_)


def _sd_edit_job(method: str, k: int, seed: int, quality: tuple[int, int], src: Any, region: str, args: dict) -> Job:
    """A diffusion fake made from the real `src` (a row of the reals table): it joins src's parent group."""
    return _new_job(
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
        rng = _plan_rng(seed, method)
        jobs: list[Job] = []
        if kind == "degrade":
            for k, i in enumerate(_balanced(rng, len(readable), n)):
                src = readable.iloc[int(i)]
                jobs.append(
                    _new_job(
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
            for k, i in enumerate(_balanced(rng, len(has_face), n)):
                src = has_face.iloc[int(i)]
                job = _new_job(
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
            picks = _balanced(rng, len(reals), n)
            region_idx = _balanced(rng, len(regions), n)
            for k, (i, r) in enumerate(zip(picks, region_idx, strict=True)):
                tgt = reals.iloc[int(i)]
                pool = reals_in[tgt.donor_pool]
                donor = _pick_donor(rng, tgt, pool, faces, float(p["identity_distance"]), int(p["donor_candidates"]))
                job = _new_job(
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


# --------------------------------------------------------------------------- running edits


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


def run_jobs(
    step: str,
    jobs: list[Job],
    out: Path,
    steps: Steps,
    runner: Callable[[list[Job]], Iterable[Result]],
) -> dict[str, Result]:
    """Run the jobs whose output is missing, log each result as it arrives, return all results."""
    previous = steps.results(step)
    results: dict[str, Result] = {}
    todo = []
    for job in jobs:
        if (out / job.name).is_file():
            results[job.name] = previous.get(job.name) or Result(job.name, True)
        else:
            todo.append(job)
    if len(todo) < len(jobs):
        log.info("%s: %d of %d outputs exist; skipping them", step, len(jobs) - len(todo), len(jobs))
    append = steps.appender(step)
    for res in runner(todo):
        append(res)
        results[res.name] = res
    return results


# --------------------------------------------------------------------------- diffusion


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
        rng = _plan_rng(seed, method)
        jobs: list[Job] = []
        if kind == "inpaint":
            regions = list(d["inpaint_regions"])
            for k, (i, r) in enumerate(
                zip(_balanced(rng, len(reals_face), n), _balanced(rng, len(regions), n), strict=True)
            ):
                src, region = reals_face.iloc[int(i)], regions[int(r)]
                args = {"landmarks": faces[src.src_name].landmarks, "prompt": prompts["inpaint"][region]}
                jobs.append(_sd_edit_job(method, k, seed, quality, src, region, args))
        elif kind == "img2img":
            lo, hi = d["img2img_strength"]
            for k, i in enumerate(_balanced(rng, len(reals), n)):
                src = reals.iloc[int(i)]
                prompt = prompts["img2img"][int(rng.integers(len(prompts["img2img"])))]
                # Two decimals: diffusers takes one strength per call, so batches group by it.
                strength = round(float(rng.uniform(lo, hi)), 2)
                args = {"prompt": prompt, "strength": strength}
                jobs.append(_sd_edit_job(method, k, seed, quality, src, "global", args))
        else:
            for k in range(n):
                prompt = prompts["txt2img"][int(rng.integers(len(prompts["txt2img"])))]
                job = _new_job(
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


def _sd_batches(jobs: list[Job], sizes: dict[str, tuple[int, int]], d: dict, batch_size: int) -> list[list[Job]]:
    """Batches of jobs that share a working size (one tensor shape per pipeline call)."""
    groups: dict[tuple[int, int], list[Job]] = {}
    for job in jobs:
        if job.source:
            key = sd.working_size(*sizes[job.name], int(d["max_side"]))
        else:
            key = (int(d["txt2img_size"]), int(d["txt2img_size"]))
        groups.setdefault(key, []).append(job)
    return [g[i : i + batch_size] for _, g in sorted(groups.items()) for i in range(0, len(g), batch_size)]


def run_diffusion_jobs(
    kind: str, jobs: list[Job], models: sd.DiffusionModels, d: dict, out: Path, progress: bool
) -> Iterable[Result]:
    """Generate, composite (inpainting), crop (txt2img) and write each job's image, batch by batch.

    Source images are decoded one batch at a time, so memory does not grow with the job count.
    """
    pipe = getattr(models, kind)
    analyzer = FaceAnalyzer(embed=False) if kind == "txt2img" and d["crop_txt2img"] else None
    sizes: dict[str, tuple[int, int]] = {}
    ready: list[Job] = []
    for job in jobs:
        try:
            if job.source:
                sizes[job.name] = _image_size(job.source_path)
            ready.append(job)
        except ImageDecodeError as err:
            yield Result(job.name, False, str(err))
    common = {"steps": int(d["steps"]), "guidance": float(d["guidance"]), "negative_prompt": d.get("negative_prompt")}
    details = {"model": models.sources.get(kind, ""), "steps": common["steps"], "guidance": common["guidance"]}
    bar = progress_bar(total=len(ready), desc=f"sd:{kind}", unit="img", disable=not progress)
    for batch in _sd_batches(ready, sizes, d, max(1, int(d["batch_size"]))):
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


# --------------------------------------------------------------------------- the stage


def _fingerprint(step: str, table_hash: str, keys: dict[str, Any]) -> dict:
    return {"recipe": RECIPE_VERSION, "step": step, "input": table_hash, **keys}


def _check_out(out: Path) -> None:
    """Refuse to write into a non-empty folder that is not a prepared set (never delete user data)."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise PrepError(f"{out}: folder exists, is not empty and is not a prepared set; refusing to write into it")
    out.mkdir(parents=True, exist_ok=True)
    write_text("prepared by python -m data_prep\n", out / MARKER)


def _provenance_rows(jobs: list[Job], results: dict[str, Result]) -> tuple[list[dict], list[dict]]:
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


def _pools(table: pd.DataFrame, faces: dict[str, Face | None], p: dict) -> np.ndarray:
    """Donor pools that keep each person's photographs in one pool where there are people enough.

    Then a split that also groups by identity still finds every group inside one pool. With
    fewer than two people per pool (the demo has two in all) a pool could not offer a donor
    of another person, so the partition then ignores people, and the log says so.
    """
    n_pools = int(p["donor_pools"])
    people = real_identities(table, faces, float(p["identity_distance"]))
    n_people = people[people != ""].nunique()
    by_person = n_people >= 2 * n_pools
    if not by_person:
        log.info(
            "donor pools: %d people for %d pools, fewer than two per pool: pools do not keep people together",
            n_people,
            n_pools,
        )
    return donor_pools(table.assign(identity=people), n_pools, int(p["seed"]), identity=by_person)


def write_face_embeddings(table: pd.DataFrame, faces: dict[str, Face | None], path: Path) -> None:
    """`names` (prepared img_name) and `embeddings` (N x 128 float32) of every real original with a face.

    Reals only: they say who is in the set. A fake's face may mix two people (a face swap), and
    joining people through it would chain different identities together.
    """
    reals = table[table["target"] == 0]
    found = [(n, faces.get(s)) for n, s in zip(reals["img_name"], reals["src_name"], strict=True)]
    found = [(n, f.embedding) for n, f in found if f is not None and f.embedding is not None]
    names = np.array([n for n, _ in found], dtype=str)
    vectors = np.array([e for _, e in found], dtype=np.float32).reshape(len(found), EMBEDDING_DIM)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, names=names, embeddings=vectors)


def reencoded_shares(provenance: pd.DataFrame, n_orig: int) -> dict:
    """Per label: images the stage wrote (every row after the first `n_orig`, the originals) and
    their share; and how many percentage points the two shares lie apart."""
    written = np.arange(len(provenance)) >= n_orig
    out: dict = {}
    for label, name in ((0, "real"), (1, "fake")):
        of_label = (provenance["target"] == label).to_numpy()
        n = int(of_label.sum())
        k = int((written & of_label).sum())
        out[name] = {"reencoded": k, "images": n, "share": round(k / n, 4) if n else 0.0}
    points = 100.0 * abs(out["real"]["share"] - out["fake"]["share"])
    out["points_apart"] = round(points, 1)
    out["within_limit"] = bool(points <= REENCODE_TOLERANCE)
    return out


def summary_table(manifest: pd.DataFrame, n_orig: int) -> pd.DataFrame:
    """Counts per (origin, method) and label."""
    df = manifest.assign(origin=np.where(np.arange(len(manifest)) < n_orig, "input", "new"))
    table = pd.crosstab([df["origin"], df["method"]], df["target"]).reindex(columns=[0, 1], fill_value=0)
    table.columns = ["real", "fake"]
    return table.reset_index()


def _run_edits(
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
    if steps.begin(method, _fingerprint(method, table_hash, keys), out / "edit" / kind):
        results = steps.results(method)
    else:

        def runner(todo: list[Job]) -> Iterable[Result]:
            return pool.map(_edit_task, [(j, str(out)) for j in todo], method, progress)

        results = run_jobs(method, jobs, out, steps, runner)
        ok = sum(r.ok for r in results.values())
        steps.finish(method, {"ok": ok, "failed": len(results) - ok})
    return _provenance_rows(jobs, results)


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
    picks = _plan_rng(seed, REENCODE).permutation(len(eligible))[:n]
    jobs = []
    for k, i in enumerate(picks):
        src = eligible.iloc[int(i)]
        jobs.append(
            _new_job(
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


def _run_reencode(
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


def _run_diffusion(
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
        if steps.begin(method, _fingerprint(method, table_hash, {**keys, "count": len(jobs)}), out / "sd" / kind):
            results[method] = steps.results(method)
        else:
            pending[method] = jobs
    status = "ran"
    if pending:
        kinds = [m.split(":", 1)[1] for m in pending]
        try:
            models = sd.load_models(
                d["model"], d["inpaint_model"], str(d["device"]), bool(d["local_files_only"]), kinds
            )
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

                def runner(todo: list[Job], kind: str = kind) -> Iterable[Result]:
                    return run_diffusion_jobs(kind, todo, models, d, out, progress)

                results[method] = run_jobs(method, jobs, out, steps, runner)
                steps.finish(method, {"ok": sum(r.ok for r in results[method].values())})
    rows: list[dict] = []
    failures: list[dict] = []
    for method, res in results.items():
        r, f = _provenance_rows(wanted[method], res)
        rows += r
        failures += f
    return rows, failures, status


def prepare(cfg: dict, force: bool = False, progress: bool | None = None, workers: int | None = None) -> dict:
    """Run the whole stage for `cfg` (a loaded data config); return the summary it prints."""
    cfg = prep_config(cfg)
    p = cfg["prep"]
    progress = bool(p["progress"]) if progress is None else progress
    out = Path(p["out"])
    start = time.perf_counter()

    paths = resolve_data(cfg, prepared=False)
    if paths.is_demo and not paths.train_labels.is_file():
        from data_prep.demo import build_demo

        log.info("no competition data configured and no demo sample at %s: building it", paths.train_labels.parent)
        build_demo(paths.train_labels.parent, progress=progress)
    table = read_originals(paths)
    log.info("read %d train images (%d fake) from %s", len(table), int(table["target"].sum()), paths.train_labels)

    _check_out(out)
    if force:
        for sub in ("edit", "sd", "steps", ORIG_DIR):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    (out / DONE_FILE).unlink(missing_ok=True)
    steps = Steps(out)
    table_hash = _table_hash(table)

    # Every run checks every original (a stat each), so a link removed by hand comes back.
    link_counts = link_originals(table, out, str(p["link"]), progress)
    log.info("originals: %s under %s", link_counts, out / ORIG_DIR)

    pool = Workers(int(p["workers"] if workers is None else workers))
    try:
        # Faces are cached per image, so this step always runs and is quick on a rerun.
        faces, unreadable = detect_faces(table, out, dict(p["faces"]), pool, progress)
        no_face = sorted(n for n, f in faces.items() if f is None)
        n_found = len(faces) - len(no_face)
        log.info("faces: %d found, %d images without one, %d unreadable", n_found, len(no_face), len(unreadable))
        write_face_embeddings(table, faces, out / FACE_EMBEDDINGS_FILE)
        table["donor_pool"] = _pools(table, faces, p)
        rows, failures = _run_edits(table, faces, cfg, out, steps, pool, progress, table_hash)
        sd_rows, sd_failures, sd_status = _run_diffusion(table, faces, cfg, out, steps, progress, table_hash)
        # Last: how many copies level the re-encoded shares depends on every other new image.
        re_rows, re_failures = _run_reencode(table, faces, rows + sd_rows, cfg, out, steps, pool, progress, table_hash)
    finally:
        pool.close()
    failures = [
        *({"method": "faces", "img_name": f"{ORIG_DIR}/{n}", "reason": why} for n, why in unreadable.items()),
        *failures,
        *sd_failures,
        *re_failures,
    ]

    orig_rows = table.assign(source=table["img_name"], donor="", seed="", details="")
    new_rows = pd.DataFrame(rows + sd_rows + re_rows, columns=PROVENANCE_COLUMNS)
    provenance = pd.concat([orig_rows[PROVENANCE_COLUMNS], new_rows], ignore_index=True)
    provenance["target"] = provenance["target"].astype(int)
    write_csv(provenance, out / "provenance.csv")
    write_csv(provenance[MANIFEST_COLUMNS], out / "manifest.csv")
    write_csv(provenance[["img_name", "target"]], out / "train_labels.csv")
    read_labels(out / "train_labels.csv", out)  # what the rest of the pipeline will read is valid
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
    write_json({"recipe": RECIPE_VERSION, "input": table_hash}, out / DONE_FILE)
    print_summary(summary, table_counts)
    return summary


def print_summary(summary: dict, table_counts: pd.DataFrame) -> None:
    print(
        f"\nprepared {summary['out']}: {summary['images']} images ({summary['originals']} input, {summary['new']} new)"
    )
    print(table_counts.to_string(index=False))
    print(f"no face: {summary['no_face']} of {summary['originals']} input images; unreadable: {summary['unreadable']}")
    g = summary["groups"]
    print(
        f"groups of images sharing pixels (linked by parent and sources): {g['n']}; the largest holds "
        f"{g['largest']} images ({100 * g['largest_share']:.1f}%); donors drawn within {g['donor_pools']} pools"
    )
    enc = summary["reencoded"]
    shares = ", ".join(
        f"{k} {100 * enc[k]['share']:.1f}% ({enc[k]['reencoded']} of {enc[k]['images']})" for k in ("real", "fake")
    )
    verdict = "ok" if enc["within_limit"] else f"MORE THAN {REENCODE_TOLERANCE:g}: re-encoding predicts the label"
    print(f"written (re-encoded) by the data stage: {shares}; {enc['points_apart']} points apart ({verdict})")
    fails = summary["failures"]
    print(f"failures: {sum(f['n'] for f in fails)}")
    for f in fails:
        print(f"  {f['method']}: {f['reason']} ({f['n']})")
    print(f"diffusion: {summary['diffusion']}")
    print(f"done in {summary['seconds']}s")
