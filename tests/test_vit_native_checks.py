"""``ferrotorch._native.vit_forward`` / ``vit_backward`` called directly (issue #11, "never
unsafe"): the native functions check every tensor themselves, as ``ferrotorch.nn.vit`` does
before calling them, so a wrong shape, dtype, device, layout or storage, a tensor subclass, a
wrong parameter count, wrong saved tensors or a wrong gradient is a ValueError/TypeError
naming the tensor, never an out-of-bounds read or a crash. Each bad call runs in a
subprocess, so a crash fails its test instead of the session."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ferrotorch import _native
from ferrotorch.nn import ViT

# The arguments as ferrotorch/nn/vit.py builds them (ViT._run, _ViTFunction): the model's
# config and its parameters in _layout's order, detached.
SETUP = r"""
import torch
from ferrotorch import _native
from ferrotorch.nn import ViT
from ferrotorch.nn.vit import _layout

KW = dict(image_size=8, patch_size=4, num_classes=3, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=24)


def setup(**over):
    torch.manual_seed(0)
    model = ViT(**{**KW, **over})
    cfg = model._config(train=False)
    params = [p.detach() for p in model._ordered_params()]
    x = torch.randn(2, 3, 8, 8)
    index = {name: i for i, (name, _) in enumerate(_layout(cfg, (8, 8)))}
    return model, cfg, x, params, index
"""

CHILD = SETUP + r"""
import json, sys


class Sub(torch.Tensor):
    pass


