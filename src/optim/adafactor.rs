//! Adafactor's step for one parameter: torch's `_single_tensor_adafactor` with the math in
//! `ferrotorch_kernels::adafactor`.
//!
//! Everything is read at this call. Anything the kernel cannot take (a subclass, another
//! device or dtype, an empty parameter, state of the wrong shape, shared memory) returns
//! False with nothing changed, and Python runs torch's function for that parameter.

use ferrotorch_kernels::adafactor::{adafactor, Adafactor, Second, Wide};
use ferrotorch_kernels::DType;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::access::{any_overlap, bump_versions, Flat, Meta, Scalar};
use crate::errors::{enter, Error};

/// A flat buffer of `dtype` with exactly `sizes`, or None.
fn buffer(obj: Option<&Bound<'_, PyAny>>, dtype: DType, sizes: &[i64]) -> PyResult<Option<Flat>> {
    let Some(obj) = obj else { return Ok(None) };
    Ok(Meta::of(obj)?
        .filter(|m| m.sizes() == sizes)
        .and_then(|m| m.flat())
        .filter(|f| f.dtype == dtype))
}

/// Addresses as plain numbers, so the work can cross into GIL-free code.
struct Work {
    dtype: DType,
    n: usize,
    param: usize,
    grad: usize,
    /// `(row_var, col_var, rows, cols)` when factored, else `variance`.
    factored: Option<(usize, usize, usize, usize)>,
    variance: usize,
}

unsafe fn run<T: Wide>(h: &Adafactor, step: f64, w: &Work, threads: usize) {
    let param = std::slice::from_raw_parts_mut(w.param as *mut T, w.n);
    let grad = std::slice::from_raw_parts(w.grad as *const T, w.n);
    let second = match w.factored {
        Some((rv, cv, rows, cols)) => {
            let batch = w.n / (rows * cols);
            Second::Factored {
                row_var: std::slice::from_raw_parts_mut(rv as *mut T, batch * rows),
                col_var: std::slice::from_raw_parts_mut(cv as *mut T, batch * cols),
                rows,
                cols,
            }
        }
        None => Second::Full {
            variance: std::slice::from_raw_parts_mut(w.variance as *mut T, w.n),
        },
    };
    adafactor(
        h,
        step,
        param,
        grad,
        second,
        threads,
        &crate::parallel::TorchThreads,
    );
}

/// Checks one parameter and its state as they are now; returns the work and its step
/// counter (not bumped yet), else None. Changes nothing.
fn prepare<'py>(
    param: &Bound<'py, PyAny>,
    grad: &Bound<'py, PyAny>,
    step: &Bound<'py, PyAny>,
    row_var: Option<&Bound<'py, PyAny>>,
    col_var: Option<&Bound<'py, PyAny>>,
    variance: Option<&Bound<'py, PyAny>>,
    written: &mut Vec<Bound<'py, PyAny>>,
) -> PyResult<Option<(Work, Scalar)>> {
    let (Some(pm), Some(gm), Some(sm)) = (Meta::of(param)?, Meta::of(grad)?, Meta::of(step)?)
    else {
        return Ok(None);
    };
    let (Some(pf), Some(gf)) = (pm.flat(), gm.flat()) else {
        return Ok(None);
    };
    let dtype = pf.dtype;
    if !matches!(dtype, DType::F32 | DType::F64)
        || gf.dtype != dtype
        || !gm.same_shape(&pm)
        || pf.numel == 0
    {
        return Ok(None);
    }
    // SAFETY: `step` is held by the caller for the whole call, and the overlap check below
    // keeps every other buffer of this parameter off its element.
    let Some(counter) = (unsafe { sm.scalar() }) else {
        return Ok(None);
    };
    let sizes = pm.sizes().to_vec();
    let mut ranges = vec![pf.range(), gf.range(), counter.range()];
    let mut states: Vec<&Bound<'py, PyAny>> = Vec::new();
    let (factored, var_addr) = if sizes.len() > 1 {
        let (rows, cols) = (
            sizes[sizes.len() - 2] as usize,
            sizes[sizes.len() - 1] as usize,
        );
        let mut row_shape = sizes.clone();
        *row_shape.last_mut().expect("2+ dims") = 1;
        let mut col_shape = sizes.clone();
        col_shape[sizes.len() - 2] = 1;
        let (Some(rv), Some(cv)) = (
            buffer(row_var, dtype, &row_shape)?,
            buffer(col_var, dtype, &col_shape)?,
        ) else {
            return Ok(None);
        };
        ranges.extend([rv.range(), cv.range()]);
        states.extend(row_var.into_iter().chain(col_var));
        (Some((rv.ptr as usize, cv.ptr as usize, rows, cols)), 0)
    } else {
        let Some(v) = buffer(variance, dtype, &sizes)? else {
            return Ok(None);
        };
        ranges.push(v.range());
        states.extend(variance);
        (None, v.ptr as usize)
    };
    if any_overlap(&mut ranges) {
        return Ok(None);
    }
    written.extend([param.clone(), step.clone()]);
    written.extend(states.into_iter().cloned());
    let work = Work {
        dtype,
        n: pf.numel,
        param: pf.ptr as usize,
        grad: gf.ptr as usize,
        factored,
        variance: var_addr,
    };
    Ok(Some((work, counter)))
}

