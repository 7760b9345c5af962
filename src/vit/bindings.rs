//! The Python bindings: `vit_forward`, `vit_backward` and the `VitRun` they share; device
//! dispatch and the GIL-free sections.

use pyo3::prelude::*;
use pyo3_tch::PyTensor;
use tch::{Device, Tensor};

use super::backward::backward;
use super::config::{check_input, Cfg, Run};
use super::forward::{forward, infer};
use super::matmul::with_onednn;
use super::ops::Ops;
use crate::access::kernel_dtype;
use crate::errors::no_panic;

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
