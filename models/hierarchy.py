"""A three-level hierarchy of forgery attributes and the exact node marginals over its legal states.

Nodes: one root (fake), global attributes (expression, identity, ...) and local attributes
(eye, mouth, ...), each local with one or more global parents. A label state x in {0, 1}^N
is legal when

    a global is on only if the root is on;
    a local is on only if at least one of its parents is on;
    with `require_child`, a global is on only if at least one of its children is on.

(The published SJEDD graph: locals hang from several globals, e.g. the lip from expression,
identity and physical inconsistency, so the hierarchy is not a tree.) With node scores f (B, N),
p(x) = exp(f . x) / Z over the legal states, and a node's marginal is the probability mass of
the legal states in which it is on: p_i = Z_i / Z with Z_i the sum restricted to x_i = 1.

`LegalStates` computes Z and every Z_i without listing the 2^N states. Every global is off
when the root is, so Z = 1 + Z_on (the all-off state) and, with the root on:

    Z_on = e^{f_root} sum_{S subset of globals} e^{f_S} W(S)

where W(S) sums over the local states allowed by S (a local may be on only if S holds one of
its parents; with `require_child`, every global of S keeps at least one child on). W(S) is
built one local at a time once the DP state remembers which globals of S still lack an on
child: the state is a pair (S, R), R subset of S the globals not yet covered. A
local l with parent set P(l) is off (weight 1, state unchanged) or, where S meets P(l), on
(weight e^{f_l}, R -> R minus P(l)). The legal states are the paths that end with R empty
(any R without `require_child`). There are 3^G pairs for G globals, so the cost is
O(L 3^G 2^{max |P(l)|}) per image for L locals: linear in the locals, exponential only in
the few globals (G = 4 here: 81 pairs), against 2^N = 2^12 states for plain enumeration.
A tree (one parent per local) is the special case; tests/test_sjedd.py checks values and
gradients against brute-force enumeration.

The marginals come from the same recursion run forwards and backwards (sum-product): with
a_l the log-weights of the pairs after the first l locals and b_l the log-weight of finishing
legally from each pair after local l, local l's Z_l sums a_{l-1}(s) e^{f_l} b_l(t_l(s)) over
the pairs s where it may be on (t_l(s) the pair it leads to), a global's sums a_0 b_0 over the
pairs whose S holds it, and the root's is Z_on. Two passes give every marginal without
autograd, so the network exports to ONNX. Everything runs in log space: impossible pairs carry
a large negative finite log-weight rather than -inf, which keeps gradients finite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from core.config import ConfigError

# The recursion holds 3^G pairs per clamp; past this many globals it stops being small.
MAX_GLOBALS = 6
# Log-weight of an impossible pair: exp() of it is exactly 0 in float32 and float64, yet it
# stays finite, so no gradient meets inf - inf.
IMPOSSIBLE = -1.0e4


@dataclass(frozen=True)
class Hierarchy:
    """Node names per level and each local's global parents; see the module docstring."""

    root: str
    globals_: tuple[str, ...]
    locals_: tuple[str, ...]
    parents: Mapping[str, tuple[str, ...]]
    require_child: bool = True

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node, in the order of the score and marginal columns: root, globals, locals."""
        return (self.root, *self.globals_, *self.locals_)

    @property
    def levels(self) -> tuple[tuple[str, ...], ...]:
        return ((self.root,), self.globals_, self.locals_)

    def children(self, node: str) -> tuple[str, ...]:
        return tuple(loc for loc in self.locals_ if node in self.parents[loc])

    def is_legal(self, state: Mapping[str, int] | Sequence[int]) -> bool:
        """Whether a label state (a 0/1 per node, by name or in `nodes` order) is legal."""
        on = dict(zip(self.nodes, state, strict=True)) if not isinstance(state, Mapping) else dict(state)
        if any(on[g] and not on[self.root] for g in self.globals_):
            return False
        if any(on[loc] and not any(on[p] for p in self.parents[loc]) for loc in self.locals_):
            return False
        return not self.require_child or all(any(on[c] for c in self.children(g)) for g in self.globals_ if on[g])

    @classmethod
    def from_config(cls, cfg: Mapping, where: str = "model.hierarchy") -> Hierarchy:
        """From `{root: name, global: [names], local: {name: [global parents]}, require_child: bool}`;
        a wrong entry raises ConfigError naming it."""
        try:
            root, globals_, local_cfg = str(cfg["root"]), tuple(str(g) for g in cfg["global"]), dict(cfg["local"])
            parents = {str(name): tuple(str(p) for p in ps) for name, ps in local_cfg.items()}
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{where}: needs root, global (a list) and local (name: [parents]) ({err})") from None
        hierarchy = cls(root, globals_, tuple(parents), parents, bool(cfg.get("require_child", True)))
        hierarchy.check(where)
        return hierarchy

    def check(self, where: str) -> None:
        names = self.nodes
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"{where}: node name(s) {repeated} used twice")
        if not self.globals_ or len(self.globals_) > MAX_GLOBALS:
            raise ConfigError(f"{where}: 1 to {MAX_GLOBALS} global attributes, not {len(self.globals_)}")
        for loc, ps in self.parents.items():
            unknown = sorted(set(ps) - set(self.globals_))
            if not ps or unknown:
                raise ConfigError(f"{where}.local.{loc}: parents must be global attributes {list(self.globals_)}")
        childless = [g for g in self.globals_ if not self.children(g)]
        if self.require_child and childless:
            raise ConfigError(f"{where}: with require_child, global(s) {childless} need a local child")


def _pairs(n_globals: int) -> list[tuple[int, int]]:
    """Every (S, R) with R subset of S, as bit masks over the globals."""
    return [(s, r) for s in range(1 << n_globals) for r in range(1 << n_globals) if r & ~s == 0]


class LegalStates(nn.Module):
    """`forward(f) -> (log_z_on, marginals)`: for node scores f (B, N) in `Hierarchy.nodes`
    order, log Z_on (B,) (the root's log-odds is log Z_on, since Z = 1 + Z_on) and every
    node's marginal probability (B, N) over the legal states. Differentiable in f; runs in
    f's dtype."""

    def __init__(self, hierarchy: Hierarchy):
        super().__init__()
        self.hierarchy = hierarchy
        g_idx = {g: i for i, g in enumerate(hierarchy.globals_)}
        pairs = _pairs(len(hierarchy.globals_))
        index = {p: k for k, p in enumerate(pairs)}
        n_g, k = len(hierarchy.globals_), len(pairs)
        subset = torch.tensor([[(s >> j) & 1 for j in range(n_g)] for s, _ in pairs], dtype=torch.float32)
        self.n_globals, self.n_locals = n_g, len(hierarchy.locals_)
        self.register_buffer("subset", subset, persistent=False)  # (K, G): which globals S holds
        self.register_buffer("start_ok", torch.tensor([s == r for s, r in pairs]), persistent=False)
        final = torch.tensor([r == 0 or not hierarchy.require_child for _, r in pairs])
        self.register_buffer("final_ok", final, persistent=False)
        for i, loc in enumerate(hierarchy.locals_):
            mask = sum(1 << g_idx[p] for p in hierarchy.parents[loc])
            # where each pair goes when local i is on (k, the padding slot, where it may not be)
            target = [index[(s, r & ~mask)] if s & mask else k for s, r in pairs]
            into: list[list[int]] = [[] for _ in pairs]
            for src, t in enumerate(target):
                if t < k:
                    into[t].append(src)
            width = max(len(x) for x in into)
            self.register_buffer(f"target_{i}", torch.tensor(target), persistent=False)  # (K,)
            # (K, width): the pairs that lead to each pair, padded with k
            self.register_buffer(
                f"sources_{i}", torch.tensor([x + [k] * (width - len(x)) for x in into]), persistent=False
            )

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_g = self.n_globals
        root, glob, loc = f[:, 0], f[:, 1 : 1 + n_g], f[:, 1 + n_g :]
        impossible = torch.full((f.shape[0], 1), IMPOSSIBLE, dtype=f.dtype, device=f.device)

        def padded(x: torch.Tensor) -> torch.Tensor:  # (B, K + 1): the padding slot is impossible
            return torch.cat([x, impossible], dim=1)

        start = root[:, None] + glob @ self.subset.to(f.dtype).t()  # f_root + the globals of S
        alpha = [torch.where(self.start_ok, start, impossible)]  # (B, K) per step
        for i in range(self.n_locals):
            on = torch.logsumexp(padded(alpha[-1])[:, getattr(self, f"sources_{i}")], dim=2) + loc[:, i, None]
            alpha.append(torch.logaddexp(alpha[-1], on))
        beta = torch.where(self.final_ok, torch.zeros_like(start), impossible)
        local_z = []
        for i in reversed(range(self.n_locals)):
            on = padded(beta)[:, getattr(self, f"target_{i}")] + loc[:, i, None]  # on from each pair, then finish
            local_z.append(torch.logsumexp(alpha[i] + on, dim=1))
            beta = torch.logaddexp(beta, on)
        both = alpha[0] + beta  # (B, K): every legal path through each starting pair
        log_z_on = torch.logsumexp(both, dim=1)
        with_global = torch.where(self.subset.t().bool(), both[:, None, :], impossible[:, :, None])
        log_z = torch.cat([log_z_on[:, None], torch.logsumexp(with_global, dim=2), torch.stack(local_z[::-1], 1)], 1)
        log_total = torch.logaddexp(torch.zeros_like(log_z_on), log_z_on)  # Z = 1 + Z_on
        return log_z_on, torch.exp(log_z - log_total[:, None])
