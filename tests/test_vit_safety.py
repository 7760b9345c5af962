"""ferrotorch.nn.ViT with modified modules or parameters: vit-pytorch's result (or torch's
autograd's), or a clear error naming the parameter; never a crash, an out-of-bounds read
or silently different numbers.

Modifications that reach the kernels (resized, retyped, meta parameters) run in a
subprocess each (``python tests/test_vit_safety.py CASE``), so a crash fails the test
instead of killing pytest; the same modification is applied to a vit-pytorch model with the
same weights, which is the reference.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ferrotorch.nn import ViT

vit_pytorch = pytest.importorskip("vit_pytorch")

KW = dict(image_size=8, patch_size=2, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=32, dim_head=8)
DIM = KW["dim"]


def randn(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    """The same values in both models (and in every process)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)


def linear(i: int, o: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(i, o, bias=bias)


def pair(kw: dict | None = None, seed: int = 0) -> tuple[nn.Module, ViT]:
    kw = KW if kw is None else kw
    torch.manual_seed(seed)
    ref = vit_pytorch.ViT(**kw)
    ours = ViT(**kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _set(path: str, value: object):
    """A modification: ``model.<path> = value`` (a fresh copy per model)."""

    def apply(m: nn.Module) -> None:
        *parent, last = path.split(".")
        obj: Any = m
        for p in parent:
            obj = getattr(obj, p) if not p.isdigit() else obj[int(p)]
        v = copy.deepcopy(value)
        if last.isdigit():
            obj[int(last)] = v
        else:
            setattr(obj, last, v)

    return apply


def _retype(path: str, dtype: torch.dtype):
    def apply(m: nn.Module) -> None:
        *parent, last = path.split(".")
        mod = m.get_submodule(".".join(parent)) if parent else m
        setattr(mod, last, nn.Parameter(getattr(mod, last).detach().to(dtype)))

    return apply


def _both(*mods):
    def apply(m: nn.Module) -> None:
        for f in mods:
            f(m)

    return apply


L0, L1 = "transformer.layers.0", "transformer.layers.1"

# case -> (modification, the parameter a ValueError/TypeError must name where vit-pytorch fails)
CASES = {
    "norm_replaced_too_small": (_set("transformer.norm", nn.LayerNorm(8)), "transformer.norm.weight"),
    "norm_replaced_other_eps": (_set("transformer.norm", nn.LayerNorm(DIM, eps=0.5)), None),
    "to_qkv_shrunk": (_set(f"{L0}.0.to_qkv", linear(DIM, 24, bias=False)), f"{L0}.0.to_qkv.weight"),
    "to_qkv_shrunk_to_a_sixth": (_set(f"{L1}.0.to_qkv", linear(DIM, 8, bias=False)), f"{L1}.0.to_qkv.weight"),
    "to_qkv_weight_shrunk": (_set(f"{L1}.0.to_qkv.weight", nn.Parameter(randn(16, DIM))), f"{L1}.0.to_qkv.weight"),
    "to_qkv_with_bias": (_set(f"{L0}.0.to_qkv", linear(DIM, 48)), None),
    "to_out_wrong_in": (_set(f"{L0}.0.to_out.0", linear(8, DIM)), f"{L0}.0.to_out.0.weight"),
    "mlp_in_wrong_out_features": (_set(f"{L0}.1.net.1", linear(DIM, 48)), f"{L0}.1.net.4.weight"),
    "mlp_out_wrong_out_features": (_set(f"{L1}.1.net.4", linear(32, 16)), f"{L1}.1.net.4.weight"),
    "mlp_in_wrong_in_features": (_set(f"{L0}.1.net.1", linear(16, 32)), f"{L0}.1.net.1.weight"),
    "mlp_widened": (_both(_set(f"{L0}.1.net.1", linear(DIM, 48)), _set(f"{L0}.1.net.4", linear(48, DIM))), None),
    "head_replaced": (_set("mlp_head", linear(DIM, 7)), None),
    "head_wrong_in_features": (_set("mlp_head", linear(16, 7)), "mlp_head.weight"),
    "head_bias_wrong": (_set("mlp_head.bias", nn.Parameter(randn(3))), "mlp_head.bias"),
    "pos_embedding_longer": (_set("pos_embedding", nn.Parameter(randn(20, DIM))), None),
    "pos_embedding_shorter": (_set("pos_embedding", nn.Parameter(randn(10, DIM))), "pos_embedding"),
    "pos_embedding_narrower": (_set("pos_embedding", nn.Parameter(randn(17, 16))), "pos_embedding"),
    "cls_token_two_rows": (_set("cls_token", nn.Parameter(randn(2, DIM))), "cls_token"),
    "patch_linear_wrong_in": (_set("to_patch_embedding.2", linear(6, DIM)), "to_patch_embedding.2.weight"),
    "float64_head_weight": (_retype("mlp_head.weight", torch.float64), "mlp_head.weight"),
    "float64_attention_norm_weight": (_retype(f"{L0}.0.norm.weight", torch.float64), f"{L0}.0.norm.weight"),
    "float64_pos_embedding": (_retype("pos_embedding", torch.float64), "pos_embedding"),
    "float64_cls_token": (_retype("cls_token", torch.float64), "cls_token"),
    "int_head_bias": (_set("mlp_head.bias", nn.Parameter(torch.zeros(5, dtype=torch.int64), requires_grad=False)), "mlp_head.bias"),
    # torch itself reads garbage for a meta weight on CPU (no reference): ours must refuse
    "meta_head_weight": (_set("mlp_head.weight", nn.Parameter(torch.empty(5, DIM, device="meta"))), "mlp_head.weight"),
    "meta_qkv_weight": (_set(f"{L1}.0.to_qkv.weight", nn.Parameter(torch.empty(48, DIM, device="meta"))), f"{L1}.0.to_qkv.weight"),
    # valid for torch: a non-contiguous weight, an Identity for a Dropout, no affine LayerNorm
    "transposed_weight": (_set(f"{L0}.1.net.1.weight", nn.Parameter(randn(DIM, 32).t())), None),
    "dropout_replaced_by_identity": (_set(f"{L0}.1.net.3", nn.Identity()), None),
    "layernorm_without_affine": (_set(f"{L1}.0.norm", nn.LayerNorm(DIM, elementwise_affine=False)), None),
    "layernorm_without_bias": (_set(f"{L0}.1.net.0", nn.LayerNorm(DIM, bias=False)), None),
}


def _outcome(model: nn.Module, x: torch.Tensor) -> dict:
    try:
        y = model(x)
        y.pow(2).sum().backward()
    except Exception as e:  # noqa: BLE001 (the point is to record it)
        return {"ok": False, "types": [c.__name__ for c in type(e).__mro__], "msg": str(e)}
    grads = {n: p.grad.double().tolist() for n, p in model.named_parameters() if p.grad is not None and p.numel()}
    return {"ok": True, "y": y.detach().double().tolist(), "grads": grads}


def _run_case(case: str) -> dict:
    mod, _ = CASES[case]
    ref, ours = pair()
    mod(ref)
    mod(ours)
    x = randn(3, 3, 8, 8)
    return {"ref": None if case.startswith("meta") else _outcome(ref, x), "ours": _outcome(ours, x)}


def _rel(a: object, b: object) -> float:
    ta, tb = (t.detach().double() if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=torch.float64) for t in (a, b))
    return float((ta - tb).abs().max() / tb.abs().max().clamp_min(1e-12)) if tb.numel() else 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_modified_model_gives_vit_pytorch_result_or_clear_error(case):
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), case], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"crashed ({proc.returncode}): {proc.stderr[-3000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ref, ours = res["ref"], res["ours"]
    name = CASES[case][1]
    if ref is None or not ref["ok"]:
        assert not ours["ok"], f"vit-pytorch failed ({ref and ref['msg']}), ours ran"
        assert "ValueError" in ours["types"] or "TypeError" in ours["types"], ours
        assert name is not None and (f"parameter {name} " in ours["msg"] or f"model's {name} " in ours["msg"]), ours["msg"]
        assert "expected" in ours["msg"] or " on meta" in ours["msg"], ours["msg"]
        return
    assert name is None, "vit-pytorch ran this case: update CASES"
    assert ours["ok"], f"vit-pytorch ran, ours failed: {ours['msg']}"
    assert _rel(ours["y"], ref["y"]) < 1e-4
    assert ours["grads"].keys() == ref["grads"].keys()
    for n in ref["grads"]:
        assert _rel(ours["grads"][n], ref["grads"][n]) < 1e-4, n


