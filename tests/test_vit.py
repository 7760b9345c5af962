"""ferrotorch.nn.ViT (Rust forward/backward) against vit-pytorch's ViT and torch autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ferrotorch.nn import ViT

vit_pytorch = pytest.importorskip("vit_pytorch")

CONFIGS = [
    dict(image_size=8, patch_size=2, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8),
    dict(image_size=(8, 12), patch_size=4, num_classes=3, dim=12, depth=1, heads=1, mlp_dim=20, dim_head=12, pool="mean", channels=2),
    dict(image_size=16, patch_size=4, num_classes=10, dim=32, depth=3, heads=4, mlp_dim=64, dim_head=8, pool="mean"),
    dict(image_size=12, patch_size=(3, 4), num_classes=7, dim=24, depth=2, heads=3, mlp_dim=48, dim_head=6, channels=1),
]


def image_shape(kw, batch):
    size = kw["image_size"] if isinstance(kw["image_size"], tuple) else (kw["image_size"],) * 2
    return (batch, kw.get("channels", 3), *size)


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("batch", [1, 5])
def test_logits_and_every_gradient_match_vit_pytorch(kw, batch):
    torch.manual_seed(0)
    ref = vit_pytorch.ViT(**kw)
    ours = ViT(**kw)
    ours.load_state_dict(ref.state_dict())  # strict: same keys
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(image_shape(kw, batch), requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    lo, lr = ours(x), ref(x2)
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(lr)
    lo.backward(g)
    lr.backward(g)
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        if b.grad is None or b.numel() == 0:
            continue
        scale = b.grad.abs().max().clamp_min(1e-12)
        assert float((a.grad - b.grad).abs().max() / scale) < 1e-4, name
    assert float((x.grad - x2.grad).abs().max() / x2.grad.abs().max()) < 1e-4


@pytest.mark.parametrize("fused", [True, False], ids=["rust-kernels", "tch-ops"])
@pytest.mark.parametrize("variant", ["vit-pytorch", "dropout", "timm-avg"])
def test_gradcheck_fp64(variant, fused):
    """torch.autograd.gradcheck (finite differences of our forward against our backward), for
    the fused CPU kernels and for the tch-op path that CUDA tensors take. With dropout the
    seed is fixed in the config, so the masks are the same on every call."""
    torch.manual_seed(1)
    kw = dict(image_size=4, patch_size=2, num_classes=3, dim=6, depth=1, heads=2, mlp_dim=8, dim_head=3, channels=1)
    if variant == "dropout":
        kw.update(dropout=0.3, emb_dropout=0.2)
    if variant == "timm-avg":
        kw.update(pool="mean", qkv_bias=True, layer_norm_eps=1e-6, patch_norm=False, class_token=True, fc_norm=True)
    model = ViT(**kw).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    params = model._ordered_params()
    from ferrotorch.nn.vit import _ViTFunction

    cfg = model._config(train=variant == "dropout")
    cfg["fused"] = fused
    assert torch.autograd.gradcheck(lambda x, *p: _ViTFunction.apply(cfg, x, *p), (x, *params), eps=1e-6, atol=1e-6)


def test_dropout_train_and_eval_modes():
    torch.manual_seed(2)
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8, dropout=0.3, emb_dropout=0.2)
    x = torch.randn(3, 3, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    a, b = model(x), model(x)
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    c = model(x)
    torch.manual_seed(5)
    assert torch.equal(c, model(x))  # masks come from torch's generator
    c.sum().backward()
    assert all(p.grad is not None for p in model._ordered_params())


@pytest.mark.parametrize(
    "x,err,match",
    [
        (torch.randn(2, 3, 8, 9), ValueError, r"expected images of shape \(batch, 3, 8, 8\), got \(2, 3, 8, 9\)"),
        (torch.randn(2, 1, 8, 8), ValueError, "got \\(2, 1, 8, 8\\)"),
        (torch.randn(2, 3, 8, 8, dtype=torch.float64), TypeError, "dtype torch.float64"),
        ("not a tensor", TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(x, err, match):
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=16, depth=1, heads=2, mlp_dim=32, dim_head=8)
    with pytest.raises(err, match=match):
        model(x)


def test_bad_configuration():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ViT(image_size=10, patch_size=4, num_classes=2, dim=8, depth=1, heads=1, mlp_dim=8)
    with pytest.raises(ValueError, match="pool"):
        ViT(image_size=8, patch_size=4, num_classes=2, dim=8, depth=1, heads=1, mlp_dim=8, pool="max")


def test_digits_training_matches_vit_pytorch():
    """A short real run on scikit-learn's 8x8 digits: same seed, optimizer and data give the
    same accuracy as vit-pytorch."""
    datasets = pytest.importorskip("sklearn.datasets")
    import ferrotorch.optim as fopt

    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    Xtr, ytr, Xte, yte = X[:1400], y[:1400], X[1400:], y[1400:]
    kw = dict(image_size=8, patch_size=2, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8, channels=1)
    accs = {}
    for lib in ("ferrotorch", "vit-pytorch"):
        torch.manual_seed(0)
        ref = vit_pytorch.ViT(**kw)
        model = ref
        if lib == "ferrotorch":
            model = ViT(**kw)
            model.load_state_dict(ref.state_dict())
        opt = fopt.AdamW(model.parameters(), lr=3e-3) if lib == "ferrotorch" else torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False)
        g = torch.Generator().manual_seed(1)
        for epoch in range(4):
            perm = torch.randperm(len(Xtr), generator=g)
            for i in range(0, len(Xtr), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            accs[lib] = (model(Xte).argmax(1) == yte).float().mean().item()
    assert accs["ferrotorch"] == pytest.approx(accs["vit-pytorch"], abs=0.01)
    assert accs["ferrotorch"] > 0.7  # 4 short epochs
