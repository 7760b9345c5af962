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
    any_overlap_sorted, bump_plain_versions, bump_versions, grads_of, is_tensor, Flat, Meta, Plain,
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
    /// Where this parameter's objects start in [`Gathered::reads`]: the parameter, its grad,
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

/// What [`gather`] found: the entries, the DTensor parameters whose version a step bumps,
/// and every plain tensor object whose layout the step reads (`reads[at..at + per]` for an
/// entry's `metas: Some(at)`), held so that their memory stays alive while the GIL is
/// released.
struct Gathered<'py> {
    entries: Vec<Entry>,
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
    Ok(Ok(Gathered {
        entries,
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

// SAFETY: a Ready is addresses and sizes read at this call (by whichever of torch's threads
// read the layouts); nothing reads or writes through them before `run_entries` has checked
// the whole call's memory for overlap, and `Gathered` holds their objects until then.
unsafe impl Send for Ready {}
unsafe impl Sync for Ready {}

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

/// The kernel's view of an entry whose layouts are `m`, or None (torch steps it; the
/// memory it covers goes to `ranges`). Errors are torch's.
fn classify<A: Fused>(
    e: &Entry,
    m: &[Meta],
    n_states: usize,
    ranges: &mut Vec<(usize, usize)>,
) -> Result<Option<Ready>> {
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
    // (The ready buffers' ranges are added by Share::judge, slot by slot.)
    Ok(Some(Ready {
        param: param_flat,
        grad,
        states,
        scalars,
        first: e.first,
    }))
}

/// What the layouts read at this call allow: the kernel's view of the entries it can step
/// (by position in the entries; the others torch steps) and the memory of every buffer the
/// step reads or writes, as one list per thread that read them, each sorted by start.
struct Judged {
    ready: Vec<Vec<(usize, Ready)>>,
    ranges: Vec<Vec<(usize, usize)>>,
}

/// One thread's part of [`judge`].
struct Share {
    /// Objects per entry.
    per: usize,
    /// The ranges of the ready buffers slot by slot (every parameter, every grad, every
    /// state...), then those of the entries torch steps. Tensors are mostly allocated in
    /// parameter order and a thread takes its blocks in order, so each slot is mostly made
    /// of ascending runs, which the pattern-defeating sort finds.
    slots: Vec<Vec<(usize, usize)>>,
    /// All of them, sorted by start, once the thread is done.
    sorted: Vec<(usize, usize)>,
    /// The entries the kernel can step, by position.
    ready: Vec<(usize, Ready)>,
    /// The first error, by position in the entries.
    error: Option<(usize, Error)>,
    /// The layouts of the block at hand.
    metas: Vec<Meta>,
}

/// Objects per unit of work in [`judge`]: enough to amortize a thread hand-off.
const BLOCK: usize = 256;

impl Share {
    /// A share expecting about `entries` entries (growing a vector of them would copy it).
    fn new(per: usize, entries: usize) -> Share {
        Share {
            per,
            // One list per ready slot, then the (rare) entries torch steps.
            slots: (0..=per)
                .map(|s| Vec::with_capacity(if s < per { entries } else { 0 }))
                .collect(),
            sorted: Vec::new(),
            ready: Vec::with_capacity(entries),
            error: None,
            metas: Vec::new(),
        }
    }

    /// Reads the layouts of a block of entries (the first at position `start`) and judges
    /// each entry.
    ///
    /// # Safety
    /// As [`Meta::read_plain`] for `addrs`.
    unsafe fn judge<A: Fused>(
        &mut self,
        (start, entries): (usize, &[Entry]),
        addrs: &[usize],
        n_states: usize,
    ) {
        let per = self.per;
        if self.error.is_some() {
            return; // every later entry of this thread comes after its error
        }
        let Some(lo) = entries.iter().find_map(|e| e.metas) else {
            return;
        };
        let hi = entries.iter().rev().find_map(|e| e.metas).unwrap_or(lo) + per;
        // Not cleared first: the shim writes every field it reports (status, address, sizes
        // up to `dim`...) of every layout; rewriting 104 bytes per tensor beforehand took 7%
        // of this function (30 of 450 us for 2000 Adam parameters).
        self.metas.resize(hi - lo, Meta::NONE);
        // SAFETY: forwarded from the caller.
        unsafe { Meta::read_plain(&addrs[lo..hi], &mut self.metas) };
        let (ready_slots, slow) = self.slots.split_at_mut(per);
        for (k, e) in entries.iter().enumerate() {
            let Some(at) = e.metas else { continue };
            let m = &self.metas[at - lo..at - lo + per];
            // A tensor the shim could not judge: torch steps the parameter.
            if !m.iter().all(Meta::ok) {
                continue;
            }
            match classify::<A>(e, m, n_states, &mut slow[0]) {
                Ok(Some(r)) => {
                    let n_scalars = A::SPEC.scalars.len();
                    let ranges = [r.param.range(), r.grad.range()]
                        .into_iter()
                        .chain(r.states[..n_states].iter().map(Flat::range))
                        .chain(r.scalars[..n_scalars].iter().map(Scalar::range));
                    for (s, range) in ready_slots.iter_mut().zip(ranges) {
                        s.push(range);
                    }
                    self.ready.push((start + k, r));
                }
                Ok(None) => {}
                Err(err) => {
                    self.error = Some((start + k, err));
                    return;
                }
            }
        }
    }

    /// Sorts all this thread's ranges into `sorted`.
    fn finish(&mut self) {
        let mut all = Vec::with_capacity(self.slots.iter().map(Vec::len).sum());
        for s in self.slots.drain(..) {
            all.extend_from_slice(&s);
        }
        // Unstable: equal starts of non-empty ranges overlap whatever their order, and
        // it is twice as fast as the stable sort when separate allocations break the runs
        // (10,000 ranges, 1 in 20 out of order: 128 against 271 us).
        all.sort_unstable_by_key(|r| r.0);
        self.sorted = all;
    }
}

/// Reads the layout of every tensor of `entries` and judges each entry, in blocks on up to
/// `threads` of torch's threads when there are many: reading, judging and sorting the
/// memory ranges all happen on the thread that read the block, so its layouts never cross to
/// another core. The caller holds the GIL throughout, so no Python code can change a tensor
/// meanwhile; the threads make C++ reads only (the types were checked when the [`Plain`]s
/// were made). Errors are torch's, for the first parameter that has one.
///
/// # Safety
/// `addrs` are the addresses of `entries`' objects (`reads` of [`Gathered`]), held by the
/// caller until this returns.
unsafe fn judge<A: Fused>(
    entries: &[Entry],
    addrs: &[usize],
    n_states: usize,
    threads: usize,
) -> Result<Judged> {
    let per = 2 + n_states + A::SPEC.scalars.len();
    let block = (BLOCK / per).max(1);
    let items: Vec<_> = entries
        .chunks(block)
        .enumerate()
        .map(|(b, e)| (b * block, e))
        .collect();
    let n_items = items.len();
    let threads = if addrs.len() >= 2 * BLOCK { threads } else { 1 };
    let shares = crate::parallel::for_each_local(
        items,
        threads,
        // Each thread takes about its share of the blocks, plus one.
        &|| Share::new(per, entries.len() / threads + block),
        // SAFETY: forwarded from the caller (the GIL is held throughout).
        &|share, item| unsafe { share.judge::<A>(item, addrs, n_states) },
        &Share::finish,
    );
    if shares.iter().map(|(_, n)| n).sum::<usize>() != n_items {
        return Err(Error::Runtime(format!(
            "{}: a thread reading the tensors' layouts failed; nothing was changed",
            A::SPEC.label
        )));
    }
    let mut first_error: Option<(usize, Error)> = None;
    let (mut ranges, mut ready) = (Vec::new(), Vec::new());
    for (share, _) in shares {
        if let Some((k, err)) = share.error {
            if first_error.as_ref().is_none_or(|(j, _)| k < *j) {
                first_error = Some((k, err));
            }
        }
        ranges.push(share.sorted);
        ready.push(share.ready);
    }
    if let Some((_, err)) = first_error {
        return Err(err);
    }
    Ok(Judged { ready, ranges })
}

/// Steps the judged entries when no two of the call's buffers share memory; each stepped
/// parameter's object (or its local shard: the entry's first object in `addrs`) has its
/// version bumped once the kernel has run.
///
/// # Safety
/// `addrs` are the addresses of `entries`' objects, live plain tensor objects held by the
/// caller, as is every object whose buffers `judged` holds.
unsafe fn run_entries<A: Fused>(
    algo: &A,
    entries: &[Entry],
    judged: &Judged,
    addrs: &[usize],
    threads: usize,
) -> Result<Outcome> {
    if any_overlap_sorted(&judged.ranges) {
        return Ok(Outcome {
            serial: true,
            ..Outcome::default()
        });
    }
    let stepped: Vec<usize> = judged.ready.iter().flatten().map(|(k, _)| *k).collect();
    let mut is_ready = vec![false; entries.len()];
    for &k in &stepped {
        is_ready[k] = true;
    }
    let slow = entries
        .iter()
        .zip(is_ready)
        .filter(|(_, ready)| !ready)
        .map(|(e, _)| (e.index, e.first))
        .collect();
    // Every check passed and no two buffers share memory: the kernel may write.
    let mut cache = StepCache::default();
    let jobs: Vec<Job<A::Scalars>> = judged
        .ready
        .iter()
        .flatten()
        .map(|(_, r)| Job {
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
    let bumped: Vec<usize> = stepped
        .iter()
        .filter_map(|&k| entries[k].metas.map(|at| addrs[at]))
        .collect();
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
    let gathered = match gather(state, group, &keys, A::SPEC.scalars, &first)? {
        Ok(g) => g,
        Err(missing) => {
            return Ok(Outcome {
                missing,
                ..Outcome::default()
            })
        }
    };
    let entries = &gathered.entries;
    // Addresses as numbers, so that they can cross threads; `gathered` holds the objects.
    let addrs: Vec<usize> = gathered.reads.iter().map(Plain::addr).collect();
    // SAFETY: `gathered` holds every object at `addrs`, and the GIL is held.
    let judged = unsafe { judge::<A>(entries, &addrs, n_states, threads)? };
    let out = enter(py, A::SPEC.label, || {
        // SAFETY: `gathered` holds every tensor object while the GIL is released.
        unsafe { run_entries(&algo, entries, &judged, &addrs, threads) }
    })?;
    bump_versions(
        out.stepped
            .iter()
            .filter_map(|&k| entries[k].wrapper)
            .map(|w| &gathered.written[w]),
    );
    Ok(out)
}
