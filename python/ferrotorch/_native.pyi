"""Type stub of the compiled extension ``ferrotorch._native`` (kept in step by tests/test_stubs.py)."""

from collections.abc import Callable, Sequence
from typing import final

import torch

__all__ = [
    "__version__",
    "TORCH_VERSION",
    "OptimizerSpec",
    "optimizer_spec",
    "optimizer_names",
    "sparse_adam_step",
    "adafactor_group",
    "muon_group",
    "lbfgs_two_loop",
    "lbfgs_gather",
    "lbfgs_add",
    "lbfgs_set",
    "uses_torch_threads",
    "cpu_capability",
    "schedule_lrs",
    "scale_lrs",
    "narrow_tensor_lrs",
    "warm_restarts_step",
    "cyclic_step",
    "one_cycle_step",
    "plateau_step",
    "plateau_reduce",
    "warmup_factor",
    "radam_warmup_params",
    "untuned_warmup_period",
    "schedule_factor",
    "swalr_lrs",
    "range_test_lr",
    "range_test_update",
    "steepest_descent",
    "grad_norms",
    "scale_grads",
    "clamp_grads",
    "ema_update",
    "ema_decay",
    "VitRun",
    "vit_forward",
    "vit_backward",
    "vit_empty_cache",
    "vit_cached_bytes",
    "FerrotorchValueError",
    "FerrotorchTypeError",
    "FerrotorchRuntimeError",
]

__version__: str
TORCH_VERSION: str

def uses_torch_threads() -> bool:
    """True when fused steps run on torch's OpenMP threads (False in a forked child)."""

def cpu_capability() -> str:
    """The SIMD kernels in use: "avx512", "avx2" or "default" (capped by
    ``FERROTORCH_CPU_CAPABILITY`` or torch's ``ATEN_CPU_CAPABILITY``)."""

class FerrotorchValueError(ValueError): ...
class FerrotorchTypeError(TypeError): ...
class FerrotorchRuntimeError(RuntimeError): ...

@final
class OptimizerSpec:
    """One fused algorithm, declared once in Rust: its state, step counter and kernel."""

    @property
    def name(self) -> str: ...
    @property
    def label(self) -> str: ...
    @property
    def has_step(self) -> bool: ...
    @property
    def sparse_grads(self) -> bool: ...
    @property
    def scalar_keys(self) -> list[str]: ...
    def state_keys(self, group: dict[str, object]) -> list[str]: ...
    def step(
        self,
        state: dict[torch.Tensor, dict[str, object]],
        group: dict[str, object],
        grad_scale: float | None = None,
        clip_coef: float | None = None,
        first: Sequence[int] = ...,
    ) -> tuple[list[int], list[tuple[int, bool]], bool]: ...

def optimizer_spec(name: str) -> OptimizerSpec:
    """The fused optimizer called ``name`` ("adam", "sgd", "rmsprop", "adagrad")."""

def optimizer_names() -> list[str]:
    """Names of every fused optimizer."""

def sparse_adam_step(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    maximize: bool,
    tensor_lr_step_size: float | None = None,
) -> bool:
    """One SparseAdam step of ``param`` from a coalesced gradient; False: torch must step it."""

def adafactor_group(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    steps: list[torch.Tensor],
    row_vars: list[torch.Tensor | None],
    col_vars: list[torch.Tensor | None],
    variances: list[torch.Tensor | None],
    *,
    lr: float,
    beta2_decay: float,
    eps1: float | None,
    eps2: float,
    d: float,
    weight_decay: float,
    maximize: bool,
) -> list[int]:
    """One Adafactor step of a param group (bumps each ``step``); returns the positions
    torch must step."""

def muon_group(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor],
    adjusted_lrs: list[float],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    copy_bf16: bool,
) -> bool:
    """One Muon step of a param group through ATen's C++ ops (``adjusted_lrs`` from torch's
    ``_adjust_lr``); False (nothing changed): torch must step it."""

def lbfgs_two_loop(
    flat_grad: torch.Tensor,
    old_dirs: list[torch.Tensor],
    old_stps: list[torch.Tensor],
    ro: list[torch.Tensor | float],
    h_diag: torch.Tensor | float,
    al: torch.Tensor,
    d: torch.Tensor,
) -> bool:
    """The L-BFGS direction for ``flat_grad`` into ``d`` (first-loop coefficients into
    ``al``); False (nothing written): torch's loops must run."""

def lbfgs_gather(params: list[torch.Tensor], sources: list[torch.Tensor | None], out: torch.Tensor) -> bool:
    """``out = cat(each source flattened, zeros for None)``; False: nothing written."""

def lbfgs_add(params: list[torch.Tensor], update: torch.Tensor, alpha: float) -> bool:
    """``p.add_(update[slice].view_as(p), alpha=alpha)`` per parameter; False: nothing written."""

def lbfgs_set(params: list[torch.Tensor], flat_params: torch.Tensor) -> bool:
    """``p.copy_(flat_params[slice].view_as(p))`` per parameter; False: nothing written."""

# ---- schedule math (ferrotorch.optim.lr_scheduler / warmup call these) ----------------

