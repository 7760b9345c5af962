//! Python entry points of gradient clipping (`ferrotorch.nn.utils`).

use ferrotorch_kernels::clip::{self, Buf};
use pyo3::prelude::*;
use tch::Tensor;

use crate::access::{flat, kernel_dtype, plain_tensor};
use crate::errors::{enter, Error, Result};

/// The plain tensors behind `objs` (under the GIL); anything else is refused, since
/// `ferrotorch.nn.utils` hands subclasses (DTensor, FakeTensor…) to torch.
pub fn plain_list(objs: &[Bound<'_, PyAny>], what: &str) -> PyResult<Vec<Tensor>> {
    objs.iter()
        .enumerate()
        .map(|(i, o)| {
            plain_tensor(o)?.ok_or_else(|| {
                let ty = o
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                Error::Type(format!(
                    "{what}[{i}]: expected a plain torch.Tensor, got {ty}"
                ))
                .into()
            })
        })
        .collect()
}

/// Every tensor as a dense contiguous CPU float buffer, read now (without the GIL).
/// Overlapping buffers are allowed: the clipping kernels visit them one after another.
fn bufs(grads: &[Tensor]) -> Result<Vec<Buf>> {
    grads
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if kernel_dtype(t).is_none() {
                return Err(Error::Type(format!(
                    "grads[{i}]: expected a float16/bfloat16/float32/float64 tensor"
                )));
            }
            let f = flat(t).ok_or_else(|| {
                Error::Value(format!(
                    "grads[{i}]: expected a dense, contiguous CPU tensor"
                ))
            })?;
            Ok(Buf {
                dtype: f.dtype,
                numel: f.numel,
                ptr: f.ptr,
            })
        })
        .collect()
}

/// The `norm_type`-norm of each of `grads`, in f64.
#[pyfunction]
pub fn grad_norms(
    py: Python<'_>,
    grads: Vec<Bound<'_, PyAny>>,
    norm_type: f64,
) -> PyResult<Vec<f64>> {
    if norm_type.is_nan() {
        return Err(Error::Value("norm_type must not be NaN".into()).into());
    }
    let grads = plain_list(&grads, "grads")?;
    let threads = tch::get_num_threads().max(1) as usize;
    enter(py, "grad_norms", move || {
        let b = bufs(&grads)?;
        // SAFETY: `grads` keeps every buffer alive; norms only read them.
        Ok(unsafe { clip::tensor_norms(&b, norm_type, threads, &crate::parallel::TorchThreads) })
    })
}

/// `g.mul_(coef)` for every grad.
#[pyfunction]
pub fn scale_grads(py: Python<'_>, grads: Vec<Bound<'_, PyAny>>, coef: f64) -> PyResult<()> {
    let grads = plain_list(&grads, "grads")?;
    enter(py, "scale_grads", move || {
        let b = bufs(&grads)?;
        // SAFETY: every buffer was checked above and `grads` keeps it alive; `scale` visits
        // the buffers one at a time, in list order, as torch's loop does.
        unsafe { clip::scale(&b, coef) };
        Ok(())
    })
}

/// `g.clamp_(-clip, clip)` for every grad.
#[pyfunction]
pub fn clamp_grads(py: Python<'_>, grads: Vec<Bound<'_, PyAny>>, clip_value: f64) -> PyResult<()> {
    let grads = plain_list(&grads, "grads")?;
    enter(py, "clamp_grads", move || {
        let b = bufs(&grads)?;
        // SAFETY: as in `scale_grads`.
        unsafe { clip::clamp(&b, clip_value) };
        Ok(())
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(grad_norms, m)?)?;
    m.add_function(wrap_pyfunction!(scale_grads, m)?)?;
    m.add_function(wrap_pyfunction!(clamp_grads, m)?)?;
    Ok(())
}
