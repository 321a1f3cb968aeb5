"""Grad-CAM explanations of the ensemble's scores: `infer.py --explain DIR`.

For every still image that was scored, one PNG per member and one for the blend, each the
image with its class activation map overlaid (pytorch-grad-cam's `GradCAM` and
`show_cam_on_image`) above a caption band that gives the probability infer.py scored:

    DIR/<image stem>__<member>.png    the member's folds' CAMs averaged
    DIR/<image stem>__blend.png       the member CAMs blended with the ensemble's weights

An image stem that two inputs share (a/face.png, b/face.jpg) gets a short hash of the input's
path (`face-1a2b3c4d__...`); every PNG also names its image in its metadata (`Source`), with
its `Caption`, `Member` and `Probability` (full precision). The networks run in PyTorch, in
float32, on the scoring device (the CPU when scoring used ONNX Runtime): Grad-CAM needs
gradients, which an ONNX export does not give. Each network names the layer to explain with a
`cam_layer()` method (for timm backbones, `models.backbones.last_feature_stage`).
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from torch import nn

from core.imaging import ImageDecodeError, decode_image, is_video
from core.infer.ensemble import Ensemble
from core.io import write_with
from core.preprocess import Preprocessing
from core.progress import progress_bar
from core.trained import ModelFile
from models.zoo import load_trained

BLEND = "blend"
CAPTION_PAD = 4


class ExplainError(ValueError):
    """A network cannot be explained, or the output folder cannot be written; the message
    names the file and the reason."""


class FakeMargin:
    """Grad-CAM's target: logit(fake) - logit(real). p(fake) is the softmax of the two logits,
    a monotone function of this margin alone, so its gradient is what raises p(fake); the fake
    logit by itself would also credit evidence that raises both logits."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., 1] - logits[..., 0]


class LogitsOnly(nn.Module):
    """A network returning a dict (`forward(images)["logits"]`), seen by Grad-CAM as one
    returning its logits tensor."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)["logits"]


class FoldCam:
    """Grad-CAM of one trained network, fed the preprocessing its meta.json records."""

    def __init__(self, trained: ModelFile, device: torch.device):
        network = load_trained(trained.weights).model.float().to(device).eval().requires_grad_(False)
        find_layer = getattr(network, "cam_layer", None)
        if find_layer is None:
            raise ExplainError(
                f"{trained.weights}: {type(network).__name__} does not say which layer to explain (no cam_layer method)"
            )
        layer = find_layer()
        # Registered before Grad-CAM's own hooks, so they see the output it gives.
        self.handle = layer.register_forward_hook(graph_from_here)
        self.preprocessing = Preprocessing.from_config(trained.config)
        self.device = device
        self.gradcam = GradCAM(LogitsOnly(network), [layer])

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float32 in [0, 1] for an RGB uint8 (H, W, 3) image: the CAM, computed at the
        network's input size (min-max scaled there by the library), resized to the image."""
        x = torch.from_numpy(self.preprocessing(image))[None].to(self.device)
        with torch.enable_grad():
            cam = self.gradcam(x, [FakeMargin()])[0]
        height, width = image.shape[:2]
        return cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)

    def release(self) -> None:
        self.gradcam.activations_and_grads.release()
        self.handle.remove()


