"""Spatiotemporal adapters on a frozen CLIP (`sta`, METHODS.md section 5).

    clip (B, T, 3, H, W) -> frozen CLIP patch embedding + learnable temporal embedding
      -> for every frozen block: x[:, 1:] += adapter(x); x = block(x)       (CLS untouched)
      -> CLS of every frame (CLIP's ln_post and projection) -> mean over T -> dropout -> FC(2)

    adapter(x): patch tokens (CLS dropped) -> Linear(width, width/2) -> (B, C, T, h, w)
      spatial  s = z + mean(dwconv 1x3x3, 1x5x5, 1x7x7)(z)
      temporal t = z + mean(dwconv 3x1x1, 5x1x1, 7x1x1)(z)
      cross-attention within each frame: s' = s + attn(s <- t), t' = t + attn(t <- s)
      -> (s' + t') / 2 -> Linear(width/2, width), zero-initialised -> back into the block's tokens

Each block's adapter feeds its residual into that block's input (as ST-Adapter places it, before
the attention): the stream between two blocks is adapted once, and the last block's attention reads
the last adapter's tokens. An adapter after the last block would change only patch tokens the CLS head
never reads (its gradient is exactly zero; tests/test_sta.py).

The cross-attention runs within each frame (the temporal stream has already mixed the frames):
O(T (hw)^2) rather than O((T hw)^2), 8x less for clips of 8, and on a CPU it was 60% of a demo step
over whole clips.

The up-projection starts at zero and the temporal embedding at zero, so the untrained network's
features are exactly the frozen CLIP's CLS features averaged over the frames. Only the adapters,
the temporal embedding and the head train. A batch of still images (B, 3, H, W) is a batch of
one-frame clips. `takes_clips` tells the data layer and inference to feed clips of `frames`
frames (`core.data.clips`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.config import ConfigError
from models import clip_towers
from models.heads import fp32_head
from models.registry import register_model

SPATIAL_KERNELS = (3, 5, 7)  # published: 1x3x3, 1x5x5, 1x7x7
TEMPORAL_KERNELS = (3, 5, 7)  # published: 3x1x1, 5x1x1, 7x1x1


def _depthwise(channels: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
    return nn.Conv3d(channels, channels, kernel, padding=tuple(k // 2 for k in kernel), groups=channels)


def spatial_conv(conv: nn.Conv3d, z: torch.Tensor) -> torch.Tensor:
    """`conv(z)` for a depthwise 1 x k x k Conv3d, computed as a 2-d convolution of every frame
    (the same numbers; depthwise 3-d convolutions are several times slower on a CPU)."""
    b, c, t, h, w = z.shape
    frames = z.transpose(1, 2).reshape(b * t, c, h, w)
    out = F.conv2d(frames, conv.weight[:, :, 0], conv.bias, padding=conv.padding[1:], groups=conv.groups)
    return out.reshape(b, t, c, h, w).transpose(1, 2)


def temporal_conv(conv: nn.Conv3d, z: torch.Tensor) -> torch.Tensor:
    """`conv(z)` for a depthwise k x 1 x 1 Conv3d, computed as a 1-d convolution along time at every
    location (the same numbers, faster on a CPU)."""
    b, c, t, h, w = z.shape
    series = z.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)
    out = F.conv1d(series, conv.weight[:, :, :, 0, 0], conv.bias, padding=conv.padding[:1], groups=conv.groups)
    return out.reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)


class STAdapter(nn.Module):
    """One adapter: see the module docstring. `forward(x, frames)` with x (B*T, 1 + h*w, width)
    the block's input returns the residual for the patch tokens, (B*T, h*w, width)."""

    def __init__(self, width: int, bottleneck: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.down = nn.Linear(width, bottleneck)
        self.spatial = nn.ModuleList(_depthwise(bottleneck, (1, k, k)) for k in SPATIAL_KERNELS)
        self.temporal = nn.ModuleList(_depthwise(bottleneck, (k, 1, 1)) for k in TEMPORAL_KERNELS)
        self.spatial_from_temporal = nn.MultiheadAttention(bottleneck, heads, batch_first=True)
        self.temporal_from_spatial = nn.MultiheadAttention(bottleneck, heads, batch_first=True)
        self.norm_s = nn.LayerNorm(bottleneck)
        self.norm_t = nn.LayerNorm(bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)  # published: the adapter adds nothing until it has learnt something
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        h, w = self.grid
        z = self.down(x[:, 1:])  # CLS dropped
        bt, n, c = z.shape
        z = z.reshape(bt // frames, frames, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, T, h, w)
        s = z + torch.stack([spatial_conv(conv, z) for conv in self.spatial]).mean(0)
        t = z + torch.stack([temporal_conv(conv, z) for conv in self.temporal]).mean(0)
        # per frame: (B*T, h*w, C), each stream's tokens attending to the other's in the same frame
        s, t = s.transpose(1, 2).reshape(bt, c, n).transpose(1, 2), t.transpose(1, 2).reshape(bt, c, n).transpose(1, 2)
        s_n, t_n = self.norm_s(s), self.norm_t(t)
        s = s + self.spatial_from_temporal(s_n, t_n, t_n, need_weights=False)[0]
        t = t + self.temporal_from_spatial(t_n, s_n, s_n, need_weights=False)[0]
        fused = (s + t) / 2
        return self.up(fused)


class AdaptedBlock(nn.Module):
    """A frozen CLIP block whose input patch tokens first receive its adapter's residual."""

    def __init__(self, block: nn.Module, adapter: STAdapter):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        residual = self.adapter(x, frames)
        return self.block(torch.cat([x[:, :1], x[:, 1:] + residual.to(x.dtype)], dim=1))


class STANet(nn.Module):
    """See the module docstring. `visual` is an open_clip VisionTransformer, frozen here."""

    takes_clips = True  # the data layer and inference feed clips (core.data.clips)

    def __init__(
        self, visual: nn.Module, frames: int, bottleneck: int | None, heads: int, drop_rate: float, num_classes: int
    ):
        super().__init__()
        width = visual.conv1.out_channels
        self.frames = int(frames)
        bottleneck = bottleneck or width // 2  # published: 1024 -> 512 for ViT-L/14
        if bottleneck % heads:
            raise ConfigError(f"model.bottleneck {bottleneck} is not divisible by model.heads {heads}")
        self.visual = visual.requires_grad_(False)
        grid = tuple(visual.grid_size)
        self.blocks = nn.ModuleList(
            AdaptedBlock(block, STAdapter(width, bottleneck, heads, grid)) for block in visual.transformer.resblocks
        )
        visual.transformer = nn.Identity()  # its blocks live on in self.blocks, each saved once
        self.temporal_embedding = nn.Parameter(torch.zeros(self.frames, width))
        feature_dim = visual.output_dim if visual.proj is not None else width
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(feature_dim, num_classes))

    def train(self, mode: bool = True) -> STANet:
        super().train(mode)
        self.visual.eval()  # frozen: no patch dropout while training
        for block in self.blocks:
            block.block.eval()
        return self

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """Per clip (B, T, 3, H, W) or still (B, 3, H, W): the CLS features averaged over frames."""
        if clips.ndim == 4:
            clips = clips[:, None]
        b, t = clips.shape[:2]
        if t > self.frames:
            raise ValueError(f"a clip of {t} frames; this network has temporal embeddings for {self.frames}")
        v = self.visual
        x = v._embeds(clips.flatten(0, 1))  # (B*T, 1 + h*w, width), open_clip's patch + position embedding
        x = (x.unflatten(0, (b, t)) + self.temporal_embedding[:t, None].to(x.dtype)).flatten(0, 1)
        for block in self.blocks:
            x = block(x, t)
        pooled, _ = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled.unflatten(0, (b, t)).mean(1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {"logits": fp32_head(self.head, features), "features": features}


@register_model("sta")
def build_sta(
    frames: int,
    clip: str | None = None,
    model_cfg: dict | None = None,
    pretrained: str | bool | None = None,
    quick_gelu: bool = False,
    bottleneck: int | None = None,
    heads: int = 8,
    drop_rate: float = 0.5,
    num_classes: int = 2,
) -> STANet:
    visual = clip_towers.build_visual(clip, model_cfg, pretrained, quick_gelu)
    if not hasattr(visual, "transformer") or not hasattr(visual, "grid_size"):
        raise ConfigError(f"model: the adapters need a ViT image tower, not {type(visual).__name__}")
    return STANet(visual, frames, bottleneck, heads, drop_rate, num_classes)
