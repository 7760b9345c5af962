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
        noise = torch.randn(a.shape, generator=g).to(a.device, a.dtype)
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


def _vit_twins(seed: int, depth: int):
    """vit-pytorch's ViT and ferrotorch's with the same weights, on the GPU."""
    vit_pytorch = pytest.importorskip("vit_pytorch")
    kw = dict(image_size=16, patch_size=4, num_classes=10, dim=32, depth=depth, heads=4, mlp_dim=64, dim_head=8)
    torch.manual_seed(seed)
    ref = vit_pytorch.ViT(**kw).to(DEV)
    ours = ViT(**kw).to(DEV)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def test_vit_matches_vit_pytorch():
    ours, ref = _vit_twins(0, depth=3)
    x = torch.randn(4, 3, 16, 16, device=DEV)
    lo, lr = ours(x), ref(x)
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
    lo.sum().backward()
    lr.sum().backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert float((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)) < 1e-4, name


def _classes(name):
    """ferrotorch's optimizer class called ``name`` and torch's."""
    return getattr(fopt, name), getattr(torch.optim, name)


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("Adafactor", dict(lr=1e-2, weight_decay=1e-2)),
        ("Muon", dict(lr=2e-2, weight_decay=0.1, nesterov=True)),
    ],
)
def test_own_step_optimizers_match_torch(name, cfg):
    """Optimizers whose CPU step is ferrotorch's own (not torch's fused/foreach kernels) give
    torch's CUDA answer on CUDA tensors."""
    ours_cls, torch_cls = _classes(name)
    shapes = [(8, 5), (33, 17)] if name == "Muon" else [(7,), (4, 5), (33, 17)]
    g = torch.Generator().manual_seed(11)
    init = [torch.randn(s, generator=g) for s in shapes]
    pa = [t.to(DEV).requires_grad_() for t in init]
    pb = [t.to(DEV).requires_grad_() for t in init]
    ours, ref = ours_cls(pa, **cfg), torch_cls(pb, **cfg)
    for _ in range(6):
        _grads(pa, pb, g)
        ours.step()
        ref.step()
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch_cls(pb, **cfg).load_state_dict(ours.state_dict())


