"""The sjedd member: legal-state marginals against brute force, the network on a tiny inline
CLIP, the fidelity loss and its learned level weights, labels from provenance, the recipe."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import models
from core.config import ConfigError, load_config
from core.infer.attributes import ATTRIBUTE_PREFIX
from data_prep.perturbations import KINDS, perturb
from models.hierarchy import Hierarchy, LegalStates
from models.sjedd import (
    AutoLambda,
    Provenance,
    attribute_labels,
    auto_lambda_step,
    collate_attributes,
    fidelity,
    level_losses,
    sjedd_recipe,
)

DEMO = Path("configs/members/sjedd_demo.yaml")
FULL = Path("configs/members/sjedd.yaml")
TINY_CLIP = {
    "embed_dim": 8,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
    "text_cfg": {"context_length": 24, "width": 8, "heads": 1, "layers": 1},
}


def brute_force(tree: Hierarchy, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log Z_on and the marginals by listing every one of the 2^N states and keeping the legal ones."""
    states = torch.tensor(
        [s for s in itertools.product((0, 1), repeat=len(tree.nodes)) if tree.is_legal(s)], dtype=f.dtype
    )
    scores = f @ states.t()
    return torch.logsumexp(scores[:, states[:, 0].bool()], dim=1), torch.softmax(scores, dim=1) @ states


def random_hierarchy(seed: int) -> Hierarchy:
    rng = random.Random(seed)
    globals_ = tuple(f"g{i}" for i in range(rng.randint(1, 3)))
    parents = {f"l{j}": tuple(rng.sample(globals_, rng.randint(1, len(globals_)))) for j in range(rng.randint(1, 4))}
    tree = Hierarchy("fake", globals_, tuple(parents), parents, require_child=False)
    # require_child only where every global has a child (a childless one could never be on)
    covered = all(tree.children(g) for g in globals_)
    return Hierarchy("fake", globals_, tuple(parents), parents, require_child=covered and rng.random() < 0.7)


def member_cfg(path: Path = DEMO) -> dict:
    return load_config(["configs/data.yaml", str(path)])


def demo_tree() -> Hierarchy:
    return Hierarchy.from_config(member_cfg()["model"]["hierarchy"])


def tiny_net(antonyms: bool = False, seed: int = 0) -> torch.nn.Module:
    cfg = dict(member_cfg()["model"])
    cfg.update(model_cfg=TINY_CLIP, antonyms=antonyms)
    torch.manual_seed(seed)
    return models.build_model(cfg)


