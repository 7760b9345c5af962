//! The pruned last layer under cls pooling: forward and backward of a transformer layer
//! whose queries, out projection and feed-forward run on the cls token alone.

use ferrotorch_kernels::vit::Dropout;
use tch::{Kind, Tensor};

use super::attention::Probs;
use super::config::{Cfg, Run};
use super::forward::Sink;
use super::matmul::{linear, linear_bwd, matmul_nn};
use super::ops::Ops;
use crate::errors::{Error, Result};

/// With cls pooling the head reads token 0 only, so in the last layer only the keys and
/// values need every token: its queries, attention rows, out projection and feed-forward
/// run on token 0 alone (about 12 % of a depth-6 model's FLOPs, skipped exactly).
pub(super) fn prune_last(cfg: &Cfg) -> bool {
    cfg.pool_cls && cfg.depth > 0
}

/// Tensors the pruned last layer saves: h_in, m1, r1, kv, q, o, h_mid, m2, r2, h1.
pub(super) const CLS_SAVED: usize = 10;

/// One layer's parameters.
pub(super) struct Lp<'a> {
    pub(super) aw: &'a Tensor,
    pub(super) ab: &'a Tensor,
    pub(super) qkv_w: &'a Tensor,
    pub(super) qkv_b: Option<&'a Tensor>,
    pub(super) out: Option<(&'a Tensor, &'a Tensor)>,
    /// Feed-forward LayerNorm w/b, Linear 1 w/b, Linear 2 w/b.
    pub(super) f: [&'a Tensor; 6],
}

/// One layer's parameter gradients, in `Lp`'s order.
pub(super) struct LayerGrads {
    pub(super) a: [Tensor; 3],
    pub(super) qkv_b: Option<Tensor>,
    pub(super) out: Option<(Tensor, Tensor)>,
    pub(super) f: [Tensor; 6],
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
pub(super) fn cls_layer(
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
pub(super) fn cls_layer_bwd(
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
