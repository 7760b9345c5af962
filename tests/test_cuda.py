"""ferrotorch on a CUDA device: optimizers, clipping, EMA, GradScaler and the ViT.

Marked ``cuda``: skipped where torch sees no GPU (conftest.py). On a GPU every native
optimizer must match torch.optim's fused (Adam, AdamW, SGD) or foreach implementation,
which is what ferrotorch hands CUDA groups to; the ViT runs its tch-op path and must match
vit-pytorch on the same device.
"""

from __future__ import annotations

import random

import pytest
import torch

import ferrotorch.optim as fopt
from conftest import OPTIMIZERS, random_config
from ferrotorch.nn import ViT
from ferrotorch.nn.utils import clip_grad_norm_, clip_grad_value_
from ferrotorch.train import ModelEMA

pytestmark = pytest.mark.cuda

FUSED = {"Adam", "AdamW", "SGD"}
DEV = "cuda"


def _params(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (4, 5), (2, 3, 4), (33,), (256, 129)]
    return [torch.randn(s, generator=g).to(DEV, dtype).requires_grad_() for s in shapes]


def _grads(pa, pb, g):
    for a, b in zip(pa, pb):
        noise = torch.randn(a.shape, generator=g).to(DEV, a.dtype)
        a.grad = noise + 0.1 * a.detach()
        b.grad = noise + 0.1 * b.detach()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("seed", range(2))
def test_optimizers_match_torch_fused_or_foreach(name, seed):
    ours_cls, torch_cls = OPTIMIZERS[name]
    cfg = random_config(name, random.Random(seed))
    how = {"fused": True} if name in FUSED else {"foreach": True}
    pa, pb = _params(seed), _params(seed)
    ours, ref = ours_cls(pa, **cfg), torch_cls(pb, **cfg, **how)
    g = torch.Generator().manual_seed(seed)
    for _ in range(10):
        _grads(pa, pb, g)
        ours.step()
        ref.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Checkpoints move both ways.
    torch_cls(_params(seed), **cfg).load_state_dict(ours.state_dict())
    ours_cls(_params(seed), **cfg).load_state_dict(ref.state_dict())


@pytest.mark.parametrize("name", sorted(FUSED))
def test_grad_scaler(name):
    ours_cls, torch_cls = OPTIMIZERS[name]
    pa, pb = _params(4), _params(4)
    ours, ref = ours_cls(pa, lr=1e-2), torch_cls(pb, lr=1e-2, fused=True)
    sa, sb = torch.amp.GradScaler("cuda", init_scale=2.0**8), torch.amp.GradScaler("cuda", init_scale=2.0**8)
    for step in range(8):
        for p_, opt, scaler in ((pa, ours, sa), (pb, ref, sb)):
            opt.zero_grad()
            loss = sum((p.float() ** 2).sum() for p in p_) * (float("inf") if step == 3 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        assert sa.get_scale() == sb.get_scale()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clip_grad_norm_and_value():
    pa, pb = _params(5), _params(5)
    g = torch.Generator().manual_seed(5)
    _grads(pa, pb, g)
    for norm_type in (2.0, 1.0, float("inf")):
        ours = clip_grad_norm_(pa, max_norm=0.3, norm_type=norm_type)
        ref = torch.nn.utils.clip_grad_norm_(pb, max_norm=0.3, norm_type=norm_type)
        torch.testing.assert_close(ours, ref)
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a.grad, b.grad)
    clip_grad_value_(pa, 0.01)
    torch.nn.utils.clip_grad_value_(pb, 0.01)
    for a, b in zip(pa, pb):
        assert torch.equal(a.grad, b.grad)


def test_clip_grad_norm_and_step():
    pa, pb = _params(6), _params(6)
    ours, ref = fopt.AdamW(pa, lr=1e-2), torch.optim.AdamW(pb, lr=1e-2, fused=True)
    g = torch.Generator().manual_seed(6)
    for _ in range(4):
        _grads(pa, pb, g)
        ours.clip_grad_norm_and_step(0.5)
        torch.nn.utils.clip_grad_norm_(pb, 0.5)
        ref.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_model_ema():
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)).to(DEV)
    ours, ref = ModelEMA(net, decay=0.99, use_warmup=True), timm_ema.ModelEmaV3(net, decay=0.99, use_warmup=True)
    opt = fopt.SGD(net.parameters(), lr=0.1)
    x = torch.randn(32, 6, device=DEV)
    for step in range(20):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        ours.update(net, step=step)
        ref.update(net, step=step)
    for (k, a), (_, b) in zip(ours.module.state_dict().items(), ref.module.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


def test_vit_matches_vit_pytorch():
    vit_pytorch = pytest.importorskip("vit_pytorch")
    kw = dict(image_size=16, patch_size=4, num_classes=10, dim=32, depth=3, heads=4, mlp_dim=64, dim_head=8)
    torch.manual_seed(0)
    ref = vit_pytorch.ViT(**kw).to(DEV)
    ours = ViT(**kw).to(DEV)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 16, 16, device=DEV)
    lo, lr = ours(x), ref(x)
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
    lo.sum().backward()
    lr.sum().backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert float((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)) < 1e-4, name