def batch_of(tree: Hierarchy, n: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    nodes = torch.zeros(n, len(tree.nodes))
    target = torch.tensor([i % 2 for i in range(n)])
    index = {name: i for i, name in enumerate(tree.nodes)}
    for i in range(1, n, 2):  # fakes: a region swap of the mouth
        nodes[i, [index["fake"], index["physical"], index["mouth"], index["lip"]]] = 1.0
    return {
        "image": torch.rand(n, 3, 16, 16, generator=g),
        "target": target,
        "nodes": nodes,
        "known": torch.ones(n, dtype=torch.bool),
    }


# --------------------------------------------------------------------------- marginals


@pytest.mark.parametrize("seed", range(12))
def test_marginals_and_gradients_match_brute_force(seed: int) -> None:
    tree = random_hierarchy(seed)
    f = 3 * torch.randn(5, len(tree.nodes), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    f.requires_grad_()
    log_z_on, marginals = LegalStates(tree)(f)
    ref_log_z_on, ref_marginals = brute_force(tree, f)
    torch.testing.assert_close(log_z_on, ref_log_z_on, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(marginals, ref_marginals, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(marginals)
    (grad,) = torch.autograd.grad((w * marginals).sum() + log_z_on.sum(), f)
    (ref_grad,) = torch.autograd.grad((w * ref_marginals).sum() + ref_log_z_on.sum(), f)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_the_shipped_hierarchy_matches_brute_force_with_large_scores() -> None:
    """12 nodes (4096 states to list): the member's own hierarchy, scores up to +-40."""
    tree = demo_tree()
    assert len(tree.nodes) == 12
    f = 15 * torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    log_z_on, marginals = LegalStates(tree)(f)
    ref_log_z_on, ref_marginals = brute_force(tree, f)
    torch.testing.assert_close(log_z_on, ref_log_z_on)
    torch.testing.assert_close(marginals, ref_marginals)
    # float32 (the network's precision) stays close to the float64 reference
    _, marginals32 = LegalStates(tree)(f.float())
    torch.testing.assert_close(marginals32.double(), ref_marginals, atol=1e-5, rtol=1e-4)


# The public training's FF++ labels: `label_map_soff` of SJEDD's set_dataset_train.py, which
# SJEDD_train_FFpp.py reads through `stack_label(targets, dataset='ffpp-so')` (its
# `SO_Graph.label_map_ffso` is not used in training). Node order: fake; expression, identity,
# physical; eye, eyebrow, lip, mouth, nose, skin.
PUBLIC_NODES = ("fake", "expression", "identity", "physical", "eye", "eyebrow", "lip", "mouth", "nose", "skin")
LABEL_MAP_SOFF = {
    "real": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "phys_eyes": [1, 0, 0, 1, 1, 0, 0, 0, 0, 0],
    "expr_mouth": [1, 1, 0, 1, 0, 0, 1, 1, 0, 0],  # NeuralTextures, Face2Face
    "phy_mouth": [1, 0, 0, 1, 0, 0, 1, 1, 0, 0],
    "phy_nose": [1, 0, 0, 1, 0, 0, 0, 0, 1, 0],
    "id": [1, 0, 1, 1, 1, 1, 1, 1, 1, 1],  # Deepfakes, FaceSwap
}


def public_state(tree: Hierarchy, row: np.ndarray) -> list[int]:
    """A label row of `tree` restricted to the public FF++ nodes, in their order."""
    by_name = dict(zip(tree.nodes, row.astype(int).tolist(), strict=True))
    return [by_name[n] for n in PUBLIC_NODES]


def test_the_published_ffpp_graph_has_its_legal_states() -> None:
    """The public SJEDD FF++ graph (fake; expression, identity, physical; eye .. skin): every state
    of its training table is legal, a local without an on parent and a childless on global are not."""
    parents = {
        "eye": ("identity", "physical"),
        "eyebrow": ("identity",),
        "lip": ("expression", "identity", "physical"),
        "mouth": ("expression", "identity", "physical"),
        "nose": ("identity", "physical"),
        "skin": ("identity",),
    }
    tree = Hierarchy("fake", ("expression", "identity", "physical"), tuple(parents), parents)
    assert tree.nodes == PUBLIC_NODES
    assert all(tree.is_legal(state) for state in LABEL_MAP_SOFF.values())
    assert not tree.is_legal([int(c) for c in "1000000010"])  # nose without a parent
    assert not tree.is_legal([int(c) for c in "1010000000"])  # identity without a local
    assert not tree.is_legal([int(c) for c in "0010111111"])  # identity without fake
    f = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(LegalStates(tree)(f)[1], brute_force(tree, f)[1])


@pytest.mark.parametrize("path", [DEMO, FULL])
def test_shipped_provenance_gives_the_public_training_states(path: Path) -> None:
    """The fakes the public table labels (face swaps, eye / mouth / nose region swaps) get its states
    on the public nodes, and `physical` is on for every fake whose attributes are recorded, as there."""
    cfg = member_cfg(path)
    tree = Hierarchy.from_config(cfg["model"]["hierarchy"])
    rows = [
        ("r.jpg", 0, "real", "", ""),
        ("fs.jpg", 1, "edit:faceswap", "face", ""),
        ("eyes.jpg", 1, "edit:swap", "eyes", ""),
        ("mouth.jpg", 1, "edit:swap", "mouth", ""),
        ("nose.jpg", 1, "edit:swap", "nose", ""),
        ("brows.jpg", 1, "edit:swap", "eyebrows", ""),
        ("sbi.jpg", 1, "sbi", "face", ""),
        ("inpaint.jpg", 1, "sd:inpaint", "mouth", ""),
        ("img2img.jpg", 1, "sd:img2img", "global", ""),
        ("txt2img.jpg", 1, "sd:txt2img", "synthesis", ""),
        ("bg.jpg", 1, "edit:background", "face+background", "fs.jpg"),
    ]
    table = pd.DataFrame(rows, columns=["img_name", "target", "method", "region", "sources"])
    nodes, known = attribute_labels(table, tree, Provenance.from_cfg(cfg["provenance"], tree), cfg["name"])
    public = {name: public_state(tree, row) for name, row in zip(table["img_name"], nodes, strict=True)}
    assert public["r.jpg"] == LABEL_MAP_SOFF["real"]
    assert public["fs.jpg"] == LABEL_MAP_SOFF["id"]
    assert public["eyes.jpg"] == LABEL_MAP_SOFF["phys_eyes"]
    assert public["mouth.jpg"] == LABEL_MAP_SOFF["phy_mouth"]
    assert public["nose.jpg"] == LABEL_MAP_SOFF["phy_nose"]
    fakes = table["target"].to_numpy() == 1
    assert known.all() and (nodes[fakes, tree.nodes.index("physical")] == 1).all()


def test_hierarchy_config_errors_name_the_entry() -> None:
    good = {"root": "fake", "global": ["a", "b"], "local": {"x": ["a"], "y": ["b"]}}
    assert Hierarchy.from_config(good).nodes == ("fake", "a", "b", "x", "y")
    with pytest.raises(ConfigError, match=r"local\.y: parents must be global"):
        Hierarchy.from_config({**good, "local": {"x": ["a"], "y": ["c"]}})
    with pytest.raises(ConfigError, match=r"global\(s\) \['b'\] need a local child"):
        Hierarchy.from_config({**good, "local": {"x": ["a"]}})
    with pytest.raises(ConfigError, match="used twice"):
        Hierarchy.from_config({**good, "local": {"a": ["a"], "y": ["b"]}})


# --------------------------------------------------------------------------- network


def test_network_outputs_and_logits_give_the_root_marginal() -> None:
    net = tiny_net().train()
    out = net(torch.rand(3, 3, 16, 16))
    assert set(out) == {"logits", "marginals", "scores", "features"}
    assert out["logits"].dtype == torch.float32 and out["logits"].shape == (3, 2)
    torch.testing.assert_close(torch.softmax(out["logits"].double(), 1)[:, 1].float(), out["marginals"][:, 0])
    net.eval()
    with torch.no_grad():
        ev = net(torch.rand(2, 3, 16, 16))
    names = [k[len(ATTRIBUTE_PREFIX) :] for k in ev if k.startswith(ATTRIBUTE_PREFIX)]
    assert names == list(net.hierarchy.nodes[1:])  # every attribute, root excluded
    assert all(((v >= 0) & (v <= 1)).all() for k, v in ev.items() if k != "logits")


def test_scores_are_scaled_dot_products_and_antonyms_subtract() -> None:
    images = torch.rand(2, 3, 16, 16)
    for antonyms in (False, True):
        net = tiny_net(antonyms=antonyms).eval()
        with torch.no_grad():
            f, _ = net.node_scores(images)
            u, t = net.clip.encode_image(images), net.clip.encode_text(net.tokens)
        sim = 0.1 * u @ t.t()
        n = len(net.hierarchy.nodes)
        expected = sim[:, :n] - sim[:, n:] if antonyms else sim
        assert net.tokens.shape[0] == (2 * n if antonyms else n)
        torch.testing.assert_close(f, expected)


def test_text_features_are_computed_once_in_eval_until_the_weights_change(monkeypatch) -> None:
    """The prompts' embeddings do not depend on the image: in eval mode the text tower runs once for
    any number of forwards, again after a weight change (in place, a load, a move) or training mode,
    and the cached features always equal a fresh computation."""
    net = tiny_net()
    calls = []
    encode = net.clip.encode_text
    monkeypatch.setattr(net.clip, "encode_text", lambda tokens: calls.append(1) or encode(tokens))
    images = torch.rand(2, 3, 16, 16)

    def fresh() -> dict:
        with torch.no_grad():
            u, t = net.clip.encode_image(images), encode(net.tokens)
        return 0.1 * u @ t.t()

    net.eval()
    with torch.inference_mode():
        for _ in range(3):
            f, _ = net.node_scores(images)
    assert len(calls) == 1
    torch.testing.assert_close(f, fresh())
    with torch.no_grad():
        net.clip.token_embedding.weight.mul_(2.0)  # an optimiser step or an EMA copy does this
        f, _ = net.node_scores(images)
        assert len(calls) == 2
        torch.testing.assert_close(f, fresh())
        state = {k: v + 0.01 for k, v in net.state_dict().items()}
        net.load_state_dict(state)
        f, _ = net.node_scores(images)
        assert len(calls) == 3
        torch.testing.assert_close(f, fresh())
        net.to(torch.float64).to(torch.float32)
        net.node_scores(images)
        net.node_scores(images)
        assert len(calls) == 4
    net.train()
    net(images)
    net(images)
    assert len(calls) == 6  # training: the text tower learns, so it runs every step
    net.eval()
    images.requires_grad_()
    net.node_scores(images)[0].sum().backward()  # Grad-CAM: gradients to the image through cached features
    assert images.grad is not None and len(calls) == 7
    with torch.inference_mode():  # weights loaded in inference mode change in place without a version
        made_here = tiny_net(seed=1).eval()
        for k in range(2):
            made_here.load_state_dict({name: v + k for name, v in net.state_dict().items()})
            u, t = made_here.clip.encode_image(images), made_here.clip.encode_text(made_here.tokens)
            torch.testing.assert_close(made_here.node_scores(images)[0], 0.1 * u @ t.t())


def test_prompts_follow_the_published_templates() -> None:
    from models.sjedd import prompts

    cfg = member_cfg()["model"]
    texts = prompts(demo_tree(), cfg["prompts"])
    assert texts[0] == "a photo of a fake face"
    assert "a photo of a face with the global attribute of physical inconsistency altered" in texts
    assert texts[-1] == "a photo of a face with the local attribute of background altered"
    assert prompts(demo_tree(), cfg["prompts"], antonym=True)[5] == (
        "a photo of a face with the local attribute of eye not altered"
    )


def test_a_prompt_longer_than_the_text_context_is_refused() -> None:
    cfg = dict(member_cfg()["model"])
    clip = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "context_length": 8}}
    with pytest.raises(ConfigError, match="do not fit the text context of 8 tokens"):
        models.build_model({**cfg, "model_cfg": clip})


def test_a_missing_hub_model_says_to_give_a_local_file(monkeypatch) -> None:
    import open_clip

    from core.checkpoint import CheckpointError

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(CheckpointError, match="give a local checkpoint file as model.pretrained"):
        models.build_model(member_cfg(FULL)["model"])


# --------------------------------------------------------------------------- loss


def test_fidelity_is_zero_at_the_label_and_largest_opposite() -> None:
    p = torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0])
    g = torch.tensor([0.0, 1.0, 0.3, 0.0, 1.0])
    loss = fidelity(p, g)
    assert loss[:2].abs().max() < 1e-3 and loss[3:].min() > 0.99
    # 1 - sqrt(p g) - sqrt((1 - p)(1 - g)) at p = g = 0.3
    assert float(loss[2]) == pytest.approx(1 - 0.3 - 0.7, abs=1e-3)


