//! Vision Transformer (vit-pytorch's `ViT`) forward and backward, written out by hand.
//!
//! The forward pass records what the backward pass needs on a `VitTape`; the backward pass
//! returns the gradient of the input and of every parameter. No libtorch autograd is used:
//! all tensors here are plain values, and the matmuls go through tch (MKL on CPU).
//! Parameter order (as `ferrotorch.nn.ViT` lists them): patch LayerNorm w/b, patch Linear
//! w/b, embedding LayerNorm w/b, cls token (pool "cls" only), pos embedding, then per layer
//! attention LayerNorm w/b, to_qkv w, [to_out w/b], feed-forward LayerNorm w/b, Linear 1
//! w/b, Linear 2 w/b; then the final LayerNorm w/b and the head w/b.

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Kind, Tensor};

use crate::errors::{no_panic, Error, Result};

const EPS: f64 = 1e-5;

#[derive(Clone, Copy, Debug)]
struct Cfg {
    patch: (i64, i64),
    channels: i64,
    dim: i64,
    depth: usize,
    heads: i64,
    dim_head: i64,
    cls: bool,
    project_out: bool,
    dropout: f64,
    emb_dropout: f64,
}

struct Ln {
    xhat: Tensor,
    rstd: Tensor,
}

fn ln_fwd(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(Tensor, Ln)> {
    let d = *x.size().last().unwrap_or(&1);
    let (y, mean, rstd) = x.f_native_layer_norm([d], Some(w), Some(b), EPS)?;
    let xhat = x.f_sub(&mean)?.f_mul(&rstd)?;
    Ok((y, Ln { xhat, rstd }))
}

/// Returns (grad x, grad w, grad b).
fn ln_bwd(gy: &Tensor, c: &Ln, w: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let lead: Vec<i64> = (0..gy.dim() as i64 - 1).collect();
    let gw = gy
        .f_mul(&c.xhat)?
        .f_sum_dim_intlist(lead.as_slice(), false, None::<Kind>)?;
    let gb = gy.f_sum_dim_intlist(lead.as_slice(), false, None::<Kind>)?;
    let gxhat = gy.f_mul(w)?;
    let m1 = gxhat.f_mean_dim(-1, true, None::<Kind>)?;
    let m2 = gxhat.f_mul(&c.xhat)?.f_mean_dim(-1, true, None::<Kind>)?;
    let gx = gxhat
        .f_sub(&m1)?
        .f_sub(&c.xhat.f_mul(&m2)?)?
        .f_mul(&c.rstd)?;
    Ok((gx, gw, gb))
}

fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.f_matmul(&w.f_transpose(0, 1)?)?;
    Ok(match b {
        Some(b) => y.f_add(b)?,
        None => y,
    })
}

/// Returns (grad x, grad w, grad b).
fn linear_bwd(gy: &Tensor, x: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let out = *gy.size().last().unwrap_or(&1);
    let inp = *x.size().last().unwrap_or(&1);
    let gx = gy.f_matmul(w)?;
    let gy2 = gy.f_reshape([-1, out])?;
    let gw = gy2.f_transpose(0, 1)?.f_mm(&x.f_reshape([-1, inp])?)?;
    let gb = gy2.f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?;
    Ok((gx, gw, gb))
}

/// An inverted-dropout mask (None when off), drawn from torch's global generator.
fn dropout_mask(like: &Tensor, p: f64, train: bool) -> Result<Option<Tensor>> {
    if !train || p == 0.0 {
        return Ok(None);
    }
    if p >= 1.0 {
        return Ok(Some(like.f_zeros_like()?));
    }
    let keep = like.f_rand_like()?.f_lt(1.0 - p)?.f_to_kind(like.kind())?;
    Ok(Some(keep.f_div_scalar(1.0 - p)?))
}

fn apply(x: Tensor, m: &Option<Tensor>) -> Result<Tensor> {
    Ok(match m {
        Some(m) => x.f_mul(m)?,
        None => x,
    })
}

struct Layer {
    ln1: Ln,
    a_in: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    attn_mask: Option<Tensor>,
    attn_d: Tensor,
    o_merged: Tensor,
    out_mask: Option<Tensor>,
    ln2: Ln,
    f_in: Tensor,
    h1: Tensor,
    gd: Tensor,
    m1: Option<Tensor>,
    m2: Option<Tensor>,
}

