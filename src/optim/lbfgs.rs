//! L-BFGS's vector work on flat buffers (`ferrotorch_kernels::lbfgs`): the two-loop
//! recursion, and the moves between the parameters (or their grads) and the flat vectors
//! torch's LBFGS builds with `torch.cat` and per-parameter `add_`/`copy_`.
//!
//! Every function reads its tensors at this call and returns False, with nothing written,
//! for anything it does not take (a subclass, another device, dtype or layout, sizes that
//! do not add up, outputs that overlap inputs); Python then runs torch's own code.

use ferrotorch_kernels::lbfgs::{add_scaled, two_loop, History, Real};
use ferrotorch_kernels::DType;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::access::{any_overlap, bump_versions, Flat, Meta};
use crate::errors::enter;

/// `obj` as a flat f32/f64 buffer (plain contiguous CPU tensor).
fn flat(obj: &Bound<'_, PyAny>) -> PyResult<Option<Flat>> {
    Ok(Meta::of(obj)?
        .and_then(|m| m.flat())
        .filter(|f| matches!(f.dtype, DType::F32 | DType::F64)))
}

/// A scalar as torch's recursion sees it: a Python number, or a one-element tensor of the
/// vectors' dtype (torch's 0-dim `ro`/`H_diag` tensors).
fn scalar(obj: &Bound<'_, PyAny>, dtype: DType) -> PyResult<Option<f64>> {
    if obj.is_instance_of::<pyo3::types::PyFloat>() || obj.is_instance_of::<pyo3::types::PyInt>() {
        return Ok(obj.extract::<f64>().ok());
    }
    let Some(m) = Meta::of(obj)?.filter(|m| m.kernel_dtype() == Some(dtype)) else {
        return Ok(None);
    };
    // SAFETY: read at once, while the caller holds the object (and the GIL).
    Ok(unsafe { m.scalar() }.map(|s| s.get()))
}

fn same(f: &Flat, dtype: DType, numel: usize) -> bool {
    f.dtype == dtype && f.numel == numel
}

/// Addresses as numbers, so the work can cross into GIL-free code.
struct TwoLoop {
    grad: usize,
    dirs: Vec<usize>,
    stps: Vec<usize>,
    ro: Vec<f64>,
    h_diag: f64,
    al: usize,
    d: usize,
    n: usize,
}

/// # Safety
/// Every address holds `n` live elements of `T` (`al` at least `dirs.len()`), and `al`
/// and `d` overlap nothing else.
unsafe fn run_two_loop<T: Real>(w: &TwoLoop) {
    let k = w.dirs.len();
    let n = w.n;
    let view = |a: usize| std::slice::from_raw_parts(a as *const T, n);
    let h = History {
        dirs: w.dirs.iter().map(|&a| view(a)).collect(),
        stps: w.stps.iter().map(|&a| view(a)).collect(),
        ro: w.ro.iter().map(|&r| T::of(r)).collect(),
    };
    let al = std::slice::from_raw_parts_mut(w.al as *mut T, k);
    let d = std::slice::from_raw_parts_mut(w.d as *mut T, n);
    two_loop(view(w.grad), &h, T::of(w.h_diag), al, d);
}

/// The L-BFGS direction for `flat_grad` from the history (`old_dirs`, `old_stps`, `ro`,
/// `H_diag` as torch's LBFGS keeps them), written into `d`; the first loop's coefficients
/// go to `al[:len(old_dirs)]`. False: nothing written, torch's loops must run.
#[pyfunction]
#[pyo3(signature = (flat_grad, old_dirs, old_stps, ro, h_diag, al, d))]
#[allow(clippy::too_many_arguments)] // torch's LBFGS state, one argument each, as Python passes it
pub fn lbfgs_two_loop(
    py: Python<'_>,
    flat_grad: &Bound<'_, PyAny>,
    old_dirs: &Bound<'_, PyList>,
    old_stps: &Bound<'_, PyList>,
    ro: &Bound<'_, PyList>,
    h_diag: &Bound<'_, PyAny>,
    al: &Bound<'_, PyAny>,
    d: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    let Some(g) = flat(flat_grad)? else {
        return Ok(false);
    };
    let (dtype, n) = (g.dtype, g.numel);
    let k = old_dirs.len();
    if old_stps.len() != k || ro.len() != k {
        return Ok(false);
    }
    let (Some(fa), Some(fd)) = (flat(al)?, flat(d)?) else {
        return Ok(false);
    };
    if fa.dtype != dtype || fa.numel < k || !same(&fd, dtype, n) {
        return Ok(false);
    }
    let Some(h) = scalar(h_diag, dtype)? else {
        return Ok(false);
    };
    let mut w = TwoLoop {
        grad: g.ptr as usize,
        dirs: Vec::with_capacity(k),
        stps: Vec::with_capacity(k),
        ro: Vec::with_capacity(k),
        h_diag: h,
        al: fa.ptr as usize,
        d: fd.ptr as usize,
        n,
    };
    let mut reads = vec![g.range()];
    for i in 0..k {
        let (Some(y), Some(s)) = (flat(&old_dirs.get_item(i)?)?, flat(&old_stps.get_item(i)?)?)
        else {
            return Ok(false);
        };
        let Some(r) = scalar(&ro.get_item(i)?, dtype)? else {
            return Ok(false);
        };
        if !same(&y, dtype, n) || !same(&s, dtype, n) {
            return Ok(false);
        }
        w.dirs.push(y.ptr as usize);
        w.stps.push(s.ptr as usize);
        w.ro.push(r);
        reads.extend([y.range(), s.range()]);
    }
    // The outputs may overlap neither each other nor anything read.
    let writes = [
        fd.range(),
        (fa.ptr as usize, fa.ptr as usize + k * fa.dtype.size()),
    ];
    let clash = writes
        .iter()
        .any(|&wr| reads.iter().any(|&r| any_overlap(&mut [r, wr])));
    if clash || any_overlap(&mut writes.to_vec()) {
        return Ok(false);
    }
    enter(py, "LBFGS", move || {
        // SAFETY: every buffer was read at this call from a live plain contiguous CPU tensor
        // of `dtype` with the checked sizes; `al` and `d` overlap nothing; the caller's lists
        // keep the objects alive.
        unsafe {
            match dtype {
                DType::F32 => run_two_loop::<f32>(&w),
                _ => run_two_loop::<f64>(&w),
            }
        }
        Ok(())
    })?;
    bump_versions(&[al.clone(), d.clone()]);
    Ok(true)
}

