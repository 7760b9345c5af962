//! `GroupPlan`: one optimizer param group, resolved once into the tensors the kernel updates.
//!
//! Python builds a plan when a group's parameters or state layout change; each `step` then
//! costs O(1) Python work per group. The plan reads every parameter's `.grad` itself, checks
//! all tensors before changing any, bumps the step counters, and runs the fused kernel with
//! the GIL released. Tensors the kernel cannot take (CUDA, non-contiguous, complex, sparse,
//! mismatched state dtypes…) are returned to Python, which steps them with torch's own
//! single-tensor functions.

use ferrotorch_kernels::{
    adagrad::Adagrad, adam::Adam, common::GradIn, rmsprop::RmsProp, sgd::Sgd, sgd::SgdScalars,
    Algorithm, DType, Job, MAX_STATES,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3_tch::PyTensor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ferrotorch_kernels::Executor;
use tch::Tensor;

use crate::errors::{no_panic, Error, Result};
use crate::tensor::{
    byte_range, check_grad_matches, flat_cpu, kernel_dtype, overlaps, StepCounter,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Adam,
    Sgd,
    RmsProp,
    Adagrad,
}

impl Kind {
    fn parse(name: &str) -> Result<Kind> {
        match name {
            "adam" => Ok(Kind::Adam),
            "sgd" => Ok(Kind::Sgd),
            "rmsprop" => Ok(Kind::RmsProp),
            "adagrad" => Ok(Kind::Adagrad),
            _ => Err(Error::Value(format!(
                "kind: expected one of 'adam', 'sgd', 'rmsprop', 'adagrad', got {name:?}"
            ))),
        }
    }
    fn has_step(self) -> bool {
        self != Kind::Sgd
    }
    fn label(self) -> &'static str {
        match self {
            Kind::Adam => "Adam",
            Kind::Sgd => "SGD",
            Kind::RmsProp => "RMSprop",
            Kind::Adagrad => "Adagrad",
        }
    }
}

struct Entry {
    /// Position of the parameter in `group["params"]`.
    index: usize,
    param: Tensor,
    states: Vec<Tensor>,
    step: Option<Tensor>,
    /// SGD: the momentum buffer is created by this entry's next step.
    first: bool,
    /// What the last full check found out about param, states and step, keyed by the
    /// param's data pointer: `p.data = …` (e.g. `model.to()`) moves it and forces a re-check.
    /// State tensors only change through `load_state_dict`/new plans, which rebuild entries.
    cache: Option<Checked>,
}

#[derive(Clone, Copy)]
struct Checked {
    param_ptr: usize,
    /// None: the kernel cannot take this parameter (torch steps it).
    fast: Option<FastParts>,
}

#[derive(Clone, Copy)]
struct FastParts {
    dtype: DType,
    numel: usize,
    /// param, then states; the grad pointer is read every step.
    ptrs: [*mut u8; 1 + MAX_STATES],
    ranges: [(usize, usize); 1 + MAX_STATES],
    step: Option<StepCounter>,
}

/// The tensors of a plan. tch tensors are reference-counted handles; every access goes
/// through `&mut GroupPlan`, which PyO3 guards against concurrent use, so sharing the
/// plan object between threads is sound.
struct Tensors {
    entries: Vec<Entry>,
    pending: Vec<Tensor>,
}
unsafe impl Send for Tensors {}
unsafe impl Sync for Tensors {}

/// One parameter group prepared for the fused kernels. Built by `ferrotorch.optim`.
#[pyclass(module = "ferrotorch._native")]
pub struct GroupPlan {
    kind: Kind,
    t: Tensors,
}

fn get<'py>(group: &Bound<'py, PyDict>, key: &str) -> Result<Bound<'py, PyAny>> {
    group
        .get_item(key)
        .map_err(|e| Error::Runtime(e.to_string()))?
        .ok_or_else(|| {
            Error::Value(format!(
                "param_group is missing the hyper-parameter '{key}'"
            ))
        })
}

