//! One optimizer step for one param group, read fresh from Python at every call.
//!
//! Under the GIL: the group's `params` list, each parameter's `.grad`, its entry in
//! `optimizer.state` and the state tensors are looked up as they are now (no plan survives
//! from one step to the next, so replaced, moved, cleared or re-shaped state is always
//! seen). Without the GIL: every tensor's metadata is checked, the memory of the whole
//! group is checked for overlap, and only then are the step counters bumped and the kernel
//! run. Any error leaves everything untouched.

use ferrotorch_kernels::{common::GradIn, Job, MAX_STATES};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tch::Tensor;

use super::algos::{Fused, Sparse};
use crate::access::{
    any_overlap, check_grad_matches, extent, flat, plain_tensor, Flat, Scalar, Shape, Sharded,
};
use crate::errors::{enter, Error, Result};

/// One parameter with a grad and complete state, as the Python objects hold them now.
struct Entry {
    /// Position in `group["params"]`.
    index: usize,
    /// The parameter objects this entry writes (with a DTensor's local shard), as
    /// `written[objs.0..objs.1]`.
    objs: (usize, usize),
    /// None when the parameter, its grad or a state is not a plain tensor: torch steps it.
    tensors: Option<Tensors>,
    first: bool,
}

struct Tensors {
    param: Tensor,
    grad: Tensor,
    states: Vec<Tensor>,
    /// The scalar state, in `SPEC.scalars`' order.
    scalars: Vec<Tensor>,
}

/// What the step did: `missing` lists parameters that have a grad but no (complete)
/// state — nothing was changed, Python creates their state and calls again; `slow` lists
/// `(index, first)` for parameters torch must step; `serial` means memory is shared
/// within the group, so nothing was changed and torch must step the whole group in order.
#[derive(Default)]
pub struct Outcome {
    pub missing: Vec<usize>,
    pub slow: Vec<(usize, bool)>,
    pub serial: bool,
    /// Positions (in the gathered entries) of the parameters the kernel stepped.
    stepped: Vec<usize>,
}

/// What [`gather`] found: the entries, and the objects they write.
struct Gathered<'py> {
    entries: Vec<Entry>,
    written: Vec<Bound<'py, PyAny>>,
}

/// Reads the group as it is now. Returns Err(missing) when some state must be created.
fn gather<'py>(
    state: &Bound<'py, PyDict>,
    group: &Bound<'py, PyDict>,
    keys: &[&'static str],
    scalar_keys: &[&'static str],
    first: &[usize],
) -> PyResult<std::result::Result<Gathered<'py>, Vec<usize>>> {
    let params = group
        .get_item("params")?
        .ok_or_else(|| Error::Value("param_group has no 'params'".into()))?;
    let params = params
        .downcast::<PyList>()
        .map_err(|_| Error::Type("param_group['params'] must be a list".into()))?;
    let stateful = !scalar_keys.is_empty() || !keys.is_empty();
    let mut entries = Vec::with_capacity(params.len());
    let mut written = Vec::with_capacity(params.len() * (2 + keys.len()));
    let mut missing = Vec::new();
    for (index, p) in params.iter().enumerate() {
        let grad = p.getattr(pyo3::intern!(p.py(), "grad"))?;
        if grad.is_none() {
            continue;
        }
        let st = if stateful {
            match state.get_item(&p)? {
                Some(s) => Some(s.downcast_into::<PyDict>().map_err(|_| {
                    Error::Type(format!(
                        "optimizer.state of parameter {index} must be a dict"
                    ))
                })?),
                None => None,
            }
        } else {
            None
        };
        let lookup = |key: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
            match &st {
                Some(s) => Ok(s.get_item(key)?.filter(|v| !v.is_none())),
                None => Ok(None),
            }
        };
        let mut objs = Vec::with_capacity(keys.len());
        let mut complete = !stateful || st.is_some();
        for key in keys {
            match lookup(key)? {
                Some(v) => objs.push(v),
                None => complete = false,
            }
        }
        let mut scalar_objs = Vec::with_capacity(scalar_keys.len());
        for key in scalar_keys {
            // A float (old checkpoints) is turned into a tensor by Python first.
            match lookup(key)? {
                Some(v) if is_tensor(&v) => scalar_objs.push(v),
                _ => complete = false,
            }
        }
        if !complete {
            missing.push(index);
            continue;
        }
        if !missing.is_empty() {
            continue;
        }
        // Plain tensors, or DTensors of one layout stepped through their local shards.
        let mut locals = Vec::new();
        let tensors = (|| -> PyResult<Option<Tensors>> {
            let sharded = Sharded::of(&p)?;
            // `written`: the local shard is written by the step (not the grad's).
            let mut unwrap = |o: &Bound<'py, PyAny>, written: bool| -> PyResult<Option<Tensor>> {
                match &sharded {
                    None => plain_tensor(o),
                    Some(sp) => match Sharded::of(o)? {
                        Some(so) if so.same_layout(sp)? => {
                            let t = plain_tensor(&so.local)?;
                            if written && locals.is_empty() {
                                locals.push(so.local); // the parameter's shard
                            }
                            Ok(t)
                        }
                        _ => Ok(None),
                    },
                }
            };
            let (Some(param), Some(grad)) = (unwrap(&p, true)?, unwrap(&grad, false)?) else {
                return Ok(None);
            };
            let mut states = Vec::with_capacity(objs.len());
            for o in &objs {
                match unwrap(o, true)? {
                    Some(t) => states.push(t),
                    None => return Ok(None),
                }
            }
            let mut scalars = Vec::with_capacity(scalar_objs.len());
            for o in &scalar_objs {
                match plain_tensor(o)? {
                    Some(t) => scalars.push(t),
                    None => return Ok(None),
                }
            }
            Ok(Some(Tensors {
                param,
                grad,
                states,
                scalars,
            }))
        })()?;
        let start = written.len();
        if tensors.is_some() {
            // Only the parameter's version is bumped: autograd saves parameters, never
            // optimizer state (differentiable optimizers take torch's path), and reading and
            // setting a version costs as much as the whole check of a small tensor.
            written.push(p);
            written.extend(locals);
        }
        let objs = (start, written.len());
        entries.push(Entry {
            index,
            objs,
            tensors,
            first: first.binary_search(&index).is_ok(),
        });
    }
    Ok(if missing.is_empty() {
        Ok(Gathered { entries, written })
    } else {
        Err(missing)
    })
}

