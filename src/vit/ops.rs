//! The math between the matmuls, dispatched per device ([`Ops`]): the fused Rust kernels
//! on the CPU, tch ops elsewhere. LayerNorm, attention, GELU and dropout (forward and
//! backward), the tch dropout mask, patch extraction and pooling.

use ferrotorch_kernels::vit as k;
use ferrotorch_kernels::vit::{Dropout, Ptr};
use ferrotorch_kernels::DType;
use tch::{Device, Kind, Tensor};

use super::attention::{attn_desc, merge_heads, split_heads, Probs};
use super::buffers;
use super::config::{Cfg, Run};
use crate::errors::Result;
use crate::parallel::TorchThreads;

/// Where the math between the matmuls runs.
#[derive(Clone, Copy)]
pub(super) enum Ops {
    /// CPU, dense: the Rust kernels, for this dtype, on `threads` of torch's OpenMP team.
    Fused { dtype: DType, threads: usize },
    /// Anything else (CUDA…): tch ops.
    Torch,
}

pub(super) fn ptr(t: &Tensor) -> Ptr {
    Ptr(t.data_ptr() as *mut u8)
}

fn stat_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

pub(super) fn last(t: &Tensor) -> i64 {
    *t.size().last().unwrap_or(&1)
}

/// The dropout mask `keep * 1/(1-p)` as a tensor, computed with tch integer ops from the
/// same hash as the kernels' `keep` (two 32-bit `lowbias32` rounds).
pub(super) fn torch_mask(d: Dropout, like: &Tensor) -> Result<Tensor> {
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
    pub(super) fn ln(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = last(x);
        match *self {
            Ops::Fused { dtype, threads } => {
                let rows = (x.numel() as i64 / d.max(1)) as usize;
                let y = buffers::empty_like(x)?;
                let mean = buffers::empty(&[rows as i64], stat_kind(x.kind()))?;
                let rstd = buffers::empty(&[rows as i64], stat_kind(x.kind()))?;
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
                // Stats in the accumulation dtype on every device: CUDA returns them so for
                // bf16/fp16 input, the CPU in the input's dtype.
                let (y, mean, rstd) = x.f_native_layer_norm([d], Some(w), Some(b), eps)?;
                let stat = stat_kind(x.kind());
                Ok((
                    y,
                    mean.f_reshape([-1])?.f_to_kind(stat)?,
                    rstd.f_reshape([-1])?.f_to_kind(stat)?,
                ))
            }
        }
    }

    /// LayerNorm backward: `(gx, gw, gb)`; with `acc`, `gx` is `acc + dx` (in place on CPU).
    pub(super) fn ln_bwd(
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
                    None => buffers::empty_like(x)?,
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
                // Computed in the stats' dtype (fp32 for bf16/fp16, as torch's CUDA kernel
                // does), the results cast back: gx to the input's dtype, gw/gb to the weight's.
                let ck = stat_kind(x.kind());
                let mut stat_shape = x.size();
                let n = stat_shape.len();
                stat_shape[n - 1] = 1;
                let mean = mean.f_reshape(&stat_shape)?.f_to_kind(ck)?;
                let rstd = rstd.f_reshape(&stat_shape)?.f_to_kind(ck)?;
                let (gy, w32) = (gy.f_to_kind(ck)?, w.f_to_kind(ck)?);
                let xhat = x.f_to_kind(ck)?.f_sub(&mean)?.f_mul(&rstd)?;
                let lead: Vec<i64> = (0..gy.dim() as i64 - 1).collect();
                let gw = gy
                    .f_mul(&xhat)?
                    .f_sum_dim_intlist(lead.as_slice(), false, None::<Kind>)?
                    .f_to_kind(w.kind())?;
                let gb = gy
                    .f_sum_dim_intlist(lead.as_slice(), false, None::<Kind>)?
                    .f_to_kind(w.kind())?;
                let gxhat = gy.f_mul(&w32)?;
                let m1 = gxhat.f_mean_dim(-1, true, None::<Kind>)?;
                let m2 = gxhat.f_mul(&xhat)?.f_mean_dim(-1, true, None::<Kind>)?;
                let gx = gxhat
                    .f_sub(&m1)?
                    .f_sub(&xhat.f_mul(&m2)?)?
                    .f_mul(&rstd)?
                    .f_to_kind(x.kind())?;
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
    pub(super) fn attention(
        &self,
        qkv: &Tensor,
        cfg: &Cfg,
        r: &Run,
        drop: Dropout,
    ) -> Result<Tensor> {
        let (b, seq, nh, dh) = (r.b, r.seq, cfg.heads, cfg.dim_head);
        let scale = (dh as f64).powf(-0.5);
        match *self {
            Ops::Fused { dtype, threads } => {
                let o = buffers::empty(&[b, seq, nh * dh], qkv.kind())?;
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
    pub(super) fn attention_bwd(
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
                let g_qkv = buffers::empty_like(qkv)?;
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
    pub(super) fn gelu(&self, x: &Tensor, drop: Dropout) -> Result<Tensor> {
        match *self {
            Ops::Fused { dtype, threads } => {
                let y = buffers::empty_like(x)?;
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
    pub(super) fn gelu_bwd(
        &self,
        x: &Tensor,
        g: Tensor,
        drop: Dropout,
    ) -> Result<(Tensor, Tensor)> {
        match *self {
            Ops::Fused { dtype, threads } => {
                let y = buffers::empty_like(x)?;
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
    pub(super) fn add_dropout(
        &self,
        h: &Tensor,
        y: Option<&Tensor>,
        drop: Dropout,
    ) -> Result<Tensor> {
        match *self {
            Ops::Fused { dtype, threads } => {
                let out = buffers::empty_like(h)?;
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
    pub(super) fn masked(&self, g: &Tensor, drop: Dropout) -> Result<Tensor> {
        if drop.active() {
            self.add_dropout(g, None, drop)
        } else {
            Ok(g.shallow_clone())
        }
    }
}

/// 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'
pub(super) fn patchify(ops: Ops, x: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
    let (ph, pw) = cfg.patch;
    let (gh, gw) = (r.hh / ph, r.ww / pw);
    match ops {
        Ops::Fused { dtype, threads } => {
            let out = buffers::empty(&[r.b, gh * gw, ph * pw * r.c], x.kind())?;
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

pub(super) fn unpatchify(ops: Ops, g: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
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
pub(super) fn pool(x: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
    if cfg.pool_cls {
        Ok(x.f_select(1, 0)?)
    } else {
        Ok(x.f_narrow(1, r.ncls, r.seq - r.ncls)?
            .f_mean_dim(1, false, None::<Kind>)?)
    }
}

pub(super) fn unpool(g: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
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