/// A hyper-parameter as a float; 1-element tensors (lr, betas, weight_decay) are accepted.
fn float(group: &Bound<'_, PyDict>, key: &str) -> Result<f64> {
    let v = get(group, key)?;
    v.extract::<f64>().map_err(|_| {
        let ty = v
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        Error::Type(format!(
            "param_group['{key}'] must be a float or a 1-element tensor, got {ty}"
        ))
    })
}

fn flag(group: &Bound<'_, PyDict>, key: &str, default: bool) -> Result<bool> {
    match group
        .get_item(key)
        .map_err(|e| Error::Runtime(e.to_string()))?
    {
        None => Ok(default),
        Some(v) => v
            .is_truthy()
            .map_err(|e| Error::Type(format!("param_group['{key}']: {e}"))),
    }
}

fn betas(group: &Bound<'_, PyDict>) -> Result<(f64, f64)> {
    let v = get(group, "betas")?;
    let bad = || Error::Type("param_group['betas'] must be a pair of floats".to_string());
    let b0 = v
        .get_item(0)
        .map_err(|_| bad())?
        .extract::<f64>()
        .map_err(|_| bad())?;
    let b1 = v
        .get_item(1)
        .map_err(|_| bad())?
        .extract::<f64>()
        .map_err(|_| bad())?;
    Ok((b0, b1))
}

enum Algo {
    Adam(Adam),
    Sgd(Sgd),
    RmsProp(RmsProp),
    Adagrad(Adagrad),
}

impl Algo {
    fn from_group(
        kind: Kind,
        g: &Bound<'_, PyDict>,
        grad_scale: Option<f64>,
        clip_coef: Option<f64>,
    ) -> Result<Algo> {
        Ok(match kind {
            Kind::Adam => {
                let (beta1, beta2) = betas(g)?;
                Algo::Adam(Adam {
                    lr: float(g, "lr")?,
                    beta1,
                    beta2,
                    eps: float(g, "eps")?,
                    weight_decay: float(g, "weight_decay")?,
                    amsgrad: flag(g, "amsgrad", false)?,
                    maximize: flag(g, "maximize", false)?,
                    decoupled_weight_decay: flag(g, "decoupled_weight_decay", false)?,
                    grad: GradIn {
                        grad_scale,
                        clip_coef,
                    },
                })
            }
            Kind::Sgd => Algo::Sgd(Sgd {
                lr: float(g, "lr")?,
                momentum: float(g, "momentum")?,
                dampening: float(g, "dampening")?,
                weight_decay: float(g, "weight_decay")?,
                nesterov: flag(g, "nesterov", false)?,
                maximize: flag(g, "maximize", false)?,
                grad: GradIn {
                    grad_scale,
                    clip_coef,
                },
            }),
            Kind::RmsProp => Algo::RmsProp(RmsProp {
                lr: float(g, "lr")?,
                alpha: float(g, "alpha")?,
                eps: float(g, "eps")?,
                weight_decay: float(g, "weight_decay")?,
                momentum: float(g, "momentum")?,
                centered: flag(g, "centered", false)?,
                maximize: flag(g, "maximize", false)?,
                grad: GradIn {
                    grad_scale,
                    clip_coef,
                },
            }),
            Kind::Adagrad => Algo::Adagrad(Adagrad {
                lr: float(g, "lr")?,
                lr_decay: float(g, "lr_decay")?,
                weight_decay: float(g, "weight_decay")?,
                eps: float(g, "eps")?,
                maximize: flag(g, "maximize", false)?,
                grad: GradIn {
                    grad_scale,
                    clip_coef,
                },
            }),
        })
    }

    fn n_states(&self) -> usize {
        match self {
            Algo::Adam(a) => a.n_states(),
            Algo::Sgd(a) => a.n_states(),
            Algo::RmsProp(a) => a.n_states(),
            Algo::Adagrad(a) => a.n_states(),
        }
    }
}

/// A validated entry ready for the kernel.
struct Ready {
    entry: usize,
    dtype: DType,
    numel: usize,
    ptrs: [*mut u8; 2 + MAX_STATES],
    step: Option<StepCounter>,
}
unsafe impl Send for Ready {}
// SAFETY: the cached pointers are only dereferenced by the kernel, under the plan's `&mut`.
unsafe impl Send for Entry {}

