"""Trained networks readied for scoring in PyTorch: infer.py's GPU and `--runtime torch` path,
and the CPU path's export (or PyTorch fallback) for a network without a verified ONNX export.

infer.py imports this module only when it needs torch; a CPU run whose networks all have a
verified export (`core.infer.onnx_cache`) never does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.data.datasets import ImageDataset, make_loader
from core.data.transforms import build_transform
from core.data.tta import check_mode
from core.imaging import ImageDecodeError, decode_image
from core.infer.ensemble import Ensemble
from core.infer.onnx_cache import FAILED, CachedExport
from core.infer.scoring import Crop, Group
from core.log import get_logger
from core.preprocess import Preprocessing
from core.train.prediction import predict_arrays, predict_loader
from core.trained import ModelFile
from models.fusion import fold_batchnorm
from models.onnx_export import OnnxNetwork, export_and_check, onnx_network
from models.zoo import load_trained

log = get_logger("scoring")


def _example(size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)


def torch_network(model: torch.nn.Module, size: int, device: torch.device) -> torch.nn.Module:
    """The network as PyTorch scores it, in eval mode: BatchNorm folded into the convolutions
    (checked to give `model`'s outputs) and weights in channels_last. May return a new module."""
    model = model.to(device).eval()
    return fold_batchnorm(model, _example(size, device)).to(memory_format=torch.channels_last)


def prepare_network(
    model: torch.nn.Module, size: int, device: torch.device, runtime: str, weights: Path | None = None
) -> torch.nn.Module:
    """The network as scored, in eval mode. `onnx` (CPU): the ONNX Runtime export, cached beside
    `weights` and checked against PyTorch when it was made; where there is none (the export
    failed or disagreed), the `torch` preparation (logged). May return a new module."""
    if runtime == "onnx":
        network = onnx_network(model.to(device).eval(), size, weights)
        if network is not None:
            return OnnxNetwork(network)
    return torch_network(model, size, device)


class NumpyIn:
    """A PyTorch network (on the CPU, or on `device`) behind the NumPy interface of `core.infer.scoring`."""

    def __init__(self, model: torch.nn.Module, device: torch.device | None = None):
        self.model = model
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray] | np.ndarray:
        x = torch.from_numpy(images).to(self.device or "cpu")
        if x.ndim == 4:  # images; a clip batch (N, T, 3, H, W) has no channels_last layout
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.model(x)
        if isinstance(out, dict):
            return {k: v.float().cpu().numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}
        return out.float().cpu().numpy()


def loaded_network(trained: ModelFile) -> torch.nn.Module:
    """The network of `trained`: already built (a `models.zoo.TrainedModel`) or loaded now."""
    model = getattr(trained, "model", None)
    return model if model is not None else load_trained(trained.weights).model


def cpu_network(
    trained: ModelFile, size: int, cached: CachedExport, frames: int | None = None
) -> Callable[[np.ndarray], object]:
    """For infer.py's CPU path, a network without a verified export in the cache: exported and
    checked now (the verdict recorded beside its weights), or, where the export fails or
    disagrees now or did before, the PyTorch network (one line on stderr either way). A clip
    network (`frames`, its longest clip) is exported with a free clip length."""
    model = loaded_network(trained).eval()
    name = str(trained.weights)
    if cached.state == FAILED:
        log.warning("%s: no ONNX export (%s, recorded in its tag); scoring with PyTorch", name, cached.reason)
    else:
        log.info("%s: exporting to ONNX and checking it against PyTorch (once per checkpoint)", name)
        network, _ = export_and_check(model, size, name, cached, frames=frames)
        if network is not None:
            return network
    return clip_network(trained) if frames is not None else NumpyIn(torch_network(model, size, torch.device("cpu")))


def clip_network(trained: ModelFile, device: str = "cpu") -> NumpyIn:
    """A clip network in PyTorch on `device` behind the NumPy interface (fp32: a clip member's
    probabilities are compared with its ONNX export's)."""
    return NumpyIn(loaded_network(trained).float().to(device).eval(), torch.device(device))


@dataclass
class TorchGroup:
    """Networks fed by one preprocessing recipe, their columns in the ensemble, and for
    networks that take face crops the `crop` and the `label` naming them (`core.infer.scoring.Group`)."""

    transform: Callable
    networks: list[torch.nn.Module]
    columns: list[int]
    crop: Crop | None = None
    label: str = ""


