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
use pyo3::types::{PyDict, PyList, PyString};

use super::algos::{Fused, Sparse, StepCache};
use crate::access::{
    any_overlap_par, bump_plain_versions, bump_versions, grads_of, is_tensor, Flat, Meta, Plain,
    Scalar, Sharded, StateLookup,
};
use crate::errors::{enter, Error, Result};

/// One parameter with a grad and complete state, as the Python objects hold them now.
struct Entry {
    /// Position in `group["params"]`.
    index: usize,
    /// A DTensor parameter's own object, as `written[k]`: its version is bumped with the
    /// GIL. (Its local shard, like a plain parameter, is the entry's first read object and
    /// is bumped right after the kernel.)
    wrapper: Option<usize>,
    /// Where this parameter's layouts start in [`Gathered::metas`]: the parameter, its grad,
    /// the states in the kernel's order, then the scalar states in `SPEC.scalars`' order.
    /// None when the parameter, its grad or a state is not a plain tensor: torch steps it.
    metas: Option<usize>,
    first: bool,
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

/// What [`gather`] found: the entries, the layouts they read (one flat list, so that an
/// entry is a few words and nothing large is moved per parameter), the DTensor parameters
/// whose version a step bumps, and every plain tensor object read (`reads[at]` for an
/// entry's `metas: Some(at)`), held so that their memory stays alive while the GIL is
/// released.
struct Gathered<'py> {
    entries: Vec<Entry>,
    metas: Vec<Meta>,
    written: Vec<Bound<'py, PyAny>>,
    reads: Vec<Plain<'py>>,
}

