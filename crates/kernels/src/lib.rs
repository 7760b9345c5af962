//! Pure-Rust kernels behind ferrotorch's fused optimizers.
//!
//! Nothing here knows about Python or libtorch: a kernel sees raw, dense element buffers and
//! plain hyper-parameters, so `cargo test -p ferrotorch-kernels` exercises the math alone.
//! The data flow is: `bindings` (PyO3 + tch, argument checks) build [`Job`]s and call
//! [`run`]; `run` splits every tensor into chunks, spreads them over a fork-safe thread pool
//! and calls the algorithm's one generic `update` for each chunk.

pub mod adadelta;
pub mod adafactor;
pub mod adagrad;
pub mod adam;
pub mod adamax;
pub mod asgd;
pub mod clip;
pub mod common;
mod driver;
pub mod elem;
pub mod ema;
pub mod lbfgs;
pub mod nadam;
pub mod overlap;
pub mod pool;
pub mod radam;
pub mod rmsprop;
pub mod rprop;
pub mod schedule;
pub mod sgd;
pub mod sparse_adam;
pub mod vit;

pub use driver::{
    capability_cap, map_pieces, pieces, run, simd_level, with_simd, Algorithm, DType, Executor,
    Job, RayonPool, Serial, SimdWork, MAX_STATES,
};
pub use elem::{Elem, OpFloat};

/// Errors a kernel call can report; the bindings map them to Python exceptions.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("{what}: expected {expected} state buffer(s), got {got}")]
    StateCount {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("could not start the thread pool: {0}")]
    Pool(String),
}