# ---------------------------------------------------------------------------------------
# Modifications torch runs module by module (hooks, pruning, parametrizations, modes).


def assert_same(ours: nn.Module, ref: nn.Module, fn, tol: float = 1e-4) -> None:
    """fn(model) -> output; outputs and every parameter gradient (by name) match."""
    yo, yr = fn(ours), fn(ref)
    torch.testing.assert_close(yo, yr, rtol=tol, atol=1e-6)
    yo.pow(2).sum().backward()
    yr.pow(2).sum().backward()
    go = {n: p.grad for n, p in ours.named_parameters() if p.numel()}
    gr = {n: p.grad for n, p in ref.named_parameters() if p.numel()}
    assert go.keys() == gr.keys()
    for n in gr:
        assert (go[n] is None) == (gr[n] is None), n
        if gr[n] is not None:
            assert _rel(go[n], gr[n]) < tol, n


def test_forward_hooks_on_submodules_run_as_in_vit_pytorch():
    ref, ours = pair()
    x = randn(3, 3, 8, 8)
    calls: dict[str, list[str]] = {"ref": [], "ours": []}
    for tag, m in (("ref", ref), ("ours", ours)):
        attn = m.transformer.layers[0][0]
        attn.register_forward_hook(lambda mod, inp, out, tag=tag: calls[tag].append("attn") or out * 1.5)
        attn.to_qkv.register_forward_pre_hook(lambda mod, inp, tag=tag: calls[tag].append("qkv-pre") or (inp[0] + 0.1,))
        attn.attend.register_forward_hook(lambda mod, inp, out, tag=tag: calls[tag].append("attend"))
        m.mlp_head.register_forward_hook(lambda mod, inp, out, tag=tag: calls[tag].append("head") or out - 1.0)
    assert_same(ours, ref, lambda m: m(x))
    assert calls["ours"] == calls["ref"] == ["qkv-pre", "attend", "attn", "head"]


