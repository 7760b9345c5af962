//! The one error type of the bindings, and its mapping onto Python exceptions.
//!
//! Each variant becomes a ferrotorch exception that subclasses the builtin a torch user
//! already catches (`ValueError`, `TypeError`, `RuntimeError`).

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

create_exception!(
    ferrotorch,
    FerrotorchValueError,
    PyValueError,
    "An argument or state has the right type but a wrong value (shape, range, keys)."
);
create_exception!(
    ferrotorch,
    FerrotorchTypeError,
    PyTypeError,
    "An argument has the wrong type or dtype."
);
create_exception!(
    ferrotorch,
    FerrotorchRuntimeError,
    PyRuntimeError,
    "An operation failed at run time (torch reported an error, or a kernel could not run)."
);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Value(String),
    #[error("{0}")]
    Type(String),
    #[error("{0}")]
    Runtime(String),
    #[error(transparent)]
    Kernel(#[from] ferrotorch_kernels::KernelError),
    #[error("torch reported: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::Value(_) => FerrotorchValueError::new_err(msg),
            Error::Type(_) => FerrotorchTypeError::new_err(msg),
            Error::Runtime(_) | Error::Kernel(_) | Error::Torch(_) => {
                FerrotorchRuntimeError::new_err(msg)
            }
        }
    }
}

/// Runs `f`, turning a panic (tch panics on some libtorch errors) into a RuntimeError so it
/// never reaches Python as a `PanicException`.
pub fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let detail = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown error");
            Err(Error::Runtime(format!("{what} failed: {detail}")))
        }
    }
}

/// The one way native work is entered from Python: the GIL is released, a panic becomes a
/// RuntimeError, and the error maps onto ferrotorch's exceptions. `f` must not touch Python
/// objects (the borrow checker enforces it: it cannot hold a `Python` token).
pub fn enter<T, F>(py: pyo3::Python<'_>, what: &str, f: F) -> pyo3::PyResult<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    py.allow_threads(|| no_panic(what, f)).map_err(PyErr::from)
}