/// Outcome of validating one entry.
enum Verdict {
    NoGrad,
    Slow,
    Fast(Ready),
}

impl GroupPlan {
    /// The full check of an entry's param, states and step (not its grad).
    fn check_entry(kind: Kind, e: &Entry, n_states: usize) -> Result<Checked> {
        let param_ptr = e.param.data_ptr() as usize;
        let slow = Checked {
            param_ptr,
            fast: None,
        };
        if e.states.len() != n_states {
            return Err(Error::Runtime(format!(
                "{}: parameter {} has {} state tensors, the group's settings need {n_states}",
                kind.label(),
                e.index,
                e.states.len()
            )));
        }
        let Some(dtype) = kernel_dtype(&e.param) else {
            return Ok(slow);
        };
        let numel = e.param.numel();
        let mut ptrs = [std::ptr::null_mut(); 1 + MAX_STATES];
        let mut ranges = [(0usize, 0usize); 1 + MAX_STATES];
        for (slot, t) in std::iter::once(&e.param).chain(e.states.iter()).enumerate() {
            if !flat_cpu(t) || kernel_dtype(t) != Some(dtype) || t.numel() != numel {
                return Ok(slow);
            }
            ptrs[slot] = t.data_ptr() as *mut u8;
            ranges[slot] = byte_range(t, dtype);
        }
        // Buffers that share memory would alias `&mut` slices: let torch handle those.
        for a in 0..=n_states {
            for b in a + 1..=n_states {
                if overlaps(ranges[a], ranges[b]) {
                    return Ok(slow);
                }
            }
        }
        let step = match (&e.step, kind.has_step()) {
            (Some(s), true) => match StepCounter::of(s) {
                Some(c) => Some(c),
                None => return Ok(slow),
            },
            (None, true) => {
                return Err(Error::Runtime(format!(
                    "parameter {} has no 'step' state",
                    e.index
                )))
            }
            (_, false) => None,
        };
        Ok(Checked {
            param_ptr,
            fast: Some(FastParts {
                dtype,
                numel,
                ptrs,
                ranges,
                step,
            }),
        })
    }

    fn classify(
        kind: Kind,
        k: usize,
        e: &mut Entry,
        grad: &Tensor,
        n_states: usize,
    ) -> Result<Verdict> {
        if !grad.defined() {
            return Ok(Verdict::NoGrad);
        }
        if grad.is_sparse() {
            return match kind {
                Kind::Adam => Err(Error::Runtime(
                    "Adam does not support sparse gradients, please consider SparseAdam instead"
                        .to_string(),
                )),
                Kind::RmsProp => Err(Error::Runtime(
                    "RMSprop does not support sparse gradients".to_string(),
                )),
                _ => Ok(Verdict::Slow),
            };
        }
        let param_ptr = e.param.data_ptr() as usize;
        let checked = match e.cache {
            Some(c) if c.param_ptr == param_ptr => c,
            _ => {
                let c = Self::check_entry(kind, e, n_states)?;
                e.cache = Some(c);
                c
            }
        };
        let Some(f) = checked.fast else {
            check_grad_matches(e.index, &e.param, grad)?;
            return Ok(Verdict::Slow);
        };
        if kernel_dtype(grad) != Some(f.dtype) || grad.numel() != f.numel {
            check_grad_matches(e.index, &e.param, grad)?;
            return Ok(Verdict::Slow);
        }
        if grad.device() != tch::Device::Cpu || !grad.is_contiguous() {
            return Ok(Verdict::Slow);
        }
        let g = byte_range(grad, f.dtype);
        if f.ranges[..=n_states].iter().any(|&r| overlaps(r, g)) {
            return Ok(Verdict::Slow);
        }
        let mut ptrs = [std::ptr::null_mut(); 2 + MAX_STATES];
        ptrs[0] = f.ptrs[0];
        ptrs[1] = g.0 as *mut u8;
        ptrs[2..].copy_from_slice(&f.ptrs[1..]);
        Ok(Verdict::Fast(Ready {
            entry: k,
            dtype: f.dtype,
            numel: f.numel,
            ptrs,
            step: f.step,
        }))
    }
}

