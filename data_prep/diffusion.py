"""Stable Diffusion fakes: region inpainting, low-strength img2img and text-to-image faces.

| kind | method | from | region |
|---|---|---|---|
| inpaint | `sd:inpaint` | a real face; a landmark region (eyes, eyebrows, nose, mouth) repainted | that region |
| img2img | `sd:img2img` | a real image re-generated at low strength (same layout, new pixels) | `global` |
| txt2img | `sd:txt2img` | a prompt only; no parent | `synthesis` |

Models come from diffusers: `model` (a Stable Diffusion checkpoint for txt2img and img2img)
and `inpaint_model` (an inpainting checkpoint; without one, inpainting runs on `model`'s own
UNet through diffusers' latent-masking mode), each a hub id or a local folder. On a GPU they
run in float16; on a CPU in float32. The safety checker is switched off: it replaces images
it flags with black squares, which would enter the training set as broken "fakes".

Every image draws its noise from its own CPU `torch.Generator` seeded with the seed the stage
records, so an image depends on its seed and prompt only, not on the batch it ran in, the
batch size or the GPU.

Inpainting passes the whole image through the VAE, which alters every pixel a little (a
detector would learn that trace instead of the repainted region). `composite` therefore puts
the original back everywhere outside the dilated region mask, so only the region changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data_prep.blending import blend, face_scale
from data_prep.edits import morph, region_mask, to_uint8

SD_KINDS = ("inpaint", "img2img", "txt2img")
INPAINT_REGIONS = ("eyes", "eyebrows", "nose", "mouth")


class DiffusionUnavailable(RuntimeError):
    """No Stable Diffusion model is configured or it cannot be loaded; the message says which and why."""


@dataclass
class DiffusionModels:
    """Loaded pipelines (None for a kind that cannot run) and where they came from."""

    txt2img: Any = None
    img2img: Any = None
    inpaint: Any = None
    device: str = "cpu"
    dtype: str = "float32"
    sources: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def available(self) -> list[str]:
        return [k for k in SD_KINDS if getattr(self, k) is not None]


def pick_device(device: str = "auto") -> str:
    """ "auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is returned as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _from_pretrained(cls: Any, source: str, dtype: Any, local_files_only: bool) -> Any:
    try:
        pipe = cls.from_pretrained(
            source,
            dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local_files_only,
        )
    except (OSError, ValueError, RuntimeError, ImportError, KeyError) as err:
        # The hub's errors are long and multi-line; the first line names the cause.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "local folder" if Path(source).is_dir() else "hub id (or missing local folder)"
        raise DiffusionUnavailable(f"cannot load {source!r} as a {where}: {first}") from None
    return pipe


def load_models(
    model: str | None,
    inpaint_model: str | None = None,
    device: str = "auto",
    local_files_only: bool = False,
    kinds: Sequence[str] = SD_KINDS,
) -> DiffusionModels:
    """Load the pipelines that `kinds` need from a hub id or a local folder.

    Raises DiffusionUnavailable when none of the requested kinds can run (nothing configured,
    or loading failed, e.g. offline with no cached copy); a kind that cannot run while others
    can is listed in `missing` with the reason.
    """
    kinds = [k for k in kinds if k in SD_KINDS]
    if not kinds:
        raise DiffusionUnavailable("no diffusion kind requested")
    if not model and not inpaint_model:
        raise DiffusionUnavailable(
            "no model configured (set diffusion.model to a Stable Diffusion hub id or local folder, "
            "e.g. stable-diffusion-v1-5/stable-diffusion-v1-5, and optionally diffusion.inpaint_model)"
        )
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    dev = pick_device(device)
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    out = DiffusionModels(device=dev, dtype=str(dtype).replace("torch.", ""))
    base = None
    base_error = "diffusion.model is not set"
    if model and ({"txt2img", "img2img"} & set(kinds) or ("inpaint" in kinds and not inpaint_model)):
        try:
            base = _from_pretrained(StableDiffusionPipeline, str(model), dtype, local_files_only).to(dev)
        except DiffusionUnavailable as err:
            base_error = str(err)
    if base is not None:
        base.set_progress_bar_config(disable=True)
        if "txt2img" in kinds:
            out.txt2img, out.sources["txt2img"] = base, str(model)
        if "img2img" in kinds:
            # Same weights, another pipeline class: no second copy on the GPU.
            out.img2img, out.sources["img2img"] = StableDiffusionImg2ImgPipeline(**base.components), str(model)
            out.img2img.set_progress_bar_config(disable=True)
    if "inpaint" in kinds:
        if inpaint_model:
            try:
                out.inpaint = _from_pretrained(
                    StableDiffusionInpaintPipeline, str(inpaint_model), dtype, local_files_only
                ).to(dev)
                out.sources["inpaint"] = str(inpaint_model)
            except DiffusionUnavailable as err:
                out.missing["inpaint"] = str(err)
        elif base is not None:
            out.inpaint = StableDiffusionInpaintPipeline(**base.components)
            out.sources["inpaint"] = f"{model} (no inpainting checkpoint: latent masking)"
        if out.inpaint is not None:
            out.inpaint.set_progress_bar_config(disable=True)
    for kind in kinds:
        if getattr(out, kind) is None and kind not in out.missing:
            out.missing[kind] = base_error
    if not out.available():
        raise DiffusionUnavailable("; ".join(dict.fromkeys(out.missing.values())))
    return out


# --------------------------------------------------------------------------- sizes and masks


