"""Sharpness-aware minimisation (SAM) over any torch optimiser, and SBI's learning-rate schedule.

SAM (Foret et al., 2021) spends two gradients on one update. With g the gradient at the
weights w, it moves to the first-order worst point of a rho-ball, w + e with
e = rho * g / ||g|| (||g|| the L2 norm over every parameter together), takes the gradient g'
there, puts the weights back to w and lets the base optimiser update w with g'.

How a trainer drives it (the closure re-runs the same batch at the perturbed weights):

    optimizer = SAM(param_groups, torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay_after(epochs, 0.75))

    loss = criterion(model, batch)
    loss.backward()                      # g at w

    def closure():
        again = criterion(model, batch)  # same batch, same augmentation
        again.backward()                 # g' at w + e; clip g' here if clipping is on
        return again

    optimizer.step(closure)              # w + e, closure, back to w, base step with g'
    optimizer.zero_grad(set_to_none=True)

`first_step` and `second_step` are public for trainers that cannot hand over a closure; a
scheduler then warns that `step` was never called, which is the one reason to prefer `step`.

Under DDP (both ways keep the replicas equal):

- Plain: both backward passes all-reduce. e comes from the global gradient, so every rank
  perturbs alike and the update equals one process's SAM on the global batch (tested with
  two gloo processes). The default: torchrun then reproduces a single process.
- First backward under `ddp_model.no_sync()`: e comes from each rank's own gradient (the
  SAM paper's "m-sharpness", m the per-rank batch) and saves one all-reduce per update.
  The ranks then evaluate g' at different points; that is harmless because the second
  backward is synchronised (every rank gets the same averaged g'), `second_step` puts each
  rank back on its own w (equal on all ranks) and the base step applies the same g'
  everywhere. This changes the update (a different e), so it is an option, not a free
  speed-up. `no_sync` leaves the first gradient in `.grad` for the next synchronised
  backward to sum; `first_step` therefore always clears the gradients, and nothing else
  may fill them between the two passes.

Gradient accumulation: both passes must cover the same micro-batches. Accumulate g over
the group, call `step` with a closure that runs every micro-batch of the group again (under
`no_sync` for all but the last, as for the first pass).

BatchNorm running statistics are updated by both forward passes (the second at w + e), as
in SBI's own training; a trainer that recomputes them for its EMA weights is unaffected.
fp16 loss scaling is not supported (the gradients must be unscaled before `first_step`);
bf16 autocast needs none.

Resume: `state_dict` is the base optimiser's (momentum buffers, learning rates, rho per
group), so a checkpoint holds exactly what an SGD one would. The perturbation exists only
inside one update; asking for the state in the middle of one is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["SAM", "linear_decay_after"]


class SAM(torch.optim.Optimizer):
    """SAM around `base` (an optimiser class built here on the same parameter groups).

    `rho` is the radius of the ascent step (SBI: 0.05, SAM's published default); a group may
    carry its own "rho". `base_kwargs` go to `base` (e.g. lr, momentum, weight_decay).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base: type[torch.optim.Optimizer],
        rho: float,
        **base_kwargs: Any,
    ) -> None:
        if not rho >= 0.0:
            raise ValueError(f"SAM: rho must be >= 0, got {rho}")
        super().__init__(params, {"rho": float(rho), **base_kwargs})
        # The base optimiser adopts these very group dicts, so a scheduler that sets "lr" on
        # this optimiser sets it for the base too.
        self.base_optimizer = base(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its value at w)

    @torch.no_grad()
    def first_step(self) -> None:
        """Move every parameter that has a gradient to w + rho * g / ||g||, then clear the gradients."""
        if self._saved:
            raise RuntimeError("SAM.first_step called twice without second_step in between")
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            raise RuntimeError("SAM.first_step: no parameter has a gradient (run the first backward pass first)")
        device = grads[0].device
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads]))
        for group in self.param_groups:
            # The epsilon keeps an all-zero gradient from dividing by zero; it then moves nothing.
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._saved.append((p, p.detach().clone()))
                p.add_(p.grad * scale.to(p.device, p.dtype))
        self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self) -> None:
        """Put the weights back to w and let the base optimiser update them with the gradient now held (g')."""
        if not self._saved:
            raise RuntimeError("SAM.second_step called without first_step")
        self._restore()
        self.base_optimizer.step()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One SAM update; `closure` runs forward and backward at the perturbed weights and returns the loss.

        The first backward pass (g at w) must already have run. If the closure raises, the
        weights are put back to w and nothing is updated.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure that runs the forward and backward pass again")
        self.first_step()
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            with torch.no_grad():
                self._restore()
            raise
        self.second_step()
        return loss

    def _restore(self) -> None:
        for p, w in self._saved:
            p.copy_(w)
        self._saved.clear()

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state: all an update depends on between two steps."""
        if self._saved:
            raise RuntimeError("SAM.state_dict inside an update: the weights are perturbed (call second_step first)")
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # Loading replaces the base optimiser's group dicts; share the new ones again.
        self.param_groups = self.base_optimizer.param_groups


def linear_decay_after(total: int, start_fraction: float) -> Callable[[int], float]:
    """LR multiplier for LambdaLR: 1 up to int(total * start_fraction), then linear to 0 at `total`.

    SBI steps it once per epoch with total = 100 epochs and 0.75 (the multiplier is 1 through
    epoch 75, then 1 - (e - 75) / 25); stepped per optimiser step, `total` counts steps.
    """
    if total < 1:
        raise ValueError(f"linear_decay_after: total must be >= 1, got {total}")
    if not 0.0 <= start_fraction <= 1.0:
        raise ValueError(f"linear_decay_after: start_fraction must be in [0, 1], got {start_fraction}")
    start = int(total * start_fraction)

    def factor(step: int) -> float:
        if step <= start:
            return 1.0
        return max(0.0, 1.0 - (step - start) / max(1, total - start))

    return factor
