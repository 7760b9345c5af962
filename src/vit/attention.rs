//! Attention helpers: softmax attention as tch ops with its backward ([`Probs`]), the fused
//! kernels' attention descriptor, and the split/merge of heads.

use ferrotorch_kernels::vit as k;
use ferrotorch_kernels::vit::Dropout;
use tch::{Kind, Tensor};

use super::config::{Cfg, Run};
use super::ops::{ptr, torch_mask};
use crate::errors::Result;

/// Softmax attention as tch ops on per-head `q` (already scaled), `k`, `v` with any leading
/// dims (`(B*H, N, dh)` for every query, `(B, H, 1, dh)` for the cls row): the probabilities
/// and the dropout mask, kept for `pd @ v` and for the backward pass.
pub(super) struct Probs {
    p: Tensor,
    mask: Option<Tensor>,
}

impl Probs {
    pub(super) fn new(q: &Tensor, k: &Tensor, drop: Dropout) -> Result<Self> {
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
    pub(super) fn dropped(&self) -> Result<Tensor> {
        Ok(match &self.mask {
            Some(m) => self.p.f_mul(m)?,
            None => self.p.shallow_clone(),
        })
    }

    /// `(g_q, g_k, g_v)` of `o = dropped() @ v` from `g_o`; `q` is the scaled query and
    /// `scale` the factor it carries (so `g_q` is for the unscaled one).
    pub(super) fn backward(
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

pub(super) fn attn_desc(qkv: &Tensor, cfg: &Cfg, r: &Run, drop: Dropout) -> k::Attention {
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
pub(super) fn split_heads(qkv: &Tensor, cfg: &Cfg, r: &Run) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, seq, nh, dh) = (r.b, r.seq, cfg.heads, cfg.dim_head);
    let t = qkv
        .f_reshape([b, seq, 3, nh, dh])?
        .f_permute([2, 0, 3, 1, 4])?;
    let part = |i: i64| -> Result<Tensor> { Ok(t.f_get(i)?.f_reshape([b * nh, seq, dh])?) };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// `(B * H, N, dh)` -> `(B, N, H * dh)`.
pub(super) fn merge_heads(o: &Tensor, cfg: &Cfg, r: &Run) -> Result<Tensor> {
    let (b, seq, nh, dh) = (r.b, r.seq, cfg.heads, cfg.dim_head);
    Ok(o.f_reshape([b, nh, seq, dh])?
        .f_permute([0, 2, 1, 3])?
        .f_contiguous()?
        .f_reshape([b, seq, nh * dh])?)
}