def working_size(height: int, width: int, max_side: int = 512, multiple: int = 8) -> tuple[int, int]:
    """(h, w) the model runs at: the image scaled so its long side is `max_side`, both sides
    rounded to a multiple of 8 (the VAE's stride), aspect ratio kept within the rounding."""
    scale = max_side / max(height, width)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def inpaint_masks(
    landmarks: np.ndarray, region: str, shape: tuple[int, ...], dilate: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """(hard, grown): the region's landmark mask and the same mask dilated by `dilate` eye distances.

    The model repaints `grown` (so the new content has room to meet the old); `composite`
    keeps the original outside it.
    """
    hard = region_mask(landmarks, region, shape)
    grown = morph(hard, dilate * face_scale(landmarks), cv2.MORPH_DILATE)
    return hard, grown


def composite(
    original: np.ndarray, generated: np.ndarray, hard: np.ndarray, grown: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Paste `generated` (any size; resized to the original's) into `original`.

    Returns (image, weight). The weight is 1 on `hard` and falls smoothly to 0 across the
    margin between `hard` and `grown`, so the repainted region meets the original without a
    seam; outside `grown` every pixel is the original's, bit for bit.
    """
    h, w = original.shape[:2]
    if generated.shape[:2] != (h, w):
        generated = cv2.resize(generated, (w, h), interpolation=cv2.INTER_CUBIC)
    inside = grown > 0
    if not inside.any():
        return original.copy(), np.zeros((h, w), np.float32)
    # Distance to the hard region, 0 on it; the ramp spans the widest part of the margin.
    dist = cv2.distanceTransform((hard == 0).astype(np.uint8), cv2.DIST_L2, 5)
    margin = max(float(dist[inside].max()), 1.0)
    t = np.clip(1.0 - dist / margin, 0.0, 1.0)
    weight = (t * t * (3.0 - 2.0 * t)).astype(np.float32)
    weight[~inside] = 0.0
    weight[weight < 1.0 / 512] = 0.0
    return blend(generated, original, weight, 1.0), weight


# --------------------------------------------------------------------------- running the pipelines


def _generators(seeds: Sequence[int]) -> list[Any]:
    import torch

    # CPU generators: the noise for a seed is the same on every device and in every batch.
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def _to_uint8_batch(images: np.ndarray) -> list[np.ndarray]:
    return [to_uint8(np.nan_to_num(img, nan=0.0) * 255.0) for img in images]


def _check_batch(n: int, **lists: Sequence[Any]) -> None:
    bad = {k: len(v) for k, v in lists.items() if len(v) != n}
    if bad:
        raise ValueError(f"batch of {n}: lengths differ {bad}")


def run_txt2img(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    size: tuple[int, int] = (512, 512),
    steps: int = 30,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
) -> list[np.ndarray]:
    """One image per prompt, RGB uint8 of `size` (h, w)."""
    _check_batch(len(prompts), seeds=seeds)
    images = pipe(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        height=int(size[0]),
        width=int(size[1]),
        num_inference_steps=int(steps),
        guidance_scale=float(guidance),
        generator=_generators(seeds),
        output_type="np",
    ).images
    return _to_uint8_batch(images)


def _pil(images: Sequence[np.ndarray], size: tuple[int, int]) -> list[Any]:
    """PIL images at `size` (h, w): RGB for (H, W, 3) uint8, grey ("L") for (H, W) masks."""
    from PIL import Image

    h, w = size
    out = []
    for img in images:
        # Masks stay 0/255 (nearest); images shrink with area averaging and grow with cubic.
        interp = cv2.INTER_NEAREST if img.ndim == 2 else cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_CUBIC
        out.append(Image.fromarray(np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=interp))))
    return out


def run_img2img(
    pipe: Any,
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    seeds: Sequence[int],
    strengths: Sequence[float],
    size: tuple[int, int],
    steps: int = 30,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
) -> list[np.ndarray]:
    """Each image re-generated at its strength, returned at its own original size.

    diffusers takes one strength per call, so images are grouped by strength within the batch.
    It denoises int(steps * strength) steps; `steps` is raised where that would be 0, which
    diffusers cannot run.
    """
    _check_batch(len(images), prompts=prompts, seeds=seeds, strengths=strengths)
    results: list[np.ndarray | None] = [None] * len(images)
    for strength in sorted(set(float(s) for s in strengths)):
        idx = [i for i, s in enumerate(strengths) if float(s) == strength]
        out = pipe(
            prompt=[prompts[i] for i in idx],
            negative_prompt=[negative_prompt] * len(idx) if negative_prompt else None,
            image=_pil([images[i] for i in idx], size),
            strength=strength,
            num_inference_steps=max(int(steps), math.ceil(1.0 / max(strength, 1e-3))),
            guidance_scale=float(guidance),
            generator=_generators([seeds[i] for i in idx]),
            output_type="np",
        ).images
        for i, img in zip(idx, _to_uint8_batch(out), strict=True):
            h, w = images[i].shape[:2]
            results[i] = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC) if img.shape[:2] != (h, w) else img
    return results  # type: ignore[return-value]


def run_inpaint(
    pipe: Any,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    prompts: Sequence[str],
    seeds: Sequence[int],
    size: tuple[int, int],
    steps: int = 30,
    guidance: float = 7.5,
    negative_prompt: str | None = None,
) -> list[np.ndarray]:
    """Repaint each image inside its 0/1 mask; returns the raw generated images at `size`.

    Callers composite them back into the originals (`composite`), which also undoes the
    resizing outside the mask.
    """
    _check_batch(len(images), masks=masks, prompts=prompts, seeds=seeds)
    h, w = size
    out = pipe(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        image=_pil(images, size),
        mask_image=_pil([(m > 0).astype(np.uint8) * 255 for m in masks], size),
        height=h,
        width=w,
        num_inference_steps=int(steps),
        guidance_scale=float(guidance),
        generator=_generators(seeds),
        output_type="np",
    ).images
    return _to_uint8_batch(out)