/// Any torch.Tensor, subclasses included (torch steps those).
fn is_tensor(s: &Bound<'_, PyAny>) -> bool {
    // SAFETY: unpack checks the type first and only reads the object.
    unsafe { Tensor::pyobject_unpack(s.as_ptr() as *mut tch::python::CPyObject) }
        .ok()
        .flatten()
        .is_some()
}

/// A parameter the kernel can step, with every buffer read at this call.
struct Ready {
    param: Flat,
    grad: Flat,
    states: [Flat; MAX_STATES],
    /// The scalar state (`scalars[..n_scalars]`), in `SPEC.scalars`' order.
    scalars: [Scalar; MAX_SCALARS],
    first: bool,
}

/// Most scalar state tensors an algorithm keeps per parameter (ASGD: step, eta, mu).
const MAX_SCALARS: usize = 3;

/// The kernel's view of an entry, or None (torch steps it). Errors are torch's.
fn classify<A: Fused>(
    e: &Entry,
    n_states: usize,
    ranges: &mut Vec<(usize, usize)>,
) -> Result<Option<Ready>> {
    let Some(t) = &e.tensors else {
        return Ok(None);
    };
    if t.grad.is_sparse() {
        return match A::SPEC.sparse {
            Sparse::Reject(msg) => Err(Error::Runtime(msg.to_string())),
            Sparse::Torch => Ok(None),
        };
    }
    check_grad_matches(e.index, &t.param, &t.grad)?;
    if t.states.len() != n_states {
        return Err(Error::Runtime(format!(
            "{}: parameter {} has {} state tensors, the group's settings need {n_states}",
            A::SPEC.label,
            e.index,
            t.states.len()
        )));
    }
    let slow = |ranges: &mut Vec<(usize, usize)>| {
        // torch steps it after the kernel: its memory still counts for overlap.
        ranges.extend(
            std::iter::once(&t.param)
                .chain([&t.grad])
                .chain(&t.states)
                .chain(&t.scalars)
                .filter_map(extent),
        );
        Ok(None)
    };
    let Some(shape) = Shape::of(&t.param) else {
        return slow(ranges);
    };
    let Some(param) = flat(&t.param) else {
        return slow(ranges);
    };
    let Some(grad) = flat(&t.grad) else {
        return slow(ranges);
    };
    if grad.dtype != param.dtype {
        return slow(ranges);
    }
    let empty = Flat {
        dtype: param.dtype,
        numel: 0,
        ptr: std::ptr::null_mut(),
    };
    let mut states = [empty; MAX_STATES];
    for (slot, s) in states.iter_mut().zip(&t.states) {
        match flat(s) {
            Some(f) if f.dtype == param.dtype && Shape::of(s) == Some(shape) => *slot = f,
            _ => return slow(ranges),
        }
    }
    let n_scalars = A::SPEC.scalars.len();
    if t.scalars.len() != n_scalars || n_scalars > MAX_SCALARS {
        return Err(Error::Runtime(format!(
            "{}: parameter {} has {} scalar state tensors, expected {n_scalars}",
            A::SPEC.label,
            e.index,
            t.scalars.len()
        )));
    }
    for (key, s) in A::SPEC.scalars.iter().zip(&t.scalars) {
        // torch's `.item()` on it would fail after other parameters were stepped.
        if Shape::of(s).map(|sh| sh.numel()) != Some(1) {
            return Err(Error::Value(format!(
                "{}: state '{key}' of parameter {} must have one element, got shape {:?}",
                A::SPEC.label,
                e.index,
                s.size()
            )));
        }
    }
    let mut scalars = [Scalar::NONE; MAX_SCALARS];
    for (slot, s) in scalars.iter_mut().zip(&t.scalars) {
        // SAFETY: `e` holds the tensor for the whole call; overlap is checked below.
        match unsafe { Scalar::of(s) } {
            Some(c) => *slot = c,
            None => return slow(ranges),
        }
    }
    ranges.push(param.range());
    ranges.push(grad.range());
    ranges.extend(states[..n_states].iter().map(Flat::range));
    ranges.extend(scalars[..n_scalars].iter().map(Scalar::range));
    Ok(Some(Ready {
        param,
        grad,
        states,
        scalars,
        first: e.first,
    }))
}