fn jobs_for<S: Copy>(ready: &[Ready], mut scalars: impl FnMut(&Ready) -> S) -> Vec<Job<S>> {
    ready
        .iter()
        .map(|r| Job {
            dtype: r.dtype,
            numel: r.numel,
            param: r.ptrs[0],
            grad: r.ptrs[1],
            states: [r.ptrs[2], r.ptrs[3], r.ptrs[4]],
            scalars: scalars(r),
        })
        .collect()
}

/// Entries per unit of parallel checking.
const CHECK_CHUNK: usize = 128;

/// Checks every entry (in parallel for large groups), then bumps the step counters and runs
/// the kernel. Nothing is changed unless every check passed.
fn step_group(
    kind: Kind,
    t: &mut Tensors,
    algo: Algo,
    threads: usize,
) -> Result<(bool, Vec<(usize, bool)>)> {
    if t.pending
        .iter()
        .any(|p| p.f_grad().map(|g| g.defined()).unwrap_or(false))
    {
        return Ok((true, Vec::new()));
    }
    let n_states = algo.n_states();
    let n = t.entries.len();
    // Per entry: its grad (kept alive until the kernel is done) and verdict.
    let mut checked: Vec<Option<(Tensor, Verdict)>> = (0..n).map(|_| None).collect();
    {
        // (first entry's index, entries, their verdicts), one per chunk
        type Chunk<'a> = Mutex<(usize, &'a mut [Entry], &'a mut [Option<(Tensor, Verdict)>])>;
        let chunks: Vec<Chunk> = t
            .entries
            .chunks_mut(CHECK_CHUNK)
            .zip(checked.chunks_mut(CHECK_CHUNK))
            .enumerate()
            .map(|(c, (e, out))| Mutex::new((c * CHECK_CHUNK, e, out)))
            .collect();
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let next = AtomicUsize::new(0);
        let task = || loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            let Some(chunk) = chunks.get(c) else { break };
            let mut guard = chunk.lock().unwrap_or_else(|p| p.into_inner());
            let (base, entries, out) = &mut *guard;
            let res = no_panic("checking tensors", || {
                for (i, (e, slot)) in entries.iter_mut().zip(out.iter_mut()).enumerate() {
                    let grad = e.param.f_grad()?;
                    let verdict = GroupPlan::classify(kind, *base + i, e, &grad, n_states)?;
                    *slot = Some((grad, verdict));
                }
                Ok(())
            });
            if let Err(err) = res {
                first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(err);
            }
        };
        if threads > 1 && chunks.len() > 1 {
            crate::parallel::TorchThreads.broadcast(threads.min(chunks.len()), &task);
        } else {
            task();
        }
        if let Some(err) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(err);
        }
    }
    let mut grads = Vec::with_capacity(n);
    let mut ready = Vec::with_capacity(n);
    let mut slow = Vec::new();
    for (e, slot) in t.entries.iter().zip(checked) {
        let Some((grad, verdict)) = slot else {
            return Err(Error::Runtime(
                "a parameter was not checked (worker failure)".to_string(),
            ));
        };
        match verdict {
            Verdict::NoGrad => {}
            Verdict::Slow => slow.push((e.index, e.first)),
            Verdict::Fast(r) => ready.push(r),
        }
        grads.push(grad);
    }
    // SAFETY (bump): the step tensors are owned by t.entries, alive here.
    let exec = &crate::parallel::TorchThreads;
    unsafe {
        match algo {
            Algo::Adam(a) => {
                let jobs = jobs_for(&ready, |r| a.scalars(r.step.as_ref().unwrap().bump()));
                ferrotorch_kernels::run(&a, &jobs, threads, exec)?
            }
            Algo::Adagrad(a) => {
                let jobs = jobs_for(&ready, |r| a.scalars(r.step.as_ref().unwrap().bump()));
                ferrotorch_kernels::run(&a, &jobs, threads, exec)?
            }
            Algo::RmsProp(a) => {
                let jobs = jobs_for(&ready, |r| {
                    r.step.as_ref().unwrap().bump();
                });
                ferrotorch_kernels::run(&a, &jobs, threads, exec)?
            }
            Algo::Sgd(a) => {
                let entries = &t.entries;
                let jobs = jobs_for(&ready, |r| SgdScalars {
                    first_step: entries[r.entry].first,
                });
                ferrotorch_kernels::run(&a, &jobs, threads, exec)?
            }
        }
    }
    for r in &ready {
        t.entries[r.entry].first = false;
    }
    drop(grads);
    Ok((false, slow))
}

