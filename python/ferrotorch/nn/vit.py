"""A Vision Transformer whose forward and backward passes run in Rust.

``ViT`` has vit-pytorch 1.26's constructor and state_dict keys, so its weights load both
ways; training works in an ordinary loop (``loss.backward()`` fills every ``.grad``).

    model = ViT(image_size=32, patch_size=4, num_classes=10, dim=256, depth=6, heads=8, mlp_dim=512)
    loss = F.cross_entropy(model(images), labels); loss.backward()
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import _compat, _native
from ..errors import FerrotorchTypeError, FerrotorchValueError
from ._vit_ops import _functional_forward, patchify

__all__ = ["ViT"]


def _pair(t: int | tuple[int, int]) -> tuple[int, int]:
    return t if isinstance(t, tuple) else (t, t)


class _Patchify(nn.Module):
    """``'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'``: vit-pytorch's ``Rearrange`` (no parameters)."""

    def __init__(self, ph: int, pw: int) -> None:
        super().__init__()
        self.ph, self.pw = ph, pw

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return patchify(img, self.ph, self.pw)

    def extra_repr(self) -> str:
        return f"'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', p1={self.ph}, p2={self.pw}"


# The submodules below are vit-pytorch's, with its forward methods. The native kernels do
# not call them; ViT's module-by-module path does (hooks, parametrizations, replaced
# modules), so it computes exactly what vit-pytorch does with the same modules.


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        inner = dim_head * heads
        self.project_out = not (heads == 1 and dim_head == dim)
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if self.project_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        qkv = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in qkv)  # b n (h d) -> b h n d
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        attn = self.dropout(self.attend(dots))
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)  # b h n d -> b n (h d)
        return self.to_out(out)


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float, qkv_bias: bool, eps: float, norm_tokens: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        #: The final norm runs on every token here (vit-pytorch); timm's fc_norm runs it on the pooled vector instead.
        self.norm_tokens = norm_tokens
        self.layers = nn.ModuleList(
            [nn.ModuleList([_Attention(dim, heads, dim_head, dropout, qkv_bias, eps), _FeedForward(dim, mlp_dim, dropout, eps)]) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers: Any = self.layers
        for attn, ff in layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x) if self.norm_tokens else x


# ---------------------------------------------------------------------------------------
# What the native kernels accept. They read parameters as flat buffers of the sizes the
# configuration implies, so every tensor is checked against `_layout` before they run.


_LAYOUT_KEYS = ("patch", "channels", "dim", "depth", "heads", "dim_head", "cls_token", "patch_norm", "qkv_bias", "project_out")


def _layout(cfg: dict[str, Any], image_hw: tuple[int, int]) -> tuple[tuple[str, tuple[int | str, ...]], ...]:
    """``(state_dict name, expected shape)`` of every tensor ``vit_forward`` takes, in the
    order it takes them, for images of ``image_hw``. A str in a shape is a width the
    configuration leaves free (the head's classes, each layer's MLP width): it must be
    positive and the same wherever it appears."""
    return _layout_of(tuple(cfg[k] for k in _LAYOUT_KEYS), tuple(image_hw))


@functools.lru_cache(maxsize=64)
def _layout_of(key: tuple[Any, ...], image_hw: tuple[int, int]) -> tuple[tuple[str, tuple[int | str, ...]], ...]:
    cfg = dict(zip(_LAYOUT_KEYS, key))
    ph, pw = cfg["patch"]
    dim, heads, dim_head = cfg["dim"], cfg["heads"], cfg["dim_head"]
    inner, patch_dim = heads * dim_head, cfg["channels"] * ph * pw
    ncls = 1 if cfg["cls_token"] else 0
    seq = (image_hw[0] // ph) * (image_hw[1] // pw) + ncls
    out: list[tuple[str, tuple[int | str, ...]]] = []
    pe = "to_patch_embedding."
    if cfg["patch_norm"]:
        out += [(pe + "1.weight", (patch_dim,)), (pe + "1.bias", (patch_dim,))]
    out += [(pe + "2.weight", (dim, patch_dim)), (pe + "2.bias", (dim,))]
    if cfg["patch_norm"]:
        out += [(pe + "3.weight", (dim,)), (pe + "3.bias", (dim,))]
    if cfg["cls_token"]:
        out.append(("cls_token", (1, dim)))
    out.append(("pos_embedding", (seq, dim)))
    for i in range(cfg["depth"]):
        a, f, hid = f"transformer.layers.{i}.0.", f"transformer.layers.{i}.1.net.", f"mlp_dim of layer {i}"
        out += [(a + "norm.weight", (dim,)), (a + "norm.bias", (dim,)), (a + "to_qkv.weight", (3 * inner, dim))]
        if cfg["qkv_bias"]:
            out.append((a + "to_qkv.bias", (3 * inner,)))
        if cfg["project_out"]:
            out += [(a + "to_out.0.weight", (dim, inner)), (a + "to_out.0.bias", (dim,))]
        out += [(f + "0.weight", (dim,)), (f + "0.bias", (dim,)), (f + "1.weight", (hid, dim)), (f + "1.bias", (hid,)), (f + "4.weight", (dim, hid)), (f + "4.bias", (dim,))]
    out += [("transformer.norm.weight", (dim,)), ("transformer.norm.bias", (dim,)), ("mlp_head.weight", ("num_classes", dim)), ("mlp_head.bias", ("num_classes",))]
    return tuple(out)


def _plain_problem(t: object) -> str | None:
    """Why the kernels cannot read ``t`` as a flat buffer (None: they can, once contiguous)."""
    if not isinstance(t, torch.Tensor):
        return f"is {type(t).__name__}, not a tensor"
    if type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        return f"is a {type(t).__name__} (a tensor subclass), not a plain tensor"
    if t.layout != torch.strided or t.is_nested:
        return f"has layout {t.layout}, not torch.strided"
    if _compat.is_wrapped(t):
        return "is wrapped by a torch.func transform or functionalization"
    try:
        if t.data_ptr() == 0 and t.numel():
            return "has no storage"
    except (RuntimeError, NotImplementedError):
        return "has no storage"
    return None


class _Problems:
    """What keeps tensors from the kernels: ``hard`` problems (a device that differs, meta)
    are errors on every path; ``shape`` and ``dtype`` ones are errors unless torch itself
    accepts the model (the module path); ``other`` ones only send it to the module path."""

    def __init__(self) -> None:
        self.hard: list[str] = []
        self.shape: list[str] = []
        self.dtype: list[str] = []
        self.other: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.hard or self.shape or self.dtype or self.other)

    def error(self, where: str) -> Exception:
        """The error to raise for the shape/dtype/hard problems (the first few named)."""
        msgs = self.hard + self.shape + self.dtype + self.other
        more = f" (and {len(msgs) - 3} more)" if len(msgs) > 3 else ""
        text = f"{where}: " + "; ".join(msgs[:3]) + more
        if self.hard or self.shape:
            return FerrotorchValueError(text)
        return FerrotorchTypeError(text)


def _check_device(p: _Problems, name: str, t: torch.Tensor, device: torch.device) -> bool:
    if t.device != device:
        p.hard.append(f"parameter {name} is on {t.device}, the images on {device}")
        return False
    return True


def _check_tensors(cfg: dict[str, Any], x: torch.Tensor, params: list[Any], any_float: bool = False) -> _Problems:
    """Checks ``params`` (in ``vit_forward``'s order) against the layout ``cfg`` implies for
    images ``x``: plain strided tensors with storage, on ``x``'s device, of ``x``'s dtype
    (any floating dtype with ``any_float``, autocast casting them), of the expected shape."""
    p = _Problems()
    layout = _layout(cfg, (int(x.shape[-2]), int(x.shape[-1])))
    if len(params) != len(layout):
        p.shape.append(f"got {len(params)} parameters, the configuration uses {len(layout)}")
        return p
    free: dict[str, int] = {}
    for (name, want), t in zip(layout, params):
        why = _plain_problem(t)
        if why is not None:
            p.other.append(f"parameter {name} {why}")
            continue
        if not _check_device(p, name, t, x.device):
            continue
        if any_float:
            if not t.is_floating_point():
                p.dtype.append(f"parameter {name} has dtype {t.dtype}, expected a floating dtype")
        elif t.dtype != x.dtype:
            p.dtype.append(f"parameter {name} has dtype {t.dtype}, expected {x.dtype} (the images' dtype)")
        got = tuple(t.shape)
        ok = len(got) == len(want)
        if ok:
            for g, w in zip(got, want):
                if isinstance(w, str):
                    w = free.setdefault(w, g)
                    ok = ok and g > 0
                ok = ok and g == w
        if not ok:
            shown = tuple(free.get(w, w) if isinstance(w, str) else w for w in want)
            p.shape.append(f"parameter {name} has shape {got}, expected {shown}".replace("'", ""))
    return p


def _check_images(cfg: dict[str, Any], x: Any) -> None:
    """Images ``vit_forward`` may read: a plain strided floating tensor (B, channels, H, W),
    H and W multiples of the patch."""
    why = _plain_problem(x)
    if why is not None:
        raise FerrotorchTypeError(f"ViT: the images {why}")
    if not x.is_floating_point():
        raise FerrotorchTypeError(f"ViT: images must be floating point, got {x.dtype}")
    ph, pw = cfg["patch"]
    if x.dim() != 4 or x.shape[1] != cfg["channels"] or x.shape[2] % ph or x.shape[3] % pw:
        raise FerrotorchValueError(f"ViT: expected images of shape (batch, {cfg['channels']}, H, W) with H, W multiples of {ph}x{pw}, got {tuple(x.shape)}")


#: Put in a config (key "checked") by ViT.forward, which checked the tensors already.
_CHECKED = object()


def _native_args(cfg: dict[str, Any], x: torch.Tensor, params: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor, list[torch.Tensor]]:
    """``vit_forward``'s configuration and tensors: the images and parameters checked
    (raising on any problem; skipped when ``cfg["checked"]`` is ``_CHECKED``), detached,
    with negative views resolved (the kernels would read their memory as it is)."""
    cfg = dict(cfg)
    if cfg.pop("checked", None) is not _CHECKED:
        _check_images(cfg, x)
        problems = _check_tensors(cfg, x, list(params))
        if problems:
            raise problems.error("ViT")
    return cfg, x.detach().resolve_neg(), [t.detach().resolve_neg() for t in params]


class _ViTFunction(torch.autograd.Function):
    """Rust forward and backward. The activations the backward needs go through
    ``ctx.save_for_backward``, so torch frees them after ``backward()`` (or keeps them under
    ``retain_graph=True``) and catches parameters modified in place before backward.

    Under ``create_graph=True`` (double backward: gradient penalties, Hessian products) the
    backward recomputes the forward as torch ops and differentiates that, so the gradients
    it returns are themselves differentiable."""

    @staticmethod
    def forward(ctx: Any, cfg: dict[str, Any], x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        cfg, xd, pd = _native_args(cfg, x, params)
        logits, saved, run = _native.vit_forward(xd, pd, **cfg)
        ctx.run, ctx.cfg = run, cfg
        ctx.n_params = len(params)
        # kept only for double backward; not saved, as vit-pytorch does not keep the images
        ctx.x, ctx.x_version = x, x._version
        ctx.save_for_backward(*params, *saved)
        return logits

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        tensors = ctx.saved_tensors
        n = ctx.n_params
        if torch.is_grad_enabled():
            return (None, *_double_backward(ctx, grad, list(tensors[:n])))
        grads = _native.vit_backward(ctx.run, grad, list(tensors[:n]), list(tensors[n:]))
        return (None, *grads)


class _EmptyGrad(torch.autograd.Function):
    """Identity on ``out`` that gives the parameter ``empty`` (no elements) a zero-size
    gradient, as torch.cat does for vit-pytorch's empty cls token."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.like = (empty.shape, empty.dtype, empty.device)
        return out.clone()  # the logits: a few bytes per image

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        shape, dtype, device = ctx.like
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def _double_backward(ctx: Any, grad: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradients of ``_ViTFunction`` as a differentiable function of the images, the
    parameters and ``grad``: the forward recomputed as torch ops and differentiated with
    ``create_graph=True``."""
    x = ctx.x
    if x._version != ctx.x_version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"the ViT's input images are at version {x._version}; expected version {ctx.x_version} instead."
        )
    need = ctx.needs_input_grad[1:]
    with torch.enable_grad():
        # one alias per position, so a tensor passed twice gets each position's gradient
        inputs = [t.view_as(t) for t in (x, *params)]
        logits = _functional_forward(ctx.cfg, inputs[0], inputs[1:])
    wanted = [i for i, w in enumerate(need) if w]
    grads = torch.autograd.grad(logits, [inputs[i] for i in wanted], grad, create_graph=True, allow_unused=True)
    out: list[torch.Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        out[i] = g
    return out


_MISSING = object()


@functools.lru_cache(maxsize=64)
def _paths(layout: tuple[tuple[str, tuple[int | str, ...]], ...]) -> tuple[tuple[tuple[str, ...], str], ...]:
    """Each layout name split into its module path and the attribute at its end."""
    return tuple((tuple(name.split(".")[:-1]), name.rsplit(".", 1)[-1]) for name, _ in layout)


def _module_at(memo: dict[tuple[str, ...], Any], path: tuple[str, ...]) -> Any:
    """The submodule (or attribute) at ``path`` below ``memo[()]``, None where there is none;
    resolved prefixes are kept in ``memo`` for the call."""
    obj = memo.get(path, _MISSING)
    if obj is _MISSING:
        parent = _module_at(memo, path[:-1])
        mods = getattr(parent, "_modules", None)
        sub = mods.get(path[-1]) if isinstance(mods, dict) else None
        obj = sub if sub is not None else getattr(parent, path[-1], None)
        memo[path] = obj
    return obj


def _lookup_all(root: nn.Module, layout: tuple[tuple[str, tuple[int | str, ...]], ...]) -> list[Any]:
    """``root``'s attribute at each of ``layout``'s dotted names (None where there is none)."""
    memo: dict[tuple[str, ...], Any] = {(): root}
    out = []
    for path, last in _paths(layout):
        obj = _module_at(memo, path)
        params = getattr(obj, "_parameters", None)
        if isinstance(params, dict) and last in params:
            out.append(params[last])
        else:
            out.append(getattr(obj, last, None))
    return out


# A dispatch mode (FakeTensorMode...), a torch function mode other than set_default_device's,
# or torch.compile tracing: torch ops must see every step.
_modes_active = _compat.modes_active


def empty_cache() -> None:
    """Releases the activation buffers ``ViT`` keeps between training steps, as
    ``torch.cuda.empty_cache()`` does for CUDA's caching allocator. A step's activations and
    gradient temporaries are reused by the next step instead of going back to the C library
    (whose heap trim made every step fault their pages in again); up to 1 GiB waits for reuse.

        train(model, loader)          # each step reuses the last one's buffers
        ferrotorch.nn.empty_cache()   # then hand that memory back
    """
    _native.vit_empty_cache()


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
        # Index 0 is vit-pytorch's Rearrange, so the keys match (.1, .2, .3).
        norm_in: nn.Module = nn.LayerNorm(patch_dim, eps=eps) if patch_norm else nn.Identity()
        norm_out: nn.Module = nn.LayerNorm(dim, eps=eps) if patch_norm else nn.Identity()
        self.to_patch_embedding = nn.Sequential(_Patchify(ph, pw), norm_in, nn.Linear(patch_dim, dim), norm_out)
        self.cls_token = nn.Parameter(torch.randn(num_cls, dim))
        self.pos_embedding = nn.Parameter(torch.randn(num_patches + num_cls, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = _Transformer(dim, depth, heads, dim_head, mlp_dim, dropout, self.qkv_bias, eps, norm_tokens=not self.fc_norm)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes)

    def _ordered_params(self) -> list[torch.Tensor]:
        """The tensors ``vit_forward`` takes, in its order (``_layout``'s names)."""
        return _lookup_all(self, _layout(self._config(False, seed=False), self.image_size))

    def _config(self, train: bool, seed: bool = True) -> dict[str, Any]:
        drop = seed and train and (self.dropout_p > 0 or self.emb_dropout_p > 0)
        # Dropout masks derive from one draw of torch's generator, so torch.manual_seed
        # makes them reproducible.
        seed_value = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if drop else 0
        return dict(
            patch=self.patch_size,
            channels=self.channels,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            dim_head=self.dim_head,
            cls_token=self.class_token,
            pool_cls=self.pool == "cls",
            project_out=not (self.heads == 1 and self.dim_head == self.dim),
            patch_norm=self.patch_norm,
            qkv_bias=self.qkv_bias,
            norm_after_pool=self.fc_norm,
            eps=self.layer_norm_eps,
            dropout=self.dropout_p,
            emb_dropout=self.emb_dropout_p,
            train=train,
            seed=seed_value,
            # big CPU matmuls go through oneDNN unless the user switched it off
            onednn=bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if not isinstance(img, torch.Tensor):
            raise FerrotorchTypeError(f"ViT: expected a torch.Tensor of images, got {type(img).__name__}")
        want = (self.channels, *self.image_size)
        if img.dim() != 4 or tuple(img.shape[1:]) != want:
            raise FerrotorchValueError(f"ViT: expected images of shape (batch, {want[0]}, {want[1]}, {want[2]}), got {tuple(img.shape)}")
        if not img.is_floating_point():
            raise FerrotorchTypeError(f"ViT: images must be floating point, got {img.dtype}")
        if self._module_path_reason(img) is not None:
            return self._module_forward(img)
        dev = img.device.type
        autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
        params = self._ordered_params()
        if not autocast:
            dtypes = {p.dtype for p in params if isinstance(p, torch.Tensor)}
            if len(dtypes) == 1 and img.dtype not in dtypes:
                raise FerrotorchTypeError(f"ViT: images have dtype {img.dtype}, the model's parameters {dtypes.pop()}")
        problems = _check_tensors(self._config(False, seed=False), img, params, any_float=autocast)
        if problems:
            # Not what the kernels read (a resized or retyped parameter...): torch decides,
            # as vit-pytorch would; its error, if any, is reported by parameter.
            try:
                return self._module_forward(img)
            except Exception as e:
                if problems.hard or problems.shape or problems.dtype:
                    raise problems.error("ViT") from e
                raise
        if autocast:
            # Autocast: run the whole model in the autocast dtype (matmuls there, LayerNorm,
            # softmax and GELU computed in fp32 inside the kernels); the casts are autograd
            # ops, so fp32 parameters get fp32 gradients.
            dt = torch.get_autocast_dtype(dev)
            params = [p.to(dt) for p in params]
            img = img.to(dt)
            with torch.autocast(dev, enabled=False):
                return self._empty_grads(self._run(img, params))
        return self._empty_grads(self._run(img, params))

    def _empty_grads(self, out: torch.Tensor) -> torch.Tensor:
        """vit-pytorch concatenates its (0, dim) cls token even without one, so it gets an
        empty gradient rather than None; so does ours."""
        if out.requires_grad and not self.class_token and self.cls_token.requires_grad:
            return _EmptyGrad.apply(out, self.cls_token)
        return out

    def _run(self, img: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        cfg = self._config(self.training)
        if img.is_cuda:
            # On a GPU the step is kernel launches, not memory traffic: torch's autograd over
            # the same math with its fused attention (SDPA) beats both the tch-op path and
            # vit-pytorch's unfused attention (benchmarks/bench_gpu.py).
            return _functional_forward(cfg, img, params, sdpa=True)
        cfg["checked"] = _CHECKED  # by forward, just now
        if torch.is_grad_enabled() and (img.requires_grad or any(p.requires_grad for p in params)):
            return _ViTFunction.apply(cfg, img, *params)
        # Nothing to differentiate (torch.no_grad(), inference_mode, frozen model): no
        # activations are kept, and the batch runs in cache-sized chunks.
        cfg, xd, pd = _native_args(cfg, img, params)
        return _native.vit_forward(xd, pd, **cfg, infer_chunk=self.inference_chunk)[0]

    # -- the module-by-module path ---------------------------------------------------------

    def _module_path_reason(self, img: torch.Tensor) -> str | None:
        """Why this call must run module by module in torch (None: the kernels may run it):
        hooks, an active torch mode or transform, images the kernels cannot read, or modules
        other than the ones the configuration describes."""
        # Any tensor on another device (meta included: torch would read garbage) is an error
        # on every path.
        dev, hooked = img.device, None
        # Every submodule once, depth first in registration order (what modules() yields,
        # walked by hand: this runs on every forward).
        stack: list[nn.Module] = [self]
        seen: set[int] = set()
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            for tensors in (m._parameters, m._buffers):
                for t in tensors.values():
                    if t is not None and t.device != dev:
                        name = next(n for n, u in (*self.named_parameters(), *self.named_buffers()) if u is t)
                        raise FerrotorchValueError(f"ViT: images are on {dev}, the model's {name} on {t.device}")
            if hooked is None and m is not self and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
                hooked = m
            stack.extend(reversed([c for c in m._modules.values() if c is not None]))
        if hooked is not None:
            return "hooks on " + next(n for n, m in self.named_modules() if m is hooked)
        mod = torch.nn.modules.module
        if mod._global_forward_hooks or mod._global_forward_pre_hooks or mod._global_backward_hooks or mod._global_backward_pre_hooks:
            return "global module hooks"
        if _modes_active():
            return "a torch mode or torch.compile"
        why = _plain_problem(img)
        if why is not None:
            return f"the images {why}"
        return self._structure_problem(img)

    def _structure_problem(self, img: torch.Tensor) -> str | None:
        """The first module or attribute that differs from what the configuration describes
        (and the kernels compute), or None. Submodules and parameters are read from the
        modules' own dicts: this runs on every forward, and nn.Module's ``__getattr__`` and
        ``Sequential.__getitem__`` cost microseconds each."""
        dim, eps, p = self.dim, self.layer_norm_eps, self.dropout_p

        def kids(m: Any) -> list[Any]:
            return list(m._modules.values())

        def ln(m: Any) -> bool:
            return (
                type(m) is nn.LayerNorm
                and m.elementwise_affine
                and m._parameters.get("bias") is not None
                and len(m.normalized_shape) == 1
                and m.eps == eps
            )

        def dropout(m: Any, rate: float) -> bool:
            return type(m) is nn.Dropout and m.p == rate and m.training == self.training

        def lin(m: Any, bias: bool = True) -> bool:
            return type(m) is nn.Linear and (m._parameters.get("bias") is not None) == bias

        top = self._modules
        pe = top.get("to_patch_embedding")
        if not (type(pe) is nn.Sequential and len(pe) == 4):
            return "to_patch_embedding is not what the configuration describes"
        pe0, pe1, pe2, pe3 = kids(pe)
        norm = ln if self.patch_norm else (lambda m: type(m) is nn.Identity)
        checks: list[tuple[str, object]] = [
            ("to_patch_embedding.0", type(pe0) is _Patchify and (pe0.ph, pe0.pw) == self.patch_size),
            ("to_patch_embedding.1", norm(pe1)),
            ("to_patch_embedding.2", lin(pe2)),
            ("to_patch_embedding.3", norm(pe3)),
            ("pool", self.pool in ("cls", "mean") and (self.pool == "mean" or self.class_token)),
            ("dropout", dropout(top.get("dropout"), self.emb_dropout_p)),
            ("to_latent", type(top.get("to_latent")) is nn.Identity),
            ("mlp_head", lin(top.get("mlp_head"))),
        ]
        if not self.class_token:
            # not passed to the kernels; vit-pytorch concatenates it all the same
            t = self.cls_token
            checks.append(("cls_token", type(t) in (torch.Tensor, nn.Parameter) and tuple(t.shape) == (0, dim) and t.dtype == img.dtype))
        for name, good in checks:
            if not good:
                return f"{name} is not what the configuration describes"
        tr = top.get("transformer")
        if not (type(tr) is _Transformer and ln(tr._modules.get("norm")) and tr.norm_tokens == (not self.fc_norm)):
            return "transformer is not what the configuration describes"
        layers = tr._modules.get("layers")
        if not (type(layers) is nn.ModuleList and len(layers) == self.depth):
            return "transformer.layers is not what the configuration describes"
        project_out = not (self.heads == 1 and self.dim_head == dim)
        for i, layer in enumerate(kids(layers)):
            where = f"transformer.layers.{i}"
            parts = kids(layer) if type(layer) is nn.ModuleList else []
            if not (len(parts) == 2 and type(parts[0]) is _Attention and type(parts[1]) is _FeedForward):
                return f"{where} is not what the configuration describes"
            a, f = parts[0]._modules, parts[1]._modules
            to_out = a.get("to_out")
            if project_out:
                out_ok = type(to_out) is nn.Sequential and len(to_out) == 2 and lin(kids(to_out)[0]) and dropout(kids(to_out)[1], p)
            else:
                out_ok = type(to_out) is nn.Identity
            att = parts[0]
            if not (ln(a.get("norm")) and lin(a.get("to_qkv"), self.qkv_bias) and out_ok and att.heads == self.heads and att.scale == self.dim_head**-0.5):
                return f"{where}.0 is not what the configuration describes"
            attend = a.get("attend")
            if not (type(attend) is nn.Softmax and attend.dim in (-1, 3)):
                return f"{where}.0.attend is not what the configuration describes"
            if not dropout(a.get("dropout"), p):
                return f"{where}.0.dropout is not what the configuration describes"
            net = f.get("net")
            nk = kids(net) if type(net) is nn.Sequential else []
            ok = (
                len(nk) == 6
                and ln(nk[0])
                and lin(nk[1])
                and type(nk[2]) is nn.GELU
                and nk[2].approximate == "none"
                and dropout(nk[3], p)
                and lin(nk[4])
                and dropout(nk[5], p)
            )
            if not ok:
                return f"{where}.1.net is not what the configuration describes"
        return None

    def _module_forward(self, img: torch.Tensor) -> torch.Tensor:
        """vit-pytorch's forward with this model's own submodules (their hooks run), plus the
        timm options: the class token left out of mean pooling, the final norm after it."""
        batch = img.shape[0]
        x = self.to_patch_embedding(img)
        cls_tokens = self.cls_token.unsqueeze(0).expand(batch, *self.cls_token.shape)  # '... d -> b ... d'
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embedding[: x.shape[1]]
        x = self.dropout(x)
        x = self.transformer(x)
        if self.mlp_head is None:
            return x
        if self.pool == "mean":
            x = x[:, cls_tokens.shape[1] :].mean(dim=1) if self.class_token else x.mean(dim=1)
        else:
            x = x[:, 0]
        if self.fc_norm:
            x = self.transformer.norm(x)
        x = self.to_latent(x)
        return self.mlp_head(x)

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
