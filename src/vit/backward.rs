//! The backward pass: every gradient from the logits' gradient and the saved activations.

use tch::{Kind, Tensor};

use super::cls::{cls_layer_bwd, prune_last, Lp, CLS_SAVED};
use super::config::{Cfg, Run};
use super::matmul::{linear_bwd, matmul_nn};
use super::ops::{last, unpatchify, unpool, Ops};
use crate::errors::{Error, Result};

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

pub(super) fn backward(
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
