"""Semantics-oriented joint embedding (`sjedd`, METHODS.md section 4): CLIP's image and text
towers, both fine-tuned, score an image against one text prompt per node of a hierarchy of
forgery attributes (models/hierarchy.py), and only hierarchy-consistent label states count.

    image --> CLIP image tower --> u                      f_i = s(u, t_i) * scale
    prompt_i --> CLIP text tower --> t_i                    (with antonyms: s(u, t_i) - s(u, t_i^not))
    f (N node scores) --> legal-state marginals p_i = Z_i / Z;   logits = (0, log Z_on)

`s` is the dot product of the unnormalised embeddings, as the published code computes it
(its normalisation lines are commented out), times `scale` 1/10; `normalize: true` makes it
the cosine similarity. Cosine / 10 would confine every node score to [-0.1, 0.1], where the
thousands of legal fake states outweigh the single all-off (real) state: p(fake) would stay
above 0.99 for every image. So the published form is the default.
The fake probability is the root's marginal Z_on / (1 + Z_on), given to the engine as the
2-class logits (0, log Z_on), whose softmax is exactly that.

In eval mode the network returns `logits` and, per non-root node, `attribute:<node>` (its
marginal), which infer.py prints with --attributes; in training mode `logits`, `marginals`
(B, N), `scores` (f) and `features` (the image embedding, for `loss.add`).

Labels come from the data stage's provenance: `provenance.methods` and `provenance.regions`
of the member config map every manifest `method` and `region` part to the nodes they alter
(recipe `sjedd`, `attribute_labels`). The loss and its learned level weights are documented
on `build_sjedd_loss`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from core.config import ConfigError
from core.data.datasets import collate_skip_errors
from core.data.folds import SOURCES_SEP
from core.distributed import sum_over_processes
from core.imaging import ImageDecodeError, decode_image
from core.infer.attributes import ATTRIBUTE_PREFIX, POSITIVES_KEY
from core.log import get_logger
from models import clip_towers
from models.hierarchy import Hierarchy, LegalStates
from models.registry import TrainData, register_criterion, register_model, register_recipe

log = get_logger("sjedd")

LEVELS = ("binary", "global", "local")
FIDELITY_EPS = 1e-8  # published: inside each square root of the fidelity loss
WEIGHTINGS = ("auto_lambda", "fixed")
UNKNOWN, FROM_SOURCE = "unknown", "source"  # provenance.methods values besides node lists


# --------------------------------------------------------------------------- the network


def build_clip(
    clip: str | None, model_cfg: Mapping | None, pretrained: str | bool | None, quick_gelu: bool
) -> tuple[nn.Module, Callable[[list[str]], torch.Tensor]]:
    """An open_clip CLIP and its tokenizer: the named architecture (`clip`, e.g. ViT-B-32) or an
    inline `model_cfg` (tests, the demo). `pretrained`: a hub tag (e.g. openai) or a local
    checkpoint file in any format `models.clip_towers` reads (OpenAI's TorchScript included);
    false/null: random weights (or a trained checkpoint loaded next)."""
    import open_clip  # heavy; only this member needs it

    model = clip_towers.build_clip(clip, model_cfg, pretrained, quick_gelu)
    if model_cfg:
        return model, lambda texts: open_clip.tokenize(texts, context_length=model.context_length)
    return model, open_clip.get_tokenizer(clip)


def prompts(hierarchy: Hierarchy, cfg: Mapping, antonym: bool = False) -> list[str]:
    """One prompt per node, in `hierarchy.nodes` order: the level's template filled with the
    node's words (`words`, default its name)."""
    templates = cfg["antonym_templates" if antonym else "templates"]
    words = dict(cfg.get("words") or {})
    return [
        templates[level].format(words.get(node, node)) for level, nodes in enumerate(hierarchy.levels) for node in nodes
    ]


class LevelWeights(nn.Module):
    """The learned weight of each level's loss and its Adam state, as buffers: they are saved
    and resumed with the network's state, which the forward pass never reads."""

    def __init__(self, n_levels: int):
        super().__init__()
        self.register_buffer("value", torch.zeros(n_levels))
        self.register_buffer("exp_avg", torch.zeros(n_levels))
        self.register_buffer("exp_avg_sq", torch.zeros(n_levels))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # updates of `value`
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))  # training steps seen


