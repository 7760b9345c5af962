"""ferrotorch.optim.LBFGS against torch.optim.LBFGS: torch's own configurations and error
inputs (optim_db), both line-search modes, short histories (pairs dropped), missing grads,
several parameters, tensor lrs, state dicts both ways, bf16 and strided parameters (torch's
code), and the native calls really running. Dot products are summed in float64 here, so
fp64 runs agree with torch to ~1e-8 (relative) after 100 iterations rather than bit for
bit; fp32 runs are compared over a few iterations, before rounding differences grow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

import ferrotorch.optim as fopt
from conftest import check_torch_error_input
from ferrotorch import _native

INFO = next(o for o in optim_db if o.optim_cls is torch.optim.LBFGS)


def _problem(dtype, seed=0, missing_grad=False):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    unused = torch.nn.Parameter(torch.zeros(3, dtype=dtype))  # never gets a grad
    x = torch.randn(128, 6, dtype=dtype)
    y = torch.sin(x.sum(1, keepdim=True))
    params = list(model.parameters()) + ([unused] if missing_grad else [])
    return model, params, x, y


def _train(mod, dtype, steps, cfg, seed=0, missing_grad=False):
    model, params, x, y = _problem(dtype, seed, missing_grad)
    opt = mod.LBFGS(params, **copy.deepcopy(cfg))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(steps)]
    return params, losses, opt


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _configs():
    for oi in INFO.optim_inputs_func(device="cpu"):
        yield pytest.param(oi.kwargs, id="optim_db-" + oi.desc.replace(" ", "_"))
    yield pytest.param({"history_size": 3}, id="history3")
    yield pytest.param({"history_size": 4, "line_search_fn": "strong_wolfe", "max_iter": 7}, id="history4-wolfe")
    yield pytest.param({"lr": 0.5, "max_iter": 3, "max_eval": 4}, id="max_eval")


@pytest.mark.parametrize("cfg", list(_configs()))
def test_float64_matches_torch(cfg):
    ours, la, oa = _train(fopt, torch.float64, 5, cfg, missing_grad=True)
    ref, lb, ob = _train(torch.optim, torch.float64, 5, cfg, missing_grad=True)
    assert la == pytest.approx(lb, rel=1e-7, abs=1e-14)
    for a, b in zip(ours, ref):  # 5 steps of up to 20 iterations: differences grow
        assert _rel(a.detach(), b.detach()) <= 1e-6
    sa, sb = oa.state[oa._params[0]], ob.state[ob._params[0]]
    assert set(sa) == set(sb)
    assert (sa["func_evals"], sa["n_iter"]) == (sb["func_evals"], sb["n_iter"])
    assert len(sa["old_dirs"]) == len(sb["old_dirs"]) <= oa.param_groups[0]["history_size"]


@pytest.mark.parametrize("line_search", [None, "strong_wolfe"])
def test_float32_matches_torch_over_a_few_iterations(line_search):
    cfg = {"max_iter": 6, "line_search_fn": line_search}
    ours, la, _ = _train(fopt, torch.float32, 1, cfg)
    ref, lb, _ = _train(torch.optim, torch.float32, 1, cfg)
    for a, b in zip(ours, ref):
        assert _rel(a.detach(), b.detach()) <= 1e-4


def test_the_native_calls_run(monkeypatch):
    calls = {"two_loop": 0, "gather": 0, "add": 0, "set": 0}
    for name in list(calls):
        real = getattr(_native, "lbfgs_" + name)

        def counted(*a, _real=real, _name=name):
            ok = _real(*a)
            calls[_name] += bool(ok)
            return ok

        monkeypatch.setattr(_native, "lbfgs_" + name, counted)
    _train(fopt, torch.float32, 2, {"line_search_fn": "strong_wolfe", "max_iter": 5})
    assert all(v > 0 for v in calls.values()), calls


@pytest.mark.parametrize("ei", INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32), ids=lambda e: str(e.error_regex)[:40])
def test_torchs_error_inputs_give_torchs_errors(ei):
    check_torch_error_input(fopt.LBFGS, ei)


def test_torchs_other_errors():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="doesn't support per-parameter options"):
        fopt.LBFGS([{"params": [p]}, {"params": [torch.nn.Parameter(torch.randn(2))]}])
    opt = fopt.LBFGS([p], line_search_fn="bogus")

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="only 'strong_wolfe' is supported"):
        opt.step(closure)
    with pytest.raises(TypeError):
        opt.step()  # LBFGS needs a closure


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_moves_both_ways_mid_training(direction):
    src, dst = (torch.optim, fopt) if direction == "torch_to_ours" else (fopt, torch.optim)
    cfg = {"history_size": 5, "max_iter": 4}
    params, _, opt = _train(src, torch.float64, 3, cfg)
    sd = copy.deepcopy(opt.state_dict())
    # The same run continued by src, and by dst from the checkpoint, must agree.
    model, twin, x, y = _problem(torch.float64)
    with torch.no_grad():
        for p, q in zip(params, twin):
            q.copy_(p)
    opt2 = dst.LBFGS(twin, **cfg)
    opt2.load_state_dict(sd)

    def closure_for(o, ps, m):
        def closure():
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        return closure

    src_model = _problem(torch.float64)[0]
    with torch.no_grad():
        for p, q in zip(params, src_model.parameters()):
            q.copy_(p)
    opt_src = src.LBFGS(list(src_model.parameters()), **cfg)
    opt_src.load_state_dict(copy.deepcopy(sd))
    for _ in range(3):
        opt_src.step(closure_for(opt_src, None, src_model))
        opt2.step(closure_for(opt2, None, model))
    for a, b in zip(src_model.parameters(), twin):
        assert _rel(a.detach(), b.detach()) <= 1e-9


def test_bfloat16_and_strided_parameters_take_torchs_code():
    def run(mod, make):
        torch.manual_seed(0)
        base = torch.randn(5, 4, dtype=torch.float64)
        p = torch.nn.Parameter(make(base))
        opt = mod.LBFGS([p], max_iter=5, history_size=3)

        def closure():
            opt.zero_grad()
            loss = ((p.double() - 1).square() * torch.arange(1.0, p.numel() + 1, dtype=torch.float64).view_as(p)).sum()
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        return p.detach().clone()

    a, b = run(fopt, lambda t: t.to(torch.bfloat16)), run(torch.optim, lambda t: t.to(torch.bfloat16))
    assert torch.equal(a, b)  # torch's code throughout, so torch's numbers
    # A transposed parameter: torch's own gather refuses its strided grad; so does ours.
    errors = []
    for mod in (fopt, torch.optim):
        with pytest.raises(RuntimeError) as ei:
            run(mod, lambda t: t.t())
        errors.append(str(ei.value))
    assert errors[0] == errors[1]


def test_sparse_grads_and_a_parameter_listed_twice_go_as_in_torch():
    def run(mod):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True).double()
        w = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opt = mod.LBFGS([emb.weight, w, w], max_iter=4)
        ids = torch.tensor([1, 3, 3, 7])

        def closure():
            opt.zero_grad()
            loss = (emb(ids) @ w - 1).square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        return emb.weight.detach().clone(), w.detach().clone()

    for a, b in zip(run(fopt), run(torch.optim)):
        assert _rel(a, b) <= 1e-9


def test_under_a_dispatch_mode_torch_steps():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = fopt.LBFGS([p], max_iter=3)

    def closure():
        opt.zero_grad()
        loss = (p - 2).square().sum()
        loss.backward()
        return loss

    with Count():
        opt.step(closure)
    assert Count.ops > 0
    assert torch.allclose(p.detach(), torch.full((4,), 2.0, dtype=torch.float64), atol=1e-6)


def test_native_calls_refuse_overlapping_or_mismatched_buffers():
    g = torch.randn(8, dtype=torch.float64)
    al = torch.zeros(4, dtype=torch.float64)
    y, s = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    ro = [1.0 / y.dot(s)]
    assert not _native.lbfgs_two_loop(g, [y], [s], ro, 1.0, al, g)  # d is the grad
    assert not _native.lbfgs_two_loop(g, [y], [s], ro, 1.0, al, y)  # d is a stored pair
    buf = torch.zeros(12, dtype=torch.float64)
    assert not _native.lbfgs_two_loop(g, [y], [s], ro, 1.0, buf[:4], buf[:8])  # outputs overlap (al[:1] is written)
    assert not _native.lbfgs_two_loop(g, [y], [s], ro, 1.0, al, torch.zeros(8))  # another dtype
    assert not _native.lbfgs_two_loop(g, [y], [s], [], 1.0, al, torch.zeros(8, dtype=torch.float64))
    d = torch.zeros(8, dtype=torch.float64)
    assert _native.lbfgs_two_loop(g, [y], [s], ro, 1.0, al, d)
    q = -g
    a0 = s.dot(q) * ro[0]
    q = q - a0 * y
    r = q + (a0 - y.dot(q) * ro[0]) * s
    assert torch.allclose(d, r, rtol=1e-12, atol=1e-15)

    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    flat = torch.zeros(4, dtype=torch.float64)
    assert not _native.lbfgs_add([p], p.detach(), 1.0)  # the update is the parameter itself
    assert not _native.lbfgs_gather([p], [None], torch.zeros(5, dtype=torch.float64))  # sizes do not add up
    assert not _native.lbfgs_gather([p], [p.detach()], p.detach())  # out is the source
    before = p._version
    assert _native.lbfgs_add([p], torch.ones(4, dtype=torch.float64), 0.5) and p._version > before
    assert _native.lbfgs_gather([p], [p], flat) and torch.equal(flat, p.detach())


def test_no_parameters_and_maximize_follow_the_running_torch():
    """torch 2.15 returns the closure's loss for an LBFGS without parameters (older ones
    raise IndexError) and adds ``maximize``; ferrotorch does what the running torch does."""
    outcomes = []
    for mod in (fopt, torch.optim):
        opt = mod.LBFGS([torch.nn.Parameter(torch.zeros(1))])
        opt.param_groups[0]["params"].clear()
        try:
            outcomes.append(float(opt.step(lambda: torch.tensor(3.0))))
        except IndexError:
            outcomes.append("IndexError")
    assert outcomes[0] == outcomes[1]
    if "maximize" not in torch.optim.LBFGS.__init__.__code__.co_varnames:
        pytest.skip(f"torch {torch.__version__}'s LBFGS has no maximize")
    for ls in (None, "strong_wolfe"):
        cfg = {"maximize": True, "line_search_fn": ls, "max_iter": 5}
        ours, la, _ = _train(fopt, torch.float64, 2, cfg)
        ref, lb, _ = _train(torch.optim, torch.float64, 2, cfg)
        assert la == pytest.approx(lb, rel=1e-9)
        assert all(_rel(a.detach(), b.detach()) <= 1e-8 for a, b in zip(ours, ref))
