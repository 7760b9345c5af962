//! The forward pass (saving the activations backward needs) and chunked inference.

use ferrotorch_kernels::vit::Dropout;
use tch::Tensor;

use super::cls::{cls_layer, prune_last, Lp};
use super::config::{Cfg, Run, P};
use super::matmul::linear;
use super::ops::{patchify, pool, Ops};
use crate::errors::{Error, Result};

/// Where the forward pass puts the activations backward needs; with `keep` off (inference)
/// they are dropped as soon as the forward pass is done with them.
pub(super) struct Sink {
    v: Vec<Tensor>,
    keep: bool,
}

impl Sink {
    pub(super) fn extend<const N: usize>(&mut self, t: [Tensor; N]) {
        if self.keep {
            self.v.extend(t);
        }
    }
    fn push(&mut self, t: Tensor) {
        self.extend([t]);
    }
}

pub(super) fn forward(
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

/// Inference: the forward pass over `chunk` images at a time, saving nothing. A chunk's
/// activations stay in cache and its buffers are reused by the allocator, where a whole
/// batch's would stream through memory (and fault in fresh pages) op after op. Only used
/// without dropout, whose masks are hashed from positions within the batch, and only on the
/// CPU kernels' path.
pub(super) fn infer(
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