struct Tape {
    cfg: Cfg,
    params: Vec<Tensor>,
    input_shape: Vec<i64>,
    ln_p: Ln,
    patches_ln: Tensor,
    ln_e: Ln,
    emb_mask: Option<Tensor>,
    layers: Vec<Layer>,
    ln_f: Ln,
    pooled: Tensor,
    seq: i64,
}

/// What the backward pass needs, kept between `vit_forward` and `VitTape.backward`.
#[pyclass(module = "ferrotorch._native")]
pub struct VitTape {
    tape: Option<TapeBox>,
}

struct TapeBox(Tape);
// SAFETY: the tape's tensors are only touched through `&mut VitTape` (PyO3's borrow flag).
unsafe impl Send for TapeBox {}
unsafe impl Sync for TapeBox {}

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
}

fn heads_split(t: &Tensor, b: i64, n: i64, h: i64, d: i64) -> Result<Tensor> {
    Ok(t.f_reshape([b, n, h, d])?.f_permute([0, 2, 1, 3])?)
}

fn forward(cfg: Cfg, x: &Tensor, params: Vec<Tensor>, train: bool) -> Result<(Tensor, Tape)> {
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
    let (gh, gw) = (hh / ph, ww / pw);
    // 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'
    let patches = x
        .f_reshape([b, c, gh, ph, gw, pw])?
        .f_permute([0, 2, 4, 3, 5, 1])?
        .f_reshape([b, gh * gw, ph * pw * c])?;
    let mut p = P { p: &params, i: 0 };
    let (ln_p_w, ln_p_b, lin_w, lin_b, ln_e_w, ln_e_b) = (
        p.next()?,
        p.next()?,
        p.next()?,
        p.next()?,
        p.next()?,
        p.next()?,
    );
    let (pn, ln_p) = ln_fwd(&patches, ln_p_w, ln_p_b)?;
    let e = linear(&pn, lin_w, Some(lin_b))?;
    let (tok, ln_e) = ln_fwd(&e, ln_e_w, ln_e_b)?;
    let tok = if cfg.cls {
        let cls = p.next()?;
        let ncls = cls.size()[0];
        Tensor::f_cat(
            &[
                cls.f_unsqueeze(0)?.f_expand([b, ncls, cfg.dim], false)?,
                tok,
            ],
            1,
        )?
    } else {
        tok
    };
    let pos = p.next()?;
    let seq = tok.size()[1];
    let mut h = tok.f_add(&pos.f_narrow(0, 0, seq)?)?;
    let emb_mask = dropout_mask(&h, cfg.emb_dropout, train)?;
    h = apply(h, &emb_mask)?;
    let (nh, dh) = (cfg.heads, cfg.dim_head);
    let inner = nh * dh;
    let scale = (dh as f64).powf(-0.5);
    let mut layers = Vec::with_capacity(cfg.depth);
    for _ in 0..cfg.depth {
        let (aw, ab, qkv_w) = (p.next()?, p.next()?, p.next()?);
        let out = if cfg.project_out {
            Some((p.next()?, p.next()?))
        } else {
            None
        };
        let (fw, fb, w1, b1, w2, b2) = (
            p.next()?,
            p.next()?,
            p.next()?,
            p.next()?,
            p.next()?,
            p.next()?,
        );
        let (a_in, ln1) = ln_fwd(&h, aw, ab)?;
        let qkv = linear(&a_in, qkv_w, None)?.f_chunk(3, -1)?;
        let q = heads_split(&qkv[0], b, seq, nh, dh)?;
        let k = heads_split(&qkv[1], b, seq, nh, dh)?;
        let v = heads_split(&qkv[2], b, seq, nh, dh)?;
        let dots = q.f_matmul(&k.f_transpose(-1, -2)?)?.f_mul_scalar(scale)?;
        let attn = dots.f_softmax(-1, None::<Kind>)?;
        let attn_mask = dropout_mask(&attn, cfg.dropout, train)?;
        let attn_d = apply(attn.shallow_clone(), &attn_mask)?;
        let o = attn_d.f_matmul(&v)?;
        let o_merged = o.f_permute([0, 2, 1, 3])?.f_reshape([b, seq, inner])?;
        let (y, out_mask) = match out {
            Some((ow, ob)) => {
                let y = linear(&o_merged, ow, Some(ob))?;
                let m = dropout_mask(&y, cfg.dropout, train)?;
                (apply(y, &m)?, m)
            }
            None => (o_merged.shallow_clone(), None),
        };
        h = y.f_add(&h)?;
        let (f_in, ln2) = ln_fwd(&h, fw, fb)?;
        let h1 = linear(&f_in, w1, Some(b1))?;
        let g = h1.f_gelu("none")?;
        let m1 = dropout_mask(&g, cfg.dropout, train)?;
        let gd = apply(g, &m1)?;
        let y2 = linear(&gd, w2, Some(b2))?;
        let m2 = dropout_mask(&y2, cfg.dropout, train)?;
        h = apply(y2, &m2)?.f_add(&h)?;
        layers.push(Layer {
            ln1,
            a_in,
            q,
            k,
            v,
            attn,
            attn_mask,
            attn_d,
            o_merged,
            out_mask,
            ln2,
            f_in,
            h1,
            gd,
            m1,
            m2,
        });
    }
    let (fw, fb, hw, hb) = (p.next()?, p.next()?, p.next()?, p.next()?);
    if p.i != params.len() {
        return Err(Error::Value(format!(
            "ViT: got {} parameters, the configuration uses {}",
            params.len(),
            p.i
        )));
    }
    let (xf, ln_f) = ln_fwd(&h, fw, fb)?;
    let pooled = if cfg.cls {
        xf.f_select(1, 0)?
    } else {
        xf.f_mean_dim(1, false, None::<Kind>)?
    };
    let logits = linear(&pooled, hw, Some(hb))?;
    let tape = Tape {
        cfg,
        params,
        input_shape: size,
        ln_p,
        patches_ln: pn,
        ln_e,
        emb_mask,
        layers,
        ln_f,
        pooled,
        seq,
    };
    Ok((logits, tape))
}

