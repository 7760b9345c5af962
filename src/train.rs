//! Python entry points of the training helpers' math (`ferrotorch.train`).

use ferrotorch_kernels::{clip::Buf, ema};
use pyo3::prelude::*;
use pyo3_tch::PyTensor;

use crate::errors::{no_panic, Error, Result};
use crate::tensor::{flat_cpu, kernel_dtype};

fn pair(i: usize, a: &PyTensor, b: &PyTensor) -> Result<(Buf, Buf)> {
    let (da, db) = (kernel_dtype(a), kernel_dtype(b));
    let Some(dtype) = da else {
        return Err(Error::Type(format!(
            "ema tensor {i}: expected a floating tensor"
        )));
    };
    if db != da || a.numel() != b.numel() {
        return Err(Error::Value(format!(
            "ema tensor {i} and its model tensor differ in dtype or size"
        )));
    }
    if !flat_cpu(a) || !flat_cpu(b) {
        return Err(Error::Value(format!(
            "ema tensor {i}: expected dense, contiguous CPU tensors"
        )));
    }
    Ok((
        Buf {
            dtype,
            numel: a.numel(),
            ptr: a.data_ptr() as *mut u8,
        },
        Buf {
            dtype,
            numel: b.numel(),
            ptr: b.data_ptr() as *mut u8,
        },
    ))
}

/// `ema[i].lerp_(model[i], weight)` for every pair, in one parallel pass.
#[pyfunction]
pub fn ema_update(
    py: Python<'_>,
    ema_tensors: Vec<PyTensor>,
    model_tensors: Vec<PyTensor>,
    weight: f64,
) -> PyResult<()> {
    if ema_tensors.len() != model_tensors.len() {
        return Err(Error::Value(format!(
            "{} EMA tensors but {} model tensors",
            ema_tensors.len(),
            model_tensors.len()
        ))
        .into());
    }
    let pairs = no_panic("ema_update", || {
        ema_tensors
            .iter()
            .zip(&model_tensors)
            .enumerate()
            .map(|(i, (a, b))| pair(i, a, b))
            .collect::<Result<Vec<_>>>()
    })?;
    let threads = tch::get_num_threads().max(1) as usize;
    // SAFETY: both lists keep their tensors alive; shapes and dtypes were checked.
    py.allow_threads(|| unsafe {
        ema::lerp_all(&pairs, weight, threads, &crate::parallel::TorchThreads)
    });
    Ok(())
}

/// timm ModelEmaV3's decay at `step` (None: the configured decay).
#[pyfunction]
#[pyo3(signature = (step, decay, min_decay, update_after_step, use_warmup, warmup_gamma, warmup_power))]
pub fn ema_decay(
    step: Option<i64>,
    decay: f64,
    min_decay: f64,
    update_after_step: i64,
    use_warmup: bool,
    warmup_gamma: f64,
    warmup_power: f64,
) -> f64 {
    ema::decay_at(
        step,
        decay,
        min_decay,
        update_after_step,
        use_warmup,
        warmup_gamma,
        warmup_power,
    )
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ema_update, m)?)?;
    m.add_function(wrap_pyfunction!(ema_decay, m)?)?;
    Ok(())
}