def test_backward_hooks_on_submodules_run():
    ref, ours = pair()
    x = randn(2, 3, 8, 8)
    seen: dict[str, list[torch.Tensor]] = {"ref": [], "ours": []}
    for tag, m in (("ref", ref), ("ours", ours)):
        m.transformer.layers[1][1].register_full_backward_hook(lambda mod, gi, go, tag=tag: seen[tag].append(go[0].clone()))
    assert_same(ours, ref, lambda m: m(x))
    assert len(seen["ours"]) == len(seen["ref"]) == 1
    torch.testing.assert_close(seen["ours"][0], seen["ref"][0], rtol=1e-4, atol=1e-6)


def test_global_module_hooks_see_vit_pytorchs_module_calls():
    ref, ours = pair()
    x = randn(2, 3, 8, 8)
    order: list[str] = []
    names = {id(m): (tag, n) for tag, model in (("ref", ref), ("ours", ours)) for n, m in model.named_modules()}

    def hook(mod, inp, out):
        order.append(names.get(id(mod), ("?", type(mod).__name__)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yo = ours(x)
        seq_ours = [n for t, n in order if t == "ours"]
        order.clear()
        yr = ref(x)
        seq_ref = [n for t, n in order if t == "ref"]
    finally:
        handle.remove()
    torch.testing.assert_close(yo, yr, rtol=1e-4, atol=1e-6)
    assert seq_ours == seq_ref and "transformer.layers.0.0.to_qkv" in seq_ours


@pytest.mark.parametrize("amount", [0.3, 0.9])
def test_pruned_to_qkv_matches_vit_pytorch(amount):
    import torch.nn.utils.prune as prune

    ref, ours = pair()
    x = randn(3, 3, 8, 8)
    for m in (ref, ours):
        prune.l1_unstructured(m.transformer.layers[0][0].to_qkv, "weight", amount=amount)
    assert_same(ours, ref, lambda m: m(x))
    # made permanent: a plain model again, on the kernels
    for m in (ref, ours):
        prune.remove(m.transformer.layers[0][0].to_qkv, "weight")
        m.zero_grad()
    assert ours._module_path_reason(x) is None
    assert_same(ours, ref, lambda m: m(x))


def test_parametrized_weight_matches_vit_pytorch():
    import torch.nn.utils.parametrize as parametrize

    class Scaled(nn.Module):
        def forward(self, w):
            return w * 0.5 + 0.01

    ref, ours = pair()
    x = randn(3, 3, 8, 8)
    for m in (ref, ours):
        parametrize.register_parametrization(m.transformer.layers[1][1].net[1], "weight", Scaled())
        torch.nn.utils.parametrizations.weight_norm(m.mlp_head)
    assert_same(ours, ref, lambda m: m(x))


def test_training_with_a_changed_dropout_rate_draws_vit_pytorchs_masks():
    """Dropout rates other than the configuration's: the module path draws torch's masks in
    vit-pytorch's order, so the same seed gives the same output."""
    ref, ours = pair(dict(KW, dropout=0.1, emb_dropout=0.1))
    x = randn(3, 3, 8, 8)
    for m in (ref, ours):
        m.train()
        m.transformer.layers[0][1].net[3].p = 0.5
    torch.manual_seed(7)
    yo = ours(x)
    torch.manual_seed(7)
    yr = ref(x)
    torch.testing.assert_close(yo, yr, rtol=1e-4, atol=1e-6)


def test_torch_function_mode_sees_every_op():
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.linears = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.linears += func is F.linear
            return func(*args, **(kwargs or {}))

    ref, ours = pair()
    x = randn(2, 3, 8, 8)
    with Count() as co:
        yo = ours(x)
    with Count() as cr:
        yr = ref(x)
    torch.testing.assert_close(yo, yr, rtol=1e-4, atol=1e-6)
    assert co.linears == cr.linears > 0


def test_meta_model_and_meta_images_give_the_output_shape():
    ref, ours = pair()
    ref, ours = ref.to("meta"), ours.to("meta")
    x = torch.empty(4, 3, 8, 8, device="meta")
    yo, yr = ours(x), ref(x)
    assert yo.device.type == "meta" and yo.shape == yr.shape == (4, 5)


def test_images_on_another_device_than_a_parameter():
    _, ours = pair()
    ours.transformer.layers[0][1].net[1].bias = nn.Parameter(torch.empty(32, device="meta"))
    with pytest.raises(ValueError, match=r"transformer\.layers\.0\.1\.net\.1\.bias on meta"):
        ours(randn(2, 3, 8, 8))


def test_plain_models_still_take_the_kernels():
    """None of the checks sends an unmodified model (any configuration, dtype, autocast,
    no_grad, timm import) to the module path."""
    configs = [
        KW,
        dict(KW, pool="mean"),
        dict(KW, heads=1, dim_head=DIM),
        dict(KW, qkv_bias=True, patch_norm=False, pool="mean", class_token=True, fc_norm=True, layer_norm_eps=1e-6),
        dict(KW, dropout=0.1, emb_dropout=0.1),
    ]
    x = randn(2, 3, 8, 8)
    for kw in configs:
        model = ViT(**kw)
        for m, xx in ((model, x), (copy.deepcopy(model).double(), x.double())):
            assert m._module_path_reason(xx) is None, kw
            m.eval()
            assert m._module_path_reason(xx) is None, kw
        with torch.no_grad():
            model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x).float().sum().backward()
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return
    if True:
        tm = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3, global_pool="avg")
        ours = ViT.from_timm(tm)
        assert ours._module_path_reason(torch.randn(1, 3, 16, 16)) is None


