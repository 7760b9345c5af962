"""ferrotorch.optim.Muon against torch.optim.Muon: bit for bit (the step runs torch's own
ATen ops from C++), for torch's own configurations and error inputs (optim_db), every float
dtype, tall/wide/square matrices, Nesterov on and off, both lr adjustments, two groups,
missing grads, a parameter listed twice, state dicts both ways; torch's ValueErrors come
before anything changes."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

import ferrotorch.optim as fopt
from conftest import check_torch_error_input
from ferrotorch import _compat

INFO = next(o for o in optim_db if o.optim_cls is torch.optim.Muon)
SHAPES = [(4, 3), (3, 7), (5, 5), (1, 6), (9, 1), (16, 12)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _adjust_fns():
    """The lr adjustments this torch accepts (2.15 adds "spectral_unclamped")."""
    fns = [None, "original", "match_rms_adamw"]
    try:
        torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="spectral_unclamped")
        fns.append("spectral_unclamped")
    except ValueError:
        pass
    return fns


def _run(mod, cfg, dtype, steps, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]
    k = len(ps) // 2
    opt = mod.Muon([{"params": ps[:k]}, {"params": ps[k:], "lr": 0.02}], **copy.deepcopy(cfg))
    for _ in range(steps):
        for p in ps:
            grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.1 * p.detach().double()).to(dtype)
            p.grad = None if rng.random() < 0.1 else grad
        opt.step()
    return ps, opt


def _configs():
    for oi in INFO.optim_inputs_func(device="cpu"):
        yield pytest.param(oi.kwargs, id="optim_db-" + oi.desc.replace(" ", "_"))
    yield pytest.param({"nesterov": False, "weight_decay": 0.2}, id="no_nesterov")  # bf16: torch <2.15 divides the buffer in place
    for fn in _adjust_fns():
        yield pytest.param({"adjust_lr_fn": fn}, id=f"adjust-{fn}")
    rng = random.Random(3)
    for i in range(4):
        cfg = {
            "lr": rng.choice([1e-2, 3e-3]),
            "weight_decay": rng.choice([0.0, 0.1]),
            "momentum": rng.choice([0.0, 0.9, 0.95]),
            "nesterov": rng.random() < 0.5,
            "adjust_lr_fn": rng.choice([None, "original", "match_rms_adamw"]),
            "eps": rng.choice([1e-7, 1e-3]),
        }
        yield pytest.param(cfg, id=f"random{i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", list(_configs()))
def test_matches_torch_bit_for_bit(cfg, dtype):
    ours, fo = _run(fopt, cfg, dtype, 20)
    ref, to = _run(torch.optim, cfg, dtype, 20)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a.detach(), b.detach())
        assert fo.state[a].keys() == to.state[b].keys()
        if "momentum_buffer" in to.state[b]:
            assert torch.equal(fo.state[a]["momentum_buffer"], to.state[b]["momentum_buffer"])


def test_the_native_step_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(_compat, "muon", lambda *a, **k: calls.append(a))
    _run(fopt, {}, torch.float32, 3)
    _run(fopt, {"weight_decay": 0.3}, torch.bfloat16, 3)
    assert calls == []
    _run(fopt, {"lr": torch.tensor(0.01)}, torch.float32, 1)  # torch's tensor arithmetic
    assert len(calls) == 1  # the group with the tensor lr; the other has its own float lr


@pytest.mark.parametrize("ei", INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32), ids=lambda e: str(e.error_regex)[:40])
def test_torchs_error_inputs_give_torchs_errors(ei):
    check_torch_error_input(fopt.Muon, ei)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"ns_steps": 100}, "Number of steps must be less than 100"),
        ({"ns_coefficients": (3.4, -4.7)}, "Coefficients must be a tuple of exactly 3 values"),
        ({"extra_1d": True}, "Param gradient must be a 2D matrix"),
    ],
)
def test_torchs_step_errors_leave_nothing_changed(bad, match):
    """torch raises these after moving the first momentum buffer; ferrotorch raises the same
    error before changing anything."""

    def make(mod):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, 5))]
        opt = mod.Muon(ps, lr=0.01, **{k: v for k, v in bad.items() if k != "extra_1d"})
        if "extra_1d" in bad:  # Muon checks 2-D only in __init__, not in add_param_group
            ps.append(torch.nn.Parameter(torch.randn(3)))
            opt.add_param_group({"params": ps[-1:]})
            opt.param_groups[0]["params"].append(ps[-1])
            del opt.param_groups[1]
        for p in ps:
            p.grad = torch.randn_like(p)
        for p in ps:
            opt.state[p]["momentum_buffer"] = torch.ones_like(p)
        return ps, opt

    for mod in (torch.optim, fopt):
        ps, opt = make(mod)
        before = [p.detach().clone() for p in ps]
        with pytest.raises(ValueError, match=match):
            opt.step()
        if mod is fopt:
            assert all(torch.equal(p, b) for p, b in zip(ps, before))
            assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.ones_like(p)) for p in ps)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_moves_both_ways_mid_training(direction):
    src, dst = (torch.optim, fopt) if direction == "torch_to_ours" else (fopt, torch.optim)
    cfg = {"weight_decay": 0.05, "adjust_lr_fn": "match_rms_adamw"}
    params, opt = _run(src, cfg, torch.float32, 10)
    sd = copy.deepcopy(opt.state_dict())
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    k = len(twin) // 2
    opt2 = dst.Muon([{"params": twin[:k]}, {"params": twin[k:], "lr": 0.02}], **cfg)
    opt2.load_state_dict(sd)
    g = torch.Generator().manual_seed(9)
    for _ in range(5):
        for p, q in zip(params, twin):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad, grad.clone()
        opt.step()
        opt2.step()
    for p, q in zip(params, twin):
        assert torch.equal(p.detach(), q.detach())


def test_a_parameter_listed_twice_and_a_grad_that_is_another_parameter_go_as_in_torch():
    def run(mod):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(5, 4))
        b = torch.nn.Parameter(torch.randn(5, 4))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = mod.Muon([a, b, a], lr=0.01)
        for _ in range(3):
            a.grad = torch.randn(5, 4)
            b.grad = a.detach()  # read while `a` is stepped (twice), as torch reads it
            opt.step()
        return a.detach().clone(), b.detach().clone()

    for x, y in zip(run(fopt), run(torch.optim)):
        assert torch.equal(x, y)


def test_a_buffer_torch_cannot_take_gets_torchs_error():
    """A momentum buffer of another dtype goes to torch's step, which raises its error."""
    errors = []
    for mod in (torch.optim, fopt):
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = mod.Muon([p])
        p.grad = torch.randn(4, 3)
        opt.state[p]["momentum_buffer"] = torch.zeros(4, 3, dtype=torch.float64)
        with pytest.raises(RuntimeError) as ei:
            opt.step()
        errors.append(str(ei.value))
    assert errors[0] == errors[1]