fn backward(t: &Tape, g_logits: &Tensor) -> Result<Vec<Tensor>> {
    let cfg = t.cfg;
    let n_params = t.params.len();
    let mut grads: Vec<Option<Tensor>> = (0..n_params).map(|_| None).collect();
    let pr = &t.params;
    // Parameter indices, in forward order.
    let mut idx = 0usize;
    let mut take = || {
        idx += 1;
        idx - 1
    };
    let (i_lnp_w, i_lnp_b, i_lin_w, i_lin_b, i_lne_w, i_lne_b) =
        (take(), take(), take(), take(), take(), take());
    let i_cls = if cfg.cls { Some(take()) } else { None };
    let i_pos = take();
    let mut layer_idx = Vec::new();
    for _ in 0..cfg.depth {
        let a = (take(), take(), take());
        let out = if cfg.project_out {
            Some((take(), take()))
        } else {
            None
        };
        let f = (take(), take(), take(), take(), take(), take());
        layer_idx.push((a, out, f));
    }
    let (i_fw, i_fb, i_hw, i_hb) = (take(), take(), take(), take());

    let (g_pooled, g_hw, g_hb) = linear_bwd(g_logits, &t.pooled, &pr[i_hw])?;
    grads[i_hw] = Some(g_hw);
    grads[i_hb] = Some(g_hb);
    let b = t.input_shape[0];
    let seq = t.seq;
    let g_xf = if cfg.cls {
        let z = Tensor::f_zeros([b, seq, cfg.dim], (g_pooled.kind(), g_pooled.device()))?;
        let first = g_pooled.f_unsqueeze(1)?;
        Tensor::f_cat(&[first, z.f_narrow(1, 1, seq - 1)?], 1)?
    } else {
        g_pooled
            .f_unsqueeze(1)?
            .f_expand([b, seq, cfg.dim], false)?
            .f_div_scalar(seq as f64)?
    };
    let (mut gh, g_fw, g_fb) = ln_bwd(&g_xf, &t.ln_f, &pr[i_fw])?;
    grads[i_fw] = Some(g_fw);
    grads[i_fb] = Some(g_fb);
    let (nh, dh) = (cfg.heads, cfg.dim_head);
    let inner = nh * dh;
    let scale = (dh as f64).powf(-0.5);
    let inv_sqrt2 = std::f64::consts::FRAC_1_SQRT_2;
    let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    for (l, (ai, out_i, fi)) in t.layers.iter().zip(layer_idx).rev() {
        // Feed-forward block: h = dropout(W2 dropout(gelu(W1 LN(h)))) + h
        let g_y2 = apply(gh.shallow_clone(), &l.m2)?;
        let (g_gd, g_w2, g_b2) = linear_bwd(&g_y2, &l.gd, &pr[fi.4])?;
        let g_g = apply(g_gd, &l.m1)?;
        let cdf =
            l.h1.f_mul_scalar(inv_sqrt2)?
                .f_erf()?
                .f_add_scalar(1.0)?
                .f_mul_scalar(0.5)?;
        let pdf =
            l.h1.f_square()?
                .f_mul_scalar(-0.5)?
                .f_exp()?
                .f_mul_scalar(inv_sqrt_2pi)?;
        let g_h1 = g_g.f_mul(&cdf.f_add(&l.h1.f_mul(&pdf)?)?)?;
        let (g_fin, g_w1, g_b1) = linear_bwd(&g_h1, &l.f_in, &pr[fi.2])?;
        let (g_ln2, g_fw, g_fb) = ln_bwd(&g_fin, &l.ln2, &pr[fi.0])?;
        grads[fi.0] = Some(g_fw);
        grads[fi.1] = Some(g_fb);
        grads[fi.2] = Some(g_w1);
        grads[fi.3] = Some(g_b1);
        grads[fi.4] = Some(g_w2);
        grads[fi.5] = Some(g_b2);
        gh = gh.f_add(&g_ln2)?;
        // Attention block: h = to_out(attend(LN(h))) + h
        let g_o_merged = match out_i {
            Some((ow, ob)) => {
                let g_y = apply(gh.shallow_clone(), &l.out_mask)?;
                let (g_om, g_ow, g_ob) = linear_bwd(&g_y, &l.o_merged, &pr[ow])?;
                grads[ow] = Some(g_ow);
                grads[ob] = Some(g_ob);
                g_om
            }
            None => gh.shallow_clone(),
        };
        let g_o = heads_split(&g_o_merged, b, seq, nh, dh)?;
        let g_attn_d = g_o.f_matmul(&l.v.f_transpose(-1, -2)?)?;
        let g_v = l.attn_d.f_transpose(-1, -2)?.f_matmul(&g_o)?;
        let g_attn = apply(g_attn_d, &l.attn_mask)?;
        let inner_sum =
            g_attn
                .f_mul(&l.attn)?
                .f_sum_dim_intlist([-1i64].as_slice(), true, None::<Kind>)?;
        let g_dots = l
            .attn
            .f_mul(&g_attn.f_sub(&inner_sum)?)?
            .f_mul_scalar(scale)?;
        let g_q = g_dots.f_matmul(&l.k)?;
        let g_k = g_dots.f_transpose(-1, -2)?.f_matmul(&l.q)?;
        let merge = |t: &Tensor| -> Result<Tensor> {
            Ok(t.f_permute([0, 2, 1, 3])?.f_reshape([b, seq, inner])?)
        };
        let g_qkv = Tensor::f_cat(&[merge(&g_q)?, merge(&g_k)?, merge(&g_v)?], -1)?;
        let (g_ain, g_qkv_w, _) = linear_bwd(&g_qkv, &l.a_in, &pr[ai.2])?;
        let (g_ln1, g_aw, g_ab) = ln_bwd(&g_ain, &l.ln1, &pr[ai.0])?;
        grads[ai.0] = Some(g_aw);
        grads[ai.1] = Some(g_ab);
        grads[ai.2] = Some(g_qkv_w);
        gh = gh.f_add(&g_ln1)?;
    }
    let gh = apply(gh, &t.emb_mask)?;
    grads[i_pos] = Some({
        let pos = &pr[i_pos];
        let g = gh.f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?;
        let rows = pos.size()[0];
        if rows > seq {
            let z = Tensor::f_zeros([rows - seq, cfg.dim], (g.kind(), g.device()))?;
            Tensor::f_cat(&[g, z], 0)?
        } else {
            g
        }
    });
    let ncls = if let Some(ic) = i_cls {
        let n = pr[ic].size()[0];
        grads[ic] = Some(gh.f_narrow(1, 0, n)?.f_sum_dim_intlist(
            [0i64].as_slice(),
            false,
            None::<Kind>,
        )?);
        n
    } else {
        0
    };
    let g_tok = gh.f_narrow(1, ncls, seq - ncls)?;
    let (g_e, g_ew, g_eb) = ln_bwd(&g_tok, &t.ln_e, &pr[i_lne_w])?;
    grads[i_lne_w] = Some(g_ew);
    grads[i_lne_b] = Some(g_eb);
    let (g_pn, g_lw, g_lb) = linear_bwd(&g_e, &t.patches_ln, &pr[i_lin_w])?;
    grads[i_lin_w] = Some(g_lw);
    grads[i_lin_b] = Some(g_lb);
    let (g_patches, g_pw, g_pb) = ln_bwd(&g_pn, &t.ln_p, &pr[i_lnp_w])?;
    grads[i_lnp_w] = Some(g_pw);
    grads[i_lnp_b] = Some(g_pb);
    // Undo 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'.
    let s = &t.input_shape;
    let (c, hh, ww) = (s[1], s[2], s[3]);
    let (ph, pw) = cfg.patch;
    let g_x = g_patches
        .f_reshape([b, hh / ph, ww / pw, ph, pw, c])?
        .f_permute([0, 5, 1, 3, 2, 4])?
        .f_reshape([b, c, hh, ww])?;
    let mut out = vec![g_x];
    for (i, g) in grads.into_iter().enumerate() {
        out.push(g.ok_or_else(|| {
            Error::Runtime(format!(
                "ViT backward produced no gradient for parameter {i}"
            ))
        })?);
    }
    Ok(out)
}