def test_kernel_path_is_used_for_plain_models(monkeypatch):
    def refuse(self, img):
        raise AssertionError("module path taken")

    monkeypatch.setattr(ViT, "_module_forward", refuse)
    ref, ours = pair()
    x = randn(2, 3, 8, 8)
    assert_same(ours, ref, lambda m: m(x))
    # widths the configuration leaves free stay on the kernels too
    for m in (ref, ours):
        m.mlp_head = linear(DIM, 3)
        m.transformer.layers[1][1].net[1] = linear(DIM, 40)
        m.transformer.layers[1][1].net[4] = linear(40, DIM)
        m.zero_grad()
    assert_same(ours, ref, lambda m: m(x))


def test_function_checks_what_it_hands_the_kernels():
    """_ViTFunction (and the no-grad call) refuse tensors that do not fit the configuration,
    whoever calls them."""
    from ferrotorch.nn.vit import _layout, _native_args, _ViTFunction

    _, ours = pair()
    x = randn(2, 3, 8, 8)
    cfg = ours._config(train=False)
    params = ours._ordered_params()
    names = [n for n, _ in _layout(cfg, (8, 8))]
    assert sorted(names) == sorted(n for n, p in ours.named_parameters() if p.numel())  # state_dict names
    assert [tuple(p.shape) for p in params] == [tuple(ours.get_parameter(n).shape) for n in names]

    def swap(name, t):
        return [t if n == name else p for n, p in zip(names, params)]

    with pytest.raises(ValueError, match=r"parameter transformer\.norm\.weight has shape \(8,\), expected \(32,\)"):
        _ViTFunction.apply(cfg, x, *swap("transformer.norm.weight", torch.ones(8, requires_grad=True)))
    with pytest.raises(ValueError, match=f"got {len(params) - 1} parameters, the configuration uses {len(params)}"):
        _ViTFunction.apply(cfg, x, *params[:-1])
    with pytest.raises(TypeError, match=r"parameter transformer\.layers\.1\.0\.norm\.bias has dtype torch\.float64"):
        _ViTFunction.apply(cfg, x, *swap("transformer.layers.1.0.norm.bias", torch.zeros(DIM, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"images of shape \(batch, 3, H, W\).*got \(2, 1, 8, 8\)"):
        _ViTFunction.apply(cfg, randn(2, 1, 8, 8), *params)
    # the no-grad call goes through the same check (ViT.forward marks what it checked)
    with pytest.raises(ValueError, match=r"to_qkv\.weight has shape \(24, 32\), expected \(48, 32\)"):
        _native_args(cfg, x, swap("transformer.layers.0.0.to_qkv.weight", torch.zeros(24, DIM)))


# ---------------------------------------------------------------------------------------
# Double backward (create_graph=True).


def gradient_penalty(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    y = model(x)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    return y.sum() + g.pow(2).sum()


@pytest.mark.parametrize(
    "kw",
    [KW, dict(KW, pool="mean"), dict(KW, heads=1, dim_head=DIM), dict(KW, depth=3, image_size=(8, 12), patch_size=(2, 4))],
    ids=["cls", "mean", "no-out-projection", "rectangular"],
)
def test_gradient_penalty_matches_vit_pytorch(kw):
    ref, ours = pair(kw)
    size = kw["image_size"] if isinstance(kw["image_size"], tuple) else (kw["image_size"],) * 2
    x = torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(2))
    lo, lr = gradient_penalty(ours, x), gradient_penalty(ref, x)
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
    lo.backward()
    lr.backward()
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        if b.numel():
            assert _rel(a.grad, b.grad) < 1e-4, n
    head = _rel(ours.mlp_head.weight.grad.norm(), ref.mlp_head.weight.grad.norm())
    assert head < 1e-4


def test_gradient_penalty_matches_timm():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    tm = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=3, global_pool="avg", fc_norm=True)
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = ViT.from_timm(tm)
    for b in tm.blocks:  # torch's fused CPU attention has no double backward
        b.attn.fused_attn = False
    x = torch.randn(2, 3, 16, 16)
    lo, lt = gradient_penalty(ours, x), gradient_penalty(tm, x)
    torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-5)
    lo.backward()
    lt.backward()
    assert _rel(ours.mlp_head.weight.grad, tm.head.weight.grad) < 1e-4
    assert _rel(ours.transformer.layers[1][0].to_qkv.weight.grad, tm.blocks[1].attn.qkv.weight.grad) < 1e-4
    del timm


