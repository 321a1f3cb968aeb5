"""Spatiotemporal adapters on a frozen CLIP (`sta`, METHODS.md section 5), built as the public
detector builds them (YZY-stack/StA4Deepfake, `training/detectors/clip_adapter_detector.py`).

    clip (B, T, 3, H, W) -> CLIP patch + position embedding, + learnable temporal embedding, ln_pre
      -> the first `layers` CLIP blocks (published: 14 of ViT-L/14's 24), each followed by its adapter:
         x = block(x); x = x + adapter(x)                          (every token, CLS included)
      -> ln_post(CLS) of every frame (no projection) -> mean over T -> dropout -> FC(2)

    adapter(x), all tokens: z = GELU(Linear(width, width/2)(x)); CLS apart, patch tokens to (B, C, T, h, w)
      spatial  s = z + mean over k in 3, 5, 7 of branch(1 x k x k)(z)
      temporal t = z + mean over k in 3, 5, 7 of branch(k x 1 x 1)(z)
      branch   = depthwise conv, BN, ReLU, depthwise conv, BN, ReLU, depthwise conv, BN
      cross-attention (2 heads) over all T*h*w tokens of the clip: s' = attn(t -> s), t' = attn(s -> t)
      f = GELU((s' + t') / 2); tokens [CLS, f] -> GELU(Linear(width/2, width)), zero-initialised

The up-projection starts at zero (GELU(0) = 0) and the temporal embedding at zero, so the untrained
network's features are exactly the frozen CLIP's CLS features (after ln_post) averaged over the
frames. Only the adapters, the temporal embedding and the head train: the public detector leaves its
freezing commented out and tunes everything; the paper and METHODS.md tune the adapters alone
(docs/members/sta.md says why this project follows them).

The public cross-attention reshapes (B, C, T, h, w) through (T, B, h*w, C) into (T*h*w, B, C),
which pairs tokens of different clips of a batch once B > 1; here each clip's T*h*w tokens attend
to that clip's own tokens, so a clip's score does not depend on its batch (tested).

The depthwise 3-d convolutions are computed as 2-d (1 x k x k) and 1-d (k x 1 x 1) ones: the
same numbers (tested), several times faster on a CPU. A batch of still images (B, 3, H, W) is a
batch of one-frame clips. `takes_clips` tells the data layer and inference to feed clips of
`frames` frames (`core.data.clips`).
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
BRANCH_DEPTH = 3  # published: three depthwise convolutions per kernel, BN after each, ReLU between


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


class Branch(nn.Module):
    """One kernel's branch (the public `DepthwiseConv3D`): `BRANCH_DEPTH` depthwise convolutions of one
    kernel, each followed by BatchNorm, ReLU between them (none after the last)."""

    def __init__(self, channels: int, kernel: tuple[int, int, int]):
        super().__init__()
        self.convs = nn.ModuleList(_depthwise(channels, kernel) for _ in range(BRANCH_DEPTH))
        self.norms = nn.ModuleList(nn.BatchNorm3d(channels) for _ in range(BRANCH_DEPTH))
        self.apply_conv = spatial_conv if kernel[0] == 1 else temporal_conv

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            z = norm(self.apply_conv(conv, z))
            if i < BRANCH_DEPTH - 1:
                z = F.relu(z)
        return z


class STAdapter(nn.Module):
    """One adapter: see the module docstring. `forward(x, frames)` with x (B*T, 1 + h*w, width), the
    block's output, returns x plus the adapter's residual (every token, CLS included)."""

    def __init__(self, width: int, bottleneck: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.down = nn.Linear(width, bottleneck)
        self.spatial = nn.ModuleList(Branch(bottleneck, (1, k, k)) for k in SPATIAL_KERNELS)
        self.temporal = nn.ModuleList(Branch(bottleneck, (k, 1, 1)) for k in TEMPORAL_KERNELS)
        # published names: spatial_to_temporal reads the temporal stream's queries against the spatial one
        self.spatial_to_temporal = nn.MultiheadAttention(bottleneck, heads, batch_first=True)
        self.temporal_to_spatial = nn.MultiheadAttention(bottleneck, heads, batch_first=True)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)  # published: the adapter adds nothing until it has learnt something
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        h, w = self.grid
        z = F.gelu(self.down(x))
        cls, z = z[:, :1], z[:, 1:]
        bt, n, c = z.shape
        b = bt // frames
        z = z.reshape(b, frames, h, w, c).permute(0, 4, 1, 2, 3)  # (B, C, T, h, w)
        s = z + torch.stack([branch(z) for branch in self.spatial]).mean(0)
        t = z + torch.stack([branch(z) for branch in self.temporal]).mean(0)
        # each clip's T*h*w tokens: (B, T*h*w, C)
        s, t = s.flatten(2).transpose(1, 2), t.flatten(2).transpose(1, 2)
        s2t = self.spatial_to_temporal(t, s, s, need_weights=False)[0]
        t2s = self.temporal_to_spatial(s, t, t, need_weights=False)[0]
        fused = F.gelu((s2t + t2s) / 2).reshape(bt, n, c)  # (B, T*h*w, C) is frame-major: frames back apart
        return x + F.gelu(self.up(torch.cat([cls, fused], dim=1))).to(x.dtype)


class AdaptedBlock(nn.Module):
    """A frozen CLIP block followed by its adapter."""

    def __init__(self, block: nn.Module, adapter: STAdapter):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return self.adapter(self.block(x), frames)


class STANet(nn.Module):
    """See the module docstring. `visual` is an open_clip VisionTransformer, frozen here; `layers` keeps
    its first blocks (None: all)."""

    takes_clips = True  # the data layer and inference feed clips (core.data.clips)

    def __init__(
        self,
        visual: nn.Module,
        frames: int,
        bottleneck: int | None,
        heads: int,
        drop_rate: float,
        num_classes: int,
        layers: int | None = None,
    ):
        super().__init__()
        width = visual.conv1.out_channels
        self.frames = int(frames)
        bottleneck = bottleneck or width // 2  # published: 1024 -> 512 for ViT-L/14
        self.visual = visual.requires_grad_(False)
        grid = tuple(visual.grid_size)
        blocks = list(visual.transformer.resblocks)[:layers]
        self.blocks = nn.ModuleList(AdaptedBlock(block, STAdapter(width, bottleneck, heads, grid)) for block in blocks)
        visual.transformer = nn.Identity()  # its kept blocks live on in self.blocks, each saved once
        self.temporal_embedding = nn.Parameter(torch.zeros(self.frames, width))
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(width, num_classes))

    def train(self, mode: bool = True) -> STANet:
        super().train(mode)
        self.visual.eval()  # frozen: no patch dropout while training
        for block in self.blocks:
            block.block.eval()
        return self

    def _tokens(self, frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """(B*T, 1 + h*w, width): CLIP's patch, class and position embeddings, the temporal embedding
        added before ln_pre (as the public `get_feat` adds it)."""
        v = self.visual
        x = v.conv1(frames).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = (x.unflatten(0, (b, t)) + self.temporal_embedding[:t, None].to(x.dtype)).flatten(0, 1)
        return v.ln_pre(x)

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """Per clip (B, T, 3, H, W) or still (B, 3, H, W): the CLS features averaged over frames."""
        if clips.ndim == 4:
            clips = clips[:, None]
        b, t = clips.shape[:2]
        if t > self.frames:
            raise ValueError(f"a clip of {t} frames; this network has temporal embeddings for {self.frames}")
        x = self._tokens(clips.flatten(0, 1), b, t)
        for block in self.blocks:
            x = block(x, t)
        return self.visual.ln_post(x[:, 0]).unflatten(0, (b, t)).mean(1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {"logits": fp32_head(self.head, features), "features": features}


def check_sta_config(
    width: int, tower_layers: int, bottleneck: int | None, heads: int, layers: int | None, frames: int
) -> None:
    """The adapter settings against the tower's width and depth; ConfigError naming the setting."""
    bottleneck = bottleneck or width // 2
    if bottleneck % heads:
        raise ConfigError(f"model.bottleneck {bottleneck} is not divisible by model.heads {heads}")
    if layers is not None and not 1 <= layers <= tower_layers:
        raise ConfigError(f"model.layers {layers} must lie in 1..{tower_layers} (the tower's blocks)")
    if frames < 1:
        raise ConfigError(f"model.frames must be a positive integer, not {frames}")


@register_model("sta")
def build_sta(
    frames: int,
    clip: str | None = None,
    model_cfg: dict | None = None,
    pretrained: str | bool | None = None,
    quick_gelu: bool = False,
    bottleneck: int | None = None,
    heads: int = 2,
    layers: int | None = None,
    drop_rate: float = 0.5,
    num_classes: int = 2,
) -> STANet:
    width, tower_layers = clip_towers.vision_shape(clip, model_cfg)
    check_sta_config(width, tower_layers, bottleneck, heads, layers, frames)  # before the tower is built or fetched
    visual = clip_towers.build_visual(clip, model_cfg, pretrained, quick_gelu)
    if not hasattr(visual, "transformer") or not hasattr(visual, "grid_size"):
        raise ConfigError(f"model: the adapters need a ViT image tower, not {type(visual).__name__}")
    return STANet(visual, frames, bottleneck, heads, drop_rate, num_classes, layers)
