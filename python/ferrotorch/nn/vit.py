"""A Vision Transformer whose forward and backward passes run in Rust.

``ViT`` has vit-pytorch 1.26's constructor and state_dict keys, so its weights load both
ways; training works in an ordinary loop (``loss.backward()`` fills every ``.grad``).

    model = ViT(image_size=32, patch_size=4, num_classes=10, dim=256, depth=6, heads=8, mlp_dim=512)
    loss = F.cross_entropy(model(images), labels); loss.backward()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _native
from ..errors import FerrotorchTypeError, FerrotorchValueError

__all__ = ["ViT"]


def _pair(t: int | tuple[int, int]) -> tuple[int, int]:
    return t if isinstance(t, tuple) else (t, t)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = dim_head * heads
        self.project_out = not (heads == 1 and dim_head == dim)
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if self.project_out else nn.Identity()


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))


class _Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            [nn.ModuleList([_Attention(dim, heads, dim_head, dropout), _FeedForward(dim, mlp_dim, dropout)]) for _ in range(depth)]
        )


class _ViTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, cfg: dict[str, Any], x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits, tape = _native.vit_forward(x.detach().contiguous(), [p.detach() for p in params], **cfg)
        ctx.tape = tape
        return logits

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grads = ctx.tape.backward(grad.contiguous())
        return (None, *grads)


class ViT(nn.Module):
    """vit-pytorch's ``ViT`` (same arguments, same parameters and state_dict keys), with the
    forward and backward passes in Rust.

        model = ViT(image_size=32, patch_size=4, num_classes=10, dim=256, depth=6, heads=8, mlp_dim=512)
        model.load_state_dict(vit_pytorch_model.state_dict())
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int | tuple[int, int],
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        pool: str = "cls",
        channels: int = 3,
        dim_head: int = 64,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        ih, iw = _pair(image_size)
        ph, pw = _pair(patch_size)
        for name, v in (("image_size", ih), ("image_size", iw), ("patch_size", ph), ("patch_size", pw), ("dim", dim), ("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim), ("channels", channels), ("dim_head", dim_head), ("num_classes", num_classes)):
            if not isinstance(v, int) or v <= 0:
                raise FerrotorchValueError(f"ViT: {name} must be a positive int, got {v!r}")
        if ih % ph or iw % pw:
            raise FerrotorchValueError(f"ViT: image size {ih}x{iw} is not divisible by the patch size {ph}x{pw}")
        if pool not in ("cls", "mean"):
            raise FerrotorchValueError(f"ViT: pool must be 'cls' or 'mean', got {pool!r}")
        for name, p in (("dropout", dropout), ("emb_dropout", emb_dropout)):
            if not 0.0 <= p <= 1.0:
                raise FerrotorchValueError(f"ViT: {name} must be in [0, 1], got {p!r}")
        self.image_size, self.patch_size, self.channels = (ih, iw), (ph, pw), channels
        self.dim, self.depth, self.heads, self.dim_head = dim, depth, heads, dim_head
        self.dropout_p, self.emb_dropout_p = dropout, emb_dropout
        num_patches = (ih // ph) * (iw // pw)
        patch_dim = channels * ph * pw
        num_cls = 1 if pool == "cls" else 0
        # Index 0 stands where vit-pytorch's Rearrange is, so the keys match (.1, .2, .3).
        self.to_patch_embedding = nn.Sequential(nn.Identity(), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.cls_token = nn.Parameter(torch.randn(num_cls, dim))
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + num_cls, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = _Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes)

    def _ordered_params(self) -> list[torch.Tensor]:
        pe = self.to_patch_embedding
        ps = [pe[1].weight, pe[1].bias, pe[2].weight, pe[2].bias, pe[3].weight, pe[3].bias]
        if self.pool == "cls":
            ps.append(self.cls_token)
        ps.append(self.pos_embedding)
        for attn, ff in self.transformer.layers:
            ps += [attn.norm.weight, attn.norm.bias, attn.to_qkv.weight]
            if attn.project_out:
                ps += [attn.to_out[0].weight, attn.to_out[0].bias]
            ps += [ff.net[0].weight, ff.net[0].bias, ff.net[1].weight, ff.net[1].bias, ff.net[4].weight, ff.net[4].bias]
        ps += [self.transformer.norm.weight, self.transformer.norm.bias, self.mlp_head.weight, self.mlp_head.bias]
        return ps

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor):
            raise FerrotorchTypeError(f"ViT: expected a torch.Tensor of images, got {type(img).__name__}")
        want = (self.channels, *self.image_size)
        if img.dim() != 4 or tuple(img.shape[1:]) != want:
            raise FerrotorchValueError(f"ViT: expected images of shape (batch, {want[0]}, {want[1]}, {want[2]}), got {tuple(img.shape)}")
        params = self._ordered_params()
        p0 = params[0]
        if img.dtype != p0.dtype:
            raise FerrotorchTypeError(f"ViT: images have dtype {img.dtype}, the model's parameters {p0.dtype}")
        if img.device != p0.device:
            raise FerrotorchValueError(f"ViT: images are on {img.device}, the model on {p0.device}")
        cfg = dict(
            patch=self.patch_size,
            channels=self.channels,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            dim_head=self.dim_head,
            pool_cls=self.pool == "cls",
            project_out=self.transformer.layers[0][0].project_out,
            dropout=float(self.dropout_p),
            emb_dropout=float(self.emb_dropout_p),
            train=self.training,
        )
        return _ViTFunction.apply(cfg, img, *params)
