"""Gradient clipping against torch.nn.utils, and the fused clip-and-step against torch's
clip_grad_norm_ followed by step()."""

from __future__ import annotations

import math

import pytest
import torch

import ferrotorch.optim as fopt
from ferrotorch.nn.utils import clip_grad_norm_, clip_grad_value_
from conftest import OPTIMIZERS, bf16_ulps, make_params, rel_err


def twins(dtype, seed=0, scale=1.0):
    pa, pb = make_params(seed, dtype), make_params(seed, dtype)
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(pa, pb):
        grad = (torch.randn(a.shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        a.grad, b.grad = grad.clone(), grad.clone()
    return pa, pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf, -math.inf, 0.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_matches_torch(dtype, norm_type, max_norm):
    pa, pb = twins(dtype)
    if math.isinf(norm_type):
        # torch refuses an infinity norm over an empty tensor; so does ferrotorch.
        with pytest.raises(RuntimeError, match="empty tensor"):
            clip_grad_norm_(pa, max_norm, norm_type)
        pa, pb = [p for p in pa if p.numel()], [p for p in pb if p.numel()]
    ours = clip_grad_norm_(pa, max_norm, norm_type)
    ref = torch.nn.utils.clip_grad_norm_(pb, max_norm, norm_type)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert float(ours) == pytest.approx(float(ref), rel=tol)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol * 1e-2)


def test_clip_grad_norm_errors_and_fallbacks():
    pa, pb = twins(torch.float32)
    pa[4].grad[0, 0] = float("inf")
    pb[4].grad[0, 0] = float("inf")
    with pytest.raises(RuntimeError) as ours:
        clip_grad_norm_(pa, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ref:
        torch.nn.utils.clip_grad_norm_(pb, 1.0, error_if_nonfinite=True)
    assert str(ours.value) == str(ref.value)
    # Non-contiguous grads go through torch's own implementation.
    pa, pb = twins(torch.float32)
    pa[4].grad = pa[4].grad.t().contiguous().t()
    torch.testing.assert_close(clip_grad_norm_(pa, 0.1), torch.nn.utils.clip_grad_norm_(pb, 0.1))
    assert float(clip_grad_norm_([torch.zeros(2, requires_grad=True)], 1.0)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_grad_value_matches_torch(dtype):
    pa, pb = twins(dtype, scale=3.0)
    pa[3].grad.view(-1)[0] = float("nan")
    pb[3].grad.view(-1)[0] = float("nan")
    clip_grad_value_(pa, 0.7)
    torch.nn.utils.clip_grad_value_(pb, 0.7)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_clip_and_step_equals_clip_then_step(name, dtype):
    ours_cls, torch_cls = OPTIMIZERS[name]
    pa, pb = make_params(3, dtype), make_params(3, dtype)
    ours, ref = ours_cls(pa, lr=0.01), torch_cls(pb, lr=0.01, foreach=False)
    g = torch.Generator().manual_seed(3)
    for step in range(30):
        for a, b in zip(pa, pb):
            grad = torch.randn(a.shape, generator=g, dtype=torch.float64).to(dtype) * (5.0 if step % 2 else 0.01)
            a.grad, b.grad = grad.clone(), grad.clone()
        n_ours = ours.clip_grad_norm_and_step(max_norm=1.0)
        n_ref = torch.nn.utils.clip_grad_norm_(pb, max_norm=1.0)
        ref.step()
        assert float(n_ours) == pytest.approx(float(n_ref), rel=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert max(rel_err(a, b) for a, b in zip(pa, pb)) <= tol


def test_fused_clip_and_step_bf16_and_scheduler_order(recwarn):
    """bf16 against torch's clip_grad_norm_ + fused AdamW (fp32 math), with a scheduler
    stepping after the fused call (which counts as the optimizer's step: no warning)."""
    pa, pb = make_params(4, torch.bfloat16), make_params(4, torch.bfloat16)
    ours, ref = fopt.AdamW(pa, lr=0.01), torch.optim.AdamW(pb, lr=0.01, fused=True)
    so = torch.optim.lr_scheduler.StepLR(ours, 3)
    sr = torch.optim.lr_scheduler.StepLR(ref, 3)
    g = torch.Generator().manual_seed(4)
    for _ in range(10):
        for a, b in zip(pa, pb):
            grad = torch.randn(a.shape, generator=g).to(torch.bfloat16) * 4
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.clip_grad_norm_and_step(0.5)
        torch.nn.utils.clip_grad_norm_(pb, 0.5)
        ref.step()
        so.step()
        sr.step()
    for a, b in zip(pa, pb):
        assert bf16_ulps(a, b) <= 1
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
