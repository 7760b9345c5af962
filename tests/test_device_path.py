"""Accelerator parameters (CUDA, XPU, MPS) are stepped by torch's fused kernel where torch has
one for the algorithm (Adam, AdamW, SGD), else by its foreach kernels: one call per group.

No GPU is needed here: the kernel is made to refuse every tensor (as it refuses CUDA ones)
and ``_compat.accelerator`` to accept CPU tensors, so the device path runs on CPU, where
torch has the same fused and foreach kernels. Its results must equal torch.optim's
``fused=True`` (``foreach=True``) bit for bit, with GradScaler's protocol and clipping too.
The same path on a real GPU is covered by tests/test_cuda.py.
"""

from __future__ import annotations

import random

import pytest
import torch

import ferrotorch._compat as compat
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


@pytest.fixture
def device_path(monkeypatch):
    calls = []
    real = compat.accelerator

    def accept_cpu(p):
        calls.append(p.device.type)
        return type(p) in (torch.Tensor, torch.nn.Parameter) or real(p)

    monkeypatch.setattr(compat, "accelerator", accept_cpu)
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
