"""Self-blended images guided by facial-embedding discrepancy (`sbi_fed`, METHODS.md section 2).

The network is the published one, efficientnet_pytorch's EfficientNet-B4 (advprop weights,
`num_classes=2`), here timm's `tf_efficientnet_b4.ap_in1k`: the head convolution to 1792
channels and its BatchNorm inside the backbone, average pooling, then the classifier head,
`model.head`:

- `sbi` (SBI's network): dropout 0.4, FC(2). Nothing sits between the pooling and the FC, so
  SBI's released weights map onto it key by key;
- `bn_fc` (the extension's public inference network): BatchNorm over the 1792 pooled
  features, FC(2), so the extension's released weights load (`models.published.convert_sbi`).

efficientnet_pytorch trains the backbone with drop-connect 0.2 and BatchNorm momentum 0.99 in
TensorFlow's convention; `model.drop_path_rate` and `model.bn_momentum` (PyTorch's convention,
1 - 0.99 = 0.01) set them on timm's network. Training adds parts that the guidance losses read
(built with `guidance: true`; the inference path never touches them), all computed in fp32
under mixed precision, as the logits are (`models.heads.fp32_head`):

    f (1792, pooled) --> head                                    logits (inference)
      `--> project: Linear(1792, 1792 + 512) --> a (1792): artifact features
                                               `-> z (512):  identity features
    a --> discrepancy: Linear(1792, 1)    predicts the real-to-fake identity shift
    a --> artifact_head: Linear(1792, 2)  an extra CE head
    a --> residual_head: Linear(1792, 1)  (no bias) scores the residual a_fake - a_real
    z --> reconstruct: MLP(512 -> 512 -> D)  reconstructs the image's face embedding

The training batch (`recipe: sbi`, data_prep.sbi_online) holds B reals then their B
self-blends, with each image's face embedding (or aligned face crop, for a torch embedder).
The exact published losses are not public; `criterion` documents the ones chosen here.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigError
from core.log import get_logger
from models.backbones import create_backbone, last_feature_stage, set_bn_momentum
from models.heads import fp32_head
from models.losses import cross_entropy
from models.provenance import Source, local_source, record
from models.registry import TrainData, register_criterion, register_model, register_recipe

if TYPE_CHECKING:  # the data stage's code is imported where it runs: `import models` stays light
    from data_prep.sbi_online import EmbedderSpec

log = get_logger("sbi_fed")

GUIDANCE_TERMS = ("distill", "recon", "artifact_ce", "residual_ce")
HEADS = ("sbi", "bn_fc")


def classifier_head(kind: str, width: int, drop_rate: float) -> nn.Sequential:
    """`model.head`: `sbi` Dropout -> FC(2) (SBI's), `bn_fc` BatchNorm -> FC(2) (the extension's)."""
    if kind == "sbi":
        return nn.Sequential(nn.Dropout(drop_rate), nn.Linear(width, 2))
    if kind == "bn_fc":
        return nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, 2))
    raise ConfigError(f"model.head {kind!r}: expected one of {HEADS}")


class SBIFedNet(nn.Module):
    """See the module docstring. `forward` returns `logits` and `features` (the pooled vector,
    which `loss.add` terms read) always, and in training mode with guidance also `artifact`
    (a), `discrepancy`, `artifact_logits`, `residual_score` and `reconstruction`, all fp32."""

    def __init__(
        self,
        backbone: nn.Module,
        guidance: bool,
        identity_dim: int = 512,
        embedding_dim: int = 128,
        drop_rate: float = 0.0,
        head: str = "sbi",
    ):
        super().__init__()
        self.backbone = backbone
        width = backbone.num_features
        self.head = classifier_head(head, width, drop_rate)
        self.guidance = guidance
        self.width = width
        if guidance:
            self.project = nn.Linear(width, width + identity_dim)
            self.discrepancy = nn.Linear(width, 1)
            self.artifact_head = nn.Linear(width, 2)
            self.residual_head = nn.Linear(width, 1, bias=False)
            self.reconstruct = nn.Sequential(
                nn.Linear(identity_dim, identity_dim), nn.ReLU(inplace=True), nn.Linear(identity_dim, embedding_dim)
            )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(images)
        out = {"logits": fp32_head(self.head, features), "features": features}
        if self.guidance and self.training:
            out.update(fp32_head(self._guidance, features))
        return out

    def _guidance(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training-only outputs (see the module docstring); the caller runs this in fp32."""
        projected = self.project(features)
        artifact, identity = projected[:, : self.width], projected[:, self.width :]
        return {
            "artifact": artifact,
            "discrepancy": self.discrepancy(artifact).squeeze(1),
            "artifact_logits": self.artifact_head(artifact),
            "residual_score": self.residual_head(artifact).squeeze(1),
            "reconstruction": self.reconstruct(identity),
        }

    def cam_layer(self) -> nn.Module:
        """The layer whose activations explanations weigh (`models.explain`)."""
        return last_feature_stage(self.backbone)