@pytest.mark.parametrize("variant", ["cls", "mean-timm"])
def test_double_backward_with_dropout_gradgradcheck(variant):
    """With dropout on, the torch-op recomputation draws the kernels' masks (its logits equal
    the kernels' to rounding), and gradgradcheck passes on it."""
    from ferrotorch import _native
    from ferrotorch.nn.vit import _functional_forward, _ViTFunction

    torch.manual_seed(5)
    kw = dict(image_size=4, patch_size=2, num_classes=3, dim=6, depth=2, heads=2, mlp_dim=8, dim_head=3, channels=1, dropout=0.3, emb_dropout=0.2)
    if variant == "mean-timm":
        kw.update(pool="mean", qkv_bias=True, patch_norm=False, class_token=True, fc_norm=True)
    model = ViT(**kw).double()
    cfg = model._config(train=True)
    params = model._ordered_params()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        native = _native.vit_forward(x.detach(), [p.detach() for p in params], **dict(cfg, fused=fused))[0]
        torch.testing.assert_close(_functional_forward(cfg, x, params).detach(), native, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda x, *p: _ViTFunction.apply(cfg, x, *p), (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_double_backward_refuses_images_changed_in_place():
    _, ours = pair()
    x = randn(2, 3, 8, 8).requires_grad_()
    xi = x * 1.0
    y = ours(xi)
    with torch.no_grad():
        xi.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    # without create_graph the kernels' saved activations are used: fine, as in vit-pytorch
    torch.autograd.grad(ours(xi).sum(), x)


def test_tied_parameter_gets_the_sum_of_both_uses_under_double_backward():
    """A tensor passed twice (tied weights) gets each use's gradient once."""
    ref, ours = pair(dict(KW, mlp_dim=DIM))
    for m in (ref, ours):
        m.transformer.layers[0][1].net[4].weight = m.transformer.layers[0][1].net[1].weight
    x = randn(2, 3, 8, 8)
    lo, lr = gradient_penalty(ours, x), gradient_penalty(ref, x)
    lo.backward()
    lr.backward()
    w_o, w_r = ours.transformer.layers[0][1].net[1].weight, ref.transformer.layers[0][1].net[1].weight
    assert _rel(w_o.grad, w_r.grad) < 1e-4


if __name__ == "__main__":
    print(json.dumps(_run_case(sys.argv[1])))