class TorchScorer:
    """Fake probability of every model of `ensemble` for every image, (N, n_models), in PyTorch
    on `device`: loader workers decode, batches run under bf16 autocast on a GPU. `cropper`
    gives each group whose checkpoints take face crops its crop; such a group scores one image
    at a time, the highest probability over its faces. Scores are averaged over the views of `tta`
    (`core.data.tta`)."""

    def __init__(
        self,
        ensemble: Ensemble,
        device: str,
        batch_size: int,
        workers: int,
        cropper: Callable[[Preprocessing], Crop | None] | None = None,
        tta: str = "none",
    ):
        self.device = torch.device(device)
        self.n_models = len(ensemble.trained)
        self.batch_size = batch_size
        self.workers = workers
        self.tta = check_mode(tta, "tta")
        self.groups = []
        for idx in ensemble.groups().values():
            data_cfg = ensemble.trained[idx[0]].config["data"]
            size = int(data_cfg["image_size"])
            networks = [torch_network(loaded_network(ensemble.trained[i]), size, self.device) for i in idx]
            crop = cropper(Preprocessing.from_config({"data": data_cfg})) if cropper else None
            label = ", ".join(sorted({ensemble.trained[i].member for i in idx}))
            self.groups.append(TorchGroup(build_transform(data_cfg, train=False), networks, idx, crop, label))

    def _faces(self, group: TorchGroup, image: np.ndarray) -> np.ndarray | None:
        """Per network of `group`, the highest probability over the image's face crops; None: no face."""
        crops = group.crop(image)
        if not crops:
            return None
        kw = {"batch_size": self.batch_size, "channels_last": True, "tta": self.tta}
        return predict_arrays(group.networks, crops, group.transform, self.device, **kw).max(axis=0)

    def _cropped_files(self, group: TorchGroup, paths: Sequence[str | Path], on_error) -> np.ndarray:
        out = np.full((len(paths), len(group.networks)), np.nan)
        for i, path in enumerate(paths):
            try:
                found = self._faces(group, decode_image(path))
            except ImageDecodeError as err:
                on_error(str(err))
                continue
            if found is None:
                on_error(f"{path}: no face found; not scored by {group.label}")
            else:
                out[i] = found
        return out

    def score_files(self, paths: Sequence[str | Path], on_error: Callable[[str], None]) -> np.ndarray:
        probs = np.full((len(paths), self.n_models), np.nan)
        for group in self.groups:
            if group.crop is not None:
                probs[:, group.columns] = self._cropped_files(group, paths, on_error)
                continue
            loader = make_loader(
                ImageDataset([str(p) for p in paths], transform=group.transform), self.batch_size, self.workers
            )
            probs[:, group.columns] = predict_loader(
                group.networks,
                loader,
                self.device,
                channels_last=True,
                progress=len(paths) > self.batch_size,
                on_error=on_error,
                tta=self.tta,
            )
        return probs

    def score_arrays(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        probs = np.full((len(arrays), self.n_models), np.nan)
        for group in self.groups:
            if group.crop is None:
                probs[:, group.columns] = predict_arrays(
                    group.networks,
                    arrays,
                    group.transform,
                    self.device,
                    batch_size=self.batch_size,
                    channels_last=True,
                    tta=self.tta,
                )
                continue
            for i, array in enumerate(arrays):
                found = self._faces(group, array)
                if found is not None:
                    probs[i, group.columns] = found
        return probs


def array_groups(scorer: TorchScorer, ensemble: Ensemble) -> list[Group]:
    """`scorer`'s networks behind the NumPy interface of `core.infer.scoring`, one group per input
    recipe, each fed as its checkpoints' meta.json says (what `core.infer.attributes.AttributeScorer` takes)."""
    groups = []
    for idx, group in zip(ensemble.groups().values(), scorer.groups, strict=True):
        prep = Preprocessing.from_config(ensemble.trained[idx[0]].config)
        networks = [NumpyIn(n, scorer.device) for n in group.networks]
        groups.append(Group(prep, networks, idx, group.crop, group.label))
    return groups