@register_model("sbi_fed")
def build_sbi_fed(
    backbone: str,
    pretrained: bool = False,
    weights: str | None = None,
    allow_mismatch: bool = False,
    guidance: bool = True,
    identity_dim: int = 512,
    embedding_dim: int = 128,
    drop_rate: float = 0.0,
    head: str = "sbi",
    drop_path_rate: float | None = None,
    bn_momentum: float | None = None,
) -> SBIFedNet:
    extra = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    net = create_backbone(backbone, pretrained=pretrained, weights=weights, allow_mismatch=allow_mismatch, **extra)
    if bn_momentum is not None:
        set_bn_momentum(net, bn_momentum)
    return SBIFedNet(net, guidance, identity_dim, embedding_dim, drop_rate, head)


# --------------------------------------------------------------------------- losses


def pair_discrepancy(embedding: torch.Tensor) -> torch.Tensor:
    """d per image of a batch laid out as B reals then their B fakes: d = 1 - cos(e_real, e_fake)
    for the fake of a pair and 0 for its real (a real is its own reference)."""
    n = len(embedding) // 2
    shift = 1.0 - F.cosine_similarity(embedding[:n].float(), embedding[n:].float(), dim=1)
    return torch.cat([torch.zeros_like(shift), shift])


def distill_loss(
    predicted: torch.Tensor, discrepancy: torch.Tensor, guided: torch.Tensor, scale: float
) -> torch.Tensor:
    """L_distill = 1/|G| sum_{i in G} (p_i - d_i / s)^2.

    p_i: the discrepancy head on image i's artifact features; d_i: `pair_discrepancy` (the
    identity shift the frozen face embedder sees between a real and its self-blend); s:
    `discrepancy_scale`, so targets are of order 1; G: the images with an embedding. The
    artifact features must carry how far the blend moved the face, not only whether it did.
    """
    if not guided.any():
        return predicted.sum() * 0.0
    return ((predicted - discrepancy / scale)[guided] ** 2).mean()


def recon_loss(reconstruction: torch.Tensor, embedding: torch.Tensor, guided: torch.Tensor) -> torch.Tensor:
    """L_recon = 1/|G| sum_{i in G} (1 - cos(R(z_i), e_i)).

    R: the reconstruction MLP on the 512-d identity features z_i; e_i: image i's own face
    embedding. It keeps identity in a branch of its own, so the artifact branch need not
    encode who the person is.
    """
    if not guided.any():
        return reconstruction.sum() * 0.0
    cos = F.cosine_similarity(reconstruction, embedding.float(), dim=1)
    return (1.0 - cos)[guided].mean()


def residual_ce(residual_score: torch.Tensor) -> torch.Tensor:
    """L_residual = 1/B sum_i softplus(-(r(a_fake_i) - r(a_real_i))).

    r: a bias-free linear head, so r(a_fake) - r(a_real) = r(a_fake - a_real) scores the residual
    between a fake's artifact features and its own real's. This is the CE of a 2-class head
    on that residual (label 1 for fake minus real, 0 for the reverse, which gives the same
    term), i.e. a pairwise ranking loss: within every pair, the fake must score above its real.
    """
    n = len(residual_score) // 2
    return F.softplus(residual_score[:n] - residual_score[n:]).mean()


