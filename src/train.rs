//! Python entry points of the training helpers' math (`ferrotorch.train`).

use ferrotorch_kernels::{clip::Buf, ema};
use pyo3::prelude::*;
use tch::Tensor;

use crate::access::{any_overlap, flat, Flat};
use crate::clip::plain_list;
use crate::errors::{enter, Error, Result};

fn buf(f: Flat) -> Buf {
    Buf {
        dtype: f.dtype,
        numel: f.numel,
        ptr: f.ptr,
    }
}

/// `ema.lerp_(model, weight)` for one pair through torch's own op.
fn torch_lerp(ema: &Tensor, model: &Tensor, weight: f64) -> Result<()> {
    let mut e = ema.shallow_clone();
    let _ = e.f_lerp_(model, weight)?;
    Ok(())
}

fn lerp_pairs(ema_t: &[Tensor], model_t: &[Tensor], weight: f64, threads: usize) -> Result<()> {
    let mut pairs = Vec::with_capacity(ema_t.len());
    let mut ranges = Vec::with_capacity(2 * ema_t.len());
    for (i, (a, b)) in ema_t.iter().zip(model_t).enumerate() {
        let (Some(fa), Some(fb)) = (flat(a), flat(b)) else {
            return Err(Error::Value(format!(
                "ema tensor {i}: expected dense, contiguous CPU float tensors"
            )));
        };
        if fa.dtype != fb.dtype || a.size() != b.size() {
            return Err(Error::Value(format!(
                "ema tensor {i} and its model tensor differ in dtype or shape"
            )));
        }
        ranges.push(fa.range());
        ranges.push(fb.range());
        pairs.push((buf(fa), buf(fb)));
    }
    if any_overlap(&mut ranges) {
        // Tied weights (or an average sharing memory with the model): one pair after the
        // other with torch's lerp_, exactly as timm's loop over the state dict does.
        for (a, b) in ema_t.iter().zip(model_t) {
            torch_lerp(a, b, weight)?;
        }
        return Ok(());
    }
    // SAFETY: every buffer is a live checked CPU tensor held by the lists; none overlap.
    unsafe { ema::lerp_all(&pairs, weight, threads, &crate::parallel::TorchThreads) };
    Ok(())
}

/// `ema[i].lerp_(model[i], weight)` for every pair, in one parallel pass.
#[pyfunction]
pub fn ema_update(
    py: Python<'_>,
    ema_tensors: Vec<Bound<'_, PyAny>>,
    model_tensors: Vec<Bound<'_, PyAny>>,
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
    let ema_t = plain_list(&ema_tensors, "ema_tensors")?;
    let model_t = plain_list(&model_tensors, "model_tensors")?;
    let threads = tch::get_num_threads().max(1) as usize;
    enter(py, "ema_update", move || {
        lerp_pairs(&ema_t, &model_t, weight, threads)
    })
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