class Traced(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


model, cfg, x, params, index = setup()


def swap(name, make):
    ps = list(params)
    ps[index[name]] = make(ps[index[name]])
    return ps


def fwd(ps=None, xx=None, **over):
    return _native.vit_forward(x if xx is None else xx, params if ps is None else ps, **{**cfg, **over})


def fake(t):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        return mode.from_tensor(t)


def misaligned(t):
    buf = bytearray(t.numel() * 4 + 1)
    out = torch.frombuffer(buf, dtype=torch.float32, offset=1, count=t.numel()).view(t.shape)
    return out


def vmapped(name):
    stacked = torch.stack([params[index[name]]] * 2)

    def f(p):
        ps = list(params)
        ps[index[name]] = p
        return fwd(ps)[0]

    return torch.func.vmap(f)(stacked)


def bwd(grad=None, ps=None, saved=None, run_ps=None, infer_chunk=0):
    logits, sv, run = fwd(run_ps, infer_chunk=infer_chunk)
    g = torch.ones_like(logits) if grad is None else grad(logits)
    return _native.vit_backward(run, g, params if ps is None else ps, sv if saved is None else saved(sv))


def other_width():
    return setup(mlp_dim=32)[3]


def with_saved(i, make):
    def f(sv):
        sv = list(sv)
        sv[i] = make(sv[i])
        return sv

    return f


def same(a, b):
    return a.shape == b.shape and torch.equal(a, b)


def check_equal(got, want):
    assert len(got) == len(want) and all(same(a, b) for a, b in zip(got, want)), "results differ"


def noncontig_param():
    # a transposed copy: same values, non-contiguous; the kernels get a contiguous copy
    ps = swap("transformer.layers.0.0.to_qkv.weight", lambda t: t.t().contiguous().t())
    assert not ps[index["transformer.layers.0.0.to_qkv.weight"]].is_contiguous()
    check_equal([fwd(ps)[0]], [fwd()[0]])


def neg_param():
    ps = swap("mlp_head.weight", lambda t: torch._neg_view(-t))
    check_equal([fwd(ps)[0]], [fwd()[0]])


def noncontig_saved():
    # (B, N, D) activations, same values, non-contiguous
    flip = lambda s: s.transpose(0, 1).contiguous().transpose(0, 1) if s.dim() == 3 else s
    ref = bwd()
    got = bwd(saved=lambda sv: [flip(s) for s in sv])
    check_equal(got, ref)


def expanded_saved():
    # stride-0 views of the right shape: wrong values, but read as the contiguous copies they are
    ref = bwd()
    out = bwd(saved=lambda sv: [s[(0,) * s.dim()].expand(s.shape) for s in sv])
    assert [g.shape for g in out] == [g.shape for g in ref], "gradient shapes differ"


CASES = {
    # forward: parameters of the wrong shape
    "qkv_rows": lambda: fwd(swap("transformer.layers.0.0.to_qkv.weight", lambda t: t[:32])),
    "norm_width": lambda: fwd(swap("transformer.layers.1.1.net.0.weight", lambda t: torch.randn(17))),
    "head_in_features": lambda: fwd(swap("mlp_head.weight", lambda t: torch.randn(3, 15))),
    "pos_shorter": lambda: fwd(swap("pos_embedding", lambda t: t[:4])),
    "pos_longer": lambda: fwd(swap("pos_embedding", lambda t: torch.randn(9, 16))),
    "cls_token": lambda: fwd(swap("cls_token", lambda t: torch.randn(2, 16))),
    "patch_norm": lambda: fwd(swap("to_patch_embedding.1.bias", lambda t: torch.randn(47))),
    "mlp_width_mismatch": lambda: fwd(swap("transformer.layers.1.1.net.4.weight", lambda t: torch.randn(16, 25))),
    "classes_mismatch": lambda: fwd(swap("mlp_head.bias", lambda t: torch.randn(4))),
    "transposed_view": lambda: fwd(swap("to_patch_embedding.2.weight", lambda t: t.t())),
    "extra_dim": lambda: fwd(swap("transformer.norm.weight", lambda t: t[None])),
    # forward: dtype, device/storage, layout, subclasses
    "dtype": lambda: fwd(swap("transformer.layers.1.0.norm.bias", lambda t: t.double())),
    "meta": lambda: fwd(swap("transformer.layers.0.0.to_out.0.weight", lambda t: t.to("meta"))),
    "sparse": lambda: fwd(swap("transformer.layers.0.1.net.1.bias", lambda t: t.to_sparse())),
    "nested": lambda: fwd(swap("transformer.layers.0.1.net.0.bias", lambda t: torch.nested.nested_tensor([t]))),
    "misaligned": lambda: fwd(swap("transformer.layers.0.0.norm.weight", misaligned)),
    "vmap": lambda: vmapped("transformer.layers.1.0.to_qkv.weight"),
    "subclass": lambda: fwd(swap("transformer.layers.0.0.to_qkv.weight", lambda t: t.as_subclass(Sub))),
    "torch_function_subclass": lambda: fwd(swap("mlp_head.bias", lambda t: t.as_subclass(Traced))),
    "fake_tensor": lambda: fwd(swap("pos_embedding", fake)),
    "images_subclass": lambda: fwd(xx=x.as_subclass(Traced)),
    "images_meta": lambda: fwd(xx=x.to("meta")),
    "images_int": lambda: fwd(xx=x.long()),
    "images_channels": lambda: fwd(xx=torch.randn(2, 1, 8, 8)),
    # forward: the parameter list and the configuration
    "too_few_params": lambda: fwd(params[:-1]),
    "too_many_params": lambda: fwd(params + [params[-1]]),
    "qkv_bias_missing": lambda: fwd(qkv_bias=True),
    "zero_heads": lambda: fwd(heads=0),
    # backward
    "saved_count": lambda: bwd(saved=lambda sv: sv[:-1]),
    "saved_shape": lambda: bwd(saved=with_saved(3, lambda s: s[..., :1].contiguous())),
    "saved_dtype": lambda: bwd(saved=with_saved(0, lambda s: s.double())),
    "saved_meta": lambda: bwd(saved=with_saved(1, lambda s: s.to("meta"))),
    "saved_subclass": lambda: bwd(saved=with_saved(2, lambda s: s.as_subclass(Sub))),
    "grad_classes": lambda: bwd(grad=lambda lo: torch.ones(2, 4)),
    "grad_batch": lambda: bwd(grad=lambda lo: torch.ones(3, 3)),
    "grad_subclass": lambda: bwd(grad=lambda lo: torch.ones_like(lo).as_subclass(Sub)),
    "grad_meta": lambda: bwd(grad=lambda lo: torch.ones(2, 3, device="meta")),
    "bwd_param_shape": lambda: bwd(ps=swap("transformer.layers.1.0.to_qkv.weight", lambda t: t[:40])),
    "bwd_param_dtype": lambda: bwd(ps=swap("mlp_head.weight", lambda t: t.half())),
    "bwd_param_count": lambda: bwd(ps=params[:-2]),
    "bwd_other_mlp_width": lambda: bwd(ps=other_width()),
    "bwd_after_inference": lambda: bwd(infer_chunk=4),
    # valid calls that must give the same results as the plain ones
    "noncontig_param": noncontig_param,
    "neg_param": neg_param,
    "noncontig_saved": noncontig_saved,
    "expanded_saved": expanded_saved,
}

try:
    CASES[sys.argv[1]]()
    result = {"error": None, "message": ""}
except Exception as e:  # the error is the result
    result = {"error": [c.__name__ for c in type(e).__mro__], "message": str(e)}
print(json.dumps(result))
"""

V, T = "ValueError", "TypeError"

# case: (error type, substrings of its message)
BAD = {
    "qkv_rows": (V, ["parameter 10 (transformer.layers.0.0.to_qkv.weight)", "has shape (32, 16), expected (48, 16)"]),
    "norm_width": (V, ["transformer.layers.1.1.net.0.weight", "has shape (17,), expected (16,)"]),
    "head_in_features": (V, ["mlp_head.weight", "has shape (3, 15), expected (3, 16)"]),
    "pos_shorter": (V, ["pos_embedding", "has shape (4, 16), expected (5, 16)"]),
    "pos_longer": (V, ["pos_embedding", "has shape (9, 16), expected (5, 16)"]),
    "cls_token": (V, ["parameter 6 (cls_token)", "expected (1, 16)"]),
    "patch_norm": (V, ["parameter 1 (to_patch_embedding.1.bias)", "expected (48,)"]),
    "mlp_width_mismatch": (V, ["transformer.layers.1.1.net.4.weight", "has shape (16, 25), expected (16, 24)"]),
    "classes_mismatch": (V, ["mlp_head.bias", "has shape (4,), expected (3,)"]),
    "transposed_view": (V, ["to_patch_embedding.2.weight", "has shape (48, 16), expected (16, 48)"]),
    "extra_dim": (V, ["transformer.norm.weight", "has shape (1, 16), expected (16,)"]),
    "dtype": (T, ["transformer.layers.1.0.norm.bias", "torch.float64, expected torch.float32"]),
    "meta": (T, ["transformer.layers.0.0.to_out.0.weight", "no storage"]),
    "sparse": (T, ["transformer.layers.0.1.net.1.bias", "not a strided tensor"]),
    "nested": (T, ["transformer.layers.0.1.net.0.bias", "non-strided"]),
    "misaligned": (T, ["transformer.layers.0.0.norm.weight", "not aligned"]),
    "vmap": (T, ["transformer.layers.1.0.to_qkv.weight", "no storage"]),
    "subclass": (T, ["transformer.layers.0.0.to_qkv.weight", "is a Sub, expected a plain torch.Tensor"]),
    "torch_function_subclass": (T, ["mlp_head.bias", "is a Traced"]),
    "fake_tensor": (T, ["pos_embedding", "is a FakeTensor"]),
    "images_subclass": (T, ["the images is a Traced"]),
    "images_meta": (T, ["the images has no storage"]),
    "images_int": (T, ["images must be float", "torch.int64"]),
    "images_channels": (V, ["expected 3 channels, got 1"]),
    "too_few_params": (V, ["got 33 parameters, the configuration uses 34"]),
    "too_many_params": (V, ["got 35 parameters, the configuration uses 34"]),
    "qkv_bias_missing": (V, ["got 34 parameters, the configuration uses 36"]),
    "zero_heads": (V, ["heads must be positive"]),
    "saved_count": (V, ["ViT backward: got 28 saved tensors, the forward pass saved 29"]),
    "saved_shape": (V, ["saved tensor 3 has shape", "the forward pass saved (2, 4, 16)"]),
    "saved_dtype": (T, ["saved tensor 0 has dtype torch.float64"]),
    "saved_meta": (T, ["saved tensor 1 has no storage"]),
    "saved_subclass": (T, ["saved tensor 2 is a Sub"]),
    "grad_classes": (V, ["grad_logits has shape (2, 4), expected (batch, classes) = (2, 3)"]),
    "grad_batch": (V, ["grad_logits has shape (3, 3)"]),
    "grad_subclass": (T, ["grad_logits is a Sub"]),
    "grad_meta": (T, ["grad_logits has no storage"]),
    "bwd_param_shape": (V, ["ViT backward: parameter", "transformer.layers.1.0.to_qkv.weight", "expected (48, 16)"]),
    "bwd_param_dtype": (T, ["ViT backward: parameter", "mlp_head.weight", "torch.float16"]),
    "bwd_param_count": (V, ["ViT backward: got 32 parameters"]),
    "bwd_other_mlp_width": (V, ["ViT backward: parameter", "transformer.layers.0.1.net.1.weight", "has shape (32, 16), expected (24, 16)"]),
    "bwd_after_inference": (V, ["saved nothing"]),
}
GOOD = ["noncontig_param", "neg_param", "noncontig_saved", "expanded_saved"]


def run_child(case: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, case], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{case}: exit code {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_call_is_a_clear_error(case):
    kind, parts = BAD[case]
    res = run_child(case)
    assert res["error"] is not None, f"{case}: no error raised"
    assert kind in res["error"] and "PanicException" not in res["error"], (case, res)
    assert f"Ferrotorch{kind}" in res["error"], (case, res)
    for part in parts:
        assert part in res["message"], (case, part, res["message"])


@pytest.mark.parametrize("case", GOOD)
def test_unusual_but_valid_tensors_give_the_same_results(case):
    res = run_child(case)
    assert res["error"] is None, (case, res)


def _setup():
    ns: dict = {}
    exec(SETUP, ns)
    return ns["setup"]()


@pytest.mark.parametrize("fused", [True, False])
def test_valid_direct_calls_equal_the_model(fused):
    """The checked direct calls give the model's own forward output and gradients."""
    model, cfg, x, params, _ = _setup()
    cfg = dict(cfg, fused=fused)
    model.eval()
    with torch.no_grad():
        want = model(x)
    logits, saved, run = _native.vit_forward(x, params, **cfg)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-6)
    assert run.fused == fused
    # gradients: the model's autograd (which calls the same functions) against a direct call
    xg = x.clone().requires_grad_()
    g = torch.randn(2, 3)
    model(xg).backward(g)
    grads = _native.vit_backward(run, g, params, saved)
    assert len(grads) == 1 + len(params)
    torch.testing.assert_close(grads[0], xg.grad, rtol=1e-5, atol=1e-6)
    for gp, p in zip(grads[1:], model._ordered_params()):
        torch.testing.assert_close(gp, p.grad, rtol=1e-5, atol=1e-6)


def test_module_path_unchanged_by_native_checks():
    """A model in the configurations the other tests do not build here (mean pooling, timm
    options) still runs through the checked native calls."""
    torch.manual_seed(1)
    m = ViT(image_size=8, patch_size=4, num_classes=5, dim=12, depth=2, heads=1, dim_head=12, mlp_dim=20, pool="mean", qkv_bias=True, patch_norm=False, fc_norm=True)
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m._ordered_params())
