//! Vision Transformer (vit-pytorch's `ViT`, or timm's plain `VisionTransformer`) forward
//! and backward, written out by hand.
//!
//! No libtorch autograd is used. The forward pass returns the logits and the activations
//! the backward pass needs; Python keeps those with `ctx.save_for_backward`, so torch frees
//! them after `backward()` (or keeps them under `retain_graph=True`) exactly as it does for
//! its own ops. Matmuls go through tch (oneDNN or MKL on CPU, see [`matmul_nt`]). On CPU
//! everything between the matmuls is one fused Rust pass from `ferrotorch_kernels::vit`
//! ([`Ops::Fused`]); on other devices the same math runs as tch ops ([`Ops::Torch`]).
//! Dropout masks come from a counter-based hash of a seed drawn from torch's generator, so
//! they are recomputed, never stored, and both paths draw the same masks.
//!
//! With cls pooling the last layer runs on the cls token alone ([`cls_layer`]); without a
//! gradient to compute, the batch runs in cache-sized chunks and nothing is saved
//! ([`infer`]).
//!
//! Parameter order (as `ferrotorch.nn.ViT._ordered_params` lists them): [patch LayerNorm
//! w/b], patch Linear w/b, [embedding LayerNorm w/b], [cls token], pos embedding; per layer
//! attention LayerNorm w/b, qkv w, [qkv b], [out w/b], feed-forward LayerNorm w/b, Linear 1
//! w/b, Linear 2 w/b; then the final LayerNorm w/b and the head w/b.

use ferrotorch_kernels::vit as k;
use ferrotorch_kernels::vit::{Dropout, Ptr};
use ferrotorch_kernels::DType;
use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

use crate::errors::{no_panic, Error, Result};
use crate::parallel::TorchThreads;
use crate::access::kernel_dtype;

/// The model's shape and options (fixed by the module's constructor).
#[derive(Clone, Copy, Debug)]
struct Cfg {
    patch: (i64, i64),
    channels: i64,
    dim: i64,
    depth: usize,
    heads: i64,
    dim_head: i64,
    /// A cls token is prepended.
    cls_token: bool,
    /// Pool by the cls token (else the mean of the non-cls tokens).
    pool_cls: bool,
    project_out: bool,
    /// vit-pytorch's LayerNorms before and after the patch Linear (timm has none).
    patch_norm: bool,
    qkv_bias: bool,
    /// The final LayerNorm runs on the pooled vector (timm's `fc_norm`), not on every token.
    norm_after_pool: bool,
    eps: f64,
    dropout: f64,
    emb_dropout: f64,
    /// Big CPU matmuls may use oneDNN (`torch.backends.mkldnn.enabled` when the model ran).
    onednn: bool,
}

/// Where the math between the matmuls runs.
#[derive(Clone, Copy)]
enum Ops {
    /// CPU, dense: the Rust kernels, for this dtype, on `threads` of torch's OpenMP team.
    Fused { dtype: DType, threads: usize },
    /// Anything else (CUDA…): tch ops.
    Torch,
}

fn ptr(t: &Tensor) -> Ptr {
    Ptr(t.data_ptr() as *mut u8)
}

fn stat_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

fn last(t: &Tensor) -> i64 {
    *t.size().last().unwrap_or(&1)
}

/// The dropout mask `keep * 1/(1-p)` as a tensor, computed with tch integer ops from the
/// same hash as the kernels' `keep` (two 32-bit `lowbias32` rounds).
fn torch_mask(d: Dropout, like: &Tensor) -> Result<Tensor> {
    const M: i64 = 0xffff_ffff;
    let opts = (Kind::Int64, like.device());
    let idx = Tensor::f_arange(like.numel() as i64, opts)?;
    let mix = |x: Tensor| -> Result<Tensor> {
        let x = x.f_bitwise_xor_tensor(&x.f_bitwise_right_shift_tensor_scalar(16)?)?;
        let x = x.f_mul_scalar(0x7feb_352d_i64)?.f_bitwise_and(M)?;
        let x = x.f_bitwise_xor_tensor(&x.f_bitwise_right_shift_tensor_scalar(15)?)?;
        let x = x.f_mul_scalar(0x846c_a68b_i64)?.f_bitwise_and(M)?;
        Ok(x.f_bitwise_xor_tensor(&x.f_bitwise_right_shift_tensor_scalar(16)?)?)
    };
    let lo = idx
        .f_bitwise_and(M)?
        .f_bitwise_xor((d.seed & 0xffff_ffff) as i64)?;
    let hi = idx
        .f_bitwise_right_shift_tensor_scalar(32)?
        .f_mul_scalar(0x9e37_79b9_i64)?
        .f_bitwise_and(M)?;
    let x = mix(lo)?
        .f_bitwise_xor((d.seed >> 32) as i64)?
        .f_bitwise_xor_tensor(&hi)?;
    let x = mix(x)?;
    let (threshold, scale) = (d.threshold() as i64, d.scale());
    let keep = x.f_bitwise_right_shift_tensor_scalar(8)?.f_lt(threshold)?;
    Ok(keep
        .f_to_kind(like.kind())?
        .f_mul_scalar(scale)?
        .f_reshape(like.size())?)
}