fn item<'py>(list: &Bound<'py, PyList>, i: usize) -> PyResult<Option<Bound<'py, PyAny>>> {
    let v = list.get_item(i)?;
    Ok((!v.is_none()).then_some(v))
}

/// Adafactor's step for one param group, from torch's per-parameter lists (as
/// `Adafactor._init_group` builds them: `row_var`/`col_var` for 2+ dims, else `variance`;
/// None where absent). Bumps each stepped parameter's `step` as torch does. `eps1` None is
/// torch's default, the dtype's machine epsilon. Returns the positions the kernel did not
/// take (nothing of theirs changed; torch's function must step them, in order).
///
/// Parameters are stepped one after another, in list order, as torch steps them: a
/// parameter listed twice is stepped twice, and memory shared between two parameters'
/// buffers sees the same sequence of updates as under torch.
#[pyfunction]
#[pyo3(signature = (params, grads, steps, row_vars, col_vars, variances, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize))]
#[allow(clippy::too_many_arguments)]
pub fn adafactor_group(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    grads: &Bound<'_, PyList>,
    steps: &Bound<'_, PyList>,
    row_vars: &Bound<'_, PyList>,
    col_vars: &Bound<'_, PyList>,
    variances: &Bound<'_, PyList>,
    lr: f64,
    beta2_decay: f64,
    eps1: Option<f64>,
    eps2: f64,
    d: f64,
    weight_decay: f64,
    maximize: bool,
) -> PyResult<Vec<usize>> {
    let n = params.len();
    if [grads, steps, row_vars, col_vars, variances]
        .iter()
        .any(|l| l.len() != n)
    {
        return Err(Error::Value(format!(
            "adafactor_group: expected {n} entries in every list (one per parameter)"
        ))
        .into());
    }
    let mut slow = Vec::new();
    let mut work = Vec::with_capacity(n);
    let mut written = Vec::with_capacity(3 * n);
    for i in 0..n {
        let (p, g, s) = (params.get_item(i)?, grads.get_item(i)?, steps.get_item(i)?);
        let (rv, cv, v) = (item(row_vars, i)?, item(col_vars, i)?, item(variances, i)?);
        match prepare(
            &p,
            &g,
            &s,
            rv.as_ref(),
            cv.as_ref(),
            v.as_ref(),
            &mut written,
        )? {
            Some(w) => work.push(w),
            None => slow.push(i),
        }
    }
    // Every parameter was read and checked: only now do the counters move (torch bumps
    // `step` before its math), in list order, so a parameter listed twice counts twice.
    let work: Vec<(Work, f64)> = work.into_iter().map(|(w, c)| (w, c.bump())).collect();
    let threads = tch::get_num_threads().max(1) as usize;
    enter(py, "Adafactor", move || {
        for (w, step) in &work {
            let h = Adafactor {
                lr,
                beta2_decay,
                eps1: eps1.unwrap_or(match w.dtype {
                    DType::F32 => f32::EPSILON as f64,
                    _ => f64::EPSILON,
                }),
                eps2,
                d,
                weight_decay,
                maximize,
            };
            // SAFETY: every buffer was read at this call from a live plain contiguous CPU
            // tensor of `dtype` with the checked shape, none of one parameter's overlaps
            // another, and the lists (held by the caller) keep the objects alive.
            unsafe {
                match w.dtype {
                    DType::F32 => run::<f32>(&h, *step, w, threads),
                    _ => run::<f64>(&h, *step, w, threads),
                }
            }
        }
        Ok(())
    })?;
    bump_versions(&written);
    Ok(slow)
}
