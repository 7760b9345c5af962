"""SparseAdam, Adafactor and Muon (whose native step is their own) under torch.compile and under a
dispatch mode: compiled, the native step runs eagerly behind a graph break (same numbers as
eager); under a mode, torch's own step runs so the mode sees the ops (torch's numbers)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ferrotorch.optim as fopt


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _params(name: str):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 4))
    if name == "SparseAdam":
        grad = torch.sparse_coo_tensor([[0, 2, 5]], torch.randn(3, 4), (6, 4))
    else:
        grad = torch.randn(6, 4)
    return p, grad


@pytest.mark.parametrize("name", ["SparseAdam", "Adafactor", "Muon"])
def test_under_a_dispatch_mode_torch_steps_and_the_mode_sees_it(name):
    results = []
    for mod in (fopt, torch.optim):
        p, grad = _params(name)
        opt = getattr(mod, name)([p], lr=0.01)
        for _ in range(2):
            p.grad = grad.clone()
            mode = CountOps()
            with mode:
                opt.step()
            assert mode.ops > 0
        results.append(p.detach().clone())
    assert torch.equal(*results)


@pytest.mark.parametrize("name, fallback, key", [("Adafactor", "adafactor", "step"), ("Muon", "muon", "momentum_buffer")])
def test_compiled_step_runs_the_native_step(monkeypatch, name, fallback, key):
    from ferrotorch import _compat

    def run(compiled: bool):
        p, grad = _params(name)
        opt = getattr(fopt, name)([p], lr=0.01)
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(3):
            p.grad = grad.clone()
            step()
        return p.detach().clone(), opt.state[p][key].clone()

    torch._dynamo.reset()
    fallbacks = []
    monkeypatch.setattr(_compat, fallback, lambda *a, **k: fallbacks.append(a))  # torch's math
    (a, sa), (b, sb) = run(True), run(False)
    assert fallbacks == [] and torch.equal(a, b) and torch.equal(sa, sb)
    if key == "step":
        assert int(sa) == 3
