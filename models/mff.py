"""One expert of the winning solution: a timm backbone with a 2-class head."""

from __future__ import annotations

import torch
from torch import nn

from models.backbones import create_backbone, last_feature_stage, pooled_before_norm
from models.heads import fp32_head
from models.registry import register_model


class MFFExpert(nn.Module):
    """timm backbone -> pooled features -> dropout -> Linear(2) in fp32 (`fp32_head`). Returns
    logits and features: the published expert's contrastive feature, the pooled feature map
    before the head's normalisation where the backbone has one (ConvNeXt's `head.norm`;
    `models.backbones.pooled_before_norm`), else the classifier's input."""

    def __init__(self, backbone: nn.Module, num_classes: int = 2, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(backbone.num_features, num_classes))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_map = self.backbone.forward_features(images)
        pooled = self.backbone.forward_head(feature_map, pre_logits=True)
        features = pooled_before_norm(self.backbone, feature_map, pooled)
        return {"logits": fp32_head(self.head, pooled), "features": features}

    def cam_layer(self) -> nn.Module:
        """The layer whose activations explanations weigh (`models.explain`)."""
        return last_feature_stage(self.backbone)


@register_model("mff_expert")
def build_mff_expert(
    backbone: str,
    pretrained: bool = False,
    weights: str | None = None,
    allow_mismatch: bool = False,
    num_classes: int = 2,
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
) -> MFFExpert:
    extra = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    net = create_backbone(backbone, pretrained=pretrained, weights=weights, allow_mismatch=allow_mismatch, **extra)
    return MFFExpert(net, num_classes=num_classes, drop_rate=drop_rate)