class SJEDDNet(nn.Module):
    """See the module docstring."""

    def __init__(
        self,
        clip: nn.Module,
        tokens: torch.Tensor,
        hierarchy: Hierarchy,
        antonyms: bool,
        scale: float,
        normalize: bool,
    ):
        super().__init__()
        self.clip = clip
        # CLIP's contrastive temperature is not used here: frozen, so DDP sees no parameter without a gradient
        clip.logit_scale.requires_grad_(False)
        self.register_buffer("tokens", tokens, persistent=False)  # made from the config's prompts
        self.hierarchy = hierarchy
        self.states = LegalStates(hierarchy)
        self.level_weights = LevelWeights(len(hierarchy.levels))
        self.antonyms, self.scale, self.normalize = antonyms, float(scale), normalize
        # The prompts' embeddings in eval mode, and the text weights they were computed from (`text_features`)
        self._text_cache: tuple[tuple, torch.Tensor] | None = None
        self._export_text: torch.Tensor | None = None  # `export_constants`

    @contextlib.contextmanager
    def export_constants(self) -> Iterator[None]:
        """Under this, an export (torch.export, for ONNX) takes the prompts' embeddings as a constant
        computed now instead of tracing the text tower into the graph, where it would run at every
        call for an answer that never changes."""
        with torch.no_grad():
            self._export_text = self.clip.encode_text(self.tokens)
        try:
            yield
        finally:
            self._export_text = None

    def text_features(self) -> torch.Tensor:
        """The prompts' embeddings. They do not depend on the image, so in eval mode they are
        computed once (the text tower costs about 8 times the ViT-B/32 image tower at batch 1) and
        kept until the text weights change: moved, trained, loaded or edited in place (each bumps
        a tensor's version or storage) or the network is put back in training mode. Training
        mode, tracing (outside `export_constants`) and weights made under torch.inference_mode
        (whose in-place changes bump no version) compute them every call."""
        if self._export_text is not None and torch.compiler.is_exporting():
            return self._export_text
        weights = [p for name, p in self.clip.named_parameters() if not name.startswith("visual.")]
        if self.training or torch.compiler.is_compiling() or any(p.is_inference() for p in weights):
            return self.clip.encode_text(self.tokens)
        key = (torch.is_inference_mode_enabled(), *((p.data_ptr(), p._version) for p in weights))
        if self._text_cache is None or self._text_cache[0] != key:
            with torch.no_grad():  # a constant in eval: no graph kept alive in the cache
                self._text_cache = (key, self.clip.encode_text(self.tokens))
        return self._text_cache[1]

    def train(self, mode: bool = True) -> SJEDDNet:
        self._text_cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): the cached features would stay behind
        self._text_cache = None
        return super()._apply(fn, recurse)

    def node_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f (B, N) in float32, the image embedding)."""
        image = self.clip.encode_image(images)
        text = self.text_features()
        with torch.autocast(images.device.type, enabled=False):
            u, t = image.float(), text.float()
            if self.normalize:
                u, t = F.normalize(u, dim=-1), F.normalize(t, dim=-1)
            sim = self.scale * (u @ t.t())
            n = len(self.hierarchy.nodes)
            return (sim[:, :n] - sim[:, n:] if self.antonyms else sim), image

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f, image = self.node_scores(images)
        with torch.autocast(images.device.type, enabled=False):
            log_z_on, marginals = self.states(f)
        logits = torch.stack([torch.zeros_like(log_z_on), log_z_on], dim=1)
        if self.training:
            return {"logits": logits, "marginals": marginals, "scores": f, "features": image}
        named = {f"{ATTRIBUTE_PREFIX}{node}": marginals[:, i] for i, node in enumerate(self.hierarchy.nodes) if i}
        return {"logits": logits, **named}


@register_model("sjedd")
def build_sjedd(
    hierarchy: dict,
    prompts: dict,
    clip: str | None = None,
    model_cfg: dict | None = None,
    pretrained: str | bool | None = None,
    quick_gelu: bool = False,
    antonyms: bool = False,
    scale: float = 0.1,
    normalize: bool = False,
) -> SJEDDNet:
    tree = Hierarchy.from_config(hierarchy)
    model, tokenize = build_clip(clip, model_cfg, pretrained, quick_gelu)
    texts = _prompt_texts(tree, prompts, antonyms)
    tokens = tokenize(texts)
    if model_cfg:  # an inline config may choose a short context; the named ones have 77 and their own tokenizer
        _check_context(texts, tokens)
    return SJEDDNet(model, tokens, tree, antonyms, scale, normalize)


def _prompt_texts(tree: Hierarchy, cfg: Mapping, antonyms: bool) -> list[str]:
    try:
        texts = prompts(tree, cfg)
        return texts + prompts(tree, cfg, antonym=True) if antonyms else texts
    except (KeyError, IndexError) as err:
        raise ConfigError(f"model.prompts: needs one template per level and antonym_templates ({err})") from None


def _check_context(texts: list[str], tokens: torch.Tensor) -> None:
    """A prompt longer than the text tower's context would be cut short without a word (CLIP's
    tokenizer truncates silently): count each prompt's tokens at the usual 77."""
    import open_clip

    full = open_clip.tokenize(texts, context_length=max(77, tokens.shape[1]))
    too_long = [t for t, row in zip(texts, full, strict=True) if int((row != 0).sum()) > tokens.shape[1]]
    if too_long:
        raise ConfigError(f"prompt(s) {too_long} do not fit the text context of {tokens.shape[1]} tokens")