def test_level_losses_leave_unknown_attributes_out() -> None:
    tree = demo_tree()
    b = batch_of(tree, 4)
    marginals = torch.full((4, 12), 0.5)
    known = torch.tensor([True, True, True, False])
    losses = level_losses(marginals, b["nodes"], known, tree)
    per_image = fidelity(marginals, b["nodes"])
    assert float(losses[0]) == pytest.approx(float(per_image[:, 0].mean()))
    assert float(losses[1]) == pytest.approx(float(per_image[:3, 1:5].mean()))
    assert float(losses[2]) == pytest.approx(float(per_image[:3, 5:].mean()))
    none = level_losses(marginals, b["nodes"], torch.zeros(4, dtype=torch.bool), tree)
    assert float(none[1]) == 0.0 and float(none[2]) == 0.0


def test_fixed_weighting_is_the_weighted_sum() -> None:
    net, tree = tiny_net().train(), demo_tree()
    crit = models.build_criterion({"loss": {"name": "sjedd", "weighting": {"kind": "fixed", "weights": [1, 2, 3]}}})
    loss, logits, logs = crit(net, batch_of(tree))
    assert logits.shape == (6, 2)
    torch.testing.assert_close(loss.detach(), logs["binary"] + 2 * logs["global"] + 3 * logs["local"])