fn run_entries<A: Fused>(
    algo: &A,
    entries: &[Entry],
    n_states: usize,
    threads: usize,
) -> Result<Outcome> {
    let mut ranges = Vec::with_capacity(entries.len() * (3 + n_states));
    let mut ready = Vec::with_capacity(entries.len());
    let mut stepped = Vec::with_capacity(entries.len());
    let mut slow = Vec::new();
    for (k, e) in entries.iter().enumerate() {
        match classify::<A>(e, n_states, &mut ranges)? {
            Some(r) => {
                ready.push(r);
                stepped.push(k);
            }
            None => slow.push((e.index, e.first)),
        }
    }
    if any_overlap(&mut ranges) {
        return Ok(Outcome {
            serial: true,
            ..Outcome::default()
        });
    }
    // Every check passed and no two buffers share memory: the kernel may write.
    let jobs: Vec<Job<A::Scalars>> = ready
        .iter()
        .map(|r| {
            // SAFETY: the counter's tensor is held by `entries` and overlaps nothing.
            let scalars = algo.scalars(&r.scalars[..A::SPEC.scalars.len()], r.first);
            Job {
                dtype: r.param.dtype,
                numel: r.param.numel,
                param: r.param.ptr,
                grad: r.grad.ptr,
                states: [r.states[0].ptr, r.states[1].ptr, r.states[2].ptr],
                scalars,
            }
        })
        .collect();
    // SAFETY: every buffer was read from a live plain CPU tensor held by `entries`, is
    // contiguous with `numel` elements of `dtype`, and no two overlap (checked above).
    unsafe { ferrotorch_kernels::run(algo, &jobs, threads, &crate::parallel::TorchThreads)? };
    Ok(Outcome {
        slow,
        stepped,
        ..Outcome::default()
    })
}

static SET_VERSIONS: pyo3::sync::GILOnceCell<Py<PyAny>> = pyo3::sync::GILOnceCell::new();

/// `t._version += 1` for every tensor the kernel wrote, as torch's in-place ops do, so
/// autograd refuses a saved parameter that a step changed before backward.
fn bump_versions(py: Python<'_>, written: &[Bound<'_, PyAny>]) -> PyResult<()> {
    if written.is_empty() {
        return Ok(());
    }
    let set = SET_VERSIONS.get_or_try_init(py, || {
        PyResult::Ok(
            py.import("ferrotorch._compat")?
                .getattr("set_version_counters")?
                .unbind(),
        )
    })?;
    let version = pyo3::intern!(py, "_version");
    let versions = written
        .iter()
        .map(|t| Ok(t.getattr(version)?.extract::<i64>()? + 1))
        .collect::<PyResult<Vec<i64>>>()?;
    set.call1(
        py,
        (
            pyo3::types::PyTuple::new(py, written)?,
            pyo3::types::PyTuple::new(py, versions)?,
        ),
    )?;
    Ok(())
}

/// The step of one group for algorithm `A` (see [`Outcome`]).
pub fn step_group<A: Fused>(
    py: Python<'_>,
    state: &Bound<'_, PyDict>,
    group: &Bound<'_, PyDict>,
    grad: GradIn,
    first: &[usize],
) -> PyResult<Outcome> {
    let algo = A::from_group(group, grad)?;
    let mut first = first.to_vec();
    first.sort_unstable();
    let keys = A::state_keys(group)?;
    let Gathered { entries, written } = match gather(state, group, &keys, A::SPEC.scalars, &first)?
    {
        Ok(g) => g,
        Err(missing) => {
            return Ok(Outcome {
                missing,
                ..Outcome::default()
            })
        }
    };
    let n_states = algo.n_states();
    if n_states != keys.len() {
        return Err(Error::Runtime(format!(
            "{}: the kernel needs {n_states} state tensors, the declaration lists {}",
            A::SPEC.label,
            keys.len()
        ))
        .into());
    }
    let threads = tch::get_num_threads().max(1) as usize;
    // The handles come back and are dropped with the GIL held: releasing a handle to a
    // tensor that Python also owns takes the GIL, once per tensor otherwise.
    let (out, entries) = enter(py, A::SPEC.label, move || {
        let out = run_entries(&algo, &entries, n_states, threads);
        Ok((out, entries))
    })?;
    let out = out?;
    let objs: Vec<Bound<'_, PyAny>> = out
        .stepped
        .iter()
        .flat_map(|&k| {
            written[entries[k].objs.0..entries[k].objs.1]
                .iter()
                .cloned()
        })
        .collect();
    drop(entries);
    bump_versions(py, &objs)?;
    Ok(out)
}