def graph_from_here(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the explained layer: autograd starts at its output. Grad-CAM needs the
    gradient there and nowhere below, so the layers before it (their weights frozen, the input
    not requiring grad) run without a graph and the backward pass stops here; the gradient at
    this output, and so the CAM, is the same as with a backward pass through the whole network.
    The clone keeps a later in-place operation on this output legal (on a leaf that requires
    grad it is not)."""
    return output.detach().requires_grad_().clone()


def blend_cam(member_cams: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The blend's CAM: sum_m w_m CAM_m / sum_m w_m, with w_m the weights the ensemble blends
    member probabilities with (`Ensemble.weights`). Each CAM_m is the mean of its folds' CAMs,
    each min-max scaled to [0, 1], so a member weighs in by its blend weight, not by how sure
    it is; where the members look at different places the blend shows both, each fainter."""
    w = np.asarray(weights, dtype=np.float64)
    stacked = np.stack(member_cams).astype(np.float64)
    return (np.tensordot(w, stacked, axes=1) / w.sum()).astype(np.float32)


class Explainer:
    """Grad-CAMs of every member of `ensemble` for one image, and of their blend."""

    def __init__(self, ensemble: Ensemble, device: str | torch.device):
        device = torch.device(device)
        self.members = [m for m in ensemble.members if not face_cropped(ensemble, m)]
        left_out = [m for m in ensemble.members if m not in self.members]
        if left_out:
            # Such a member scores crops around each face, not the image: a CAM of the whole
            # image would not explain the probability in its caption.
            print(f"explain: {', '.join(left_out)} not explained (scored on face crops)", file=sys.stderr)
        if not self.members:
            raise ExplainError("no member to explain: every member is scored on face crops")
        self.weights = np.array([ensemble.weights[ensemble.members.index(m)] for m in self.members])
        self.folds = {m: [FoldCam(t, device) for t in ensemble.trained if t.member == m] for m in self.members}

    def cams(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Per explained member, then `blend` (theirs, with their blend weights): (H, W) maps in
        [0, 1] at the image's size."""
        members = {m: np.mean([fold(image) for fold in folds], axis=0) for m, folds in self.folds.items()}
        members[BLEND] = blend_cam([members[m] for m in self.members], self.weights)
        return members

    def release(self) -> None:
        for folds in self.folds.values():
            for fold in folds:
                fold.release()


def face_cropped(ensemble: Ensemble, member: str) -> bool:
    """Whether `member`'s networks take face crops (their meta.json records `data.face_crop`)."""
    return any(Preprocessing.from_config(t.config).face_crop for t in ensemble.trained if t.member == member)


def output_stems(paths: Sequence[Path]) -> list[str]:
    """The file-name stem of each input's explanations: its own stem, or, when two inputs share
    one, the stem and the first 8 hex digits of the SHA-1 of the input's path."""
    counts = Counter(p.stem for p in paths)

    def stem(path: Path) -> str:
        if counts[path.stem] == 1:
            return path.stem
        return f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"

    return [stem(p) for p in paths]


def caption_text(member: str, probability: float) -> str:
    """The caption under an explanation, with the probability as infer.py prints it."""
    return f"{member}: p(fake) = {probability:.4f}"


def _font(text: str, width: int) -> ImageFont.FreeTypeFont:
    """The default font at the largest size from 1/24 of the width (at most 28 px) down to 10 px
    that fits `text` on one line of `width`."""
    size = max(10, min(28, width // 24))
    font = ImageFont.load_default(size)
    while size > 10 and font.getlength(text) > width:
        size -= 1
        font = ImageFont.load_default(size)
    return font


def _lines(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """`text` broken at spaces into lines that fit `width` (a word wider than that is cut at the
    edge when drawn; the PNG's metadata keeps the caption whole)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def captioned(overlay: np.ndarray, text: str) -> np.ndarray:
    """`overlay` (H, W, 3) with a white band below it holding `text` in black, on as many lines
    as a narrow image needs."""
    width = overlay.shape[1]
    room = width - 2 * CAPTION_PAD
    font = _font(text, room)
    lines = _lines(text, font, room)
    ascent, descent = font.getmetrics()
    band = Image.new("RGB", (width, len(lines) * (ascent + descent) + 2 * CAPTION_PAD), "white")
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((CAPTION_PAD, CAPTION_PAD + i * (ascent + descent)), line, fill="black", font=font)
    return np.concatenate([overlay, np.asarray(band)], axis=0)


def write_png(path: Path, pixels: np.ndarray, text: dict[str, str]) -> Path:
    """`pixels` as a PNG at `path`, written atomically, with `text` as its metadata."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return write_with(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info))


def explain_image(
    explainer: Explainer, path: Path, stem: str, probabilities: dict[str, float], out_dir: Path
) -> list[Path]:
    """Write the explanations of one image (see the module docstring); `probabilities`: the
    scored ones, by member and `blend`. Raises ImageDecodeError if the image cannot be read."""
    image = decode_image(path)
    base = image.astype(np.float32) / 255.0
    written = []
    for name, cam in explainer.cams(image).items():
        text = caption_text(name, probabilities[name])
        pixels = captioned(show_cam_on_image(base, cam, use_rgb=True), text)
        meta = {"Caption": text, "Member": name, "Probability": repr(probabilities[name]), "Source": str(path)}
        written.append(write_png(out_dir / f"{stem}__{name}.png", pixels, meta))
    return written


def write_explanations(
    ensemble: Ensemble,
    paths: Sequence[Path],
    table: np.ndarray,
    out_dir: str | Path,
    device: str,
    report: Callable[[str], None],
) -> list[Path]:
    """Explain every still image of `paths` that was scored: `table` is infer.py's, per path the
    blend then each member's probability (NaN where the image was not scored, which was
    reported then). Videos are not explained (one line on stderr says how many). An image that
    cannot be read now goes to `report` and is skipped. Returns the files written."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExplainError(f"{out_dir}: cannot write explanations there ({err.strerror})") from None
    columns = [BLEND, *ensemble.members]
    chosen = [i for i, p in enumerate(paths) if not is_video(p) and not np.isnan(table[i, 0])]
    videos = sum(is_video(p) for p in paths)
    if videos:
        print(f"explain: {videos} video(s) not explained (still images only)", file=sys.stderr)
    stems = output_stems([paths[i] for i in chosen])
    explainer = Explainer(ensemble, device)
    written: list[Path] = []
    try:
        for i, stem in progress_bar(list(zip(chosen, stems, strict=True)), desc="explain", unit="image"):
            probabilities = dict(zip(columns, map(float, table[i]), strict=True))
            try:
                written += explain_image(explainer, paths[i], stem, probabilities, out_dir)
            except ImageDecodeError as err:
                report(str(err))
    finally:
        explainer.release()
    print(f"explain: {len(written)} PNG(s) for {len(chosen)} image(s) in {out_dir}/", file=sys.stderr)
    return written