def _auto(**kw) -> AutoLambda:
    cfg = {"init": 0.1, "meta_lr": 1e-2, "virtual_lr": 0.5, "weight_decay": 0.0, "primary": ["binary"], "every": 1}
    return AutoLambda.from_cfg({**cfg, **kw})


def test_auto_lambda_gradient_is_the_unrolled_hypergradient(monkeypatch) -> None:
    """The finite-difference estimate equals d L_binary(theta'(lambda); held-out) / d lambda computed
    exactly through the virtual step with autograd (float64)."""
    import models.sjedd as sjedd

    net = tiny_net().double().train()
    tree, settings = net.hierarchy, _auto()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch_of(tree, 8).items()}
    net.level_weights.value.copy_(torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64))
    captured = []
    monkeypatch.setattr(sjedd, "_adam_step", lambda w, grad, lr: captured.append(grad.clone()))
    auto_lambda_step(net, batch, settings)

    lam = net.level_weights.value.clone().requires_grad_()
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    train = {k: v[:4] for k, v in batch.items()}
    held = {k: v[4:] for k, v in batch.items()}
    # attention's fused CPU kernel has no second derivative; the plain one gives the same numbers
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        losses = sjedd._losses_at(net, params, train)
        grads = torch.autograd.grad((lam * losses).sum(), list(params.values()), create_graph=True, allow_unused=True)
        virtual = {
            n: p - settings.virtual_lr * g if g is not None else p
            for (n, p), g in zip(params.items(), grads, strict=True)
        }
        (exact,) = torch.autograd.grad(sjedd._losses_at(net, virtual, held)[0], lam)
    torch.testing.assert_close(captured[0], exact, rtol=0.05, atol=1e-6)
    assert exact.abs().max() > 1e-4  # the check is not 0 == 0


def test_auto_lambda_weights_are_buffers_that_learn_and_resume() -> None:
    net, tree = tiny_net().train(), demo_tree()
    weighting = {"kind": "auto_lambda", "init": 0.1, "meta_lr": 0.05, "virtual_lr": 0.5, "weight_decay": 1e-3}
    crit = models.build_criterion({"loss": {"name": "sjedd", "weighting": {**weighting, "primary": ["binary"]}}})
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(4):
        loss, _, logs = crit(net, batch_of(tree, seed=step))
        loss.backward()
        opt.step()
        opt.zero_grad()
    w = net.level_weights
    assert int(w.calls) == 4 and int(w.steps) == 4
    assert (w.value >= 0).all() and not torch.allclose(w.value, torch.full((3,), 0.1))
    state = net.state_dict()
    assert {"level_weights.value", "level_weights.exp_avg", "level_weights.steps"} <= set(state)
    again = tiny_net(seed=1)
    again.load_state_dict(state)
    torch.testing.assert_close(again.level_weights.value, w.value)  # a resumed run continues from them


def test_auto_lambda_every_and_primary_settings() -> None:
    assert _auto(primary=["binary", "local"]).primary == (1.0, 0.0, 1.0)
    with pytest.raises(ConfigError, match="primary"):
        _auto(primary=["colour"])
    net, tree = tiny_net().train(), demo_tree()
    weighting = {"kind": "auto_lambda", "init": 0.2, "meta_lr": 0.05, "virtual_lr": 0.5, "weight_decay": 0.0}
    crit = models.build_criterion(
        {"loss": {"name": "sjedd", "weighting": {**weighting, "primary": ["binary"], "every": 3}}}
    )
    for step in range(4):
        crit(net, batch_of(tree, seed=step))
    assert int(net.level_weights.calls) == 4 and int(net.level_weights.steps) == 2  # steps 0 and 3


def test_criterion_without_attribute_labels_names_the_recipe() -> None:
    crit = models.build_criterion({"loss": {"name": "sjedd"}})
    batch = batch_of(demo_tree())
    del batch["nodes"]
    with pytest.raises(ConfigError, match="recipe: sjedd"):
        crit(tiny_net().train(), batch)


# --------------------------------------------------------------------------- provenance


