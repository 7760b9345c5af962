//! Python entry points of gradient clipping (`ferrotorch.nn.utils`).

use ferrotorch_kernels::clip::{self, Buf};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use crate::errors::{no_panic, Error, Result};
use crate::tensor::{flat_cpu, kernel_dtype};

/// Checks that every tensor is a dense contiguous CPU float tensor the kernels can read.
fn bufs(grads: &[PyTensor]) -> Result<Vec<Buf>> {
    grads
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let dtype = kernel_dtype(t).ok_or_else(|| {
                Error::Type(format!(
                    "grads[{i}]: expected a float16/bfloat16/float32/float64 tensor"
                ))
            })?;
            if !flat_cpu(t) {
                return Err(Error::Value(format!(
                    "grads[{i}]: expected a dense, contiguous CPU tensor"
                )));
            }
            Ok(Buf {
                dtype,
                numel: t.numel(),
                ptr: t.data_ptr() as *mut u8,
            })
        })
        .collect()
}

/// The `norm_type`-norm of each of `grads`, in f64.
#[pyfunction]
pub fn grad_norms(py: Python<'_>, grads: Vec<PyTensor>, norm_type: f64) -> PyResult<Vec<f64>> {
    if norm_type.is_nan() {
        return Err(Error::Value("norm_type must not be NaN".into()).into());
    }
    let b = no_panic("grad_norms", || bufs(&grads))?;
    let threads = tch::get_num_threads().max(1) as usize;
    // SAFETY: `grads` keeps every tensor alive for the call; they were checked above.
    Ok(py.allow_threads(|| unsafe {
        clip::tensor_norms(&b, norm_type, threads, &crate::parallel::TorchThreads)
    }))
}

/// `g.mul_(coef)` for every grad.
#[pyfunction]
pub fn scale_grads(py: Python<'_>, grads: Vec<PyTensor>, coef: f64) -> PyResult<()> {
    let b = no_panic("scale_grads", || bufs(&grads))?;
    py.allow_threads(|| unsafe { clip::scale(&b, coef) });
    Ok(())
}

/// `g.clamp_(-clip, clip)` for every grad.
#[pyfunction]
pub fn clamp_grads(py: Python<'_>, grads: Vec<PyTensor>, clip_value: f64) -> PyResult<()> {
    let b = no_panic("clamp_grads", || bufs(&grads))?;
    py.allow_threads(|| unsafe { clip::clamp(&b, clip_value) });
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(grad_norms, m)?)?;
    m.add_function(wrap_pyfunction!(scale_grads, m)?)?;
    m.add_function(wrap_pyfunction!(clamp_grads, m)?)?;
    Ok(())
}
