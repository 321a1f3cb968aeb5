"""The sta member: spatiotemporal adapters on a frozen CLIP image tower (models/sta.py)."""

from __future__ import annotations

import pytest
import torch

import models
from core.config import ConfigError
from models.sta import STANet

TINY = {
    "name": "sta",
    "frames": 8,
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    },
    "heads": 2,
}


def tiny(**overrides) -> STANet:
    torch.manual_seed(0)
    return models.build_model({**TINY, **overrides})


def unadapted(net: STANet, clips: torch.Tensor) -> torch.Tensor:
    """The frozen CLIP tower alone (its kept blocks): each frame's CLS after ln_post, averaged over the clip."""
    v = net.visual
    x = v._embeds(clips.flatten(0, 1))
    for block in net.blocks:
        x = block.block(x)
    return v.ln_post(x[:, 0]).unflatten(0, clips.shape[:2]).mean(1)


def test_at_init_the_adapted_features_equal_the_frozen_clip_features():
    net = tiny().eval()
    clips = torch.randn(3, 8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.features(clips), unadapted(net, clips), atol=1e-6)
        # and the adapters do compute something: their residual is zero only through the zero up-projection
        torch.nn.init.normal_(net.blocks[0].adapter.up.weight)
        assert not torch.allclose(net.features(clips), unadapted(net, clips), atol=1e-3)


def test_adapter_is_built_as_the_public_detector_builds_it():
    net = tiny()
    adapter = net.blocks[0].adapter
    assert (adapter.down.in_features, adapter.down.out_features) == (32, 16)  # width -> width / 2
    for branches, kernels in (
        (adapter.spatial, [(1, 3, 3), (1, 5, 5), (1, 7, 7)]),
        (adapter.temporal, [(3, 1, 1), (5, 1, 1), (7, 1, 1)]),
    ):
        assert [b.convs[0].kernel_size for b in branches] == kernels
        for branch in branches:  # three depthwise convolutions per kernel, BatchNorm after each
            assert len(branch.convs) == 3 and len(branch.norms) == 3
            assert all(c.groups == 16 and c.kernel_size == branch.convs[0].kernel_size for c in branch.convs)
            assert all(isinstance(n, torch.nn.BatchNorm3d) for n in branch.norms)
    assert adapter.spatial_to_temporal.num_heads == 2  # published: 2 heads
    assert torch.count_nonzero(adapter.up.weight) == 0 and torch.count_nonzero(adapter.up.bias) == 0
    assert len(net.blocks) == 2 and net.temporal_embedding.shape == (8, 32)
    assert isinstance(net.head[0], torch.nn.Dropout) and net.head[0].p == 0.5
    assert net.head[1].in_features == 32 and net.head[1].out_features == 2  # the CLS width, no projection


def test_layers_keeps_the_first_blocks_of_the_tower():
    net = tiny(layers=1)
    assert len(net.blocks) == 1
    with pytest.raises(ConfigError, match="model.layers 3"):
        tiny(layers=3)


def test_adapter_changes_cls_and_follows_its_block():
    """Published: x = block(x); x = x + adapter(x), the adapter's up-projection reaching CLS too."""
    net = tiny().eval()
    block = net.blocks[0]
    torch.nn.init.normal_(block.adapter.up.weight)
    x = torch.randn(8, 17, 32)
    with torch.no_grad():
        out = block(x, 8)
        assert torch.allclose(out, block.adapter(block.block(x), 8))
        assert not torch.allclose(out[:, 0], block.block(x)[:, 0], atol=1e-4)


def test_a_clips_score_does_not_depend_on_its_batch():
    """The cross-attention spans a clip's own frames (all T*h*w tokens), never another clip's."""
    net = tiny().eval()
    for b in net.blocks:
        torch.nn.init.normal_(b.adapter.up.weight, std=0.1)
    clips = torch.randn(3, 8, 3, 32, 32)
    with torch.no_grad():
        together = net(clips)["logits"]
        alone = torch.cat([net(clips[i : i + 1])["logits"] for i in range(3)])
        assert torch.allclose(together, alone, atol=1e-5)
        # and it does span frames: changing frame 7 changes frame 0's tokens after one adapter
        block = net.blocks[0]
        x = net._tokens(clips[:1].flatten(0, 1), 1, 8)
        y = x.clone()
        y[7] += 1.0
        assert not torch.allclose(block(x, 8)[0], block(y, 8)[0], atol=1e-5)


