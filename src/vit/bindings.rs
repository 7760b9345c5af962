//! The Python bindings: `vit_forward`, `vit_backward` and the `VitRun` they share; device
//! dispatch and the GIL-free sections.

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Device, Kind, Tensor};

use super::backward::backward;
use super::config::{
    check_grad, check_input, check_params, check_saved, dense, param_name, Cfg, Run, SavedSpec,
    Widths,
};
use super::forward::{forward, infer};
use super::matmul::with_onednn;
use super::ops::Ops;
use crate::access::{kernel_dtype, plain_tensor};
use crate::errors::{no_panic, Error};

/// What `backward` needs besides the saved tensors: the configuration, the batch's shape and
/// dropout seed, and what forward was given and saved (dtype and device of the images, the
/// parameters' free widths, each saved tensor's shape and dtype), to check backward's
/// tensors against. Holds no tensors.
#[pyclass(module = "ferrotorch._native", frozen)]
pub struct VitRun {
    cfg: Cfg,
    run: Run,
    fused: bool,
    like: (Kind, Device),
    widths: Widths,
    saved: SavedSpec,
}

/// The libtorch handle of `obj` if it is a plain `torch.Tensor`/`nn.Parameter` (subclasses
/// such as FakeTensor, DTensor or `__torch_function__` types are refused: the pointers they
/// report are not theirs, or they have none).
fn plain(obj: &Bound<'_, PyAny>, what: impl FnOnce() -> String) -> PyResult<Tensor> {
    plain_tensor(obj)?.ok_or_else(|| {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        Error::Type(format!(
            "{} is a {ty}, expected a plain torch.Tensor or nn.Parameter",
            what()
        ))
        .into()
    })
}

/// [`plain`] for each parameter, errors naming it.
fn plain_params(
    objs: &[Bound<'_, PyAny>],
    cfg: &Cfg,
    hw: (i64, i64),
    what: &str,
) -> PyResult<Vec<Tensor>> {
    objs.iter()
        .enumerate()
        .map(|(i, o)| {
            plain(o, || {
                format!("{what}: parameter {}", param_name(cfg, hw, i))
            })
        })
        .collect()
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
    x: Bound<'_, PyAny>,
    params: Vec<Bound<'_, PyAny>>,
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
    // Every tensor is checked here, before any kernel runs: the kernels read them as raw
    // buffers of the sizes the configuration implies.
    let x = plain(&x, || "ViT: the images".into())?;
    let ((b, c, hh, ww), xm) = check_input(&cfg, &x)?;
    let like = (xm.kind, xm.device);
    let params = plain_params(&params, &cfg, (hh, ww), "ViT")?;
    let widths = check_params("ViT", &cfg, (hh, ww), like, &params, None)?;
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
    let job = Job((x, params, cfg, run));
    let (logits, saved, spec, run_out, fused_used) = py
        .allow_threads(move || {
            let Job((x, params, cfg, mut run)) = job;
            no_panic("ViT forward", || {
                with_onednn(cfg.onednn, || {
                    tch::no_grad(|| {
                        let x = dense(&x)?;
                        let params = params.iter().map(dense).collect::<Result<Vec<_>, _>>()?;
                        let ops = pick_ops(&x, &params, fused);
                        let dropout_on = run.drop(cfg.dropout, 1).active()
                            || run.drop(cfg.emb_dropout, 0).active();
                        let (logits, saved) = if infer_chunk > 0 && !dropout_on && run.b > 0 {
                            infer(ops, &cfg, &x, &params, &mut run, infer_chunk)?
                        } else {
                            forward(ops, &cfg, &x, &params, &mut run, true)?
                        };
                        let spec: SavedSpec = saved
                            .iter()
                            .map(|t| Ok((t.size(), t.f_kind()?)))
                            .collect::<Result<_, Error>>()?;
                        let fused = matches!(ops, Ops::Fused { .. });
                        Ok(Job((logits, saved, spec, run, fused)))
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
            like,
            widths,
            saved: spec,
        },
    ))
}

/// Values moved into the GIL-free section.
struct Job<T>(T);
// SAFETY: tch tensors are reference-counted handles to libtorch tensors, which may be used
// from any thread; the Python objects that own them stay alive for the whole call.
unsafe impl<T> Send for Job<T> {}

/// Backward pass: `[grad input, grad param 0, …]` from the logits' gradient, the parameters
/// and the tensors `vit_forward` saved. Each is checked against what that forward pass was
/// given and saved first.
#[pyfunction]
pub fn vit_backward(
    py: Python<'_>,
    run: &VitRun,
    grad_logits: Bound<'_, PyAny>,
    params: Vec<Bound<'_, PyAny>>,
    saved: Vec<Bound<'_, PyAny>>,
) -> PyResult<Vec<PyTensor>> {
    let (cfg, r, fused) = (run.cfg, run.run, run.fused);
    let g = plain(&grad_logits, || "ViT backward: grad_logits".into())?;
    check_grad(&g, [r.b, run.widths.classes], run.like.1)?;
    let hw = (r.hh, r.ww);
    let params = plain_params(&params, &cfg, hw, "ViT backward")?;
    check_params(
        "ViT backward",
        &cfg,
        hw,
        run.like,
        &params,
        Some(&run.widths),
    )?;
    let saved = saved
        .iter()
        .enumerate()
        .map(|(i, o)| plain(o, || format!("ViT backward: saved tensor {i}")))
        .collect::<PyResult<Vec<_>>>()?;
    check_saved(&run.saved, run.like.1, &saved)?;
    let job = Job((g, params, saved));
    let grads = py
        .allow_threads(move || {
            let Job((g, params, saved)) = job;
            no_panic("ViT backward", || {
                with_onednn(cfg.onednn, || {
                    tch::no_grad(|| {
                        let g =
                            dense(&g)?.f_to_kind(saved.last().map_or(g.kind(), |t| t.kind()))?;
                        let params = params.iter().map(dense).collect::<Result<Vec<_>, _>>()?;
                        let saved = saved.iter().map(dense).collect::<Result<Vec<_>, _>>()?;
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