/// Reads the group as it is now. Returns Err(missing) when some state must be created.
fn gather<'py>(
    state: &Bound<'py, PyDict>,
    group: &Bound<'py, PyDict>,
    keys: &[&'static str],
    scalar_keys: &[&'static str],
    first: &[usize],
    threads: usize,
) -> PyResult<std::result::Result<Gathered<'py>, Vec<usize>>> {
    let params = group
        .get_item("params")?
        .ok_or_else(|| Error::Value("param_group has no 'params'".into()))?;
    let params = params
        .downcast::<PyList>()
        .map_err(|_| Error::Type("param_group['params'] must be a list".into()))?;
    let stateful = !scalar_keys.is_empty() || !keys.is_empty();
    let per = 2 + keys.len() + scalar_keys.len();
    let mut entries = Vec::with_capacity(params.len());
    let mut reads = Vec::with_capacity(params.len() * per);
    let mut written = Vec::with_capacity(params.len());
    let mut missing = Vec::new();
    let py = params.py();
    // Interned once per call: looking a key up then costs no string building or hashing.
    let key_objs: Vec<_> = keys.iter().map(|k| PyString::intern(py, k)).collect();
    let scalar_key_objs: Vec<_> = scalar_keys
        .iter()
        .map(|k| PyString::intern(py, k))
        .collect();
    // Every grad first, in one shim call that prefetches along the next parameters' chains
    // of objects: after a kernel has swept the caches, following one parameter's chain at a
    // time would wait for memory at every link.
    let params: Vec<Bound<'py, PyAny>> = params.iter().collect();
    let grads = grads_of(&params)?;
    let mut lookup_state = StateLookup::default();
    for (index, (p, grad)) in params.into_iter().zip(grads).enumerate() {
        if grad.is_none() {
            continue;
        }
        let st = if stateful {
            match lookup_state.get(state, &p)? {
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
        let lookup = |key: &Bound<'py, PyString>| -> PyResult<Option<Bound<'py, PyAny>>> {
            match &st {
                Some(s) => Ok(s.get_item(key)?.filter(|v| !v.is_none())),
                None => Ok(None),
            }
        };
        let mut objs: [Option<Bound<'py, PyAny>>; MAX_STATES] = Default::default();
        let mut complete = !stateful || st.is_some();
        for (slot, key) in objs.iter_mut().zip(&key_objs) {
            *slot = lookup(key)?;
            complete &= slot.is_some();
        }
        let mut scalar_objs: [Option<Bound<'py, PyAny>>; MAX_SCALARS] = Default::default();
        for (slot, key) in scalar_objs.iter_mut().zip(&scalar_key_objs) {
            // A float (old checkpoints) is turned into a tensor by Python first.
            *slot = lookup(key)?.filter(|v| is_tensor(v).unwrap_or(false));
            complete &= slot.is_some();
        }
        if !complete {
            missing.push(index);
            continue;
        }
        if !missing.is_empty() {
            continue;
        }
        // Plain tensors, or DTensors of one layout stepped through their local shards. The
        // objects whose layouts the kernel needs go to `reads`, in the entry's slot order;
        // their layouts are read below, all at once.
        let at = reads.len();
        let mut sharded = false;
        let plain = (|| -> PyResult<bool> {
            let layout = Sharded::of(&p)?;
            sharded = layout.is_some();
            let mut read = |o: &Bound<'py, PyAny>| -> PyResult<bool> {
                let o = match &layout {
                    None => o.clone(),
                    Some(sp) => match Sharded::of(o)? {
                        Some(so) if so.same_layout(sp)? => so.local,
                        _ => return Ok(false),
                    },
                };
                match Plain::new(o)? {
                    Some(o) => reads.push(o),
                    None => return Ok(false),
                }
                Ok(true)
            };
            if !read(&p)? || !read(&grad)? {
                return Ok(false);
            }
            for o in objs.iter().flatten() {
                if !read(o)? {
                    return Ok(false);
                }
            }
            // Scalar state is never sharded: read as it is.
            for o in scalar_objs.iter().flatten() {
                match Plain::new(o.clone())? {
                    Some(o) => reads.push(o),
                    None => return Ok(false),
                }
            }
            Ok(true)
        })()?;
        if !plain {
            reads.truncate(at);
        }
        // Only the parameter's version is bumped: autograd saves parameters, never
        // optimizer state (differentiable optimizers take torch's path).
        let wrapper = (plain && sharded).then(|| {
            written.push(p);
            written.len() - 1
        });
        entries.push(Entry {
            index,
            wrapper,
            metas: plain.then_some(at),
            first: first.binary_search(&index).is_ok(),
        });
    }
    if !missing.is_empty() {
        return Ok(Err(missing));
    }
    // Every layout at once (on torch's threads when there are many), then the entries
    // whose tensors the shim could not judge go to torch.
    let metas = Meta::of_all(&reads, threads);
    for e in &mut entries {
        if let Some(at) = e.metas {
            if !metas[at..at + per].iter().all(Meta::ok) {
                e.metas = None;
            }
        }
    }
    Ok(Ok(Gathered {
        entries,
        metas,
        written,
        reads,
    }))
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

/// torch's errors for a gradient that cannot belong to its parameter (sparse grads pass).
fn check_grad_matches(index: usize, param: &Meta, grad: &Meta) -> Result<()> {
    if !param.same_dtype(grad) {
        return Err(Error::Type(format!(
            "grad of parameter {index} has dtype {}, but the parameter has dtype {}",
            grad.dtype_name(),
            param.dtype_name()
        )));
    }
    if !param.same_shape(grad) {
        return Err(Error::Value(format!(
            "grad of parameter {index} has shape {:?}, but the parameter has shape {:?}",
            grad.sizes(),
            param.sizes()
        )));
    }
    Ok(())
}

/// The kernel's view of an entry, or None (torch steps it). Errors are torch's.
fn classify<A: Fused>(
    e: &Entry,
    metas: &[Meta],
    n_states: usize,
    ranges: &mut Vec<(usize, usize)>,
) -> Result<Option<Ready>> {
    let Some(at) = e.metas else {
        return Ok(None);
    };
    let n_scalars = A::SPEC.scalars.len();
    let m = &metas[at..at + 2 + n_states + n_scalars];
    let (param, grad) = (&m[0], &m[1]);
    let (states_in, scalars_in) = m[2..].split_at(n_states);
    if grad.is_sparse() {
        return match A::SPEC.sparse {
            Sparse::Reject(msg) => Err(Error::Runtime(msg.to_string())),
            Sparse::Torch => Ok(None),
        };
    }
    check_grad_matches(e.index, param, grad)?;
    for (key, s) in A::SPEC.scalars.iter().zip(scalars_in) {
        // torch's `.item()` on it would fail after other parameters were stepped.
        if s.sizes().iter().product::<i64>() != 1 {
            return Err(Error::Value(format!(
                "{}: state '{key}' of parameter {} must have one element, got shape {:?}",
                A::SPEC.label,
                e.index,
                s.sizes()
            )));
        }
    }
    let slow = |ranges: &mut Vec<(usize, usize)>| {
        // torch steps it after the kernel: its memory still counts for overlap.
        ranges.extend(m.iter().filter_map(Meta::extent));
        Ok(None)
    };
    let (Some(param_flat), Some(grad)) = (param.flat(), grad.flat()) else {
        return slow(ranges);
    };
    let empty = Flat {
        dtype: param_flat.dtype,
        numel: 0,
        ptr: std::ptr::null_mut(),
    };
    let mut states = [empty; MAX_STATES];
    for (slot, s) in states.iter_mut().zip(states_in) {
        match s.flat() {
            Some(f) if f.dtype == param_flat.dtype && s.same_shape(param) => *slot = f,
            _ => return slow(ranges),
        }
    }
    let mut scalars = [Scalar::NONE; MAX_SCALARS];
    for (slot, s) in scalars.iter_mut().zip(scalars_in) {
        // SAFETY: the object is held by `Gathered` for the whole call; overlap is checked
        // by the caller before any use.
        match unsafe { s.scalar() } {
            Some(c) => *slot = c,
            None => return slow(ranges),
        }
    }
    // (The ready buffers' ranges are added by run_entries, slot by slot.)
    Ok(Some(Ready {
        param: param_flat,
        grad,
        states,
        scalars,
        first: e.first,
    }))
}

/// Checks and steps the entries; `params[k]` is the address of entry k's parameter object
/// (or its local shard), whose version is bumped once the kernel has run.
///
/// # Safety
/// Every non-zero address in `params` is a live plain tensor object held by the caller.
unsafe fn run_entries<A: Fused>(
    algo: &A,
    entries: &[Entry],
    metas: &[Meta],
    params: &[usize],
    n_states: usize,
    threads: usize,
) -> Result<Outcome> {
    let mut ranges = Vec::with_capacity(entries.len() * (3 + n_states));
    let mut ready = Vec::with_capacity(entries.len());
    let mut stepped = Vec::with_capacity(entries.len());
    let mut slow = Vec::new();
    for (k, e) in entries.iter().enumerate() {
        match classify::<A>(e, metas, n_states, &mut ranges)? {
            Some(r) => {
                ready.push(r);
                stepped.push(k);
            }
            None => slow.push((e.index, e.first)),
        }
    }
    // Slot by slot (every parameter, then every grad, every state...): tensors are mostly
    // allocated in parameter order, so each slot's ranges form an ascending or descending
    // run and the adaptive sort in any_overlap merges a few runs instead of sorting afresh.
    let n_scalars = A::SPEC.scalars.len();
    ranges.extend(ready.iter().map(|r| r.param.range()));
    ranges.extend(ready.iter().map(|r| r.grad.range()));
    for k in 0..n_states {
        ranges.extend(ready.iter().map(|r| r.states[k].range()));
    }
    for k in 0..n_scalars {
        ranges.extend(ready.iter().map(|r| r.scalars[k].range()));
    }
    if any_overlap_par(&mut ranges, threads) {
        return Ok(Outcome {
            serial: true,
            ..Outcome::default()
        });
    }
    // Every check passed and no two buffers share memory: the kernel may write.
    let mut cache = StepCache::default();
    let jobs: Vec<Job<A::Scalars>> = ready
        .iter()
        .map(|r| Job {
            dtype: r.param.dtype,
            numel: r.param.numel,
            param: r.param.ptr,
            grad: r.grad.ptr,
            states: [r.states[0].ptr, r.states[1].ptr, r.states[2].ptr],
            scalars: algo.scalars(&r.scalars[..A::SPEC.scalars.len()], r.first, &mut cache),
        })
        .collect();
    // SAFETY: every buffer was read at this call from a live plain CPU tensor whose object
    // the caller holds, is contiguous with `numel` elements of `dtype`, and no two overlap.
    unsafe { ferrotorch_kernels::run(algo, &jobs, threads, &crate::parallel::TorchThreads)? };
    let bumped: Vec<usize> = stepped.iter().map(|&k| params[k]).collect();
    // SAFETY: forwarded from the caller.
    unsafe { bump_plain_versions(&bumped, threads) };
    Ok(Outcome {
        slow,
        stepped,
        ..Outcome::default()
    })
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
    let n_states = algo.n_states();
    if n_states != keys.len() || n_states > MAX_STATES || A::SPEC.scalars.len() > MAX_SCALARS {
        return Err(Error::Runtime(format!(
            "{}: the kernel needs {n_states} state tensors, the declaration lists {} \
             (at most {MAX_STATES} state and {MAX_SCALARS} scalar tensors)",
            A::SPEC.label,
            keys.len()
        ))
        .into());
    }
    let threads = tch::get_num_threads().max(1) as usize;
    let gathered = match gather(state, group, &keys, A::SPEC.scalars, &first, threads)? {
        Ok(g) => g,
        Err(missing) => {
            return Ok(Outcome {
                missing,
                ..Outcome::default()
            })
        }
    };
    let (entries, metas) = (&gathered.entries, &gathered.metas);
    let params: Vec<usize> = entries
        .iter()
        .map(|e| e.metas.map_or(0, |at| gathered.reads[at].addr()))
        .collect();
    let out = enter(py, A::SPEC.label, move || {
        // SAFETY: `gathered` holds every tensor object while the GIL is released.
        unsafe { run_entries(&algo, entries, metas, &params, n_states, threads) }
    })?;
    bump_versions(
        out.stepped
            .iter()
            .filter_map(|&k| entries[k].wrapper)
            .map(|w| &gathered.written[w]),
    );
    Ok(out)
}