impl Ops {
    fn exec(&self) -> &'static TorchThreads {
        &TorchThreads
    }

    /// LayerNorm over the last dim: `(y, mean, rstd)`, stats one per row.
    fn ln(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
        let d = last(x);
        match *self {
            Ops::Fused { dtype, threads } => {
                let rows = (x.numel() as i64 / d.max(1)) as usize;
                let y = x.f_empty_like()?;
                let stat = (stat_kind(x.kind()), Device::Cpu);
                let mean = Tensor::f_empty([rows as i64], stat)?;
                let rstd = Tensor::f_empty([rows as i64], stat)?;
                let op = k::LnFwd {
                    x: ptr(x),
                    w: ptr(w),
                    b: ptr(b),
                    y: ptr(&y),
                    mean: ptr(&mean),
                    rstd: ptr(&rstd),
                    d: d as usize,
                    eps,
                };
                // SAFETY: every tensor is contiguous on the CPU with the sizes the op reads.
                unsafe { k::layer_norm(&op, dtype, rows, threads, self.exec()) };
                Ok((y, mean, rstd))
            }
            Ops::Torch => {
                let (y, mean, rstd) = x.f_native_layer_norm([d], Some(w), Some(b), eps)?;
                Ok((y, mean.f_reshape([-1])?, rstd.f_reshape([-1])?))
            }
        }
    }

    /// LayerNorm backward: `(gx, gw, gb)`; with `acc`, `gx` is `acc + dx` (in place on CPU).
    fn ln_bwd(
        &self,
        gy: &Tensor,
        x: &Tensor,
        mean: &Tensor,
        rstd: &Tensor,
        w: &Tensor,
        acc: Option<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = last(x);
        match *self {
            Ops::Fused { dtype, threads } => {
                let gy = gy.f_contiguous()?;
                let rows = (x.numel() as i64 / d.max(1)) as usize;
                let accumulate = acc.is_some();
                let gx = match acc {
                    Some(a) => a,
                    None => x.f_empty_like()?,
                };
                let op = k::LnBwd {
                    gy: ptr(&gy),
                    x: ptr(x),
                    mean: ptr(mean),
                    rstd: ptr(rstd),
                    w: ptr(w),
                    gx: ptr(&gx),
                    accumulate,
                    d: d as usize,
                };
                // SAFETY: as in `ln`; `gx` is a fresh tensor or the caller's own accumulator.
                let sums =
                    unsafe { k::layer_norm_backward(&op, dtype, rows, threads, self.exec()) };
                let sums = Tensor::f_from_slice(&sums)?.f_to_kind(w.kind())?;
                Ok((gx, sums.f_narrow(0, 0, d)?, sums.f_narrow(0, d, d)?))
            }
            Ops::Torch => {
                let mut stat_shape = x.size();
                let n = stat_shape.len();
                stat_shape[n - 1] = 1;
                let (mean, rstd) = (mean.f_reshape(&stat_shape)?, rstd.f_reshape(&stat_shape)?);
                let xhat = x.f_sub(&mean)?.f_mul(&rstd)?;
                let lead: Vec<i64> = (0..gy.dim() as i64 - 1).collect();
                let gw =
                    gy.f_mul(&xhat)?
                        .f_sum_dim_intlist(lead.as_slice(), false, None::<Kind>)?;
                let gb = gy.f_sum_dim_intlist(lead.as_slice(), false, None::<Kind>)?;
                let gxhat = gy.f_mul(w)?;
                let m1 = gxhat.f_mean_dim(-1, true, None::<Kind>)?;
                let m2 = gxhat.f_mul(&xhat)?.f_mean_dim(-1, true, None::<Kind>)?;
                let gx = gxhat.f_sub(&m1)?.f_sub(&xhat.f_mul(&m2)?)?.f_mul(&rstd)?;
                let gx = match acc {
                    Some(a) => a.f_add(&gx)?,
                    None => gx,
                };
                Ok((gx, gw, gb))
            }
        }
    }

    /// Multi-head attention on the qkv Linear's output `(B, N, 3 * inner)`: returns the
    /// heads' outputs merged, `(B, N, inner)`.
    fn attention(&self, qkv: &Tensor, cfg: &Cfg, r: &Run, drop: Dropout) -> Result<Tensor> {
        let (b, seq, nh, dh) = (r.b, r.seq, cfg.heads, cfg.dim_head);
        let scale = (dh as f64).powf(-0.5);
        match *self {
            Ops::Fused { dtype, threads } => {
                let o = Tensor::f_empty([b, seq, nh * dh], (qkv.kind(), Device::Cpu))?;
                let a = attn_desc(qkv, cfg, r, drop);
                // SAFETY: `qkv` is contiguous (B, N, 3, H, dh); `o` fresh (B, N, H * dh).
                unsafe { k::attention(&a, ptr(&o), dtype, threads, self.exec()) };
                Ok(o)
            }
            Ops::Torch => {
                let (q, kk, v) = split_heads(qkv, cfg, r)?;
                let probs = Probs::new(&q.f_mul_scalar(scale)?, &kk, drop)?;
                merge_heads(&probs.dropped()?.f_bmm(&v)?, cfg, r)
            }
        }
    }

    /// Gradient of `qkv` from that of the merged output; the attention matrix is recomputed.
    fn attention_bwd(
        &self,
        qkv: &Tensor,
        g_o: &Tensor,
        cfg: &Cfg,
        r: &Run,
        drop: Dropout,
    ) -> Result<Tensor> {
        let (b, seq, nh, dh) = (r.b, r.seq, cfg.heads, cfg.dim_head);
        let scale = (dh as f64).powf(-0.5);
        match *self {
            Ops::Fused { dtype, threads } => {
                let g_o = g_o.f_contiguous()?;
                let g_qkv = qkv.f_empty_like()?;
                let a = attn_desc(qkv, cfg, r, drop);
                // SAFETY: as in `attention`; `g_qkv` is fresh and shaped like `qkv`.
                unsafe {
                    k::attention_backward(&a, ptr(&g_o), ptr(&g_qkv), dtype, threads, self.exec())
                };
                Ok(g_qkv)
            }
            Ops::Torch => {
                let (q, kk, v) = split_heads(qkv, cfg, r)?;
                let q = q.f_mul_scalar(scale)?;
                let g_o = g_o
                    .f_reshape([b, seq, nh, dh])?
                    .f_permute([0, 2, 1, 3])?
                    .f_reshape([b * nh, seq, dh])?;
                let (g_q, g_k, g_v) =
                    Probs::new(&q, &kk, drop)?.backward(&q, &kk, &v, &g_o, scale)?;
                let parts: Vec<Tensor> = [g_q, g_k, g_v]
                    .iter()
                    .map(|t| t.f_reshape([b, nh, seq, dh]))
                    .collect::<std::result::Result<_, _>>()?;
                Ok(Tensor::f_stack(&parts, 2)?
                    .f_permute([0, 3, 2, 1, 4])?
                    .f_contiguous()?
                    .f_reshape([b, seq, 3 * nh * dh])?)
            }
        }
    }

    /// `gelu(x) * mask`.
    fn gelu(&self, x: &Tensor, drop: Dropout) -> Result<Tensor> {
        match *self {
            Ops::Fused { dtype, threads } => {
                let y = x.f_empty_like()?;
                let op = k::GeluFwd {
                    x: ptr(x),
                    y: ptr(&y),
                    dropout: drop,
                };
                // SAFETY: contiguous CPU tensors of one size.
                unsafe { k::gelu_forward(&op, dtype, x.numel(), threads, self.exec()) };
                Ok(y)
            }
            Ops::Torch => {
                let y = x.f_gelu("none")?;
                Ok(if drop.active() {
                    y.f_mul(&torch_mask(drop, &y)?)?
                } else {
                    y
                })
            }
        }
    }

    /// GELU backward on `g` (consumed): `(g * mask * gelu'(x), gelu(x) * mask)`.
    fn gelu_bwd(&self, x: &Tensor, g: Tensor, drop: Dropout) -> Result<(Tensor, Tensor)> {
        match *self {
            Ops::Fused { dtype, threads } => {
                let y = x.f_empty_like()?;
                let op = k::GeluBwd {
                    x: ptr(x),
                    g: ptr(&g),
                    y: ptr(&y),
                    dropout: drop,
                };
                // SAFETY: contiguous CPU tensors of one size; `g` is ours.
                unsafe { k::gelu_backward(&op, dtype, x.numel(), threads, self.exec()) };
                Ok((g, y))
            }
            Ops::Torch => {
                let cdf = x
                    .f_mul_scalar(std::f64::consts::FRAC_1_SQRT_2)?
                    .f_erf()?
                    .f_add_scalar(1.0)?
                    .f_mul_scalar(0.5)?;
                let pdf = x
                    .f_square()?
                    .f_mul_scalar(-0.5)?
                    .f_exp()?
                    .f_mul_scalar(1.0 / (2.0 * std::f64::consts::PI).sqrt())?;
                let mut gg = g.f_mul(&cdf.f_add(&x.f_mul(&pdf)?)?)?;
                let mut y = x.f_mul(&cdf)?;
                if drop.active() {
                    let m = torch_mask(drop, x)?;
                    gg = gg.f_mul(&m)?;
                    y = y.f_mul(&m)?;
                }
                Ok((gg, y))
            }
        }
    }

    /// `h + y * mask`, or `h * mask` without `y` (a new tensor).
    fn add_dropout(&self, h: &Tensor, y: Option<&Tensor>, drop: Dropout) -> Result<Tensor> {
        match *self {
            Ops::Fused { dtype, threads } => {
                let out = h.f_empty_like()?;
                let y = match y {
                    Some(y) => Some(y.f_contiguous()?),
                    None => None,
                };
                let op = k::AddDropout {
                    h: ptr(h),
                    y: y.as_ref().map_or(Ptr::NULL, ptr),
                    out: ptr(&out),
                    dropout: drop,
                };
                // SAFETY: contiguous CPU tensors of one size; `out` is fresh.
                unsafe { k::add_dropout(&op, dtype, h.numel(), threads, self.exec()) };
                Ok(out)
            }
            Ops::Torch => {
                let y = match y {
                    Some(y) if drop.active() => y.f_mul(&torch_mask(drop, y)?)?,
                    Some(y) => y.shallow_clone(),
                    None if drop.active() => return Ok(h.f_mul(&torch_mask(drop, h)?)?),
                    None => return Ok(h.shallow_clone()),
                };
                Ok(h.f_add(&y)?)
            }
        }
    }

    /// `x * mask` (a dropout, or the gradient through one), or `x` itself when dropout is
    /// off (no copy).
    fn masked(&self, g: &Tensor, drop: Dropout) -> Result<Tensor> {
        if drop.active() {
            self.add_dropout(g, None, drop)
        } else {
            Ok(g.shallow_clone())
        }
    }
}