def provenance_table() -> pd.DataFrame:
    rows = [
        ("orig/r.jpg", 0, "real", "", ""),
        ("orig/swap.jpg", 1, "edit:swap", "mouth", "orig/r.jpg;orig/d.jpg"),
        ("orig/fs.jpg", 1, "edit:faceswap", "face", ""),
        ("orig/sbi.jpg", 1, "sbi", "face", ""),
        ("edit/degrade/0.jpg", 1, "edit:degrade", "face", "orig/sbi.jpg"),
        ("edit/background/0.jpg", 1, "edit:background", "face+background", "orig/fs.jpg;orig/r.jpg"),
        ("edit/background/1.jpg", 0, "edit:background", "background", "orig/r.jpg"),
        ("orig/unknown.jpg", 1, "original", "", ""),
        ("edit/degrade/1.jpg", 1, "edit:degrade", "", "orig/unknown.jpg"),
        ("sd/txt2img/0.jpg", 1, "sd:txt2img", "synthesis", ""),
    ]
    return pd.DataFrame(rows, columns=["img_name", "target", "method", "region", "sources"])


def on_nodes(tree: Hierarchy, row: np.ndarray) -> set[str]:
    return {n for n, v in zip(tree.nodes, row, strict=True) if v}


def test_provenance_gives_the_label_states_of_the_data_stage() -> None:
    cfg, tree = member_cfg(), demo_tree()
    table = provenance_table()
    nodes, known = attribute_labels(table, tree, Provenance.from_cfg(cfg["provenance"], tree), "sjedd_demo")
    got = {name: on_nodes(tree, row) for name, row in zip(table["img_name"], nodes, strict=True)}
    local_face = {"eye", "eyebrow", "lip", "mouth", "nose", "skin"}
    assert got["orig/r.jpg"] == set() and got["edit/background/1.jpg"] == set()
    assert got["orig/swap.jpg"] == {"fake", "physical", "mouth", "lip"}
    assert got["orig/fs.jpg"] == {"fake", "identity", "physical", *local_face}
    assert got["orig/sbi.jpg"] == got["edit/degrade/0.jpg"] == {"fake", "physical", "skin"}  # the source's
    assert got["edit/background/0.jpg"] == {"fake", "identity", "physical", "background", *local_face}
    assert got["sd/txt2img/0.jpg"] == {"fake", "synthesis", "physical", "background", *local_face}
    unknown = ~known
    assert set(table["img_name"][unknown]) == {"orig/unknown.jpg", "edit/degrade/1.jpg"}  # and what came from it
    assert (nodes[unknown][:, 0] == 1).all()
    assert all(tree.is_legal(r.astype(int).tolist()) for r in nodes[known])


def test_an_unmapped_method_or_region_stops_with_one_line_naming_it() -> None:
    cfg, tree = member_cfg(), demo_tree()
    prov = Provenance.from_cfg(cfg["provenance"], tree)
    table = provenance_table()
    table.loc[1, "method"] = "edit:warp"
    with pytest.raises(ConfigError, match=r"method 'edit:warp' .* provenance\.methods of configs/members/sjedd_demo"):
        attribute_labels(table, tree, prov, "sjedd_demo")
    table = provenance_table()
    table.loc[1, "region"] = "mouth+ears"
    with pytest.raises(ConfigError, match=r"region 'ears' .* provenance\.regions") as err:
        attribute_labels(table, tree, prov, "sjedd_demo")
    assert "\n" not in str(err.value)


def test_a_mapping_to_an_illegal_state_or_an_unknown_node_is_refused() -> None:
    cfg, tree = member_cfg(), demo_tree()
    prov_cfg = dict(cfg["provenance"])
    prov_cfg["methods"] = {**prov_cfg["methods"], "edit:swap": []}  # a mouth with no global parent on
    prov = Provenance.from_cfg(prov_cfg, tree)
    with pytest.raises(ConfigError, match="illegal label state"):
        attribute_labels(provenance_table(), tree, prov, "sjedd_demo")
    with pytest.raises(ConfigError, match=r"\['chin'\] are not attribute nodes"):
        Provenance.from_cfg({**cfg["provenance"], "regions": {"chin": ["chin"]}}, tree)


def test_shipped_mappings_cover_every_method_and_region_of_the_data_stage() -> None:
    from data_prep import demo, diffusion, edits

    methods = {f"edit:{k}" for k in edits.EDIT_KINDS} | {f"sd:{k}" for k in diffusion.SD_KINDS}
    methods |= {m for m, _ in demo.FAKE_RECIPES} | {"real", "original", "fake"}
    regions = set(edits.MASK_REGIONS) | set(diffusion.INPAINT_REGIONS) | {"background", "global", "synthesis"}
    prov = member_cfg(FULL)["provenance"]
    assert methods <= set(prov["methods"]) and regions <= set(prov["regions"])


# --------------------------------------------------------------------------- recipe and configs


def test_recipe_items_carry_labels_and_are_seeded(tmp_path: Path) -> None:
    from PIL import Image

    from core.data.transforms import build_transform

    table = provenance_table()
    rng = np.random.default_rng(0)
    paths = []
    for name in table["img_name"]:
        path = tmp_path / name.replace("/", "_").replace(".jpg", ".png")
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    table["path"] = paths
    (tmp_path / "gone.png").write_bytes(b"not an image")
    table.loc[len(table)] = ["orig/gone.jpg", 0, "real", "", "", str(tmp_path / "gone.png")]
    cfg = member_cfg()
    cfg["recipe"]["perturb_p"] = 1.0
    data = sjedd_recipe(cfg, table, build_transform({"image_size": 16}, train=False), seed=3)
    items = [data.dataset[i] for i in range(len(table))]
    assert "error" in items[-1]
    batch = data.collate(items)
    assert batch["image"].shape == (len(table) - 1, 3, 16, 16) and batch["nodes"].shape == (len(table) - 1, 12)
    assert batch["known"].dtype == torch.bool and len(batch["errors"]) == 1
    torch.testing.assert_close(data.dataset[1]["image"], items[1]["image"])  # same seed, same perturbation
    data.dataset.set_epoch(1)
    assert any(not torch.equal(data.dataset[i]["image"], items[i]["image"]) for i in range(len(table) - 1))
    assert collate_attributes([items[-1]])["errors"] and "nodes" not in collate_attributes([items[-1]])