def schedule_lrs(
    kind: str,
    groups: Sequence[dict[str, object]],
    base_lrs: Sequence[float | torch.Tensor],
    last_epoch: int,
    is_initial: bool,
    step_count: int,
    closed: bool,
    a: float = 0.0,
    b: float = 0.0,
    c: float = 0.0,
    milestones: Sequence[int] | None = None,
) -> list[float] | None: ...
def scale_lrs(lrs: Sequence[float], factors: Sequence[float]) -> list[float]: ...
def narrow_tensor_lrs(values: Sequence[object]) -> bool: ...
def warm_restarts_step(
    t_cur: float,
    t_i: float,
    last_epoch: int,
    epoch: float | None,
    t_0: int,
    t_mult: int,
    eta_min: float,
    base_lrs: Sequence[float],
) -> tuple[float, float, int, list[float]]: ...
def cyclic_step(
    last_epoch: int,
    total_size: float,
    step_ratio: float,
    mode: str,
    gamma: float,
    scale_fn: Callable[[float], float] | None,
    scale_by_cycle: bool,
    base_lrs: Sequence[float],
    max_lrs: Sequence[float],
    base_momentums: Sequence[float] | None = None,
    max_momentums: Sequence[float] | None = None,
) -> tuple[list[float], list[float]]: ...
def one_cycle_step(
    step_num: int,
    total_steps: int,
    groups: Sequence[dict[str, object]],
    phases: Sequence[dict[str, object]],
    cos: bool,
    momentum: bool,
) -> list[tuple[float, float]]: ...
def plateau_step(
    mode: str,
    threshold_mode: str,
    threshold: float,
    patience: int,
    cooldown: int,
    best: float,
    num_bad_epochs: int,
    cooldown_counter: int,
    current: float,
) -> tuple[float, int, int, bool]: ...
def plateau_reduce(lrs: Sequence[float], factor: float, min_lrs: Sequence[float], eps: float) -> list[float | None]: ...
def warmup_factor(kind: str, step: int, params: dict[str, object]) -> float: ...
def radam_warmup_params(beta2: float) -> tuple[float, int]: ...
def untuned_warmup_period(kind: str, beta2: float) -> int: ...
def schedule_factor(kind: str, step: int, params: dict[str, object]) -> float: ...
def swalr_lrs(groups: Sequence[dict[str, object]], step_count: int, anneal_epochs: int, cosine: bool) -> list[float] | None: ...
def range_test_lr(mode: str, start: float, end: float, i: int, num_iter: int) -> float: ...
def range_test_update(first: bool, loss: float, prev: float, best: float, smooth_f: float, diverge_th: float) -> tuple[float, float, bool]: ...
def steepest_descent(losses: Sequence[float]) -> int | None: ...

# ---- gradient clipping (ferrotorch.nn.utils) ------------------------------------------

def grad_norms(grads: Sequence[torch.Tensor], norm_type: float) -> list[float]: ...
def scale_grads(grads: Sequence[torch.Tensor], coef: float) -> None: ...
def clamp_grads(grads: Sequence[torch.Tensor], clip_value: float) -> None: ...

# ---- training helpers (ferrotorch.train) ---------------------------------------------

def ema_update(ema_tensors: Sequence[torch.Tensor], model_tensors: Sequence[torch.Tensor], weight: float) -> None: ...
def ema_decay(
    step: int | None,
    decay: float,
    min_decay: float,
    update_after_step: int,
    use_warmup: bool,
    warmup_gamma: float,
    warmup_power: float,
) -> float: ...

# ---- Vision Transformer (ferrotorch.nn.ViT) -------------------------------------------

@final
class VitRun:
    """The configuration, batch shape and dropout seed of one ``vit_forward`` call (no tensors)."""

    @property
    def fused(self) -> bool:
        """Whether the fused CPU kernels ran (else tch ops)."""

def vit_forward(
    x: torch.Tensor,
    params: Sequence[torch.Tensor],
    patch: tuple[int, int],
    channels: int,
    dim: int,
    depth: int,
    heads: int,
    dim_head: int,
    cls_token: bool,
    pool_cls: bool,
    project_out: bool,
    patch_norm: bool,
    qkv_bias: bool,
    norm_after_pool: bool,
    eps: float,
    dropout: float,
    emb_dropout: float,
    train: bool,
    seed: int,
    fused: bool = True,
    infer_chunk: int = 0,
    onednn: bool = True,
) -> tuple[torch.Tensor, list[torch.Tensor], VitRun]:
    """``(logits, saved, run)``. With ``infer_chunk > 0`` and no dropout active: inference,
    ``infer_chunk`` images at a time, nothing saved. ``onednn``: big CPU matmuls (fp32, bf16)
    may use oneDNN, here and in the matching ``vit_backward``."""

def vit_backward(
    run: VitRun,
    grad_logits: torch.Tensor,
    params: Sequence[torch.Tensor],
    saved: Sequence[torch.Tensor],
) -> list[torch.Tensor]: ...

def vit_empty_cache() -> int:
    """Frees the ViT's activation buffers waiting for reuse; returns how many bytes."""

def vit_cached_bytes() -> int:
    """Bytes of ViT activation buffers waiting for reuse."""
