//! Muon's step for a param group: torch's `_single_tensor_muon`, op for op, through ATen's
//! C++ API (`src/shim/muon.cpp`), so the numbers are torch's bit for bit and the ~20 Python
//! op dispatches per parameter are gone. The Newton–Schulz matmuls are libtorch's own.
//!
//! Everything torch's Python code checks is checked here first, for every parameter, with
//! torch's messages, so an error leaves nothing changed (torch's own step would already
//! have moved the first buffer). A group the shim should not take (a tensor subclass,
//! another device, a grad or buffer whose shape or dtype differs from its parameter's)
//! returns False untouched and Python runs torch's function for it.

use std::ffi::{c_char, c_int, c_void, CStr};

use pyo3::prelude::*;
use pyo3::types::PyList;
use tch::Tensor;

use crate::access::{plain_tensor, Meta};
use crate::errors::{enter, Error};

/// The scalars of one group, as Python computes them (`src/shim/muon.cpp` mirrors it).
#[repr(C)]
struct FtMuon {
    one_minus_momentum: f64,
    momentum: f64,
    nesterov: i32,
    copy_bf16: i32,
    a: f64,
    b: f64,
    c: f64,
    ns_steps: i64,
    eps: f64,
    decay: f64,
    alpha: f64,
}

extern "C" {
    // src/shim/muon.cpp
    fn ft_muon_update(
        param: *mut c_void,
        grad: *mut c_void,
        buf: *mut c_void,
        h: *const FtMuon,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// One parameter's handles, taken while the GIL is held.
struct Entry {
    param: Tensor,
    grad: Tensor,
    buf: Tensor,
    alpha: f64,
}

/// The three tensors of parameter `i` if the shim may step them: plain dense CPU tensors
/// of one float dtype and one 2-D shape.
fn entry(
    p: &Bound<'_, PyAny>,
    g: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
) -> PyResult<Option<[Tensor; 3]>> {
    let metas = [Meta::of(p)?, Meta::of(g)?, Meta::of(b)?];
    let [Some(mp), Some(mg), Some(mb)] = metas else {
        return Ok(None);
    };
    let fits = [mp, mg, mb]
        .iter()
        .all(|m| m.plain_cpu() && m.kernel_dtype().is_some() && m.sizes().len() == 2)
        && mp.same_shape(&mg)
        && mp.same_shape(&mb)
        && mp.same_dtype(&mg)
        && mp.same_dtype(&mb);
    if !fits {
        return Ok(None);
    }
    match (plain_tensor(p)?, plain_tensor(g)?, plain_tensor(b)?) {
        (Some(p), Some(g), Some(b)) => Ok(Some([p, g, b])),
        _ => Ok(None),
    }
}

/// Steps a Muon param group (`params`, their `grads` and `momentum_buffer`s, as torch's
/// `_init_group` lists them, and each parameter's `adjusted_lrs` from torch's own
/// `_adjust_lr`, whose rules differ between torch versions); True when done, False (nothing changed) when torch's
/// function must run instead. Raises torch's ValueErrors before changing anything.
///
/// Parameters are stepped in list order, as torch steps them, so a parameter listed twice
/// is stepped twice.
#[pyfunction]
#[pyo3(signature = (params, grads, momentum_buffers, adjusted_lrs, *, lr, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps, copy_bf16))]
#[allow(clippy::too_many_arguments)]
pub fn muon_group(
    py: Python<'_>,
    params: &Bound<'_, PyList>,
    grads: &Bound<'_, PyList>,
    momentum_buffers: &Bound<'_, PyList>,
    adjusted_lrs: Vec<f64>,
    lr: f64,
    weight_decay: f64,
    momentum: f64,
    nesterov: bool,
    ns_coefficients: &Bound<'_, PyAny>,
    ns_steps: i64,
    eps: f64,
    copy_bf16: bool,
) -> PyResult<bool> {
    let n = params.len();
    if grads.len() != n || momentum_buffers.len() != n || adjusted_lrs.len() != n {
        return Err(Error::Value(format!(
            "muon_group: expected {n} grads, momentum buffers and adjusted lrs (one per parameter)"
        ))
        .into());
    }
    // torch checks, per parameter: the grad is 2-D, then (inside Newton–Schulz) the step
    // count and the coefficients, which are the same for every parameter.
    for i in 0..n {
        let dims = grads.get_item(i)?.getattr("ndim")?.extract::<i64>()?;
        if dims != 2 {
            return Err(Error::Value("Param gradient must be a 2D matrix".into()).into());
        }
        if i == 0 && ns_steps >= 100 {
            return Err(Error::Value(
                "Number of steps must be less than 100 for computational efficiency".into(),
            )
            .into());
        }
        if i == 0 && ns_coefficients.len()? != 3 {
            return Err(
                Error::Value("Coefficients must be a tuple of exactly 3 values".into()).into(),
            );
        }
    }
    if n == 0 {
        return Ok(true);
    }
    let Ok((a, b, c)) = ns_coefficients.extract::<(f64, f64, f64)>() else {
        return Ok(false);
    };
    let mut work = Vec::with_capacity(n);
    for (i, &lr) in adjusted_lrs.iter().enumerate().take(n) {
        let (p, g, m) = (
            params.get_item(i)?,
            grads.get_item(i)?,
            momentum_buffers.get_item(i)?,
        );
        let Some([param, grad, buf]) = entry(&p, &g, &m)? else {
            return Ok(false);
        };
        work.push(Entry {
            param,
            grad,
            buf,
            alpha: -lr,
        });
    }
    let h = FtMuon {
        one_minus_momentum: 1.0 - momentum,
        momentum,
        nesterov: nesterov as i32,
        copy_bf16: copy_bf16 as i32,
        a,
        b,
        c,
        ns_steps,
        eps,
        decay: 1.0 - lr * weight_decay,
        alpha: 0.0,
    };
    enter(py, "Muon", move || {
        let mut err = [0 as c_char; 512];
        for mut e in work {
            let h = FtMuon {
                alpha: e.alpha,
                ..h
            };
            // SAFETY: the handles are live tch tensors owned by `e` for the whole call; the
            // shim only runs ATen ops on them and writes at most `err.len()` bytes to `err`.
            let rc = unsafe {
                ft_muon_update(
                    e.param.as_mut_ptr() as *mut c_void,
                    e.grad.as_mut_ptr() as *mut c_void,
                    e.buf.as_mut_ptr() as *mut c_void,
                    &h,
                    err.as_mut_ptr(),
                    err.len(),
                )
            };
            if rc != 0 {
                // SAFETY: the shim wrote a NUL-terminated message (snprintf).
                let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
                    .to_string_lossy()
                    .into_owned();
                return Err(Error::Runtime(format!("Muon: torch reported: {msg}")));
            }
        }
        Ok(())
    })?;
    Ok(true)
}
