"""Stable Diffusion fakes with a tiny pipeline built in code (random weights, no hub)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from data_prep import demo, diffusion

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

SIZE = 64  # the tiny VAE downsamples by 2, so 64 px run on 32x32 latents


def fast_tiny_cpu() -> Iterator[None]:
    """Run tiny random models on one thread with denormals flushed, then restore the settings.

    Random tiny weights produce denormal floats, which are 100x slower to compute with; the
    flush-to-zero flag is per thread, so it only helps when torch keeps to the calling thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def build_tiny_sd(folder: Path, inpaint_unet: bool = False) -> Path:
    """Save a random-weight Stable Diffusion pipeline to `folder`, loadable by `from_pretrained`.

    inpaint_unet: a 9-channel UNet (image latents + masked latents + mask), as an
    inpainting checkpoint has; otherwise the 4-channel UNet of a text-to-image checkpoint.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=SIZE // 2,
        in_channels=9 if inpaint_unet else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=1,
            vocab_size=64,
            max_position_embeddings=32,
            projection_dim=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # A character-level vocabulary is enough to turn prompts into ids.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz,":
        vocab[ch] = len(vocab)
        vocab[f"{ch}</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu() -> Iterator[None]:
    yield from fast_tiny_cpu()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny")


@pytest.fixture(scope="module")
def models(tiny_sd: Path) -> diffusion.DiffusionModels:
    return diffusion.load_models(str(tiny_sd), device="cpu", local_files_only=True)


@pytest.fixture(scope="module")
def face() -> tuple[np.ndarray, np.ndarray]:
    view = demo.augment_view(demo.load_photos()[0], 80, np.random.default_rng(0))
    # 80 x 72: not a multiple of 8, and not square, as real inputs can be.
    return np.ascontiguousarray(view.rgb[:, 4:76]), view.landmarks - [4, 0]


def test_loads_every_kind_from_a_local_folder(models: diffusion.DiffusionModels, tiny_sd: Path) -> None:
    assert models.available() == list(diffusion.SD_KINDS)
    assert models.device == "cpu" and models.dtype == "float32"
    assert models.sources["txt2img"] == str(tiny_sd)
    assert "latent masking" in models.sources["inpaint"]
    # img2img shares the text-to-image weights rather than loading them twice.
    assert models.img2img.unet is models.txt2img.unet


def test_a_real_inpainting_checkpoint_is_used_when_given(tmp_path: Path, tiny_sd: Path) -> None:
    inpaint = build_tiny_sd(tmp_path / "inpaint", inpaint_unet=True)
    loaded = diffusion.load_models(None, str(inpaint), device="cpu", local_files_only=True)
    assert loaded.available() == ["inpaint"]
    assert loaded.inpaint.unet.config.in_channels == 9
    assert "diffusion.model is not set" in loaded.missing["txt2img"]


def test_no_model_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(diffusion.DiffusionUnavailable, match="no model configured"):
        diffusion.load_models(None, None)
    missing = tmp_path / "no_such_model"
    with pytest.raises(diffusion.DiffusionUnavailable, match="cannot load") as err:
        diffusion.load_models(str(missing), device="cpu", local_files_only=True)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_txt2img_shapes_and_seeds(models: diffusion.DiffusionModels) -> None:
    pipe = models.txt2img
    a = diffusion.run_txt2img(pipe, ["a face", "a face"], [1, 2], (SIZE, SIZE), steps=2)
    b = diffusion.run_txt2img(pipe, ["a face"], [2], (SIZE, SIZE), steps=2)
    c = diffusion.run_txt2img(pipe, ["a face"], [2], (SIZE, SIZE), steps=2)
    assert len(a) == 2 and a[0].shape == (SIZE, SIZE, 3) and a[0].dtype == np.uint8
    np.testing.assert_array_equal(b[0], c[0])  # same seed, same image
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 5  # other seed, other image
    # An image depends on its seed, not on its batch (up to float rounding in batched kernels).
    assert np.abs(a[1].astype(int) - b[0].astype(int)).max() <= 2


def test_img2img_returns_each_image_at_its_own_size(models: diffusion.DiffusionModels, face: tuple) -> None:
    rgb, _ = face
    size = diffusion.working_size(*rgb.shape[:2], max_side=SIZE)
    assert size == (64, 56)
    outs = diffusion.run_img2img(models.img2img, [rgb, rgb], ["a face"] * 2, [3, 3], [0.3, 0.5], size, steps=4)
    assert [o.shape for o in outs] == [rgb.shape, rgb.shape]
    again = diffusion.run_img2img(models.img2img, [rgb], ["a face"], [3], [0.3], size, steps=4)
    np.testing.assert_array_equal(outs[0], again[0])


def test_inpainting_changes_only_the_dilated_region(models: diffusion.DiffusionModels, face: tuple) -> None:
    rgb, lm = face
    hard, grown = diffusion.inpaint_masks(lm, "mouth", rgb.shape, dilate=0.15)
    assert hard.sum() < grown.sum() and not (hard & ~grown.astype(bool)).any()
    size = diffusion.working_size(*rgb.shape[:2], max_side=SIZE)
    raw = diffusion.run_inpaint(models.inpaint, [rgb], [grown], ["a mouth"], [7], size, steps=2)
    assert raw[0].shape == (*size, 3)
    # The VAE round trip alters pixels everywhere, hence the composite.
    assert (diffusion.composite(rgb, raw[0], np.ones_like(hard), np.ones_like(hard))[0] != rgb).any()
    out, weight = diffusion.composite(rgb, raw[0], hard, grown)
    outside = grown == 0
    np.testing.assert_array_equal(out[outside], rgb[outside])
    assert (weight[hard > 0] == 1).all() and (weight[outside] == 0).all()
    assert np.abs(out[hard > 0].astype(int) - rgb[hard > 0].astype(int)).mean() > 5
    again = diffusion.run_inpaint(models.inpaint, [rgb], [grown], ["a mouth"], [7], size, steps=2)
    np.testing.assert_array_equal(raw[0], again[0])


def test_composite_ramp() -> None:
    original = np.zeros((40, 40, 3), np.uint8)
    generated = np.full((20, 20, 3), 200, np.uint8)  # another size: resized to the original's
    hard = np.zeros((40, 40), np.uint8)
    hard[15:25, 15:25] = 1
    grown = np.zeros_like(hard)
    grown[10:30, 10:30] = 1
    out, weight = diffusion.composite(original, generated, hard, grown)
    assert out.shape == original.shape
    assert (out[15:25, 15:25] == 200).all() and (out[grown == 0] == 0).all()
    ring = (grown > 0) & (hard == 0)
    assert 0 < weight[ring].mean() < 1
    # Monotone from the hard region outwards along a row.
    row = weight[20, 10:16]
    assert (np.diff(row) >= 0).all()


def test_working_size() -> None:
    assert diffusion.working_size(512, 512) == (512, 512)
    assert diffusion.working_size(1000, 500, 512) == (512, 256)
    h, w = diffusion.working_size(333, 517, 512)
    assert h % 8 == 0 and w % 8 == 0 and w == 512


def test_model_sources_are_json(models: diffusion.DiffusionModels) -> None:
    # The stage records where every image came from; the record must serialise.
    json.dumps(models.sources)