/// Softmax attention as tch ops on per-head `q` (already scaled), `k`, `v` with any leading
/// dims (`(B*H, N, dh)` for every query, `(B, H, 1, dh)` for the cls row): the probabilities
/// and the dropout mask, kept for `pd @ v` and for the backward pass.
struct Probs {
    p: Tensor,
    mask: Option<Tensor>,
}

impl Probs {
    fn new(q: &Tensor, k: &Tensor, drop: Dropout) -> Result<Self> {
        let p = q
            .f_matmul(&k.f_transpose(-1, -2)?)?
            .f_softmax(-1, None::<Kind>)?;
        let mask = if drop.active() {
            Some(torch_mask(drop, &p)?)
        } else {
            None
        };
        Ok(Probs { p, mask })
    }

    /// `p * mask`: the probabilities after dropout.
    fn dropped(&self) -> Result<Tensor> {
        Ok(match &self.mask {
            Some(m) => self.p.f_mul(m)?,
            None => self.p.shallow_clone(),
        })
    }

    /// `(g_q, g_k, g_v)` of `o = dropped() @ v` from `g_o`; `q` is the scaled query and
    /// `scale` the factor it carries (so `g_q` is for the unscaled one).
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g_o: &Tensor,
        scale: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let g_v = self.dropped()?.f_transpose(-1, -2)?.f_matmul(g_o)?;
        let mut g_p = g_o.f_matmul(&v.f_transpose(-1, -2)?)?;
        if let Some(m) = &self.mask {
            g_p = g_p.f_mul(m)?;
        }
        let dot = g_p
            .f_mul(&self.p)?
            .f_sum_dim_intlist([-1i64].as_slice(), true, None::<Kind>)?;
        let g_s = self.p.f_mul(&g_p.f_sub(&dot)?)?;
        let g_q = g_s.f_matmul(k)?.f_mul_scalar(scale)?;
        let g_k = g_s.f_transpose(-1, -2)?.f_matmul(q)?;
        Ok((g_q, g_k, g_v))
    }
}

fn attn_desc(qkv: &Tensor, cfg: &Cfg, r: &Run, drop: Dropout) -> k::Attention {
    k::Attention {
        qkv: ptr(qkv),
        b: r.b as usize,
        n: r.seq as usize,
        heads: cfg.heads as usize,
        dh: cfg.dim_head as usize,
        scale: (cfg.dim_head as f64).powf(-0.5),
        dropout: drop,
    }
}

/// `(B, N, 3 * H * dh)` -> q, k, v as `(B * H, N, dh)`.
fn split_heads(qkv: &Tensor, cfg: &Cfg, r: &Run) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, seq, nh, dh) = (r.b, r.seq, cfg.heads, cfg.dim_head);
    let t = qkv
        .f_reshape([b, seq, 3, nh, dh])?
        .f_permute([2, 0, 3, 1, 4])?;
    let part = |i: i64| -> Result<Tensor> { Ok(t.f_get(i)?.f_reshape([b * nh, seq, dh])?) };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// `(B * H, N, dh)` -> `(B, N, H * dh)`.
fn merge_heads(o: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
    let (b, seq, nh, dh) = (r.b, r.seq, cfg.heads, cfg.dim_head);
    Ok(o.f_reshape([b, nh, seq, dh])?
        .f_permute([0, 2, 1, 3])?
        .f_contiguous()?
        .f_reshape([b, seq, nh * dh])?)
}