/// How a flat vector and each parameter's slice of it move.
#[derive(Clone, Copy)]
enum Move {
    /// `flat[slice] = src` (`src` None: zeros), torch's `_gather_flat_grad` / clone.
    Gather,
    /// `param += alpha * flat[slice]`, torch's `_add_grad`.
    Add(f64),
    /// `param.copy_(flat[slice])`, torch's `_set_param`.
    Set,
}

/// `(flat offset, tensor address or 0 for zeros, numel)` per parameter.
type Slices = Vec<(usize, usize, usize)>;

unsafe fn run_moves<T: Real>(flat: usize, slices: &Slices, how: Move) {
    for &(off, addr, n) in slices {
        let v = std::slice::from_raw_parts_mut((flat as *mut T).add(off), n);
        match how {
            Move::Gather if addr == 0 => v.fill(T::of(0.0)),
            Move::Gather => v.copy_from_slice(std::slice::from_raw_parts(addr as *const T, n)),
            Move::Add(alpha) => add_scaled(
                std::slice::from_raw_parts_mut(addr as *mut T, n),
                T::of(alpha),
                v,
            ),
            Move::Set => std::slice::from_raw_parts_mut(addr as *mut T, n).copy_from_slice(v),
        }
    }
}

/// Checks and runs one move between `flat` and the tensors in `items` (parameter `i`'s
/// slice is `params[i].numel()` long); writes go to `flat` (Gather) or to the items.
fn moves(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    items: &Bound<'_, PyList>,
    flat_obj: &Bound<'_, PyAny>,
    how: Move,
) -> PyResult<bool> {
    let Some(f) = flat(flat_obj)? else {
        return Ok(false);
    };
    if items.len() != params.len() {
        return Ok(false);
    }
    let mut slices = Slices::with_capacity(params.len());
    let mut ranges = Vec::with_capacity(params.len());
    let mut off = 0usize;
    for i in 0..params.len() {
        let Some(p) = flat(&params.get_item(i)?)? else {
            return Ok(false);
        };
        if p.dtype != f.dtype {
            return Ok(false);
        }
        let item = items.get_item(i)?;
        let addr = if item.is_none() && matches!(how, Move::Gather) {
            0
        } else {
            let Some(t) = flat(&item)? else {
                return Ok(false);
            };
            if !same(&t, f.dtype, p.numel) {
                return Ok(false);
            }
            ranges.push(t.range());
            t.ptr as usize
        };
        slices.push((off, addr, p.numel));
        off += p.numel;
    }
    if off != f.numel {
        return Ok(false);
    }
    // The flat vector may share no memory with the tensors; the tensors (all read, or all
    // written one after another in list order, as torch writes them) may share theirs.
    let fr = f.range();
    if ranges.iter().any(|&r| any_overlap(&mut [r, fr])) {
        return Ok(false);
    }
    let (dtype, base) = (f.dtype, f.ptr as usize);
    enter(py, "LBFGS", move || {
        // SAFETY: every address was read at this call from a live plain contiguous CPU
        // tensor of `dtype` with the checked numel, the slices lie inside `flat`, and
        // `flat` overlaps none of the tensors; the caller's lists keep them alive.
        unsafe {
            match dtype {
                DType::F32 => run_moves::<f32>(base, &slices, how),
                _ => run_moves::<f64>(base, &slices, how),
            }
        }
        Ok(())
    })?;
    match how {
        Move::Gather => bump_versions(std::slice::from_ref(flat_obj)),
        _ => bump_versions(&items.iter().collect::<Vec<_>>()),
    }
    Ok(true)
}

/// `out = cat([src.view(-1) or zeros for each parameter])`: torch's `_gather_flat_grad`
/// (`sources` = the grads, None for a missing one) and `_clone_param` (`sources` = the
/// parameters). False: nothing written.
#[pyfunction]
pub fn lbfgs_gather(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    sources: &Bound<'_, PyList>,
    out: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    moves(py, params, sources, out, Move::Gather)
}

/// `p.add_(update[slice].view_as(p), alpha=alpha)` for each parameter, in list order:
/// torch's `_add_grad`. False: nothing written.
#[pyfunction]
pub fn lbfgs_add(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    update: &Bound<'_, PyAny>,
    alpha: f64,
) -> PyResult<bool> {
    moves(py, params, params, update, Move::Add(alpha))
}

/// `p.copy_(flat[slice].view_as(p))` for each parameter: torch's `_set_param` from a flat
/// clone. False: nothing written.
#[pyfunction]
pub fn lbfgs_set(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    flat_params: &Bound<'_, PyAny>,
) -> PyResult<bool> {
    moves(py, params, params, flat_params, Move::Set)
}
