//! What the fast path needs to know about a tensor before touching its memory.

use ferrotorch_kernels::DType;
use tch::{Device, Kind, Tensor};

use crate::errors::{Error, Result};

/// Element type of a strided CPU tensor the kernels can update in place, or None.
pub fn kernel_dtype(t: &Tensor) -> Option<DType> {
    match t.f_kind().ok()? {
        Kind::Float => Some(DType::F32),
        Kind::Double => Some(DType::F64),
        Kind::BFloat16 => Some(DType::BF16),
        Kind::Half => Some(DType::F16),
        _ => None,
    }
}

/// A tensor the kernel may treat as a flat buffer: defined, dense, contiguous, on the CPU.
pub fn flat_cpu(t: &Tensor) -> bool {
    t.defined()
        && !t.is_sparse()
        && !t.is_mkldnn()
        && t.device() == Device::Cpu
        && t.is_contiguous()
}

/// The half-open byte range a flat tensor occupies.
pub fn byte_range(t: &Tensor, dtype: DType) -> (usize, usize) {
    let start = t.data_ptr() as usize;
    (start, start + t.numel() * dtype.size())
}

pub fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 != a.1 && b.0 != b.1
}

/// A scalar step counter the kernel can read and bump: 1 element, f32 or f64, on the CPU.
#[derive(Clone, Copy)]
pub struct StepCounter {
    ptr: *mut u8,
    double: bool,
}

impl StepCounter {
    pub fn of(t: &Tensor) -> Option<StepCounter> {
        if !flat_cpu(t) || t.numel() != 1 {
            return None;
        }
        match t.f_kind().ok()? {
            Kind::Float => Some(StepCounter {
                ptr: t.data_ptr() as *mut u8,
                double: false,
            }),
            Kind::Double => Some(StepCounter {
                ptr: t.data_ptr() as *mut u8,
                double: true,
            }),
            _ => None,
        }
    }

    /// `step_t += 1` in the counter's own dtype, as torch does; returns the new value.
    ///
    /// # Safety
    /// The tensor this counter was made from must still be alive.
    pub unsafe fn bump(&self) -> f64 {
        if self.double {
            let p = self.ptr as *mut f64;
            *p += 1.0;
            *p
        } else {
            let p = self.ptr as *mut f32;
            *p += 1.0;
            *p as f64
        }
    }
}

pub fn torch_kind_name(t: &Tensor) -> String {
    match t.f_kind() {
        Ok(k) => format!("{k:?}"),
        Err(_) => "an unsupported dtype".to_string(),
    }
}

/// Errors torch itself would raise for a gradient that cannot belong to its parameter.
pub fn check_grad_matches(index: usize, param: &Tensor, grad: &Tensor) -> Result<()> {
    if grad.is_sparse() {
        return Ok(());
    }
    if param.f_kind().ok() != grad.f_kind().ok() {
        return Err(Error::Type(format!(
            "grad of parameter {index} has dtype {}, but the parameter has dtype {}",
            torch_kind_name(grad),
            torch_kind_name(param)
        )));
    }
    // numel and rank are free to read; the sizes are only materialized for the message.
    if param.numel() != grad.numel() || param.dim() != grad.dim() {
        let (ps, gs) = (param.size(), grad.size());
        return Err(Error::Value(format!(
            "grad of parameter {index} has shape {gs:?}, but the parameter has shape {ps:?}"
        )));
    }
    Ok(())
}