def test_non_contiguous_parameter_and_closure():
    def run(mod):
        torch.manual_seed(0)
        base = torch.randn(6, 8)
        p = torch.nn.Parameter(base.t())  # a transposed view: strided, not contiguous
        opt = mod.Muon([p], lr=0.05)
        x = torch.randn(3, 8)

        def closure():
            opt.zero_grad()
            loss = (x @ p).square().sum()
            loss.backward()
            return loss

        losses = [float(opt.step(closure)) for _ in range(4)]
        return p.detach().clone(), losses

    (pa, la), (pb, lb) = run(fopt), run(torch.optim)
    assert torch.equal(pa, pb) and la == lb


def test_linear_model_trains_like_torch():
    def train(mod):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 4, bias=False))
        opt = mod.Muon(model.parameters(), lr=2e-2)
        x, y = torch.randn(64, 8), torch.randn(64, 4)
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(fopt), train(torch.optim)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (3, 0)], ids=str)
def test_empty_and_one_element_matrices_go_as_in_torch(shape):
    """(0, 3) and (1, 1) step as torch steps them; (3, 0) raises torch's ZeroDivisionError
    (its lr adjustment divides by the column count), here before anything changes."""
    results = []
    for mod in (fopt, torch.optim):
        torch.manual_seed(0)
        p, q = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(4, 3))
        opt = mod.Muon([q, p], lr=0.1)
        try:
            for _ in range(3):
                p.grad, q.grad = torch.randn(shape), torch.randn(4, 3)
                opt.step()
            results.append((p.detach().clone(), q.detach().clone()))
        except ZeroDivisionError:
            results.append(("ZeroDivisionError", q.detach().clone(), opt.state[q]["momentum_buffer"].clone()))
    if shape == (3, 0):
        ours, ref = results
        assert ours[0] == ref[0] == "ZeroDivisionError"
        assert torch.count_nonzero(ours[2]) == 0  # nothing moved, unlike torch's half step
    else:
        assert all(torch.equal(a, b) for a, b in zip(*results))