/// Forward pass: `(logits, tape)`. `patch`, `heads`, … describe the model; `params` are its
/// parameters in `ferrotorch.nn.ViT`'s order.
#[pyfunction]
#[pyo3(signature = (x, params, patch, channels, dim, depth, heads, dim_head, pool_cls, project_out, dropout, emb_dropout, train))]
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
    pool_cls: bool,
    project_out: bool,
    dropout: f64,
    emb_dropout: f64,
    train: bool,
) -> PyResult<(PyTensor, VitTape)> {
    let cfg = Cfg {
        patch,
        channels,
        dim,
        depth,
        heads,
        dim_head,
        cls: pool_cls,
        project_out,
        dropout,
        emb_dropout,
    };
    let params: Vec<Tensor> = params.into_iter().map(|t| t.0.shallow_clone()).collect();
    let x = x.0.shallow_clone();
    let res = py.allow_threads(move || {
        no_panic("ViT forward", || {
            tch::no_grad(|| forward(cfg, &x, params, train))
        })
    });
    let (logits, tape) = res?;
    Ok((
        PyTensor(logits),
        VitTape {
            tape: Some(TapeBox(tape)),
        },
    ))
}

/// The backward pass's inputs, moved into the GIL-free section.
struct BackwardJob<'a>(&'a Tape, Tensor);
// SAFETY: the tape is borrowed from `&VitTape` for the whole call and only read.
unsafe impl Send for BackwardJob<'_> {}

impl BackwardJob<'_> {
    fn run(self) -> Result<Vec<Tensor>> {
        no_panic("ViT backward", || {
            tch::no_grad(|| backward(self.0, &self.1))
        })
    }
}

#[pymethods]
impl VitTape {
    /// Gradients `[d input, d param 0, d param 1, …]` for `grad_logits`. The tape stays
    /// (backward may run again with `retain_graph=True`) until `free()` or garbage collection.
    fn backward(&self, py: Python<'_>, grad_logits: PyTensor) -> PyResult<Vec<PyTensor>> {
        let tape = self
            .tape
            .as_ref()
            .ok_or_else(|| Error::Runtime("ViT backward after the tape was freed".into()))?;
        let job = BackwardJob(&tape.0, grad_logits.0.shallow_clone());
        let grads = py.allow_threads(move || job.run())?;
        Ok(grads.into_iter().map(PyTensor).collect())
    }

    /// Releases the saved activations.
    fn free(&mut self) {
        self.tape = None;
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<VitTape>()?;
    m.add_function(wrap_pyfunction!(vit_forward, m)?)?;
    Ok(())
}