#[pymethods]
impl GroupPlan {
    /// `GroupPlan(kind, indices, params, states, steps, first, pending)`; `states[i]` lists the
    /// state tensors of `params[i]` in the kernel's order, `steps` is None for SGD.
    #[new]
    #[pyo3(signature = (kind, indices, params, states, steps, first, pending))]
    fn new(
        kind: &str,
        indices: Vec<usize>,
        params: Vec<PyTensor>,
        states: Vec<Vec<PyTensor>>,
        steps: Option<Vec<PyTensor>>,
        first: Vec<bool>,
        pending: Vec<PyTensor>,
    ) -> PyResult<Self> {
        let kind = Kind::parse(kind)?;
        let n = params.len();
        let steps_len = steps.as_ref().map_or(n, Vec::len);
        if indices.len() != n || states.len() != n || first.len() != n || steps_len != n {
            return Err(Error::Value(format!(
                "GroupPlan: indices, params, states, steps and first must have one item per parameter \
                 (got {}, {n}, {}, {steps_len}, {})",
                indices.len(),
                states.len(),
                first.len()
            ))
            .into());
        }
        if kind.has_step() != steps.is_some() {
            return Err(Error::Value(format!(
                "GroupPlan: steps must be {} for {}",
                if kind.has_step() { "a list" } else { "None" },
                kind.label()
            ))
            .into());
        }
        let mut steps = steps
            .map(|v| v.into_iter().map(|t| Some(t.0)).collect::<Vec<_>>())
            .unwrap_or_else(|| (0..n).map(|_| None).collect());
        let entries = indices
            .into_iter()
            .zip(params)
            .zip(states)
            .zip(first)
            .enumerate()
            .map(|(i, (((index, p), st), first))| Entry {
                index,
                param: p.0,
                states: st.into_iter().map(|t| t.0).collect(),
                step: steps[i].take(),
                first,
                cache: None,
            })
            .collect();
        Ok(GroupPlan {
            kind,
            t: Tensors {
                entries,
                pending: pending.into_iter().map(|t| t.0).collect(),
            },
        })
    }

    /// Number of parameters the plan steps (those with state).
    fn __len__(&self) -> usize {
        self.t.entries.len()
    }

    /// One optimizer step for this group.
    ///
    /// Returns `(rebuild, slow)`: `rebuild` is True when a parameter without state got a grad
    /// (nothing was changed; build a new plan and call again); `slow` lists
    /// `(index, first)` for the parameters Python must step with torch's own functions.
    #[pyo3(signature = (group, grad_scale=None, clip_coef=None))]
    fn step(
        &mut self,
        py: Python<'_>,
        group: &Bound<'_, PyDict>,
        grad_scale: Option<f64>,
        clip_coef: Option<f64>,
    ) -> PyResult<(bool, Vec<(usize, bool)>)> {
        let algo = Algo::from_group(self.kind, group, grad_scale, clip_coef)?;
        let threads = tch::get_num_threads().max(1) as usize;
        let (kind, t) = (self.kind, &mut self.t);
        // Nothing below touches Python objects: checks and kernel run without the GIL.
        let out = py.allow_threads(move || {
            no_panic("optimizer step", || step_group(kind, t, algo, threads))
        })?;
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "GroupPlan({}, {} params, {} pending)",
            self.kind.label(),
            self.t.entries.len(),
            self.t.pending.len()
        )
    }
}
