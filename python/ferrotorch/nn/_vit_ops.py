"""The ViT's math as differentiable torch ops, parameters in ``ferrotorch.nn.ViT``'s order.

Two users: CUDA images (the whole forward, attention through torch's fused
``scaled_dot_product_attention``), and double backward on the CPU (``create_graph=True``
recomputes the forward here and differentiates it). Dropout masks are a port of the Rust
kernels' (src/vit's ``Run::drop`` and ``torch_mask``), so both paths draw the same ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def patchify(img: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'``: vit-pytorch's ``Rearrange``."""
    b, c, hh, ww = img.shape
    gh, gw = hh // ph, ww // pw
    return img.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, ph * pw * c)


class _FusedAttention(torch.autograd.Function):
    """``softmax(q k^T * scale) v`` through ``F.scaled_dot_product_attention`` (torch's
    flash / memory-efficient kernels on a GPU). Those kernels' backward is not itself
    differentiable, so under ``create_graph=True`` the backward recomputes the attention
    as explicit products and differentiates that, as vit-pytorch's graph would be."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        with torch.enable_grad():
            inner = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*inner, scale=scale)
        ctx.save_for_backward(q, k, v)
        ctx.inner, ctx.out, ctx.scale = inner, out, scale
        return out.detach()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        need = [i for i, w in enumerate(ctx.needs_input_grad[:3]) if w]
        if torch.is_grad_enabled():
            out = torch.matmul(torch.matmul(q * ctx.scale, k.transpose(-1, -2)).softmax(-1), v)
            wrt = [(q, k, v)[i] for i in need]
            grads = torch.autograd.grad(out, wrt, g, create_graph=True, allow_unused=True)
        else:
            # retain_graph: a second backward over a retained outer graph needs it again
            wrt = [ctx.inner[i] for i in need]
            grads = torch.autograd.grad(ctx.out, wrt, g, retain_graph=True, allow_unused=True)
        res: list[Any] = [None, None, None, None]
        for i, gr in zip(need, grads):
            res[i] = gr
        return tuple(res)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FusedAttention.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _site_seed(seed: int, site: int) -> int:
    """``Run::drop``'s per-site seed: splitmix64's finalizer of ``seed ^ (site+1)*golden``."""
    z = (seed ^ (((site + 1) * 0x9E3779B97F4A7C15) & _M64)) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _mask(p: float, seed: int, like: torch.Tensor) -> torch.Tensor:
    """``torch_mask``: ``keep * 1/(1-p)`` shaped like ``like``, element i kept when two
    ``lowbias32`` rounds of (i, seed) fall under the threshold (int64 ops wrap as u32 here)."""

    def mix(v: torch.Tensor) -> torch.Tensor:
        v = v ^ (v >> 16)
        v = (v * 0x7FEB352D) & _M32
        v = v ^ (v >> 15)
        v = (v * 0x846CA68B) & _M32
        return v ^ (v >> 16)

    idx = torch.arange(like.numel(), dtype=torch.int64, device=like.device)
    lo = (idx & _M32) ^ (seed & _M32)
    hi = ((idx >> 32) * 0x9E3779B9) & _M32
    v = mix(mix(lo) ^ (seed >> 32) ^ hi)
    threshold = math.floor((1.0 - min(max(p, 0.0), 1.0)) * (1 << 24) + 0.5)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return ((v >> 8) < threshold).to(like.dtype).mul(scale).reshape(like.shape)


def _functional_forward(cfg: dict[str, Any], x: torch.Tensor, params: list[torch.Tensor], sdpa: bool = False) -> torch.Tensor:
    """``vit_forward``'s logits as differentiable torch ops (``params`` in its order). With
    ``sdpa``, attention without active dropout runs as ``F.scaled_dot_product_attention``
    (torch's fused attention kernels; the same math up to rounding)."""
    it = iter(params)
    ph, pw = cfg["patch"]
    dim, nh, dh, eps = cfg["dim"], cfg["heads"], cfg["dim_head"], cfg["eps"]
    inner, scale = nh * dh, float(dh) ** -0.5
    b, c, hh, ww = x.shape

    def drop(t: torch.Tensor, p: float, site: int) -> torch.Tensor:
        if not cfg["train"] or p <= 0:
            return t
        return t * _mask(p, _site_seed(cfg["seed"], site), t)

    def ln(t: torch.Tensor) -> torch.Tensor:
        w, bias = next(it), next(it)
        return F.layer_norm(t, (t.shape[-1],), w, bias, eps)

    def lin(t: torch.Tensor, bias: bool = True) -> torch.Tensor:
        w = next(it)
        return F.linear(t, w, next(it) if bias else None)

    h = patchify(x, ph, pw)
    if cfg["patch_norm"]:
        h = ln(h)
    h = lin(h)
    if cfg["patch_norm"]:
        h = ln(h)
    ncls = 0
    if cfg["cls_token"]:
        cls = next(it)
        ncls = cls.shape[0]
        h = torch.cat([cls.unsqueeze(0).expand(b, ncls, dim), h], 1)
    seq = h.shape[1]
    h = drop(h + next(it)[:seq], cfg["emb_dropout"], 0)
    p_drop = cfg["dropout"]
    fused_attn = sdpa and (not cfg["train"] or p_drop <= 0)
    pruned = False
    for i in range(cfg["depth"]):
        a = ln(h)
        w_qkv = next(it)
        b_qkv = next(it) if cfg["qkv_bias"] else None
        out = (next(it), next(it)) if cfg["project_out"] else None
        if cfg["pool_cls"] and i + 1 == cfg["depth"]:
            # the last layer on token 0 alone (its keys and values from every token)
            pruned = True
            q = F.linear(a[:, 0], w_qkv[:inner], None if b_qkv is None else b_qkv[:inner])
            kv = F.linear(a, w_qkv[inner:], None if b_qkv is None else b_qkv[inner:]).reshape(b, seq, 2, nh, dh)
            kh, vh = kv[:, :, 0].permute(0, 2, 1, 3), kv[:, :, 1].permute(0, 2, 1, 3)
            if fused_attn:
                o = _attention(q.reshape(b, nh, 1, dh), kh, vh, scale).reshape(b, inner)
            else:
                qh = q.reshape(b, nh, 1, dh) * scale
                probs = drop(torch.matmul(qh, kh.transpose(-1, -2)).softmax(-1), p_drop, 1 + 4 * i)
                o = torch.matmul(probs, vh).reshape(b, inner)
            h = h[:, 0]
        elif fused_attn:
            q, k, v = F.linear(a, w_qkv, b_qkv).reshape(b, seq, 3, nh, dh).permute(2, 0, 3, 1, 4)
            o = _attention(q, k, v, scale).permute(0, 2, 1, 3).reshape(b, seq, inner)
        else:
            q, k, v = qkv = F.linear(a, w_qkv, b_qkv).reshape(b, seq, 3, nh, dh).permute(2, 0, 3, 1, 4).reshape(3, b * nh, seq, dh)
            del qkv
            probs = drop(torch.bmm(q * scale, k.transpose(-1, -2)).softmax(-1), p_drop, 1 + 4 * i)
            o = torch.bmm(probs, v).reshape(b, nh, seq, dh).permute(0, 2, 1, 3).reshape(b, seq, inner)
        h = h + (drop(F.linear(o, *out), p_drop, 2 + 4 * i) if out is not None else o)
        g = drop(F.gelu(lin(ln(h))), p_drop, 3 + 4 * i)
        h = h + drop(lin(g), p_drop, 4 + 4 * i)

    def pool(t: torch.Tensor) -> torch.Tensor:
        return t if pruned else t[:, 0] if cfg["pool_cls"] else t[:, ncls:].mean(1)

    pooled = ln(pool(h)) if pruned or cfg["norm_after_pool"] else pool(ln(h))
    return lin(pooled)
