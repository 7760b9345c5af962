//! Adafactor's step for one parameter: torch's `_single_tensor_adafactor` with the math in
//! `ferrotorch_kernels::adafactor`.
//!
//! Everything is read at this call. Anything the kernel cannot take (a subclass, another
//! device or dtype, an empty parameter, state of the wrong shape, shared memory) returns
//! False with nothing changed, and Python runs torch's function for that parameter.

use ferrotorch_kernels::adafactor::{adafactor, Adafactor, Second, Wide};
use ferrotorch_kernels::DType;
use pyo3::prelude::*;

use crate::access::{any_overlap, bump_versions, Flat, Meta};
use crate::errors::enter;

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

/// One Adafactor step of `param` (torch's state: `step`, and `row_var`/`col_var` for 2+
/// dims or `variance`); bumps `step` as torch does. False: nothing changed, torch's
/// function must step this parameter.
#[pyfunction]
#[pyo3(signature = (param, grad, step, row_var, col_var, variance, *, lr, beta2_decay, eps1, eps2, d, weight_decay, maximize))]
#[allow(clippy::too_many_arguments)]
pub fn adafactor_step(
    py: Python<'_>,
    param: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
    step: &Bound<'_, PyAny>,
    row_var: Option<&Bound<'_, PyAny>>,
    col_var: Option<&Bound<'_, PyAny>>,
    variance: Option<&Bound<'_, PyAny>>,
    lr: f64,
    beta2_decay: f64,
    eps1: f64,
    eps2: f64,
    d: f64,
    weight_decay: f64,
    maximize: bool,
) -> PyResult<bool> {
    let (Some(pm), Some(gm), Some(sm)) = (Meta::of(param)?, Meta::of(grad)?, Meta::of(step)?)
    else {
        return Ok(false);
    };
    let (Some(pf), Some(gf)) = (pm.flat(), gm.flat()) else {
        return Ok(false);
    };
    let dtype = pf.dtype;
    if !matches!(dtype, DType::F32 | DType::F64)
        || gf.dtype != dtype
        || !gm.same_shape(&pm)
        || pf.numel == 0
    {
        return Ok(false);
    }
    // SAFETY: `step` is held by the caller for the whole call, and the overlap check below
    // keeps every other buffer off its element.
    let Some(counter) = (unsafe { sm.scalar() }) else {
        return Ok(false);
    };
    let sizes = pm.sizes().to_vec();
    let mut ranges = vec![pf.range(), gf.range(), counter.range()];
    let mut states: Vec<&Bound<'_, PyAny>> = Vec::new();
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
            return Ok(false);
        };
        ranges.extend([rv.range(), cv.range()]);
        states.extend(row_var.into_iter().chain(col_var));
        (Some((rv.ptr as usize, cv.ptr as usize, rows, cols)), 0)
    } else {
        let Some(v) = buffer(variance, dtype, &sizes)? else {
            return Ok(false);
        };
        ranges.push(v.range());
        states.extend(variance);
        (None, v.ptr as usize)
    };
    if any_overlap(&mut ranges) {
        return Ok(false);
    }
    // Every check passed: from here on the step happens.
    let step_now = counter.bump();
    let work = Work {
        dtype,
        n: pf.numel,
        param: pf.ptr as usize,
        grad: gf.ptr as usize,
        factored,
        variance: var_addr,
    };
    let h = Adafactor {
        lr,
        beta2_decay,
        eps1,
        eps2,
        d,
        weight_decay,
        maximize,
    };
    let threads = tch::get_num_threads().max(1) as usize;
    enter(py, "Adafactor", move || {
        // SAFETY: every buffer was read at this call from a live plain contiguous CPU tensor
        // of `dtype` with the checked shape, none overlaps another, and the caller holds
        // the objects.
        unsafe {
            match work.dtype {
                DType::F32 => run::<f32>(&h, step_now, &work, threads),
                _ => run::<f64>(&h, step_now, &work, threads),
            }
        }
        Ok(())
    })?;
    let mut written: Vec<Bound<'_, PyAny>> = vec![param.clone(), step.clone()];
    written.extend(states.into_iter().cloned());
    bump_versions(&written);
    Ok(true)
}