@pytest.mark.parametrize("kind", KINDS)
def test_each_perturbation_changes_the_image_and_repeats_with_its_seed(kind: str, monkeypatch) -> None:
    import data_prep.perturbations as pert

    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    monkeypatch.setattr(pert, "KINDS", (kind,))
    out, applied = perturb(image, np.random.default_rng(5), p=1.0)
    again, _ = perturb(image, np.random.default_rng(5), p=1.0)
    assert applied == kind and out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image) and np.array_equal(out, again)
    kept, none = perturb(image, np.random.default_rng(5), p=0.0)
    assert kept is image and none is None


@pytest.mark.parametrize("path", [FULL, DEMO])
def test_every_config_field_is_in_the_yaml_with_a_comment(path: Path) -> None:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("  ") and ":" in ln]
    # A key whose value is a mapping carries its comments on its sub-keys; prompt templates are text.
    uncommented = [ln for ln in lines if "#" not in ln and not ln.rstrip().endswith(":") and '- "' not in ln]
    assert not uncommented, f"{path}: constants without a reason: {uncommented}"


@pytest.mark.parametrize("path", [DEMO, FULL])
def test_shipped_configs_hold_the_published_numbers_and_build(path: Path) -> None:
    from core.train.trainer import TrainSettings

    cfg = member_cfg(path)
    s = TrainSettings.from_cfg(cfg["train"])
    w = cfg["loss"]["weighting"]
    assert (cfg["model"]["scale"], cfg["recipe"]["perturb_p"], w["kind"], w["primary"]) == (
        0.1,
        0.3,
        "auto_lambda",
        ["binary"],
    )
    if path == FULL:
        assert (s.lr, s.weight_decay, s.epochs, s.optimizer, s.schedule) == (6e-7, 1e-3, 20, "adamw", "warmup_cosine")
        assert (cfg["model"]["clip"], cfg["model"]["pretrained"], cfg["model"]["quick_gelu"]) == (
            "ViT-B-32",
            "openai",
            True,
        )
        assert (w["init"], w["meta_lr"], w["virtual_lr"]) == (0.1, 1e-4, s.lr)
        return
    assert w["virtual_lr"] == s.lr
    net = models.build_model(cfg["model"], pretrained=False).train()
    size = cfg["data"]["image_size"]
    tree = net.hierarchy
    batch = {**batch_of(tree, 4), "image": torch.rand(4, 3, size, size)}
    loss, _, logs = models.build_criterion(cfg)(net, batch)
    assert torch.isfinite(loss) and {"binary", "global", "local"} <= set(logs)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)  # DDP-ready


def test_the_input_is_the_whole_image_as_the_public_transform_keeps_it() -> None:
    """SJEDD's clip.py `_transform` resizes the shorter side to 224 with its CenterCrop commented
    out (on square face crops: the whole image); no centre crop here either: the sides of a wide
    image reach the network."""
    from core.data.transforms import build_transform

    cfg = member_cfg(FULL)["data"]
    wide = np.full((200, 400, 3), 128, np.uint8)
    wide[:, :40] = (255, 0, 0)  # the outer tenth of each side, which a centre crop would drop
    wide[:, -40:] = (0, 0, 255)
    x = build_transform(cfg, train=False)(wide, 0)
    assert tuple(x.shape) == (3, 224, 224)
    mean, std = torch.tensor(cfg["mean"])[:, None], torch.tensor(cfg["std"])[:, None]
    rgb = x[:, 112, :] * std + mean  # one row, back in [0, 1]
    torch.testing.assert_close(rgb[:, 5], torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(rgb[:, -5], torch.tensor([0.0, 0.0, 1.0]), atol=0.02, rtol=0)


@pytest.mark.slow
def test_the_published_architecture_builds_without_weights() -> None:
    cfg = member_cfg(FULL)
    net = models.build_model(cfg["model"], pretrained=False).eval()
    assert net.clip.visual.image_size == (224, 224) and net.tokens.shape == (12, 77)
    with torch.no_grad():
        out = net(torch.rand(1, 3, 224, 224))
    assert out["logits"].shape == (1, 2) and len(out) == 12


def test_the_demo_keeps_the_hierarchy_prompts_and_provenance() -> None:
    demo, full = yaml.safe_load(DEMO.read_text()), yaml.safe_load(FULL.read_text())
    for key in ("hierarchy", "prompts"):
        assert demo["model"][key] == full["model"][key]
    assert demo["provenance"] == full["provenance"]


# --------------------------------------------------------------------------- train.py and infer.py


def sjedd_project(p: dict) -> dict:
    """The tiny project of conftest with a tiny sjedd member instead of its mff one."""
    member = yaml.safe_load(DEMO.read_text())
    member["name"] = "tiny"
    member["model"]["model_cfg"] = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], "image_size": 32}}
    member["data"]["image_size"] = 32
    member["train"].update(epochs=1, batch_size=4, num_workers=0, warmup_steps=1, progress=False, ema_bn="average")
    member["train"].pop("ema_bn_batches", None)
    p["member_cfg"].write_text(yaml.safe_dump(member))
    return member


