"""SAM's two-step update on quadratics, its schedule, resume, and DDP with two gloo processes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.checkpoint import load_state, save_state
from core.train.sam import SAM, linear_decay_after

F64 = torch.float64


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


A = _t([[3.0, 0.5], [0.5, 1.0]])  # symmetric positive definite: f(w) = w.A.w / 2, grad A w


def _quadratic_grad(w: torch.nn.Parameter) -> None:
    (0.5 * w @ A @ w).backward()


def test_first_step_moves_rho_along_the_normalised_gradient():
    w0 = _t([1.0, -2.0])
    w = torch.nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=0.3, lr=0.1)
    _quadratic_grad(w)
    g = A @ w0
    opt.first_step()
    e = w.detach() - w0
    torch.testing.assert_close(e.norm(), _t(0.3))
    torch.testing.assert_close(e, 0.3 * g / g.norm())
    assert w.grad is None, "first_step clears the gradient so the second pass does not add to it"


def test_second_step_updates_w_with_the_gradient_at_the_perturbed_point():
    w0 = _t([1.0, -2.0])
    w = torch.nn.Parameter(w0.clone())
    rho, lr = 0.3, 0.1
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)
    _quadratic_grad(w)
    opt.step(lambda: _quadratic_grad(w))
    g = A @ w0
    g_perturbed = A @ (w0 + rho * g / g.norm())
    torch.testing.assert_close(w.detach(), w0 - lr * g_perturbed)
    # Plain SGD would have used g; SAM's step is measurably different.
    assert (w.detach() - (w0 - lr * g)).abs().max() > 1e-2


def test_norm_is_taken_over_all_parameters_together():
    a = torch.nn.Parameter(_t([3.0]))
    b = torch.nn.Parameter(_t([4.0]))
    frozen = torch.nn.Parameter(_t([1.0]))  # no gradient: left alone
    opt = SAM([a, b, frozen], torch.optim.SGD, rho=1.0, lr=0.1)
    (0.5 * a.square() + 0.5 * b.square()).sum().backward()  # grads (3, 4), global norm 5
    opt.first_step()
    torch.testing.assert_close(a.detach(), _t([3.0 + 3 / 5]))
    torch.testing.assert_close(b.detach(), _t([4.0 + 4 / 5]))
    torch.testing.assert_close(frozen.detach(), _t([1.0]))


def test_rho_zero_is_the_base_optimiser():
    w_sam = torch.nn.Parameter(_t([1.0, -2.0]))
    w_sgd = torch.nn.Parameter(_t([1.0, -2.0]))
    sam = SAM([w_sam], torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD([w_sgd], lr=0.1, momentum=0.9)
    for _ in range(5):
        _quadratic_grad(w_sam)
        sam.step(lambda: _quadratic_grad(w_sam))
        sam.zero_grad()
        _quadratic_grad(w_sgd)
        sgd.step()
        sgd.zero_grad()
    torch.testing.assert_close(w_sam.detach(), w_sgd.detach())


def test_a_failing_closure_leaves_the_weights_at_w():
    w = torch.nn.Parameter(_t([1.0, -2.0]))
    opt = SAM([w], torch.optim.SGD, rho=0.3, lr=0.1)
    _quadratic_grad(w)

    def broken():
        raise FloatingPointError("loss is NaN")

    with pytest.raises(FloatingPointError):
        opt.step(broken)
    torch.testing.assert_close(w.detach(), _t([1.0, -2.0]))
    opt.state_dict()  # no update is pending any more


def test_misuse_is_refused():
    w = torch.nn.Parameter(_t([1.0, -2.0]))
    opt = SAM([w], torch.optim.SGD, rho=0.3, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM([w], torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    _quadratic_grad(w)
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()


def test_linear_decay_after_matches_sbi_schedule():
    f = linear_decay_after(100, 0.75)
    assert [f(e) for e in (0, 50, 75)] == [1.0, 1.0, 1.0]
    assert f(76) == pytest.approx(0.96)
    assert f(99) == pytest.approx(0.04)
    assert f(100) == 0.0 and f(150) == 0.0
    with pytest.raises(ValueError):
        linear_decay_after(0, 0.75)
    with pytest.raises(ValueError):
        linear_decay_after(10, 1.5)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def _train(net, opt, sched, batches) -> None:
    loss_fn = torch.nn.functional.mse_loss
    for x, y in batches:
        loss_fn(net(x), y).backward()
        opt.step(lambda x=x, y=y: loss_fn(net(x), y).backward())
        opt.zero_grad(set_to_none=True)
        sched.step()


def _build(net):
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, weight_decay=1e-3)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear_decay_after(8, 0.5))


def test_resume_through_a_safetensors_state_equals_an_uninterrupted_run(tmp_path: Path):
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(6, 4, generator=gen, dtype=F64), torch.randn(6, 1, generator=gen, dtype=F64)) for _ in range(8)
    ]
    net = _net()
    opt, sched = _build(net)
    _train(net, opt, sched, batches)

    first = _net()
    opt1, sched1 = _build(first)
    _train(first, opt1, sched1, batches[:5])
    save_state(
        {"model": first.state_dict(), "optimizer": opt1.state_dict(), "scheduler": sched1.state_dict()}, tmp_path / "s"
    )
    state = load_state(tmp_path / "s")
    resumed = _net()
    opt2, sched2 = _build(resumed)
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert opt2.base_optimizer.state[next(resumed.parameters())]["momentum_buffer"].abs().sum() > 0
    _train(resumed, opt2, sched2, batches[5:])

    # The schedule reached the optimiser the base steps with, and the runs agree bit for bit.
    assert opt2.base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] < 0.05
    for p, q in zip(net.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


# ---- DDP: two gloo processes ----------------------------------------------------------------
WORLD = 2
RHO, LR = 0.5, 0.1


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 1, generator=gen, dtype=F64)


def _sam_reference(x_shares, y_shares, local_perturbation: bool) -> list[torch.Tensor]:
    """One SAM update computed by hand: e from the global or each share's gradient, g' averaged."""
    net = _net()
    params = list(net.parameters())
    w0 = [p.detach().clone() for p in params]

    def grads(x, y, at):
        with torch.no_grad():
            for p, v in zip(params, at, strict=True):
                p.copy_(v)
        net.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        return [p.grad.clone() for p in params]

    def perturbed(g):
        norm = torch.sqrt(sum(t.square().sum() for t in g))
        return [w + RHO * t / norm for w, t in zip(w0, g, strict=True)]

    shares = list(zip(x_shares, y_shares, strict=True))
    local = [grads(x, y, w0) for x, y in shares]
    mean_g = [sum(ts) / WORLD for ts in zip(*local, strict=True)]
    points = [perturbed(g) for g in local] if local_perturbation else [perturbed(mean_g)] * WORLD
    second = [grads(x, y, pt) for (x, y), pt in zip(shares, points, strict=True)]
    return [w - LR * sum(ts) / WORLD for w, ts in zip(w0, zip(*second, strict=True), strict=True)]


def _sam_under_ddp(rank: int, init: str, expected: dict[bool, list[torch.Tensor]]) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        x, y = (t.chunk(WORLD)[rank] for t in _ddp_data())
        loss_fn = torch.nn.functional.mse_loss
        for local_perturbation, weights in expected.items():
            model = torch.nn.parallel.DistributedDataParallel(_net())
            opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
            if local_perturbation:
                with model.no_sync():
                    loss_fn(model(x), y).backward()
            else:
                loss_fn(model(x), y).backward()
            opt.step(lambda model=model: loss_fn(model(x), y).backward())
            for p, q in zip(model.parameters(), weights, strict=True):
                torch.testing.assert_close(p.detach(), q, msg=f"no_sync first pass: {local_perturbation}")
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            everyone = [torch.empty_like(flat) for _ in range(WORLD)]
            dist.all_gather(everyone, flat)
            assert torch.equal(everyone[0], everyone[1]), "the replicas stay equal"
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 6 s idle, 13 s on a busy 2-core machine: two spawned processes import torch
def test_sam_under_ddp_equals_the_hand_computed_update(tmp_path: Path):
    """Synced first pass: one process's SAM on the global batch. First pass under no_sync: each
    rank's own e, and the replicas still agree after the update."""
    x, y = _ddp_data()
    expected = {local: _sam_reference(x.chunk(WORLD), y.chunk(WORLD), local) for local in (False, True)}
    assert max((a - b).abs().max() for a, b in zip(*expected.values(), strict=True)) > 1e-4, "the modes differ"
    mp.spawn(_sam_under_ddp, args=(f"file://{tmp_path / 'rendezvous'}", expected), nprocs=WORLD, join=True)