def test_only_adapters_temporal_embedding_and_head_get_gradients():
    net = tiny().train()
    out = net(torch.randn(2, 8, 3, 32, 32))
    torch.nn.functional.cross_entropy(out["logits"], torch.tensor([0, 1])).backward()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert trainable and all(n.startswith(("blocks.", "temporal_embedding", "head.")) for n in trainable)
    assert all(".adapter." in n for n in trainable if n.startswith("blocks."))
    assert all(".adapter." not in n for n in frozen) and any(n.startswith("visual.") for n in frozen)
    assert all(p.grad is None for n, p in net.named_parameters() if n in frozen)
    assert all(p.grad is not None for n, p in net.named_parameters() if n in trainable)
    # the zero up-projections learn first: their gradient is non-zero from the first step
    assert all(torch.count_nonzero(b.adapter.up.weight.grad) > 0 for b in net.blocks)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 3, 32, 32), (2, 8, 3, 32, 32)])
def test_stills_and_clips_give_one_pair_of_logits_per_item(shape):
    net = tiny().eval()
    with torch.no_grad():
        out = net(torch.randn(*shape))
    assert out["logits"].shape == (2, 2) and out["logits"].dtype == torch.float32
    assert out["features"].shape == (2, 32)  # the CLS width: no projection, as published


def test_a_still_is_a_one_frame_clip():
    net = tiny().eval()
    torch.nn.init.normal_(net.blocks[1].adapter.up.weight)  # so the adapters matter
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(images)["logits"], net(images[:, None])["logits"])


def test_temporal_stream_mixes_frames_and_spatial_stream_does_not():
    adapter = tiny().blocks[0].adapter.eval()
    z = torch.zeros(1, 16, 8, 4, 4)
    z[0, :, 4, 1, 1] = 1.0  # one token of frame 4
    with torch.no_grad():  # the response to the impulse alone, biases taken out

        def response(branches):
            return torch.stack([b(z) - b(torch.zeros_like(z)) for b in branches]).mean(0)

        spatial, temporal = response(adapter.spatial), response(adapter.temporal)
    assert spatial[0, :, [3, 5]].abs().sum() == 0 and spatial[0, :, 4].abs().sum() > 0
    assert temporal[0, :, [1, 7]].abs().sum() > 0 and temporal[0, :, 4, 0, 0].abs().sum() == 0


def test_the_fast_convolutions_equal_the_3d_ones():
    from models.sta import spatial_conv, temporal_conv

    adapter = tiny().blocks[0].adapter
    z = torch.randn(2, 16, 8, 4, 4)
    with torch.no_grad():
        for branch in adapter.spatial:
            conv = branch.convs[0]
            assert torch.allclose(spatial_conv(conv, z), conv(z), atol=1e-5)
        for branch in adapter.temporal:
            conv = branch.convs[0]
            assert torch.allclose(temporal_conv(conv, z), conv(z), atol=1e-5)


def test_longer_clips_than_temporal_embeddings_are_refused():
    with pytest.raises(ValueError, match="clip of 9 frames"):
        tiny()(torch.randn(1, 9, 3, 32, 32))


def test_state_dict_saves_each_frozen_tensor_once(tmp_path):
    from core.checkpoint import load_weights, save_weights

    net = tiny()
    save_weights(net.state_dict(), tmp_path / "w.safetensors")
    other = tiny()
    other.load_state_dict(load_weights(tmp_path / "w.safetensors"))
    assert not any(k.startswith("visual.transformer") for k in net.state_dict())


def public_order(attn: torch.nn.MultiheadAttention, query: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """The public detector's cross-attention on (B, C, T, h, w) streams: each stream viewed as (B, C, T, h*w),
    permuted to (T, B, h*w, C) and reshaped to a (T*h*w, B, C) sequence, attended, and reshaped back."""
    b, c, t, h, w = query.shape

    def sequence(z):
        return z.reshape(b, c, t, h * w).permute(2, 0, 3, 1).reshape(t * h * w, b, c)

    q, kv = sequence(query), sequence(source)
    out = attn(q.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    return out.reshape(t, h * w, b, c).permute(2, 3, 0, 1).reshape(b, c, t, h, w)


def test_the_cross_attention_is_the_public_one_for_one_clip_and_keeps_clips_apart_for_more():
    attn = tiny().blocks[0].adapter.spatial_to_temporal.eval()
    torch.manual_seed(1)
    spatial, temporal = torch.randn(2, 16, 8, 4, 4), torch.randn(2, 16, 8, 4, 4)

    def ours(s, t):  # as STAdapter.forward: each clip's T*h*w tokens, frame-major
        tokens = attn(t.flatten(2).transpose(1, 2), s.flatten(2).transpose(1, 2), s.flatten(2).transpose(1, 2))[0]
        return tokens.transpose(1, 2).reshape(s.shape)

    with torch.no_grad():
        one = ours(spatial[:1], temporal[:1])
        assert torch.allclose(one, public_order(attn, temporal[:1], spatial[:1]), atol=1e-6)
        # two clips: ours scores each clip alone; the public reshape pairs tokens of different clips
        assert torch.allclose(ours(spatial, temporal)[:1], one, atol=1e-6)
        assert not torch.allclose(public_order(attn, temporal, spatial)[:1], one, atol=1e-3)