# --------------------------------------------------------------------------- the loss


def fidelity(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Elementwise fidelity loss 1 - sqrt(p g + e) - sqrt((1 - p)(1 - g) + e), e = 1e-8: one
    minus the Bhattacharyya coefficient of Bernoulli(p) and Bernoulli(g)."""
    return 1 - torch.sqrt(p * g + FIDELITY_EPS) - torch.sqrt((1 - p) * (1 - g) + FIDELITY_EPS)


def level_losses(marginals: torch.Tensor, nodes: torch.Tensor, known: torch.Tensor, tree: Hierarchy) -> torch.Tensor:
    """(L_binary, L_global, L_local): per level, the fidelity loss averaged over the level's
    nodes and the images. The attribute levels average over the images whose attributes the
    provenance records (`known`); a level with none of them in the batch contributes 0."""
    g = nodes.to(marginals.dtype)
    out, start = [], 0
    for k, level in enumerate(tree.levels):
        per_image = fidelity(marginals[:, start : start + len(level)], g[:, start : start + len(level)]).mean(1)
        start += len(level)
        weight = torch.ones_like(per_image) if k == 0 else known.to(per_image.dtype)
        out.append((per_image * weight).sum() / weight.sum().clamp(min=1.0))
    return torch.stack(out)


@dataclass(frozen=True)
class AutoLambda:
    """Settings of the bi-level level weighting; see `build_sjedd_loss`."""

    init: float
    meta_lr: float
    virtual_lr: float
    weight_decay: float
    primary: tuple[float, ...]  # 1 for a primary level, 0 for an auxiliary one
    every: int

    @classmethod
    def from_cfg(cls, cfg: Mapping) -> AutoLambda:
        unknown = sorted(set(cfg.get("primary", [])) - set(LEVELS))
        if unknown or not cfg.get("primary"):
            raise ConfigError(f"loss.weighting.primary: some of {list(LEVELS)}, not {cfg.get('primary')}")
        return cls(
            float(cfg["init"]),
            float(cfg["meta_lr"]),
            float(cfg["virtual_lr"]),
            float(cfg["weight_decay"]),
            tuple(float(level in cfg["primary"]) for level in LEVELS),
            int(cfg.get("every", 1)),
        )


def network_of(model: nn.Module) -> SJEDDNet:
    """The network inside a DDP wrapper or `models.losses.FirstForward` (both keep it as an attribute)."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        return inner
    return model if isinstance(model, nn.Module) else network_of(model.model)


def _losses_at(net: SJEDDNet, tensors: dict[str, torch.Tensor], part: dict) -> torch.Tensor:
    out = functional_call(net, tensors, (part["image"],))
    return level_losses(out["marginals"], part["nodes"], part["known"], net.hierarchy)


def auto_lambda_step(net: SJEDDNet, batch: dict, s: AutoLambda) -> None:
    """One update of the level weights lambda (Auto-Lambda, as the published code does it).

    With the batch's first half as training data (t) and its second half as the held-out
    data (v), and a = `virtual_lr`, wd = `weight_decay`:

        theta' = theta - a (grad_theta sum_k lambda_k L_k(theta; t) + wd theta)     (virtual step)
        d = grad_theta' sum_k pri_k L_k(theta'; v)                  (primary levels pri_k = 1)
        dL_pri(theta') / dlambda_k = -a grad L_k(theta; t) . d
                                   ~ -a (L_k(theta + e d; t) - L_k(theta - e d; t)) / 2e,  e = 0.01 / |d|

    That gradient, times a as in the published code and averaged over the DDP ranks that have a
    pair of images, takes one Adam step (lr `meta_lr`) on lambda, which is then kept >= 0 (a
    negative weight would maximise its level's loss). A rank whose batch holds fewer than two
    readable images contributes nothing but still joins the all-reduce (the others wait in it);
    when no rank has a pair, lambda stays. The published code draws v from a second loader over
    the training set; a half of the same batch keeps a resumed run identical to an uninterrupted one.
    """
    n = len(batch["image"]) // 2
    lam = net.level_weights.value
    grad = _hypergradient(net, batch, n, s) if n else torch.zeros_like(lam)
    # (sum of the ranks' gradients, how many ranks had a pair): one collective, reached by every rank
    summed = sum_over_processes(torch.cat([grad, torch.ones_like(lam[:1]) * (n > 0)]))
    with torch.no_grad():
        if summed[-1] > 0:
            _adam_step(net.level_weights, summed[:-1] / summed[-1], s.meta_lr)


def _hypergradient(net: SJEDDNet, batch: dict, n: int, s: AutoLambda) -> torch.Tensor:
    """This rank's d L_pri(theta') / d lambda (`auto_lambda_step`) from its first n images and the next n."""
    train = {k: batch[k][:n] for k in ("image", "nodes", "known")}
    held_out = {k: batch[k][n : 2 * n] for k in ("image", "nodes", "known")}
    params = {name: p for name, p in net.named_parameters() if p.requires_grad}
    # copies of the buffers: BatchNorm statistics of these extra forward passes stay out of the network
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    lam = net.level_weights.value.detach()
    grads = torch.autograd.grad(
        (lam * _losses_at(net, {**params, **buffers}, train)).sum(), list(params.values()), allow_unused=True
    )
    virtual = {
        name: (p - s.virtual_lr * (g + s.weight_decay * p)).detach().requires_grad_() if g is not None else p.detach()
        for (name, p), g in zip(params.items(), grads, strict=True)
    }
    primary = torch.tensor(s.primary, dtype=lam.dtype, device=lam.device)
    val_loss = (primary * _losses_at(net, {**virtual, **buffers}, held_out)).sum()
    moved = [name for name, g in zip(params, grads, strict=True) if g is not None]
    d = torch.autograd.grad(val_loss, [virtual[name] for name in moved], allow_unused=True)
    d = {name: torch.zeros_like(params[name]) if x is None else x for name, x in zip(moved, d, strict=True)}
    eps = 0.01 / (torch.sqrt(sum((x.float() ** 2).sum() for x in d.values())) + 1e-12)
    with torch.no_grad():
        plus = _losses_at(net, {**buffers, **{k: p + eps * d[k] if k in d else p for k, p in params.items()}}, train)
        minus = _losses_at(net, {**buffers, **{k: p - eps * d[k] if k in d else p for k, p in params.items()}}, train)
        return (-s.virtual_lr * (plus - minus) / (2 * eps)).to(lam.dtype)


def _adam_step(w: LevelWeights, grad: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
    """torch.optim.Adam's update (eps 1e-8, no weight decay) on buffers, then lambda >= 0."""
    w.steps += 1
    t = int(w.steps)
    w.exp_avg.mul_(betas[0]).add_(grad, alpha=1 - betas[0])
    w.exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    denom = (w.exp_avg_sq / (1 - betas[1] ** t)).sqrt_().add_(1e-8)
    w.value.addcdiv_(w.exp_avg, denom, value=-lr / (1 - betas[0] ** t)).clamp_(min=0.0)


@register_criterion("sjedd")
def build_sjedd_loss(cfg: dict) -> Callable:
    """L = sum_k lambda_k L_k over the levels k = binary (fake), global, local attributes.

    L_k (`level_losses`): the fidelity loss 1 - sqrt(p g) - sqrt((1 - p)(1 - g)) between each
    node's legal-state marginal p and its label g, averaged over the level's nodes and images
    (the attribute levels over the images whose provenance records their attributes).

    lambda (`loss.weighting`): `auto_lambda`, the published bi-level scheme: lambda starts at
    `init` for every level and is learned so that one training step on sum_k lambda_k L_k
    lowers the primary levels' loss (the binary task: `primary: [binary]`) on held-out images,
    every `every` steps (`auto_lambda_step`). `fixed`: `weights`, one per level (the published
    code's plain sum is [1, 1, 1]). lambda and its Adam state are buffers of the network.
    """
    weighting = dict(cfg.get("weighting") or {"kind": "fixed", "weights": [1.0, 1.0, 1.0]})
    kind = weighting.get("kind")
    if kind not in WEIGHTINGS:
        raise ConfigError(f"loss.weighting.kind must be one of {list(WEIGHTINGS)}, not {kind!r}")
    auto = AutoLambda.from_cfg(weighting) if kind == "auto_lambda" else None
    fixed = None if auto else torch.tensor([float(w) for w in weighting["weights"]])
    if fixed is not None and len(fixed) != len(LEVELS):
        raise ConfigError(f"loss.weighting.weights: one per level {list(LEVELS)}")

    def criterion(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if "nodes" not in batch:
            raise ConfigError("the sjedd loss needs the attribute labels of its recipe in the batch (recipe: sjedd)")
        net = network_of(model)
        weights = _level_weights(net, batch, auto) if auto else fixed.to(batch["image"].device)
        out = model(batch["image"])
        losses = level_losses(out["marginals"], batch["nodes"], batch["known"], net.hierarchy)
        logs = {name: losses[k].detach() for k, name in enumerate(LEVELS)}
        logs.update({f"lambda_{name}": weights[k].detach() for k, name in enumerate(LEVELS)})
        return (weights.to(losses.dtype) * losses).sum(), out["logits"], logs

    return criterion


def _level_weights(net: SJEDDNet, batch: dict, auto: AutoLambda) -> torch.Tensor:
    w = net.level_weights
    if int(w.calls) == 0:
        w.value.fill_(auto.init)
    if int(w.calls) % auto.every == 0:
        auto_lambda_step(net, batch, auto)
    w.calls += 1
    return w.value.detach().clone()


# --------------------------------------------------------------------------- labels from provenance


@dataclass(frozen=True)
class Provenance:
    """`provenance.methods` (method -> nodes, `source` or `unknown`) and `provenance.regions`
    (region part -> nodes) of the member config."""

    methods: Mapping[str, tuple[str, ...] | str]
    regions: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_cfg(cls, cfg: Mapping, tree: Hierarchy) -> Provenance:
        def nodes(where: str, value: object) -> tuple[str, ...] | str:
            if value in (UNKNOWN, FROM_SOURCE) and where.startswith("methods"):
                return str(value)
            bad = sorted(set(value or []) - set(tree.nodes[1:])) if isinstance(value, list | tuple) else [value]
            if bad:
                raise ConfigError(f"provenance.{where}: {bad} are not attribute nodes {list(tree.nodes[1:])}")
            return tuple(value or [])

        try:
            methods = {str(m): nodes(f"methods.{m}", v) for m, v in cfg["methods"].items()}
            regions = {str(r): nodes(f"regions.{r}", v) for r, v in cfg["regions"].items()}
        except (KeyError, AttributeError, TypeError) as err:
            raise ConfigError(f"provenance: needs `methods` and `regions` mappings ({err})") from None
        return cls(methods, regions)


def _unknown_values(table: pd.DataFrame, prov: Provenance, member: str) -> None:
    """Stop on a method or region part the mapping does not know, naming it and where to add it."""
    parts = {p for region in table["region"] for p in str(region).split("+") if p}
    for kind, values, known in (
        ("method", set(table["method"]), prov.methods),
        ("region", parts, prov.regions),
    ):
        missing = sorted(str(v) for v in values - set(known))
        if missing:
            raise ConfigError(
                f"{kind} {missing[0]!r} of the training data is not in provenance.{kind}s of "
                f"configs/members/{member}.yaml (add what it alters there)"
                + (f"; also missing: {missing[1:]}" if len(missing) > 1 else "")
            )


def attribute_labels(
    table: pd.DataFrame, tree: Hierarchy, prov: Provenance, member: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the training table (target, method, region, sources): the node labels (n, N)
    float32 in `tree.nodes` order and whether the attributes are known (n,) bool.

    A real has every node off. A fake has the root on plus the nodes of its method and of each
    `+`-joined part of its region; a method mapped to `source` (an edit that carries its source
    image's alteration along: degrade, re-encode, new background) takes its source's nodes (the
    first of `sources`), and `unknown` (a fake whose provenance is not recorded) leaves the
    attribute levels out of the loss. An illegal label state stops training."""
    _unknown_values(table, prov, member)
    by_name = table.set_index("img_name")
    index = {node: i for i, node in enumerate(tree.nodes)}

    def alters(name: str, depth: int = 0) -> frozenset[str] | None:
        row = by_name.loc[name]
        spec = prov.methods[row["method"]]
        if spec == UNKNOWN:
            return None
        if spec == FROM_SOURCE:
            source = next((s for s in str(row["sources"]).split(SOURCES_SEP) if s), "")
            if not source or source not in by_name.index or depth > 8:
                return None
            base = alters(source, depth + 1)
            if base is None:
                return None
        else:
            base = frozenset(spec)
        parts = [p for p in str(row["region"]).split("+") if p]
        return base.union(*(prov.regions[p] for p in parts))

    nodes = np.zeros((len(table), len(tree.nodes)), np.float32)
    known = np.ones(len(table), bool)
    for i, (name, target) in enumerate(zip(table["img_name"], table["target"], strict=True)):
        if int(target) == 0:
            continue
        found = alters(name)
        nodes[i, 0] = 1.0
        if found is None:
            known[i] = False
            continue
        nodes[i, [index[n] for n in found]] = 1.0
        if not tree.is_legal(nodes[i].astype(int).tolist()):
            row = by_name.loc[name]
            on = [n for n, v in zip(tree.nodes, nodes[i], strict=True) if v]
            raise ConfigError(
                f"{name}: method {row['method']!r}, region {row['region']!r} give the illegal label state {on} "
                f"(see model.hierarchy); fix provenance in configs/members/{member}.yaml"
            )
    return nodes, known


# --------------------------------------------------------------------------- the training batches


class AttributeDataset(Dataset):
    """The training images with their attribute labels: items `image`, `target`, `nodes`, `known`,
    `index` (or `error`). Each image gets the published quality perturbation with probability
    `perturb_p` before the member's transform; both are seeded by (seed, epoch, index)."""

    def __init__(
        self,
        paths: list[str],
        targets: list[int],
        nodes: np.ndarray,
        known: np.ndarray,
        transform: Callable,
        seed: int,
        perturb_p: float,
    ):
        self.paths, self.targets = paths, targets
        self.nodes, self.known = torch.from_numpy(nodes), torch.from_numpy(known)
        self.transform, self.seed, self.perturb_p = transform, seed, perturb_p
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        from data_prep.perturbations import perturb

        try:
            image = decode_image(self.paths[index])
        except ImageDecodeError as err:
            return {"index": index, "error": str(err)}
        seq = np.random.SeedSequence([self.seed, self.epoch, index, 7])
        image, _ = perturb(image, np.random.default_rng(seq), self.perturb_p)
        return {
            "image": self.transform(image, int(seq.generate_state(1)[0])),
            "target": self.targets[index],
            "nodes": self.nodes[index],
            "known": self.known[index],
            "index": index,
        }


def collate_attributes(items: list[dict]) -> dict:
    batch = collate_skip_errors(items)
    good = [it for it in items if "error" not in it]
    if good:
        batch["nodes"] = torch.stack([it["nodes"] for it in good])
        batch["known"] = torch.stack([it["known"] for it in good])
    return batch


@register_recipe("sjedd")
def sjedd_recipe(cfg: dict, table: pd.DataFrame, transform: Callable, seed: int) -> TrainData:
    """The table's images, each with its node labels from provenance (`attribute_labels`)."""
    tree = Hierarchy.from_config(cfg["model"]["hierarchy"])
    nodes, known = attribute_labels(table, tree, Provenance.from_cfg(cfg["provenance"], tree), cfg["name"])
    fakes = table["target"].to_numpy() == 1
    positives = {n: int(nodes[known, i].sum()) for i, n in enumerate(tree.nodes)}
    log.info(
        "attribute labels: %d fakes, %d with attributes recorded; positives per node: %s",
        int(fakes.sum()),
        int((fakes & known).sum()),
        ", ".join(f"{n} {k}" for n, k in positives.items()),
    )
    perturb_p = float(cfg["recipe"].get("perturb_p", 0.0))
    dataset = AttributeDataset(
        table["path"].tolist(), table["target"].astype(int).tolist(), nodes, known, transform, seed, perturb_p
    )
    # infer.py --attributes marks an attribute this fold never saw altered as untrained
    record = {POSITIVES_KEY: {n: k for n, k in positives.items() if n != tree.root}}
    return TrainData(dataset, collate_attributes, record=record)