@pytest.mark.parametrize("name", ["SparseAdam", "SGD", "Adagrad"])
def test_sparse_embedding_grads(name):
    """nn.Embedding(sparse=True) on the GPU: SparseAdam, and SGD / Adagrad, whose fused
    kernels take no sparse grads, step them as torch's default does."""
    ga, gb = torch.Generator().manual_seed(12), torch.Generator().manual_seed(12)
    ea, eb = (torch.nn.Embedding(50, 8, sparse=True).to(DEV) for _ in range(2))
    eb.load_state_dict(ea.state_dict())
    ours_cls, torch_cls = _classes(name)
    ours, ref = ours_cls(ea.parameters(), lr=1e-2), torch_cls(eb.parameters(), lr=1e-2)
    for _ in range(5):
        for emb, opt, gen in ((ea, ours, ga), (eb, ref, gb)):
            idx = torch.randint(0, 50, (12,), generator=gen).to(DEV)
            opt.zero_grad()
            emb(idx).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(ea.weight, eb.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_lbfgs(line_search_fn):
    torch.manual_seed(13)
    x = torch.randn(64, 4, device=DEV)
    y = x @ torch.randn(4, 1, device=DEV) + 0.1
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(DEV) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [cls(n.parameters(), lr=0.5, max_iter=10, line_search_fn=line_search_fn)
            for cls, n in zip((fopt.LBFGS, torch.optim.LBFGS), nets)]
    for _ in range(3):
        for n, opt in zip(nets, opts):
            def closure(n=n, opt=opt):
                opt.zero_grad()
                loss = (n(x) - y).pow(2).mean()
                loss.backward()
                return loss
            opt.step(closure)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop"])
def test_group_with_cpu_and_cuda_params(name):
    """One group holding CPU and CUDA parameters: each device's tensors give torch's answer
    (the CPU ones through the Rust kernels, the CUDA ones through torch's)."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    cfg = dict(lr=1e-2, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
    g = torch.Generator().manual_seed(14)
    init = [torch.randn(5, 3, generator=g) for _ in range(4)]
    devs = ["cpu", DEV, "cpu", DEV]
    pa = [t.to(d).requires_grad_() for t, d in zip(init, devs)]
    pb = [t.to(d).requires_grad_() for t, d in zip(init, devs)]
    ours, ref = ours_cls(pa, **cfg), torch_cls(pb, **cfg, foreach=False)
    for _ in range(5):
        _grads(pa, pb, g)
        ours.step()
        ref.step()
    for a, b in zip(pa, pb):
        assert a.device == b.device
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_checkpoint_moves_between_cuda_and_cpu(name):
    """A checkpoint saved on the GPU resumes on the CPU (and back), as torch.optim's does:
    state follows the parameters' device on load."""
    ours_cls, torch_cls = OPTIMIZERS[name]
    cfg = dict(lr=1e-2, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
    g = torch.Generator().manual_seed(15)
    init = [torch.randn(6, 4, generator=g), torch.randn(9, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(6)]

    def run(cls, first, second):
        ps = [t.to(first, copy=True).requires_grad_() for t in init]
        opt = cls(ps, **cfg)
        for gs in grads[:3]:
            for p, gr in zip(ps, gs):
                p.grad = gr.to(first)
            opt.step()
        sd = opt.state_dict()
        qs = [p.detach().to(second).requires_grad_() for p in ps]
        opt2 = cls(qs, **cfg)
        opt2.load_state_dict(sd)
        for gs in grads[3:]:
            for q, gr in zip(qs, gs):
                q.grad = gr.to(second)
            opt2.step()
        return [q.detach().cpu() for q in qs]

    for first, second in ((DEV, "cpu"), ("cpu", DEV)):
        for a, b in zip(run(ours_cls, first, second), run(torch_cls, first, second)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_step():
    """PyTorch's compiled-optimizer recipe on the GPU: torch.compile(opt.step) gives the
    eager answer."""
    ps = [torch.randn(32, 16, device=DEV, requires_grad=True) for _ in range(3)]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    ours, ref = fopt.AdamW(ps, lr=1e-2), torch.optim.AdamW(qs, lr=1e-2)
    step = torch.compile(ours.step)
    g = torch.Generator().manual_seed(16)
    for _ in range(3):
        _grads(ps, qs, g)
        step()
        ref.step()
    for a, b in zip(ps, qs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vit_autocast_bf16_trains():
    """The ViT under CUDA autocast (bf16), the usual GPU training setup: forward and backward
    agree with vit-pytorch under the same autocast to bf16's precision."""
    ours, ref = _vit_twins(1, depth=2)
    x = torch.randn(8, 3, 16, 16, device=DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lo, lr = ours(x), ref(x)
    torch.testing.assert_close(lo.float(), lr.float(), rtol=3e-2, atol=3e-2)
    lo.float().sum().backward()
    lr.float().sum().backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert a.grad is not None and torch.isfinite(a.grad).all(), name
        assert float((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)) < 5e-2, name


def test_vit_gradient_penalty_matches_vit_pytorch():
    """Double backward on the GPU (a gradient penalty, create_graph=True): the fused
    attention's backward recomputes the attention differentiably, so the penalty's gradient
    reaches the parameters as in vit-pytorch."""
    ours, ref = (m.double() for m in _vit_twins(2, depth=2))
    x = torch.randn(4, 3, 16, 16, device=DEV, dtype=torch.float64)
    for m in (ours, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (gx,) = torch.autograd.grad(y.sum(), xi, create_graph=True)
        (y.pow(2).mean() + gx.pow(2).sum()).backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9, msg=name)