thread_local! {
    /// Whether [`matmul_nt`] may use oneDNN: set for the duration of one forward or backward
    /// pass (which runs on the calling thread) from the model's configuration.
    static ONEDNN: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` with [`ONEDNN`] set to `on`, restoring the previous value afterwards.
fn with_onednn<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = ONEDNN.replace(on);
    let out = f();
    ONEDNN.set(before);
    out
}

/// Multiply-adds at or above which [`matmul_nt`] asks oneDNN: each call costs it ~40-60 us
/// more than `addmm`, and the two broke even at 25-40 M here.
const ONEDNN_MIN_MACS: i64 = 1 << 25;

/// `x2 @ w.T (+ b)` for a 2-D `x2 (M, K)` and `w (N, K)`.
///
/// On the CPU, fp32/bf16 go through oneDNN as a 1x1 convolution over a channels-last view
/// of `x2` (a plain GEMM, no copies either way): for the ViT's tall, thin products
/// (K = 256..768) libtorch's oneDNN kernels measured 1.3-2x the GFLOP/s of the MKL `sgemm`
/// that `addmm` calls on this machine's CPU. Anything else, or any oneDNN error, takes
/// `addmm` / `mm`.
fn matmul_nt(x2: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (m, kk) = (x2.size()[0], x2.size()[1]);
    let n = w.size()[0];
    let onednn = ONEDNN.get()
        && x2.device() == Device::Cpu
        && matches!(x2.kind(), Kind::Float | Kind::BFloat16)
        && m * kk * n >= ONEDNN_MIN_MACS
        && w.kind() == x2.kind()
        && b.is_none_or(|b| b.kind() == x2.kind());
    // A libtorch without oneDNN (or a CPU without bf16 support) fails the first call; from
    // then on that dtype goes straight to addmm instead of raising a C++ error every time.
    static ONEDNN_FAILED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
    let failed = &ONEDNN_FAILED[usize::from(x2.kind() == Kind::BFloat16)];
    if onednn && !failed.load(Ordering::Relaxed) {
        let x2 = x2.f_contiguous()?;
        let w = w.f_contiguous()?;
        // (M, K) row-major is (1, K, M, 1) in channels-last: C = K, H = M.
        let x4 = x2.f_as_strided([1, kk, m, 1], [m * kk, 1, kk, kk], None::<i64>)?;
        let w4 = w.f_view([n, kk, 1, 1])?;
        match x4.f_mkldnn_convolution(&w4, b, [0, 0], [1, 1], [1, 1], 1) {
            // channels-last (1, N, M, 1) is (M, N) row-major: a view, not a copy
            Ok(y) => return Ok(y.f_permute([0, 2, 3, 1])?.f_reshape([m, n])?),
            Err(_) => failed.store(true, Ordering::Relaxed),
        }
    }
    Ok(match b {
        Some(b) => b.f_addmm(x2, &w.f_tr()?)?,
        None => x2.f_mm(&w.f_tr()?)?,
    })
}

/// `g2 @ w` for `g2 (M, N)`, `w (N, K)`: a Linear's input gradient. `w.T` goes in as a view:
/// only the oneDNN branch needs it contiguous, and `mm` takes it as it is.
fn matmul_nn(g2: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_nt(g2, &w.f_tr()?, None)
}

/// `x @ w.T + b` over the last dim.
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let size = x.size();
    let x2 = x.f_reshape([-1, size[size.len() - 1]])?;
    let y = matmul_nt(&x2, w, b)?;
    let mut out = size;
    let n = out.len();
    out[n - 1] = w.size()[0];
    Ok(y.f_reshape(out)?)
}

/// Returns (grad x, grad w, grad b) of `linear` (grad b is None without `with_bias`).
fn linear_bwd(
    gy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    with_bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (out, inp) = (last(gy), last(x));
    let gy2 = gy.f_reshape([-1, out])?;
    let gx = matmul_nn(&gy2, w)?;
    let mut gx_size = gy.size();
    let n = gx_size.len();
    gx_size[n - 1] = inp;
    let gw = gy2.f_tr()?.f_mm(&x.f_reshape([-1, inp])?)?;
    let gb = if with_bias {
        Some(gy2.f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?)
    } else {
        None
    };
    Ok((gx.f_reshape(gx_size)?, gw, gb))
}

/// Per-forward constants: the dropout sites' seeds and the batch's shape.
#[derive(Clone, Copy, Debug)]
struct Run {
    b: i64,
    c: i64,
    hh: i64,
    ww: i64,
    seq: i64,
    ncls: i64,
    seed: u64,
    train: bool,
}

impl Run {
    /// Dropout at site `site` (0 embedding; then 4 per layer: attention, out, ff1, ff2).
    fn drop(&self, p: f64, site: u64) -> Dropout {
        if !self.train || p <= 0.0 {
            return Dropout::OFF;
        }
        let s = self.seed ^ site.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // splitmix64 finalizer, so neighbouring sites get unrelated seeds
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Dropout {
            p,
            seed: z ^ (z >> 31),
        }
    }
}

/// The parameter list, walked in order.
struct P<'a> {
    p: &'a [Tensor],
    i: usize,
}

impl<'a> P<'a> {
    fn next(&mut self) -> Result<&'a Tensor> {
        let t = self.p.get(self.i).ok_or_else(|| {
            Error::Value(format!("ViT: expected more than {} parameters", self.i))
        })?;
        self.i += 1;
        Ok(t)
    }
    fn opt(&mut self, present: bool) -> Result<Option<&'a Tensor>> {
        if present {
            Ok(Some(self.next()?))
        } else {
            Ok(None)
        }
    }
}

/// The activations kept for backward, read back in the order they were pushed.
struct Saved {
    v: Vec<Tensor>,
    i: usize,
}

impl Saved {
    fn take(&mut self) -> Result<Tensor> {
        let t = self
            .v
            .get(self.i)
            .ok_or_else(|| Error::Runtime("ViT backward: too few saved tensors".into()))?
            .shallow_clone();
        self.i += 1;
        Ok(t)
    }
}

/// 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'
fn patchify(ops: Ops, x: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
    let (ph, pw) = cfg.patch;
    let (gh, gw) = (r.hh / ph, r.ww / pw);
    match ops {
        Ops::Fused { dtype, threads } => {
            let out = Tensor::f_empty([r.b, gh * gw, ph * pw * r.c], (x.kind(), Device::Cpu))?;
            let op = patch_op(x, &out, cfg, r, false);
            // SAFETY: `x` is contiguous (B, C, H, W) with H, W multiples of the patch; `out` fresh.
            unsafe { k::patches(&op, dtype, r.b as usize, threads, ops.exec()) };
            Ok(out)
        }
        Ops::Torch => Ok(x
            .f_reshape([r.b, r.c, gh, ph, gw, pw])?
            .f_permute([0, 2, 4, 3, 5, 1])?
            .f_contiguous()?
            .f_reshape([r.b, gh * gw, ph * pw * r.c])?),
    }
}

fn unpatchify(ops: Ops, g: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
    let (ph, pw) = cfg.patch;
    match ops {
        Ops::Fused { dtype, threads } => {
            let g = g.f_contiguous()?;
            let out = Tensor::f_empty([r.b, r.c, r.hh, r.ww], (g.kind(), Device::Cpu))?;
            let op = patch_op(&out, &g, cfg, r, true);
            // SAFETY: as in `patchify`, with the roles of the buffers swapped.
            unsafe { k::patches(&op, dtype, r.b as usize, threads, ops.exec()) };
            Ok(out)
        }
        Ops::Torch => Ok(g
            .f_reshape([r.b, r.hh / ph, r.ww / pw, ph, pw, r.c])?
            .f_permute([0, 5, 1, 3, 2, 4])?
            .f_contiguous()?
            .f_reshape([r.b, r.c, r.hh, r.ww])?),
    }
}

fn patch_op(img: &Tensor, patches: &Tensor, cfg: &Cfg, r: &Run, backward: bool) -> k::Patches {
    k::Patches {
        img: ptr(img),
        patches: ptr(patches),
        c: r.c as usize,
        h: r.hh as usize,
        w: r.ww as usize,
        ph: cfg.patch.0 as usize,
        pw: cfg.patch.1 as usize,
        backward,
    }
}

/// Pooling: the cls token, or the mean of the tokens after the cls token.
fn pool(x: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
    if cfg.pool_cls {
        Ok(x.f_select(1, 0)?)
    } else {
        Ok(x.f_narrow(1, r.ncls, r.seq - r.ncls)?
            .f_mean_dim(1, false, None::<Kind>)?)
    }
}

fn unpool(g: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
    let out = Tensor::f_zeros([r.b, r.seq, cfg.dim], (g.kind(), g.device()))?;
    if cfg.pool_cls {
        out.f_select(1, 0)?.f_copy_(g)?;
    } else {
        let n = r.seq - r.ncls;
        out.f_narrow(1, r.ncls, n)?
            .f_copy_(&g.f_unsqueeze(1)?.f_div_scalar(n as f64)?)?;
    }
    Ok(out)
}

fn check_input(cfg: &Cfg, x: &Tensor) -> Result<(i64, i64, i64, i64)> {
    let size = x.size();
    if size.len() != 4 {
        return Err(Error::Value(format!(
            "ViT: expected images of shape (batch, channels, height, width), got {size:?}"
        )));
    }
    let (b, c, hh, ww) = (size[0], size[1], size[2], size[3]);
    let (ph, pw) = cfg.patch;
    if c != cfg.channels {
        return Err(Error::Value(format!(
            "ViT: expected {} channels, got {c}",
            cfg.channels
        )));
    }
    if ph <= 0 || pw <= 0 || hh % ph != 0 || ww % pw != 0 {
        return Err(Error::Value(format!(
            "ViT: image size {hh}x{ww} is not divisible by the patch size {ph}x{pw}"
        )));
    }
    Ok((b, c, hh, ww))
}

/// With cls pooling the head reads token 0 only, so in the last layer only the keys and
/// values need every token: its queries, attention rows, out projection and feed-forward
/// run on token 0 alone (about 12 % of a depth-6 model's FLOPs, skipped exactly).
fn prune_last(cfg: &Cfg) -> bool {
    cfg.pool_cls && cfg.depth > 0
}

/// Tensors the pruned last layer saves: h_in, m1, r1, kv, q, o, h_mid, m2, r2, h1.
const CLS_SAVED: usize = 10;

/// One layer's parameters.
struct Lp<'a> {
    aw: &'a Tensor,
    ab: &'a Tensor,
    qkv_w: &'a Tensor,
    qkv_b: Option<&'a Tensor>,
    out: Option<(&'a Tensor, &'a Tensor)>,
    /// Feed-forward LayerNorm w/b, Linear 1 w/b, Linear 2 w/b.
    f: [&'a Tensor; 6],
}

/// One layer's parameter gradients, in `Lp`'s order.
struct LayerGrads {
    a: [Tensor; 3],
    qkv_b: Option<Tensor>,
    out: Option<(Tensor, Tensor)>,
    f: [Tensor; 6],
}

impl Lp<'_> {
    /// The q rows, then the k and v rows, of the qkv Linear: `(w, b)`.
    fn qkv_part(&self, cfg: &Cfg, kv: bool) -> Result<(Tensor, Option<Tensor>)> {
        let inner = cfg.heads * cfg.dim_head;
        let (start, len) = if kv { (inner, 2 * inner) } else { (0, inner) };
        let b = match self.qkv_b {
            Some(b) => Some(b.f_narrow(0, start, len)?),
            None => None,
        };
        Ok((self.qkv_w.f_narrow(0, start, len)?, b))
    }
}

/// Heads of token 0's query `(B, inner)` and of every token's key and value
/// `(B, N, 2 * inner)`: q scaled `(B, H, 1, dh)`, k `(B, H, N, dh)`, v `(B, H, N, dh)`.
fn cls_heads(q: &Tensor, kv: &Tensor, cfg: &Cfg, r: &Run) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, nh, dh) = (r.b, r.seq, cfg.heads, cfg.dim_head);
    let scale = (dh as f64).powf(-0.5);
    let qh = q.f_reshape([b, nh, 1, dh])?.f_mul_scalar(scale)?;
    let kv5 = kv.f_reshape([b, n, 2, nh, dh])?;
    let kh = kv5.f_select(2, 0)?.f_permute([0, 2, 1, 3])?;
    let vh = kv5.f_select(2, 1)?.f_permute([0, 2, 1, 3])?;
    Ok((qh, kh, vh))
}

/// The pruned last layer (see [`prune_last`]): token 0's output `(B, dim)`; pushes
/// `CLS_SAVED` tensors. Its attention row is a matrix-vector product per head, so it runs
/// as tch ops on every device.
fn cls_layer(
    ops: Ops,
    cfg: &Cfg,
    r: &Run,
    l: u64,
    h: &Tensor,
    lp: &Lp,
    s: &mut Sink,
) -> Result<Tensor> {
    let (b, inner) = (r.b, cfg.heads * cfg.dim_head);
    let (a_in, m1, r1) = ops.ln(h, lp.aw, lp.ab, cfg.eps)?;
    let (w_kv, b_kv) = lp.qkv_part(cfg, true)?;
    let kv = linear(&a_in, &w_kv, b_kv.as_ref())?;
    let (w_q, b_q) = lp.qkv_part(cfg, false)?;
    let q = linear(&a_in.f_select(1, 0)?, &w_q, b_q.as_ref())?;
    drop(a_in);
    let (qh, kh, vh) = cls_heads(&q, &kv, cfg, r)?;
    let probs = Probs::new(&qh, &kh, r.drop(cfg.dropout, 1 + 4 * l))?;
    let o = probs.dropped()?.f_matmul(&vh)?.f_reshape([b, inner])?;
    drop((qh, kh, vh, probs));
    let h0 = h.f_select(1, 0)?.f_contiguous()?;
    let h_mid = match lp.out {
        Some((ow, ob)) => {
            let y = linear(&o, ow, Some(ob))?;
            ops.add_dropout(&h0, Some(&y), r.drop(cfg.dropout, 2 + 4 * l))?
        }
        None => ops.add_dropout(&h0, Some(&o), Dropout::OFF)?,
    };
    let [fw, fb, w1, b1, w2, b2] = lp.f;
    let (f_in, m2, r2) = ops.ln(&h_mid, fw, fb, cfg.eps)?;
    let h1 = linear(&f_in, w1, Some(b1))?;
    let gd = ops.gelu(&h1, r.drop(cfg.dropout, 3 + 4 * l))?;
    let y2 = linear(&gd, w2, Some(b2))?;
    let h_out = ops.add_dropout(&h_mid, Some(&y2), r.drop(cfg.dropout, 4 + 4 * l))?;
    s.extend([h.shallow_clone(), m1, r1, kv, q, o, h_mid, m2, r2, h1]);
    Ok(h_out)
}

/// Backward of [`cls_layer`] from the gradient of token 0's output: the gradient of the
/// layer's input `(B, N, dim)` and of its parameters.
fn cls_layer_bwd(
    ops: Ops,
    cfg: &Cfg,
    r: &Run,
    l: u64,
    g_out: Tensor,
    lp: &Lp,
    saved: Vec<Tensor>,
) -> Result<(Tensor, LayerGrads)> {
    let [h_in, m1, r1, kv, q, o, h_mid, m2, r2, h1] = <[Tensor; CLS_SAVED]>::try_from(saved)
        .map_err(|_| Error::Runtime("ViT backward: bad saved last layer".into()))?;
    let (b, n, inner) = (r.b, r.seq, cfg.heads * cfg.dim_head);
    let sum0 = |t: &Tensor| t.f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>);
    // Feed-forward on token 0.
    let [fw, fb, w1, _, w2, _] = lp.f;
    let g_y2 = ops.masked(&g_out, r.drop(cfg.dropout, 4 + 4 * l))?;
    let (g_h1, gd) = ops.gelu_bwd(&h1, matmul_nn(&g_y2, w2)?, r.drop(cfg.dropout, 3 + 4 * l))?;
    let (g_w2, g_b2) = (g_y2.f_tr()?.f_mm(&gd)?, sum0(&g_y2)?);
    let (f_in, _, _) = ops.ln(&h_mid, fw, fb, cfg.eps)?;
    let (g_fin, g_w1, g_b1) = linear_bwd(&g_h1, &f_in, w1, true)?;
    let g_b1 = g_b1.ok_or_else(|| Error::Runtime("ViT backward: no bias gradient".into()))?;
    let (g_mid, g_fw, g_fb) = ops.ln_bwd(&g_fin, &h_mid, &m2, &r2, fw, Some(g_out))?;
    // Out projection and attention on token 0's row.
    let (g_o, out) = match lp.out {
        Some((ow, _)) => {
            let g_y = ops.masked(&g_mid, r.drop(cfg.dropout, 2 + 4 * l))?;
            let (g_o, g_ow, g_ob) = linear_bwd(&g_y, &o, ow, true)?;
            (g_o, g_ob.map(|g_ob| (g_ow, g_ob)))
        }
        None => (g_mid.shallow_clone(), None),
    };
    let (qh, kh, vh) = cls_heads(&q, &kv, cfg, r)?;
    let probs = Probs::new(&qh, &kh, r.drop(cfg.dropout, 1 + 4 * l))?;
    let g_oh = g_o.f_reshape([b, cfg.heads, 1, cfg.dim_head])?;
    let scale = (cfg.dim_head as f64).powf(-0.5);
    let (g_q, g_k, g_v) = probs.backward(&qh, &kh, &vh, &g_oh, scale)?;
    let g_q = g_q.f_reshape([b, inner])?;
    drop((qh, kh, vh, probs));
    // (2, B, H, N, dh) -> (B, N, 2, H, dh), the kv Linear's output layout
    let g_kv = Tensor::f_stack(&[g_k, g_v], 0)?
        .f_permute([1, 3, 0, 2, 4])?
        .f_contiguous()?
        .f_reshape([b, n, 2 * inner])?;
    // The qkv Linear: k and v from every token, q from token 0.
    let (a_in, _, _) = ops.ln(&h_in, lp.aw, lp.ab, cfg.eps)?;
    let bias = lp.qkv_b.is_some();
    let (w_kv, _) = lp.qkv_part(cfg, true)?;
    let (g_ain, g_wkv, g_bkv) = linear_bwd(&g_kv, &a_in, &w_kv, bias)?;
    let (w_q, _) = lp.qkv_part(cfg, false)?;
    let (g_a0, g_wq, g_bq) = linear_bwd(&g_q, &a_in.f_select(1, 0)?, &w_q, bias)?;
    drop((a_in, g_kv));
    let _ = g_ain.f_select(1, 0)?.f_add_(&g_a0)?;
    let g_qkv_w = Tensor::f_cat(&[g_wq, g_wkv], 0)?;
    let g_qkv_b = match (g_bq, g_bkv) {
        (Some(q), Some(kv)) => Some(Tensor::f_cat(&[q, kv], 0)?),
        _ => None,
    };
    // Residual: only token 0 carried a gradient past the attention block.
    let acc = Tensor::f_zeros([b, n, cfg.dim], (g_mid.kind(), g_mid.device()))?;
    acc.f_select(1, 0)?.f_copy_(&g_mid)?;
    let (gh, g_aw, g_ab) = ops.ln_bwd(&g_ain, &h_in, &m1, &r1, lp.aw, Some(acc))?;
    Ok((
        gh,
        LayerGrads {
            a: [g_aw, g_ab, g_qkv_w],
            qkv_b: g_qkv_b,
            out,
            f: [g_fw, g_fb, g_w1, g_b1, g_w2, g_b2],
        },
    ))
}

/// Where the forward pass puts the activations backward needs; with `keep` off (inference)
/// they are dropped as soon as the forward pass is done with them.
struct Sink {
    v: Vec<Tensor>,
    keep: bool,
}

impl Sink {
    fn extend<const N: usize>(&mut self, t: [Tensor; N]) {
        if self.keep {
            self.v.extend(t);
        }
    }
    fn push(&mut self, t: Tensor) {
        self.extend([t]);
    }
}

fn forward(
    ops: Ops,
    cfg: &Cfg,
    x: &Tensor,
    params: &[Tensor],
    r: &mut Run,
    keep: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut s = Sink {
        v: Vec::new(),
        keep,
    };
    let mut p = P { p: params, i: 0 };
    let patches = patchify(ops, x, cfg, r)?;
    let ln_p = p.opt(cfg.patch_norm)?.zip(p.opt(cfg.patch_norm)?);
    let (lin_w, lin_b) = (p.next()?, p.next()?);
    let ln_e = p.opt(cfg.patch_norm)?.zip(p.opt(cfg.patch_norm)?);
    let pn = match ln_p {
        Some((w, b)) => {
            let (y, m, rs) = ops.ln(&patches, w, b, cfg.eps)?;
            s.extend([patches.shallow_clone(), m, rs]);
            y
        }
        None => {
            s.push(patches.shallow_clone());
            patches
        }
    };
    let e = linear(&pn, lin_w, Some(lin_b))?;
    let tok = match ln_e {
        Some((w, b)) => {
            let (y, m, rs) = ops.ln(&e, w, b, cfg.eps)?;
            s.extend([e, m, rs]);
            y
        }
        None => e,
    };
    let tok = match p.opt(cfg.cls_token)? {
        Some(cls) => {
            r.ncls = cls.size()[0];
            Tensor::f_cat(
                &[
                    cls.f_unsqueeze(0)?
                        .f_expand([r.b, r.ncls, cfg.dim], false)?,
                    tok,
                ],
                1,
            )?
        }
        None => tok,
    };
    let pos = p.next()?;
    r.seq = tok.size()[1];
    let h0 = tok.f_add(&pos.f_narrow(0, 0, r.seq)?)?;
    let mut h = ops.masked(&h0, r.drop(cfg.emb_dropout, 0))?;
    let mut h_cls = None;
    for l in 0..cfg.depth as u64 {
        let (aw, ab, qkv_w) = (p.next()?, p.next()?, p.next()?);
        let qkv_b = p.opt(cfg.qkv_bias)?;
        let out = p.opt(cfg.project_out)?.zip(p.opt(cfg.project_out)?);
        let (fw, fb, w1, b1, w2, b2) = (
            p.next()?,
            p.next()?,
            p.next()?,
            p.next()?,
            p.next()?,
            p.next()?,
        );
        if prune_last(cfg) && l + 1 == cfg.depth as u64 {
            let lp = Lp {
                aw,
                ab,
                qkv_w,
                qkv_b,
                out,
                f: [fw, fb, w1, b1, w2, b2],
            };
            h_cls = Some(cls_layer(ops, cfg, r, l, &h, &lp, &mut s)?);
            break;
        }
        // Attention: h = h + dropout(to_out(attend(LN(h))))
        let (a_in, m1, r1) = ops.ln(&h, aw, ab, cfg.eps)?;
        let qkv = linear(&a_in, qkv_w, qkv_b)?;
        drop(a_in);
        let o_merged = ops.attention(&qkv, cfg, r, r.drop(cfg.dropout, 1 + 4 * l))?;
        let h_in = h.shallow_clone();
        h = match out {
            Some((ow, ob)) => {
                let y = linear(&o_merged, ow, Some(ob))?;
                ops.add_dropout(&h, Some(&y), r.drop(cfg.dropout, 2 + 4 * l))?
            }
            None => ops.add_dropout(&h, Some(&o_merged), Dropout::OFF)?,
        };
        s.extend([h_in, m1, r1, qkv, o_merged]);
        // Feed-forward: h = h + dropout(W2 dropout(gelu(W1 LN(h))))
        let (f_in, m2, r2) = ops.ln(&h, fw, fb, cfg.eps)?;
        let h1 = linear(&f_in, w1, Some(b1))?;
        drop(f_in);
        let gd = ops.gelu(&h1, r.drop(cfg.dropout, 3 + 4 * l))?;
        let y2 = linear(&gd, w2, Some(b2))?;
        drop(gd);
        let h_mid = h.shallow_clone();
        h = ops.add_dropout(&h, Some(&y2), r.drop(cfg.dropout, 4 + 4 * l))?;
        s.extend([h_mid, m2, r2, h1]);
    }
    let (fw, fb, hw, hb) = (p.next()?, p.next()?, p.next()?, p.next()?);
    if p.i != params.len() {
        return Err(Error::Value(format!(
            "ViT: got {} parameters, the configuration uses {}",
            params.len(),
            p.i
        )));
    }
    let pooled = if let Some(pooled0) = h_cls {
        // token 0 only: the final LayerNorm before or after pooling is the same thing
        let (y, m, rs) = ops.ln(&pooled0, fw, fb, cfg.eps)?;
        s.extend([pooled0, m, rs]);
        y
    } else if cfg.norm_after_pool {
        let pooled0 = pool(&h, cfg, r)?.f_contiguous()?;
        let (y, m, rs) = ops.ln(&pooled0, fw, fb, cfg.eps)?;
        s.extend([pooled0, m, rs]);
        y
    } else {
        let (xf, m, rs) = ops.ln(&h, fw, fb, cfg.eps)?;
        s.extend([h, m, rs]);
        pool(&xf, cfg, r)?.f_contiguous()?
    };
    let logits = linear(&pooled, hw, Some(hb))?;
    s.push(pooled);
    Ok((logits, s.v))
}

fn backward(
    ops: Ops,
    cfg: &Cfg,
    r: &Run,
    g_logits: &Tensor,
    params: &[Tensor],
    saved: Vec<Tensor>,
) -> Result<Vec<Tensor>> {
    // Parameter indices in forward order.
    let mut idx = 0usize;
    let mut take = |present: bool| {
        if present {
            idx += 1;
            Some(idx - 1)
        } else {
            None
        }
    };
    let i_lnp = take(cfg.patch_norm).zip(take(cfg.patch_norm));
    let (i_lin_w, i_lin_b) = (take(true).unwrap_or(0), take(true).unwrap_or(0));
    let i_lne = take(cfg.patch_norm).zip(take(cfg.patch_norm));
    let i_cls = take(cfg.cls_token);
    let i_pos = take(true).unwrap_or(0);
    struct L {
        aw: usize,
        ab: usize,
        qkv_w: usize,
        qkv_b: Option<usize>,
        out: Option<(usize, usize)>,
        f: [usize; 6],
    }
    let mut layers: Vec<L> = Vec::new();
    for _ in 0..cfg.depth {
        let (aw, ab, qkv_w) = (
            take(true).unwrap_or(0),
            take(true).unwrap_or(0),
            take(true).unwrap_or(0),
        );
        let qkv_b = take(cfg.qkv_bias);
        let out = take(cfg.project_out).zip(take(cfg.project_out));
        let mut f = [0usize; 6];
        for slot in f.iter_mut() {
            *slot = take(true).unwrap_or(0);
        }
        layers.push(L {
            aw,
            ab,
            qkv_w,
            qkv_b,
            out,
            f,
        });
    }
    let (i_fw, i_fb, i_hw, i_hb) = (
        take(true).unwrap_or(0),
        take(true).unwrap_or(0),
        take(true).unwrap_or(0),
        take(true).unwrap_or(0),
    );
    if idx != params.len() {
        return Err(Error::Value(format!(
            "ViT backward: got {} parameters, expected {idx}",
            params.len()
        )));
    }
    let pr = params;
    let mut grads: Vec<Option<Tensor>> = (0..pr.len()).map(|_| None).collect();

    // The saved activations, in forward order: embedding first, then layers, then the end.
    let mut sv = Saved { v: saved, i: 0 };
    let emb_p = if cfg.patch_norm {
        (sv.take()?, Some((sv.take()?, sv.take()?)))
    } else {
        (sv.take()?, None)
    };
    let emb_e = if cfg.patch_norm {
        Some((sv.take()?, sv.take()?, sv.take()?))
    } else {
        None
    };
    let pruned = prune_last(cfg);
    let full = cfg.depth - usize::from(pruned);
    let mut acts = Vec::with_capacity(cfg.depth);
    for l in 0..cfg.depth {
        let n = if l < full { 9 } else { CLS_SAVED };
        let mut a: Vec<Tensor> = Vec::with_capacity(n);
        for _ in 0..n {
            a.push(sv.take()?);
        }
        acts.push(a);
    }
    let (f_x, f_m, f_r, pooled) = (sv.take()?, sv.take()?, sv.take()?, sv.take()?);

    let (g_pooled, g_hw, g_hb) = linear_bwd(g_logits, &pooled, &pr[i_hw], true)?;
    grads[i_hw] = Some(g_hw);
    grads[i_hb] = g_hb;
    let mut gh = if pruned {
        let (g0, gw, gb) = ops.ln_bwd(&g_pooled, &f_x, &f_m, &f_r, &pr[i_fw], None)?;
        grads[i_fw] = Some(gw);
        grads[i_fb] = Some(gb);
        let (ix, a) = (layers.pop(), acts.pop());
        let (ix, a) = ix
            .zip(a)
            .ok_or_else(|| Error::Runtime("ViT backward: no layer".into()))?;
        let l = full as u64;
        let lp = Lp {
            aw: &pr[ix.aw],
            ab: &pr[ix.ab],
            qkv_w: &pr[ix.qkv_w],
            qkv_b: ix.qkv_b.map(|i| &pr[i]),
            out: ix.out.map(|(w, b)| (&pr[w], &pr[b])),
            f: ix.f.map(|i| &pr[i]),
        };
        let (g, lg) = cls_layer_bwd(ops, cfg, r, l, g0, &lp, a)?;
        for (i, gi) in [ix.aw, ix.ab, ix.qkv_w].into_iter().zip(lg.a) {
            grads[i] = Some(gi);
        }
        if let Some(i) = ix.qkv_b {
            grads[i] = lg.qkv_b;
        }
        if let (Some((w, b)), Some((gw, gb))) = (ix.out, lg.out) {
            grads[w] = Some(gw);
            grads[b] = Some(gb);
        }
        for (i, gi) in ix.f.into_iter().zip(lg.f) {
            grads[i] = Some(gi);
        }
        g
    } else if cfg.norm_after_pool {
        let (g0, gw, gb) = ops.ln_bwd(&g_pooled, &f_x, &f_m, &f_r, &pr[i_fw], None)?;
        grads[i_fw] = Some(gw);
        grads[i_fb] = Some(gb);
        unpool(&g0, cfg, r)?
    } else {
        let g_xf = unpool(&g_pooled, cfg, r)?;
        let (g, gw, gb) = ops.ln_bwd(&g_xf, &f_x, &f_m, &f_r, &pr[i_fw], None)?;
        grads[i_fw] = Some(gw);
        grads[i_fb] = Some(gb);
        g
    };
    let seq = r.seq;
    for (l, (ix, a)) in layers.iter().zip(acts).enumerate().rev() {
        let l = l as u64;
        let [h_in, m1, r1, qkv, o_merged, h_mid, m2, r2, h1] = <[Tensor; 9]>::try_from(a)
            .map_err(|_| Error::Runtime("ViT backward: bad saved layer".into()))?;
        // Feed-forward block: h = h_mid + drop(W2 drop(gelu(W1 LN(h_mid))))
        let f = ix.f;
        let g_y2 = ops.masked(&gh, r.drop(cfg.dropout, 4 + 4 * l))?;
        let g_y2_2 = g_y2.f_reshape([-1, cfg.dim])?;
        let g_gd = matmul_nn(&g_y2_2, &pr[f[4]])?;
        let (g_h1, gd) = ops.gelu_bwd(
            &h1,
            g_gd.f_reshape(h1.size())?,
            r.drop(cfg.dropout, 3 + 4 * l),
        )?;
        grads[f[4]] = Some(g_y2_2.f_tr()?.f_mm(&gd.f_reshape([-1, last(&gd)])?)?);
        grads[f[5]] = Some(g_y2_2.f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?);
        drop((gd, g_y2, g_y2_2));
        let (f_in, _, _) = ops.ln(&h_mid, &pr[f[0]], &pr[f[1]], cfg.eps)?;
        let (g_fin, g_w1, g_b1) = linear_bwd(&g_h1, &f_in, &pr[f[2]], true)?;
        drop((f_in, g_h1));
        grads[f[2]] = Some(g_w1);
        grads[f[3]] = g_b1;
        let (g, g_fw, g_fb) = ops.ln_bwd(&g_fin, &h_mid, &m2, &r2, &pr[f[0]], Some(gh))?;
        gh = g;
        grads[f[0]] = Some(g_fw);
        grads[f[1]] = Some(g_fb);
        // Attention block: h_mid = h_in + drop(to_out(attend(LN(h_in))))
        let g_om = match ix.out {
            Some((ow, ob)) => {
                let g_y = ops.masked(&gh, r.drop(cfg.dropout, 2 + 4 * l))?;
                let (g_om, g_ow, g_ob) = linear_bwd(&g_y, &o_merged, &pr[ow], true)?;
                grads[ow] = Some(g_ow);
                grads[ob] = g_ob;
                g_om
            }
            None => gh.shallow_clone(),
        };
        let g_qkv = ops.attention_bwd(&qkv, &g_om, cfg, r, r.drop(cfg.dropout, 1 + 4 * l))?;
        drop((g_om, qkv));
        let (a_in, _, _) = ops.ln(&h_in, &pr[ix.aw], &pr[ix.ab], cfg.eps)?;
        let (g_ain, g_qkv_w, g_qkv_b) =
            linear_bwd(&g_qkv, &a_in, &pr[ix.qkv_w], ix.qkv_b.is_some())?;
        drop((a_in, g_qkv));
        grads[ix.qkv_w] = Some(g_qkv_w);
        if let Some(i) = ix.qkv_b {
            grads[i] = g_qkv_b;
        }
        let (g, g_aw, g_ab) = ops.ln_bwd(&g_ain, &h_in, &m1, &r1, &pr[ix.aw], Some(gh))?;
        gh = g;
        grads[ix.aw] = Some(g_aw);
        grads[ix.ab] = Some(g_ab);
    }
    // Embedding: h0 = cat(cls, tokens) + pos, then dropout.
    let gh = ops.masked(&gh, r.drop(cfg.emb_dropout, 0))?;
    grads[i_pos] = Some({
        let g = gh.f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?;
        let rows = pr[i_pos].size()[0];
        if rows > seq {
            let z = Tensor::f_zeros([rows - seq, cfg.dim], (g.kind(), g.device()))?;
            Tensor::f_cat(&[g, z], 0)?
        } else {
            g
        }
    });
    if let Some(ic) = i_cls {
        grads[ic] = Some(gh.f_narrow(1, 0, r.ncls)?.f_sum_dim_intlist(
            [0i64].as_slice(),
            false,
            None::<Kind>,
        )?);
    }
    let g_tok = gh.f_narrow(1, r.ncls, seq - r.ncls)?.f_contiguous()?;
    drop(gh);
    let g_e = match (emb_e, i_lne) {
        (Some((e, m, rs)), Some((iw, ib))) => {
            let (g, gw, gb) = ops.ln_bwd(&g_tok, &e, &m, &rs, &pr[iw], None)?;
            grads[iw] = Some(gw);
            grads[ib] = Some(gb);
            g
        }
        _ => g_tok,
    };
    let (patches, p_stats) = emb_p;
    let pn = match (&p_stats, i_lnp) {
        (Some(_), Some((iw, ib))) => ops.ln(&patches, &pr[iw], &pr[ib], cfg.eps)?.0,
        _ => patches.shallow_clone(),
    };
    let (g_pn, g_lw, g_lb) = linear_bwd(&g_e, &pn, &pr[i_lin_w], true)?;
    drop(pn);
    grads[i_lin_w] = Some(g_lw);
    grads[i_lin_b] = g_lb;
    let g_patches = match (p_stats, i_lnp) {
        (Some((m, rs)), Some((iw, ib))) => {
            let (g, gw, gb) = ops.ln_bwd(&g_pn, &patches, &m, &rs, &pr[iw], None)?;
            grads[iw] = Some(gw);
            grads[ib] = Some(gb);
            g
        }
        _ => g_pn,
    };
    let mut out = vec![unpatchify(ops, &g_patches, cfg, r)?];
    for (i, g) in grads.into_iter().enumerate() {
        out.push(g.ok_or_else(|| {
            Error::Runtime(format!(
                "ViT backward produced no gradient for parameter {i}"
            ))
        })?);
    }
    Ok(out)
}

/// What `backward` needs besides the saved tensors: the configuration and the batch's shape
/// and dropout seed. Holds no tensors.
#[pyclass(module = "ferrotorch._native", frozen)]
pub struct VitRun {
    cfg: Cfg,
    run: Run,
    fused: bool,
}

fn pick_ops(x: &Tensor, params: &[Tensor], allow_fused: bool) -> Ops {
    let cpu_dense = |t: &Tensor| {
        t.device() == Device::Cpu && !t.is_sparse() && !t.is_mkldnn() && t.kind() == x.kind()
    };
    match kernel_dtype(x) {
        Some(dtype) if allow_fused && cpu_dense(x) && params.iter().all(cpu_dense) => Ops::Fused {
            dtype,
            threads: tch::get_num_threads().max(1) as usize,
        },
        _ => Ops::Torch,
    }
}

/// Forward pass: `(logits, saved, run)`. `params` are the model's parameters in
/// `ferrotorch.nn.ViT`'s order; `saved` are the activations `vit_backward` needs.
#[pyfunction]
#[pyo3(signature = (x, params, patch, channels, dim, depth, heads, dim_head, cls_token, pool_cls, project_out, patch_norm, qkv_bias, norm_after_pool, eps, dropout, emb_dropout, train, seed, fused=true, infer_chunk=0, onednn=true))]
#[allow(clippy::too_many_arguments)]
pub fn vit_forward(
    py: Python<'_>,
    x: PyTensor,
    params: Vec<PyTensor>,
    patch: (i64, i64),
    channels: i64,
    dim: i64,
    depth: usize,
    heads: i64,
    dim_head: i64,
    cls_token: bool,
    pool_cls: bool,
    project_out: bool,
    patch_norm: bool,
    qkv_bias: bool,
    norm_after_pool: bool,
    eps: f64,
    dropout: f64,
    emb_dropout: f64,
    train: bool,
    seed: u64,
    fused: bool,
    infer_chunk: i64,
    onednn: bool,
) -> PyResult<(PyTensor, Vec<PyTensor>, VitRun)> {
    let cfg = Cfg {
        patch,
        channels,
        dim,
        depth,
        heads,
        dim_head,
        cls_token,
        pool_cls,
        project_out,
        patch_norm,
        qkv_bias,
        norm_after_pool,
        eps,
        dropout,
        emb_dropout,
        onednn,
    };
    let (b, c, hh, ww) = check_input(&cfg, &x.0)?;
    let mut run = Run {
        b,
        c,
        hh,
        ww,
        seq: 0,
        ncls: 0,
        seed,
        train,
    };
    let params: Vec<Tensor> = params.into_iter().map(|t| t.0.shallow_clone()).collect();
    let x = x.0.shallow_clone();
    let job = Job((x, params, cfg, run));
    let (logits, saved, run_out, fused_used) = py
        .allow_threads(move || {
            let Job((x, params, cfg, mut run)) = job;
            no_panic("ViT forward", || {
                with_onednn(cfg.onednn, || {
                    tch::no_grad(|| {
                        let x = x.f_contiguous()?;
                        let params = params
                            .iter()
                            .map(|p| p.f_contiguous())
                            .collect::<std::result::Result<Vec<_>, _>>()?;
                        let ops = pick_ops(&x, &params, fused);
                        let dropout_on = run.drop(cfg.dropout, 1).active()
                            || run.drop(cfg.emb_dropout, 0).active();
                        let (logits, saved) = if infer_chunk > 0 && !dropout_on && run.b > 0 {
                            infer(ops, &cfg, &x, &params, &mut run, infer_chunk)?
                        } else {
                            forward(ops, &cfg, &x, &params, &mut run, true)?
                        };
                        Ok(Job((logits, saved, run, matches!(ops, Ops::Fused { .. }))))
                    })
                })
            })
        })?
        .0;
    run = run_out;
    Ok((
        PyTensor(logits),
        saved.into_iter().map(PyTensor).collect(),
        VitRun {
            cfg,
            run,
            fused: fused_used,
        },
    ))
}

/// Inference: the forward pass over `chunk` images at a time, saving nothing. A chunk's
/// activations stay in cache and its buffers are reused by the allocator, where a whole
/// batch's would stream through memory (and fault in fresh pages) op after op. Only used
/// without dropout, whose masks are hashed from positions within the batch, and only on the
/// CPU kernels' path.
fn infer(
    ops: Ops,
    cfg: &Cfg,
    x: &Tensor,
    params: &[Tensor],
    r: &mut Run,
    chunk: i64,
) -> Result<(Tensor, Vec<Tensor>)> {
    let (b, mut start) = (r.b, 0);
    // On a GPU, smaller launches would only cost time.
    let chunk = if matches!(ops, Ops::Fused { .. }) {
        chunk
    } else {
        b
    };
    let mut logits = Vec::new();
    while start < b {
        let c = chunk.min(b - start);
        let mut rc = Run { b: c, ..*r };
        logits.push(forward(ops, cfg, &x.f_narrow(0, start, c)?, params, &mut rc, false)?.0);
        (r.seq, r.ncls) = (rc.seq, rc.ncls);
        start += c;
    }
    Ok((Tensor::f_cat(&logits, 0)?, Vec::new()))
}

/// Values moved into the GIL-free section.
struct Job<T>(T);
// SAFETY: tch tensors are reference-counted handles to libtorch tensors, which may be used
// from any thread; the Python objects that own them stay alive for the whole call.
unsafe impl<T> Send for Job<T> {}

/// Backward pass: `[grad input, grad param 0, …]` from the logits' gradient, the parameters
/// and the tensors `vit_forward` saved.
#[pyfunction]
pub fn vit_backward(
    py: Python<'_>,
    run: &VitRun,
    grad_logits: PyTensor,
    params: Vec<PyTensor>,
    saved: Vec<PyTensor>,
) -> PyResult<Vec<PyTensor>> {
    let (cfg, r, fused) = (run.cfg, run.run, run.fused);
    let params: Vec<Tensor> = params.into_iter().map(|t| t.0.shallow_clone()).collect();
    let saved: Vec<Tensor> = saved.into_iter().map(|t| t.0.shallow_clone()).collect();
    let g = grad_logits.0.shallow_clone();
    let job = Job((g, params, saved));
    let grads = py
        .allow_threads(move || {
            let Job((g, params, saved)) = job;
            no_panic("ViT backward", || {
                with_onednn(cfg.onednn, || {
                    tch::no_grad(|| {
                        let g = g
                            .f_contiguous()?
                            .f_to_kind(saved.last().map_or(g.kind(), |t| t.kind()))?;
                        let params = params
                            .iter()
                            .map(|p| p.f_contiguous())
                            .collect::<std::result::Result<Vec<_>, _>>()?;
                        let ops = if fused {
                            pick_ops(&g, &params, true)
                        } else {
                            Ops::Torch
                        };
                        Ok(Job(backward(ops, &cfg, &r, &g, &params, saved)?))
                    })
                })
            })
        })?
        .0;
    Ok(grads.into_iter().map(PyTensor).collect())
}

#[pymethods]
impl VitRun {
    /// Whether the fused CPU kernels ran (else tch ops).
    #[getter]
    fn fused(&self) -> bool {
        self.fused
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<VitRun>()?;
    m.add_function(wrap_pyfunction!(vit_forward, m)?)?;
    m.add_function(wrap_pyfunction!(vit_backward, m)?)?;
    Ok(())
}