def test_train_stops_on_provenance_the_mapping_does_not_know(tiny_project, capsys) -> None:
    import cv_split
    import train

    p = tiny_project
    sjedd_project(p)
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0"]
    assert train.main(args) == 2  # conftest's fakes are method "patch"
    (err,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert "method 'patch'" in err and "provenance.methods of configs/members/tiny.yaml" in err


@pytest.mark.slow
def test_train_then_infer_prints_attributes(tiny_project, capsys) -> None:
    import cv_split
    import infer
    import train

    p = tiny_project
    member = sjedd_project(p)
    member["provenance"]["methods"]["patch"] = ["physical", "skin"]
    p["member_cfg"].write_text(yaml.safe_dump(member))
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    assert train.main(["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "all"]) == 0
    for k in (0, 1):
        assert (p["outputs"] / "tiny" / f"fold{k}" / "oof.csv").is_file()
    capsys.readouterr()
    configs = ["--config", str(p["ensemble_cfg"]), "--data-config", str(p["data_cfg"])]
    image = str(Path(p["test_root"]) / "t_000.png")
    assert infer.main([image, *configs, "--attributes", "--json"]) == 0  # the ONNX path: exports first
    attrs = json.loads(capsys.readouterr().out.strip())["attributes"]["tiny"]
    # the fakes here are all "patch" (physical, skin): every other attribute is marked untrained, from meta.json
    positives = json.loads((p["outputs"] / "tiny" / "fold0" / "meta.json").read_text())["training_data"]
    assert {n for n, k in positives["attribute_positives"].items() if k} == {"physical", "skin"}
    assert set(attrs["given_fake"]) == {"physical", "skin"} and all(0 <= v <= 1 for v in attrs["given_fake"].values())
    assert set(attrs["untrained"]) == set(demo_tree().nodes[1:]) - {"physical", "skin"}
    assert 0 < attrs["fake"] < 1


def save_fold(folder: Path, cfg: dict, seed: int, record: dict | None = None) -> torch.nn.Module:
    from core.checkpoint import save_weights

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    net = models.build_model(cfg["model"]).eval()
    save_weights(net.state_dict(), folder / "model.safetensors")
    meta = {"complete": True, "config": cfg} | ({"training_data": record} if record is not None else {})
    (folder / "meta.json").write_text(json.dumps(meta))
    return net


def test_infer_attributes_average_the_folds_and_skip_members_without_them(tmp_path: Path, capsys, monkeypatch) -> None:
    """sjedd's own p(fake) beside its attributes given fake (the folds' mean joint probability over
    their mean p(fake)); an attribute no fold saw altered is marked untrained, without a number;
    the networks run once per image with --attributes as without."""
    from PIL import Image

    import infer
    from core.preprocess import Preprocessing
    from models.sjedd import SJEDDNet

    model = {**member_cfg()["model"], "model_cfg": TINY_CLIP}
    sjedd_cfg = {"name": "sj", "model": model, "data": {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}}
    untrained = {"expression", "synthesis"}
    record = {"attribute_positives": {n: 0 if n in untrained else 5 for n in demo_tree().nodes[1:]}}
    nets = [save_fold(tmp_path / "sj" / f"fold{k}", sjedd_cfg, seed=k, record=record) for k in (0, 1)]
    other = {"name": "cnn", "model": {"name": "mff_expert", "backbone": "test_resnet"}, "data": {"image_size": 32}}
    save_fold(tmp_path / "cnn" / "fold0", other, seed=0)
    image = tmp_path / "a.png"
    pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    weights = [
        f"--weights={tmp_path / m / f'fold{k}' / 'model.safetensors'}" for m, k in (("sj", 0), ("sj", 1), ("cnn", 0))
    ]
    forwards = []
    forward = SJEDDNet.forward
    monkeypatch.setattr(SJEDDNet, "forward", lambda self, x: forwards.append(len(x)) or forward(self, x))
    assert infer.main([str(image), *weights, "--runtime", "torch", "--attributes", "--json"]) == 0
    with_attributes = len(forwards)
    obj = json.loads(capsys.readouterr().out.strip())
    assert set(obj["attributes"]) == {"sj"}  # the CNN member explains nothing
    got = obj["attributes"]["sj"]
    assert got["fake"] == pytest.approx(obj["members"]["sj"], abs=1e-6)  # the member's own probability
    x = torch.from_numpy(Preprocessing.from_config(sjedd_cfg)(pixels))[None]
    with torch.no_grad():
        outs = [n(x) for n in nets]
    p_fake = np.mean([float(torch.softmax(o["logits"].double(), 1)[0, 1]) for o in outs])
    assert got["fake"] == pytest.approx(p_fake, abs=1e-5)
    assert set(got["untrained"]) == untrained and not untrained & set(got["given_fake"])
    for name, value in got["given_fake"].items():
        joint = np.mean([float(o[f"{ATTRIBUTE_PREFIX}{name}"][0]) for o in outs])
        assert value == pytest.approx(joint / p_fake, abs=1e-5)
    assert infer.main([str(image), *weights, "--runtime", "torch", "--attributes"]) == 0
    line = capsys.readouterr().out.strip()
    given = " ".join(f"{n} {p:.2f}" for n, p in got["given_fake"].items())
    assert line == (
        f"{obj['probability']:.4f}\t{image}\tsj: p(fake) {got['fake']:.2f} | if fake: {given}"
        " | untrained: expression synthesis"
    )
    forwards.clear()
    assert infer.main([str(image), *weights, "--runtime", "torch"]) == 0
    assert capsys.readouterr().out.strip() == f"{obj['probability']:.4f}\t{image}"  # without the flag: as before
    assert len(forwards) == with_attributes >= 2  # --attributes runs no network a second time


@pytest.mark.slow
def test_onnx_export_carries_the_attributes(tmp_path: Path) -> None:
    """The CPU path: the exported network gives PyTorch's logits and attributes, which
    `core.infer.attributes` reads from ONNX Runtime's outputs by name."""
    from PIL import Image

    from core.infer.scoring import ArrayScorer, Group
    from core.preprocess import Preprocessing
    from models.onnx_export import export_and_check

    net = tiny_net().eval()
    network, reason = export_and_check(net, 16, "tiny")
    assert network is not None, reason
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    prep = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    scorer = ArrayScorer([Group(prep, [network], [0])], 1, explain=True)
    scorer.score_files([tmp_path / "a.png"], print)
    got = scorer.attributes[0][0]
    with torch.no_grad():
        ref = net(torch.from_numpy(prep(image))[None])
    for name, value in got.items():
        assert value == pytest.approx(float(ref[f"{ATTRIBUTE_PREFIX}{name}"][0]), abs=1e-4)


def test_every_trainable_parameter_gets_a_gradient() -> None:
    """DDP (without find_unused_parameters) requires it; CLIP's unused temperature is frozen."""
    net, tree = tiny_net().train(), demo_tree()
    loss, _, _ = models.build_criterion({"loss": {"name": "sjedd"}})(net, batch_of(tree))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing and not net.clip.logit_scale.requires_grad


def test_bench_attributes_scores_each_fold_on_its_own_images(tiny_project, capsys) -> None:
    import cv_split
    from bench import sjedd_attributes

    p = tiny_project
    member = sjedd_project(p)
    member["provenance"]["methods"]["patch"] = ["physical", "skin"]
    p["member_cfg"].write_text(yaml.safe_dump(member))
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    cfg = {"name": "tiny", "model": {**member["model"]}, "data": member["data"]}
    for k in (0, 1):
        save_fold(p["outputs"] / "tiny" / f"fold{k}", cfg, seed=k)
    capsys.readouterr()
    out = p["root"] / "attr.json"
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--out", str(out)]
    assert sjedd_attributes.main(args) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 24 and result["folds"] == [0, 1]
    rows = {r["node"]: r for r in result["attributes"]}
    assert rows["fake"]["positives"] == 12 and rows["skin"]["positives"] == 12 and rows["eye"]["positives"] == 0
    assert rows["eye"]["auc_all"] is None and 0 <= rows["skin"]["auc_all"] <= 1
    assert rows["skin"]["auc_fakes"] is None  # every fake has it: no negatives among the fakes
    assert "| skin | 12 |" in capsys.readouterr().out


def test_interrupted_training_resumes_to_the_same_weights_and_level_weights(tiny_project, monkeypatch) -> None:
    """The level weights and their Adam state are in the saved state; the held-out half for their
    update is part of the same batch: a resumed run ends where an uninterrupted one does."""
    import cv_split
    import train
    from core.checkpoint import load_weights
    from core.train.trainer import Trainer

    p = tiny_project
    member = sjedd_project(p)
    member["provenance"]["methods"]["patch"] = ["physical", "skin"]
    member["loss"]["weighting"].update(every=1, meta_lr=0.05)
    p["member_cfg"].write_text(yaml.safe_dump(member))
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0", "train.epochs=3"]
    assert train.main(args) == 0
    reference = load_weights(p["outputs"] / "tiny" / "fold0" / "model.safetensors")
    shutil.rmtree(p["outputs"] / "tiny")
    real_train_epoch = Trainer.train_epoch

    def dies_in_third_epoch(self):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return real_train_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", dies_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(Trainer, "train_epoch", real_train_epoch)
    assert train.main(args) == 0
    resumed = load_weights(p["outputs"] / "tiny" / "fold0" / "model.safetensors")
    assert int(resumed["level_weights.steps"]) > 0
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_cosine_over_ten_could_never_call_an_image_real() -> None:
    """Why `normalize: false` (the published code's dot products): with cosine similarities / 10
    every node score lies in [-0.1, 0.1], and the thousands of legal fake states then outweigh
    the one all-off (real) state whatever the image."""
    tree = demo_tree()
    _, marginals = LegalStates(tree)(torch.full((1, 12), -0.1))  # every score at its lowest
    assert float(marginals[0, 0]) > 0.99


def test_level_weights_under_ddp_with_a_rank_left_one_readable_image(tmp_path: Path) -> None:
    """Two gloo processes (tests/sjedd_ddp_workers.py): a rank without a held-out pair still joins
    the all-reduce of the hypergradient (a short process-group timeout fails instead of hanging)."""
    import torch.multiprocessing as mp

    from tests import sjedd_ddp_workers
    from tests.ddp_workers import WORLD

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(sjedd_ddp_workers.level_weights_with_a_nearly_unreadable_share, args=(init,), nprocs=WORLD, join=True)
