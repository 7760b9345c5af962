//! The fused optimizers as Python sees them: one `OptimizerSpec` object per algorithm,
//! looked up by name once when a Python class is defined.
//!
//!     spec = _native.optimizer_spec("adam")
//!     missing, slow, serial = spec.step(opt.state, group)

mod adafactor;
mod algos;
mod lbfgs;
mod muon;
mod sparse;
mod step;

use ferrotorch_kernels::{
    adadelta::Adadelta, adagrad::Adagrad, adam::Adam, adamax::Adamax, asgd::Asgd, common::GradIn,
    nadam::NAdam, radam::RAdam, rmsprop::RmsProp, rprop::Rprop, sgd::Sgd,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::errors::Error;
use algos::{Fused, Sparse, Spec};
use step::{step_group, Outcome};

type StepFn = for<'py> fn(
    Python<'py>,
    &Bound<'py, PyDict>,
    &Bound<'py, PyDict>,
    GradIn,
    &[usize],
) -> PyResult<Outcome>;
/// `(missing, slow, serial)` as Python receives it.
type StepResult = (Vec<usize>, Vec<(usize, bool)>, bool);
type KeysFn = for<'py> fn(&Bound<'py, PyDict>) -> crate::errors::Result<Vec<&'static str>>;

/// An algorithm's declaration with its step bound to its kernel.
struct Entry {
    spec: &'static Spec,
    keys: KeysFn,
    step: StepFn,
}

const fn entry<A: Fused>() -> Entry {
    Entry {
        spec: &A::SPEC,
        keys: A::state_keys,
        step: step_group::<A>,
    }
}

/// Every fused optimizer. Adding one is a kernel, a `Fused` impl and a line here.
static REGISTRY: [Entry; 10] = [
    entry::<Adam>(),
    entry::<Sgd>(),
    entry::<RmsProp>(),
    entry::<Adagrad>(),
    entry::<Adamax>(),
    entry::<RAdam>(),
    entry::<Adadelta>(),
    entry::<Rprop>(),
    entry::<NAdam>(),
    entry::<Asgd>(),
];

/// One fused algorithm: its declaration and its step.
#[pyclass(module = "ferrotorch._native", frozen)]
pub struct OptimizerSpec {
    entry: &'static Entry,
}

#[pymethods]
impl OptimizerSpec {
    #[getter]
    fn name(&self) -> &'static str {
        self.entry.spec.name
    }
    /// torch's class name.
    #[getter]
    fn label(&self) -> &'static str {
        self.entry.spec.label
    }
    /// Whether each parameter's state holds a `step` tensor.
    #[getter]
    fn has_step(&self) -> bool {
        self.entry.spec.has_step()
    }
    /// The per-parameter one-element state tensors (`step` first where torch counts steps).
    #[getter]
    fn scalar_keys<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyString>> {
        interned(py, self.entry.spec.scalars)
    }
    /// Whether sparse gradients are stepped by torch (True) or rejected with torch's error.
    #[getter]
    fn sparse_grads(&self) -> bool {
        matches!(self.entry.spec.sparse, Sparse::Torch)
    }
    /// The state tensors (besides `step`) this group's settings need, in the kernel's order;
    /// each has the parameter's shape.
    fn state_keys<'py>(&self, group: &Bound<'py, PyDict>) -> PyResult<Vec<Bound<'py, PyString>>> {
        Ok(interned(group.py(), &(self.entry.keys)(group)?))
    }

    /// One step of `group`, reading `state` (the optimizer's `state`) as it is now.
    ///
    /// Returns `(missing, slow, serial)`: `missing` lists the parameters whose state must be
    /// created first (nothing was changed; call again); `slow` the `(index, first)` of the
    /// parameters torch must step; `serial` is True when buffers of the group share memory,
    /// nothing was changed and torch must step the whole group in order. `first` lists the
    /// parameters whose state was created for this step.
    #[pyo3(signature = (state, group, grad_scale=None, clip_coef=None, first=Vec::new()))]
    fn step(
        &self,
        py: Python<'_>,
        state: &Bound<'_, PyDict>,
        group: &Bound<'_, PyDict>,
        grad_scale: Option<f64>,
        clip_coef: Option<f64>,
        first: Vec<usize>,
    ) -> PyResult<StepResult> {
        let grad = GradIn {
            grad_scale,
            clip_coef,
        };
        let out = (self.entry.step)(py, state, group, grad, &first)?;
        Ok((out.missing, out.slow, out.serial))
    }

    fn __repr__(&self) -> String {
        format!("OptimizerSpec({:?})", self.entry.spec.name)
    }
}

/// The spec of the fused optimizer called `name` (see `optimizer_names()`).
#[pyfunction]
fn optimizer_spec(name: &str) -> PyResult<OptimizerSpec> {
    REGISTRY
        .iter()
        .find(|e| e.spec.name == name)
        .map(|entry| OptimizerSpec { entry })
        .ok_or_else(|| {
            let known: Vec<_> = REGISTRY.iter().map(|e| e.spec.name).collect();
            Error::Value(format!(
                "optimizer_spec: expected one of {known:?}, got {name:?}"
            ))
            .into()
        })
}

/// Names of every fused optimizer.
#[pyfunction]
fn optimizer_names() -> Vec<&'static str> {
    REGISTRY.iter().map(|e| e.spec.name).collect()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OptimizerSpec>()?;
    m.add_function(wrap_pyfunction!(optimizer_spec, m)?)?;
    m.add_function(wrap_pyfunction!(optimizer_names, m)?)?;
    m.add_function(wrap_pyfunction!(sparse::sparse_adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(adafactor::adafactor_group, m)?)?;
    m.add_function(wrap_pyfunction!(muon::muon_group, m)?)?;
    m.add_function(wrap_pyfunction!(lbfgs::lbfgs_two_loop, m)?)?;
    m.add_function(wrap_pyfunction!(lbfgs::lbfgs_gather, m)?)?;
    m.add_function(wrap_pyfunction!(lbfgs::lbfgs_add, m)?)?;
    m.add_function(wrap_pyfunction!(lbfgs::lbfgs_set, m)?)?;
    Ok(())
}

/// The state keys as interned strings: the state dicts made with them then hold the very
/// objects the step looks up with, so each lookup matches by identity, not by comparing
/// characters.
fn interned<'py>(py: Python<'py>, keys: &[&'static str]) -> Vec<Bound<'py, PyString>> {
    keys.iter().map(|k| PyString::intern(py, k)).collect()
}
