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
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        inner = dim_head * heads
        self.project_out = not (heads == 1 and dim_head == dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if self.project_out else nn.Identity()


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))


class _Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            [nn.ModuleList([_Attention(dim, heads, dim_head, dropout, qkv_bias, eps), _FeedForward(dim, mlp_dim, dropout, eps)]) for _ in range(depth)]
        )


class _ViTFunction(torch.autograd.Function):
    """Rust forward and backward. The activations the backward needs go through
    ``ctx.save_for_backward``, so torch frees them after ``backward()`` (or keeps them under
    ``retain_graph=True``) and catches parameters modified in place before backward."""

    @staticmethod
    def forward(ctx: Any, cfg: dict[str, Any], x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits, saved, run = _native.vit_forward(x.detach(), [p.detach() for p in params], **cfg)
        ctx.run = run
        ctx.n_params = len(params)
        ctx.save_for_backward(*params, *saved)
        return logits

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        tensors = ctx.saved_tensors
        n = ctx.n_params
        grads = _native.vit_backward(ctx.run, grad, list(tensors[:n]), list(tensors[n:]))
        return (None, *grads)


class ViT(nn.Module):
    """vit-pytorch's ``ViT`` (same arguments, same parameters and state_dict keys), with the
    forward and backward passes in Rust.

        model = ViT(image_size=32, patch_size=4, num_classes=10, dim=256, depth=6, heads=8, mlp_dim=512)
        model.load_state_dict(vit_pytorch_model.state_dict())

    The keyword options after ``emb_dropout`` describe timm's plain ``VisionTransformer``
    instead (``ViT.from_timm(model)`` sets them): ``qkv_bias``, ``layer_norm_eps``,
    ``patch_norm=False`` (no LayerNorm around the patch projection), ``class_token``
    (default: ``pool == "cls"``) and ``fc_norm`` (the final LayerNorm runs on the pooled
    vector).

    When nothing needs a gradient (``torch.no_grad()``, frozen weights) the forward pass
    keeps no activations and runs ``inference_chunk`` images at a time, so each chunk's
    activations stay in cache.
    """

    #: Images per chunk of a forward pass that needs no gradient (0: the whole batch at once).
    inference_chunk: int = 64

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
        qkv_bias: bool = False,
        layer_norm_eps: float = 1e-5,
        patch_norm: bool = True,
        class_token: bool | None = None,
        fc_norm: bool = False,
    ) -> None:
        super().__init__()
        ih, iw = _pair(image_size)
        ph, pw = _pair(patch_size)
        for name, v in (("image_size", ih), ("image_size", iw), ("patch_size", ph), ("patch_size", pw), ("dim", dim), ("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim), ("channels", channels), ("dim_head", dim_head), ("num_classes", num_classes)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise FerrotorchValueError(f"ViT: {name} must be a positive int, got {v!r}")
        if ih % ph or iw % pw:
            raise FerrotorchValueError(f"ViT: image size {ih}x{iw} is not divisible by the patch size {ph}x{pw}")
        if pool not in ("cls", "mean"):
            raise FerrotorchValueError(f"ViT: pool must be 'cls' or 'mean', got {pool!r}")
        for name, p in (("dropout", dropout), ("emb_dropout", emb_dropout)):
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise FerrotorchValueError(f"ViT: {name} must be a number in [0, 1], got {p!r}")
        if not isinstance(layer_norm_eps, (int, float)) or not layer_norm_eps > 0:
            raise FerrotorchValueError(f"ViT: layer_norm_eps must be a positive number, got {layer_norm_eps!r}")
        if class_token is None:
            class_token = pool == "cls"
        if pool == "cls" and not class_token:
            raise FerrotorchValueError("ViT: pool='cls' needs class_token=True")
        self.image_size, self.patch_size, self.channels = (ih, iw), (ph, pw), channels
        self.dim, self.depth, self.heads, self.dim_head = dim, depth, heads, dim_head
        self.dropout_p, self.emb_dropout_p = float(dropout), float(emb_dropout)
        self.qkv_bias, self.layer_norm_eps, self.patch_norm = bool(qkv_bias), float(layer_norm_eps), bool(patch_norm)
        self.class_token, self.fc_norm = bool(class_token), bool(fc_norm)
        num_patches = (ih // ph) * (iw // pw)
        patch_dim = channels * ph * pw
        num_cls = 1 if class_token else 0
        eps = self.layer_norm_eps
        # Index 0 stands where vit-pytorch's Rearrange is, so the keys match (.1, .2, .3).
        norm_in: nn.Module = nn.LayerNorm(patch_dim, eps=eps) if patch_norm else nn.Identity()
        norm_out: nn.Module = nn.LayerNorm(dim, eps=eps) if patch_norm else nn.Identity()
        self.to_patch_embedding = nn.Sequential(nn.Identity(), norm_in, nn.Linear(patch_dim, dim), norm_out)
        self.cls_token = nn.Parameter(torch.randn(num_cls, dim))
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + num_cls, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = _Transformer(dim, depth, heads, dim_head, mlp_dim, dropout, self.qkv_bias, eps)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes)

    def _ordered_params(self) -> list[torch.Tensor]:
        pe = self.to_patch_embedding
        ps: list[torch.Tensor] = []
        if self.patch_norm:
            ps += [pe[1].weight, pe[1].bias]
        ps += [pe[2].weight, pe[2].bias]
        if self.patch_norm:
            ps += [pe[3].weight, pe[3].bias]
        if self.class_token:
            ps.append(self.cls_token)
        ps.append(self.pos_embedding)
        for attn, ff in self.transformer.layers:
            ps += [attn.norm.weight, attn.norm.bias, attn.to_qkv.weight]
            if self.qkv_bias:
                ps.append(attn.to_qkv.bias)
            if attn.project_out:
                ps += [attn.to_out[0].weight, attn.to_out[0].bias]
            ps += [ff.net[0].weight, ff.net[0].bias, ff.net[1].weight, ff.net[1].bias, ff.net[4].weight, ff.net[4].bias]
        ps += [self.transformer.norm.weight, self.transformer.norm.bias, self.mlp_head.weight, self.mlp_head.bias]
        return ps

    def _config(self, train: bool) -> dict[str, Any]:
        drop = train and (self.dropout_p > 0 or self.emb_dropout_p > 0)
        # Dropout masks derive from one draw of torch's generator, so torch.manual_seed
        # makes them reproducible.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if drop else 0
        return dict(
            patch=self.patch_size,
            channels=self.channels,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            dim_head=self.dim_head,
            cls_token=self.class_token,
            pool_cls=self.pool == "cls",
            project_out=self.transformer.layers[0][0].project_out,
            patch_norm=self.patch_norm,
            qkv_bias=self.qkv_bias,
            norm_after_pool=self.fc_norm,
            eps=self.layer_norm_eps,
            dropout=self.dropout_p,
            emb_dropout=self.emb_dropout_p,
            train=train,
            seed=seed,
            # big CPU matmuls go through oneDNN unless the user switched it off
            onednn=bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor):
            raise FerrotorchTypeError(f"ViT: expected a torch.Tensor of images, got {type(img).__name__}")
        want = (self.channels, *self.image_size)
        if img.dim() != 4 or tuple(img.shape[1:]) != want:
            raise FerrotorchValueError(f"ViT: expected images of shape (batch, {want[0]}, {want[1]}, {want[2]}), got {tuple(img.shape)}")
        params = self._ordered_params()
        p0 = params[0]
        if img.device != p0.device:
            raise FerrotorchValueError(f"ViT: images are on {img.device}, the model on {p0.device}")
        if not img.is_floating_point():
            raise FerrotorchTypeError(f"ViT: images must be floating point, got {img.dtype}")
        dev = img.device.type
        if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            # Autocast: run the whole model in the autocast dtype (matmuls there, LayerNorm,
            # softmax and GELU computed in fp32 inside the kernels); the casts are autograd
            # ops, so fp32 parameters get fp32 gradients.
            dt = torch.get_autocast_dtype(dev)
            params = [p.to(dt) for p in params]
            img = img.to(dt)
            with torch.autocast(dev, enabled=False):
                return self._run(img, params)
        if img.dtype != p0.dtype:
            raise FerrotorchTypeError(f"ViT: images have dtype {img.dtype}, the model's parameters {p0.dtype}")
        return self._run(img, params)

    def _run(self, img: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        cfg = self._config(self.training)
        if torch.is_grad_enabled() and (img.requires_grad or any(p.requires_grad for p in params)):
            return _ViTFunction.apply(cfg, img, *params)
        # Nothing to differentiate (torch.no_grad(), inference_mode, frozen model): no
        # activations are kept, and the batch runs in cache-sized chunks.
        return _native.vit_forward(img.detach(), [p.detach() for p in params], **cfg, infer_chunk=self.inference_chunk)[0]

    @classmethod
    def from_timm(cls, model: nn.Module) -> "ViT":
        """A ``ViT`` with the weights of a timm ``VisionTransformer`` of the plain
        configuration (conv patch embedding, class token or average pooling, exact GELU,
        LayerNorm, no layer scale / register tokens / qk-norm / stochastic depth), giving the
        same logits.

            ours = ViT.from_timm(timm.create_model("vit_tiny_patch16_224", num_classes=10))
        """
        return _from_timm(cls, model)


def _from_timm(cls: type[ViT], m: nn.Module) -> ViT:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise FerrotorchValueError(f"ViT.from_timm: unsupported timm model: {what}")

    need(hasattr(m, "blocks") and hasattr(m, "patch_embed"), f"expected a timm VisionTransformer, got {type(m).__name__}")
    pe = m.patch_embed
    proj = pe.proj
    need(isinstance(proj, nn.Conv2d) and tuple(proj.kernel_size) == tuple(proj.stride) and proj.padding in ((0, 0), 0), "the patch embedding must be a Conv2d with stride = kernel")
    need(isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity), "patch_embed.norm must be Identity")
    need(getattr(pe, "flatten", True) and not getattr(pe, "dynamic_img_pad", False) and not getattr(m, "dynamic_img_size", False), "dynamic image size/padding")
    need(getattr(m, "num_reg_tokens", 0) == 0, "register tokens")
    need(not getattr(m, "no_embed_class", False) and m.pos_embed is not None, "pos embedding must cover the class token")
    need(isinstance(m.norm_pre, nn.Identity), "norm_pre must be Identity")
    need(getattr(m, "global_pool", "token") in ("token", "avg") and getattr(m, "attn_pool", None) is None, f"global_pool {getattr(m, 'global_pool', None)!r} (token or avg)")
    need(isinstance(m.head, nn.Linear), "the head must be a Linear (num_classes > 0)")
    need(isinstance(getattr(m, "patch_drop", nn.Identity()), nn.Identity), "patch dropout")
    eps = None
    blocks = list(m.blocks)
    need(len(blocks) > 0, "no blocks")
    a0 = blocks[0].attn
    for b in blocks:
        for norm in (b.norm1, b.norm2):
            need(isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None, "block norms must be affine LayerNorms")
            eps = norm.eps if eps is None else eps
            need(norm.eps == eps, "all LayerNorms must share one eps")
        for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
            need(isinstance(getattr(b, name, nn.Identity()), nn.Identity), f"{name} (layer scale / stochastic depth) must be Identity")
        at = b.attn
        need(isinstance(getattr(at, "q_norm", nn.Identity()), nn.Identity) and isinstance(getattr(at, "k_norm", nn.Identity()), nn.Identity), "qk-norm")
        need(isinstance(getattr(at, "norm", nn.Identity()), nn.Identity), "attention norm")
        mlp = b.mlp
        need(hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity), "the MLP must be fc1 -> GELU -> fc2")
        need(isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none", "the MLP activation must be exact GELU")
        need(mlp.fc1.bias is not None and mlp.fc2.bias is not None, "MLP biases")
        need((at.qkv.bias is not None) == (a0.qkv.bias is not None), "qkv bias on some blocks only")
    use_fc_norm = not isinstance(m.fc_norm, nn.Identity)
    final = m.fc_norm if use_fc_norm else m.norm
    need(isinstance(final, nn.LayerNorm) and final.eps == eps, "the final norm must be a LayerNorm with the blocks' eps")
    need(isinstance(m.norm if use_fc_norm else m.fc_norm, nn.Identity), "both norm and fc_norm set")
    rates = {b.attn.attn_drop.p for b in blocks} | {b.attn.proj_drop.p for b in blocks} | {b.mlp.drop1.p for b in blocks} | {b.mlp.drop2.p for b in blocks}
    need(len(rates) == 1, f"one dropout rate for attention, projection and MLP, got {sorted(rates)}")
    heads = a0.num_heads
    dim = m.embed_dim
    has_cls = m.cls_token is not None
    ours = cls(
        image_size=tuple(pe.img_size),  # type: ignore[arg-type]
        patch_size=tuple(pe.patch_size),  # type: ignore[arg-type]
        num_classes=m.head.out_features,
        dim=dim,
        depth=len(blocks),
        heads=heads,
        mlp_dim=blocks[0].mlp.fc1.out_features,
        pool="cls" if m.global_pool == "token" else "mean",
        channels=proj.in_channels,
        dim_head=a0.head_dim,
        dropout=rates.pop(),
        emb_dropout=m.pos_drop.p,
        qkv_bias=a0.qkv.bias is not None,
        layer_norm_eps=float(eps),  # type: ignore[arg-type]
        patch_norm=False,
        class_token=has_cls,
        fc_norm=use_fc_norm,
    )
    with torch.no_grad():
        w = proj.weight  # (dim, c, ph, pw) -> (dim, ph * pw * c), our patch order
        ours.to_patch_embedding[2].weight.copy_(w.permute(0, 2, 3, 1).reshape(dim, -1))
        ours.to_patch_embedding[2].bias.copy_(proj.bias if proj.bias is not None else torch.zeros(dim))
        if has_cls:
            ours.cls_token.copy_(m.cls_token.reshape(1, dim))
        ours.pos_embedding.copy_(m.pos_embed.reshape(-1, dim))
        for (attn, ff), b in zip(ours.transformer.layers, blocks):
            attn.norm.load_state_dict(b.norm1.state_dict())
            attn.to_qkv.load_state_dict(b.attn.qkv.state_dict())
            attn.to_out[0].load_state_dict(b.attn.proj.state_dict())
            ff.net[0].load_state_dict(b.norm2.state_dict())
            ff.net[1].load_state_dict(b.mlp.fc1.state_dict())
            ff.net[4].load_state_dict(b.mlp.fc2.state_dict())
        ours.transformer.norm.load_state_dict(final.state_dict())
        ours.mlp_head.load_state_dict(m.head.state_dict())
    return ours.to(dtype=w.dtype, device=w.device)