class DeviceEmbedder:
    """A frozen face-recognition network from a torch.export archive (.pt2; no pickled code),
    run on the device on the workers' aligned uint8 face crops: (x / 255 - mean) / std."""

    def __init__(self, file: str, mean: tuple, std: tuple):
        try:
            self.net = torch.export.load(file).module()
        except (OSError, RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise ConfigError(f"{file}: cannot load the face embedder as a torch.export archive ({err})") from None
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.device: torch.device | None = None

    @torch.no_grad()
    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        if self.device != faces.device:
            self.net, self.mean, self.std = (x.to(faces.device) for x in (self.net, self.mean, self.std))
            self.device = faces.device
        with torch.autocast(faces.device.type, enabled=False):
            return self.net((faces.float() / 255.0 - self.mean) / self.std).float()


@register_criterion("sbi_fed")
def build_sbi_fed_loss(cfg: dict) -> Callable:
    """L = w_ce L_ce + w_distill L_distill + w_recon L_recon + w_artifact_ce L_artifact_ce
    + w_residual_ce L_residual.

    L_ce: cross-entropy of the inference head. L_artifact_ce: the same CE on the artifact
    head. L_distill, L_recon, L_residual: see their functions. The guidance terms need a
    network built with `guidance: true` (without it they are off, said once in the log). A
    term with weight 0 is still computed and added times 0: every head then takes part in
    every step, which DDP requires, and receives a zero gradient.
    """
    from data_prep.sbi_online import EmbedderSpec

    weights = {"ce": float(cfg.get("ce", 1.0)), **{k: float(cfg.get(k, 0.0)) for k in GUIDANCE_TERMS}}
    scale = float(cfg.get("discrepancy_scale", 0.02))
    spec = EmbedderSpec.from_cfg(cfg.get("embedder"))
    device_embedder = DeviceEmbedder(spec.file, spec.mean, spec.std) if spec.kind == "torch" else None
    warned = []

    def embeddings(batch: dict) -> torch.Tensor:
        if "embedding" in batch:
            return batch["embedding"]
        if device_embedder is None or "face" not in batch:
            raise ConfigError("the sbi_fed guidance losses need the sbi recipe's embeddings in the batch (recipe: sbi)")
        return device_embedder(batch["face"])

    def criterion(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        target = batch["target"]
        out = model(batch["image"])
        logs = {"ce": cross_entropy(out["logits"], target)}
        if "artifact" in out:
            emb = embeddings(batch)
            if emb.shape[1] != out["reconstruction"].shape[1]:
                raise ConfigError(
                    f"the face embedder gives {emb.shape[1]}-d embeddings but model.embedding_dim is "
                    f"{out['reconstruction'].shape[1]}"
                )
            guided = batch["guided"]
            logs["distill"] = distill_loss(out["discrepancy"], pair_discrepancy(emb), guided, scale)
            logs["recon"] = recon_loss(out["reconstruction"], emb, guided)
            logs["artifact_ce"] = cross_entropy(out["artifact_logits"], target)
            logs["residual_ce"] = residual_ce(out["residual_score"])
        elif any(weights[k] for k in GUIDANCE_TERMS) and not warned:
            warned.append(True)
            log.warning(
                "the network has no guidance heads (model.guidance: false): loss terms %s are off", GUIDANCE_TERMS
            )
        loss = sum(weights[k] * v for k, v in logs.items())
        return loss, out["logits"], {k: v.detach() for k, v in logs.items()}

    return criterion


# --------------------------------------------------------------------------- the training batches


@register_recipe("sbi")
def sbi_recipe(cfg: dict, table: pd.DataFrame, transform: Callable, seed: int) -> TrainData:
    """Each item a real with a cached face and its own fresh self-blend (data_prep.sbi_online);
    the embeddings for guidance when the network has guidance heads."""
    from data_prep.sbi_online import EmbedderSpec, collate_pairs, sbi_pairs

    guided = bool(cfg["model"].get("guidance", False))
    data = sbi_pairs(cfg, table, transform, seed, guided)
    if guided:
        record(embedder_source(EmbedderSpec.from_cfg((cfg.get("loss") or {}).get("embedder"))))
    return TrainData(data, collate_pairs)


def embedder_source(spec: EmbedderSpec) -> Source:
    """The face-recognition network the guidance reads: a torch.export archive, or dlib's model
    file (from the face_recognition_models package unless `models_dir` names another folder)."""
    if spec.kind == "torch":
        if not Path(spec.file).is_file():
            raise ConfigError(f"{spec.file}: no such face embedder (loss.embedder.file, a torch.export archive)")
        return local_source("face embedder (torch.export archive)", spec.file)
    from data_prep.faces import EMBEDDING_FILE, FaceModelError, model_path

    try:
        return local_source("dlib face embedder", model_path(EMBEDDING_FILE, spec.models_dir))
    except FaceModelError as err:
        raise ConfigError(str(err)) from None
