"""Accelerator parameters (CUDA, XPU, MPS) are stepped by torch's fused kernel where torch has
one for the algorithm (Adam, AdamW, SGD), else by its foreach kernels: one call per group.

No GPU is needed here: the kernel is made to refuse every tensor (as it refuses CUDA ones)
and ``_compat.accelerator`` to accept CPU tensors, so the device path runs on CPU, where
torch has the same fused and foreach kernels. Its results must equal torch.optim's
``fused=True`` (``foreach=True``) bit for bit, with GradScaler's protocol and clipping too.
The same path on a real GPU is covered by tests/test_cuda.py.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

import ferrotorch._compat as compat
import ferrotorch.optim._fused as _fused
from conftest import OPTIMIZERS, feed_same_grads, make_params, random_config

FUSED = {"Adam", "AdamW", "SGD"}


class _RefuseAll:
    """An OptimizerSpec whose kernel takes nothing: every param with a grad comes back slow."""

    def __init__(self, spec):
        self._spec = spec
        self.scalar_keys = spec.scalar_keys
        self.label = spec.label

    def state_keys(self, group):
        return self._spec.state_keys(group)

    def step(self, state, group, scale, clip, first):
        keys = list(self._spec.state_keys(group)) + list(self._spec.scalar_keys)
        with_grad = [i for i, p in enumerate(group["params"]) if p.grad is not None]
        missing = [i for i in with_grad if any(state.get(group["params"][i], {}).get(k) is None for k in keys)]
        if missing:
            return missing, [], False
        firsts = set(first)
        return [], [(i, i in firsts) for i in with_grad], False


@pytest.fixture(params=["general", "lean"])
def device_path(request, monkeypatch):
    """``general``: the native planner hands the tensors back and ``_compat.accelerator``
    sends them to torch's kernels (groups that mix devices take this route). ``lean``: the
    whole group is "CUDA" (``_fused._cuda_plain``), so the planner is skipped, as for a
    group of CUDA parameters."""
    calls = []
    if request.param == "general":
        real = compat.accelerator

        def accept_cpu(p):
            calls.append(p.device.type)
            return type(p) in (torch.Tensor, torch.nn.Parameter) or real(p)

        monkeypatch.setattr(compat, "accelerator", accept_cpu)
    else:

        def all_cuda(p):
            calls.append(p.device.type)
            return type(p) in (torch.Tensor, torch.nn.Parameter)

        monkeypatch.setattr(_fused, "_cuda_plain", all_cuda)
    return calls


def _ours(cls, params, cfg, monkeypatch):
    opt = cls(params, **cfg)
    monkeypatch.setattr(opt, "_spec", _RefuseAll(type(opt)._spec))
    return opt


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("seed", range(3))
def test_device_path_equals_torch_fused_or_foreach(name, seed, device_path, monkeypatch):
    ours_cls, torch_cls = OPTIMIZERS[name]
    rng = random.Random(seed)
    cfg = random_config(name, rng)
    how = {"fused": True} if name in FUSED else {"foreach": True}
    shapes = [(7,), (4, 5), (2, 3, 4), (33,)]
    pa = make_params(seed, torch.float32, shapes)
    pb = make_params(seed, torch.float32, shapes)
    ours = _ours(ours_cls, pa, cfg, monkeypatch)
    ref = torch_cls(pb, **cfg, **how)
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        feed_same_grads(pa, pb, g, none_prob=0.2, rng=rng)
        ours.step()
        ref.step()
    assert device_path, "the device path was never taken"
    for a, b in zip(pa, pb):
        assert torch.equal(a, b), (name, cfg)
    for a, b in zip(pa, pb):
        for key, value in ref.state[b].items():
            assert torch.equal(ours.state[a][key].cpu().to(value.dtype), value), (name, key)


@pytest.mark.parametrize("name", sorted(FUSED))
def test_device_path_grad_scaler_protocol(name, device_path, monkeypatch):
    """GradScaler hands grad_scale/found_inf to fused optimizers: a skipped step on inf, and
    unscaled grads afterwards, as torch's fused kernels do."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    cfg = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
    pa = make_params(1, torch.float32, [(5,), (3, 4)])
    pb = make_params(1, torch.float32, [(5,), (3, 4)])
    ours = _ours(ours_cls, pa, cfg, monkeypatch)
    ref = torch_cls(pb, **cfg, fused=True)
    g = torch.Generator().manual_seed(0)
    for inf in (0.0, 1.0, 0.0, 0.0):
        feed_same_grads(pa, pb, g)
        for opt in (ours, ref):
            opt.grad_scale = torch.tensor(8.0)
            opt.found_inf = torch.tensor(inf)
            opt.step()
            del opt.grad_scale, opt.found_inf
        for a, b in zip(pa, pb):
            assert torch.equal(a, b)
            assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_device_path_clip_grad_norm_and_step(name, device_path, monkeypatch):
    """The fused clip: parameters as clip_grad_norm_ then step, stored grads unclipped."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    cfg = {"lr": 0.05}
    how = {"fused": True} if name in FUSED else {"foreach": True}
    pa = make_params(2, torch.float32, [(6,), (2, 5)])
    pb = make_params(2, torch.float32, [(6,), (2, 5)])
    ours = _ours(ours_cls, pa, cfg, monkeypatch)
    ref = torch_cls(pb, **cfg, **how)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        feed_same_grads(pa, pb, g)
        raw = [p.grad.clone() for p in pa]
        norm = ours.clip_grad_norm_and_step(max_norm=0.5)
        ref_norm = torch.nn.utils.clip_grad_norm_(pb, max_norm=0.5)
        ref.step()
        torch.testing.assert_close(norm, ref_norm)
        for a, b, r in zip(pa, pb, raw):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            assert torch.equal(a.grad, r)


def test_cpu_tensors_never_take_the_device_path():
    """Without the patch, CPU, meta and subclass tensors are not accelerator tensors."""
    assert not compat.accelerator(torch.zeros(2))
    assert not compat.accelerator(torch.zeros(2, device="meta"))
    assert not compat.accelerator(torch.nn.Parameter(torch.zeros(2)))


def test_lean_path_leaves_mixed_groups_to_the_general_one(monkeypatch):
    """One parameter the lean path may not take (here: not "CUDA") sends the whole group
    down the general route, untouched by the lean one, and the result is torch's."""
    pa = make_params(4, torch.float32, [(5,), (3, 4), (6,)])
    pb = make_params(4, torch.float32, [(5,), (3, 4), (6,)])
    cuda_like = {id(pa[0]), id(pa[2])}
    monkeypatch.setattr(_fused, "_cuda_plain", lambda p: id(p) in cuda_like)
    ours, ref = OPTIMIZERS["Adam"][0](pa, lr=0.1), torch.optim.Adam(pb, lr=0.1, foreach=False)
    lean = []
    real = type(ours)._device_step
    monkeypatch.setattr(type(ours), "_device_step", lambda self, *a, **k: lean.append(k) or real(self, *a, **k))
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        feed_same_grads(pa, pb, g)
        ours.step()
        ref.step()
    assert lean == []
    for a, b in zip(pa, pb):
        # Not bit-equal on every CPU: torch.sqrt goes through MKL's vector math, which is not
        # always correctly rounded (on an AMD EPYC 155,078 of 1,000,000 results differ from
        # the exact sqrt the kernels use; see crates/kernels/src/adam.rs).
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_lean_path_resumes_a_checkpoint_and_takes_extra_state_keys(name, monkeypatch):
    """A checkpoint written by torch's non-fused optimizer (CPU float32 ``step``) resumes on
    the lean path with torch's fused/foreach numbers; a state dict with a key the group no
    longer uses (amsgrad switched off) steps as torch does."""
    monkeypatch.setattr(_fused, "_cuda_plain", lambda p: type(p) in (torch.Tensor, torch.nn.Parameter))
    ours_cls, torch_cls = OPTIMIZERS[name]
    cfg = {"lr": 0.05, "momentum": 0.9} if name == "SGD" else {"lr": 0.05}
    how = {"fused": True} if name in FUSED else {"foreach": True}
    start = make_params(5, torch.float32, [(5,), (2, 3)])
    warm = torch_cls(start, **cfg, foreach=False)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        for p in start:
            p.grad = torch.randn(p.shape, generator=g)
        warm.step()
    sd = warm.state_dict()
    if name == "Adam":
        for st in sd["state"].values():
            st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg"])  # an amsgrad leftover
    pa = [p.detach().clone().requires_grad_() for p in start]
    pb = [p.detach().clone().requires_grad_() for p in start]
    ours, ref = ours_cls(pa, **cfg), torch_cls(pb, **cfg, **how)
    ours.load_state_dict(copy.deepcopy(sd))
    ref.load_state_dict(copy.deepcopy(sd))
    for _ in range(3):
        feed_same_grads(pa, pb, g)
        ours.step()
        ref.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_device_path_sparse_grads(name, device_path, monkeypatch):
    """Sparse gradients (``nn.Embedding(sparse=True)``) on the device path: torch's fused
    kernels refuse them, so the group takes the foreach step torch's default picks on a GPU,
    which steps them as torch does."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    ea, eb = torch.nn.Embedding(20, 4, sparse=True), torch.nn.Embedding(20, 4, sparse=True)
    eb.load_state_dict(ea.state_dict())
    ours = _ours(ours_cls, list(ea.parameters()), {"lr": 0.1}, monkeypatch)
    ref = torch_cls(eb.parameters(), lr=0.1, foreach=True)
    for step in range(3):
        idx = torch.tensor([step, 3, 7, 3])
        for emb, opt in ((ea, ours), (eb, ref)):
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            opt.step()
    assert device_path
    assert torch.equal(ea.weight, eb.weight)
