//! Python entry points of the schedule math in `ferrotorch_kernels::schedule`.
//!
//! The Python scheduler classes read `param_groups` and their own attributes, call one of
//! these per step, and write the returned values back.

use ferrotorch_kernels::schedule as s;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyFloat};

use crate::access::is_tensor;
use crate::errors::Error;

fn param<'py, T: FromPyObject<'py>>(params: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    let v = params
        .get_item(key)?
        .ok_or_else(|| Error::Value(format!("scheduler parameter '{key}' is missing")))?;
    v.extract::<T>().map_err(|_| {
        Error::Type(format!(
            "scheduler parameter '{key}' has the wrong type ({})",
            v.get_type()
        ))
        .into()
    })
}

static FLOAT64: GILOnceCell<Py<PyAny>> = GILOnceCell::new();

/// Whether `v` is a tensor narrower than float64 (a float32 `lr=torch.tensor(0.01)`, as
/// torch.compile recipes write it). torch's lr formulas run in such a tensor's dtype, so
/// only torch's own formula gives torch's numbers: the Python classes fall back to it.
fn is_narrow_tensor(v: &Bound<'_, PyAny>) -> PyResult<bool> {
    if v.is_instance_of::<PyFloat>() || !is_tensor(v)? {
        return Ok(false);
    }
    let py = v.py();
    let f64_dtype = FLOAT64.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("torch")?.getattr("float64")?.unbind())
    })?;
    Ok(!v.getattr(intern!(py, "dtype"))?.is(f64_dtype.bind(py)))
}

/// Whether one of `values` is a tensor narrower than float64 (see [`is_narrow_tensor`]),
/// for the schedulers whose lr arithmetic (user lambdas) stays in Python.
#[pyfunction]
pub fn narrow_tensor_lrs(values: &Bound<'_, PyAny>) -> PyResult<bool> {
    for v in values.try_iter()? {
        if is_narrow_tensor(&v?)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// An lr as a float, or None for a tensor narrower than float64 (see [`is_narrow_tensor`]).
fn lr_value(v: &Bound<'_, PyAny>, what: &str) -> PyResult<Option<f64>> {
    if let Ok(f) = v.downcast::<PyFloat>() {
        return Ok(Some(f.value()));
    }
    if is_narrow_tensor(v)? {
        return Ok(None);
    }
    v.extract::<f64>().map(Some).map_err(|_| {
        Error::Type(format!(
            "{what} must be a float or a 1-element tensor, got {}",
            v.get_type()
        ))
        .into()
    })
}

/// Each group's current `lr` (see [`lr_value`]), read straight from `optimizer.param_groups`.
fn group_lrs(groups: &Bound<'_, PyAny>) -> PyResult<Option<Vec<f64>>> {
    group_floats(groups, intern!(groups.py(), "lr"))
}

/// Each group's value under `key` (see [`lr_value`]); None if one is a narrow tensor.
fn group_floats(
    groups: &Bound<'_, PyAny>,
    key: &Bound<'_, pyo3::types::PyString>,
) -> PyResult<Option<Vec<f64>>> {
    let mut out = Vec::new();
    for g in groups.try_iter()? {
        let g = g?;
        let v = g
            .get_item(key)
            .map_err(|_| Error::Value(format!("a param_group has no '{key}'")))?;
        match lr_value(&v, &format!("param_group['{key}']"))? {
            Some(x) => out.push(x),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// `base_lrs` (see [`lr_value`]); None if one is a narrow tensor.
fn base_values(base_lrs: &Bound<'_, PyAny>) -> PyResult<Option<Vec<f64>>> {
    let mut out = Vec::new();
    for v in base_lrs.try_iter()? {
        match lr_value(&v?, "base_lrs")? {
            Some(x) => out.push(x),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}

/// The lrs of a StepLR/MultiStepLR/ConstantLR/LinearLR/ExponentialLR/PolynomialLR/
/// CosineAnnealingLR/CosineAnnealingWarmRestarts step: torch's chainable form from the
/// groups' current lrs, or the closed form from `base_lrs` when `closed`. None when an lr
/// is a tensor narrower than float64 (the caller then runs torch's formula).
///
/// Hyper-parameters, by kind: step (a=step_size, b=gamma), multistep (a=gamma,
/// milestones), constant (a=factor, b=total_iters), linear (a=start_factor, b=end_factor,
/// c=total_iters), exponential (a=gamma), polynomial (a=total_iters, b=power), cosine
/// (a=T_max, b=eta_min), warm_restarts (a=T_cur, b=T_i, c=eta_min).
#[pyfunction]
#[pyo3(signature = (kind, groups, base_lrs, last_epoch, is_initial, step_count, closed, a=0.0, b=0.0, c=0.0, milestones=None))]
#[allow(clippy::too_many_arguments)]
pub fn schedule_lrs(
    kind: &str,
    groups: &Bound<'_, PyAny>,
    base_lrs: &Bound<'_, PyAny>,
    last_epoch: i64,
    is_initial: bool,
    step_count: i64,
    closed: bool,
    a: f64,
    b: f64,
    c: f64,
    milestones: Option<Vec<i64>>,
) -> PyResult<Option<Vec<f64>>> {
    let Some(base_lrs) = base_values(base_lrs)? else {
        return Ok(None);
    };
    let lrs = if closed {
        base_lrs.clone()
    } else {
        match group_lrs(groups)? {
            Some(l) => l,
            None => return Ok(None),
        }
    };
    if lrs.len() != base_lrs.len() {
        return Err(Error::Value(format!(
            "{} param groups but {} base_lrs",
            lrs.len(),
            base_lrs.len()
        ))
        .into());
    }
    let e = last_epoch;
    // Step counts must be whole numbers; anything else would silently differ from torch.
    let int = |x: f64| -> PyResult<i64> {
        if x.is_finite() && x.fract() == 0.0 {
            Ok(x as i64)
        } else {
            Err(Error::Value(format!(
                "{kind} schedule: step counts (step_size, total_iters) must be integers, got {x}"
            ))
            .into())
        }
    };
    let out: Vec<f64> = match kind {
        "step" => {
            let (k, g) = (int(a)?, b);
            if k == 0 {
                return Err(Error::Value("StepLR: step_size must not be 0".into()).into());
            }
            if closed {
                base_lrs
                    .iter()
                    .map(|&x| s::step_closed(x, e, k, g))
                    .collect()
            } else {
                lrs.iter().map(|&lr| s::step_chain(lr, e, k, g)).collect()
            }
        }
        "multistep" => {
            let m = milestones.unwrap_or_default();
            if closed {
                base_lrs
                    .iter()
                    .map(|&x| s::multistep_closed(x, e, &m, a))
                    .collect()
            } else {
                lrs.iter()
                    .map(|&lr| s::multistep_chain(lr, e, &m, a))
                    .collect()
            }
        }
        "constant" => {
            let t = int(b)?;
            if closed {
                base_lrs
                    .iter()
                    .map(|&x| s::constant_closed(x, e, a, t))
                    .collect()
            } else {
                lrs.iter()
                    .map(|&lr| s::constant_chain(lr, e, a, t))
                    .collect()
            }
        }
        "linear" => {
            let t = int(c)?;
            if closed {
                base_lrs
                    .iter()
                    .map(|&x| s::linear_closed(x, e, a, b, t))
                    .collect()
            } else {
                lrs.iter()
                    .map(|&lr| s::linear_chain(lr, e, is_initial, a, b, t))
                    .collect()
            }
        }
        "exponential" => {
            if closed {
                base_lrs
                    .iter()
                    .map(|&x| s::exponential_closed(x, e, a))
                    .collect()
            } else {
                lrs.iter()
                    .map(|&lr| s::exponential_chain(lr, is_initial, a))
                    .collect()
            }
        }
        "polynomial" => {
            let t = int(a)?;
            if closed {
                base_lrs
                    .iter()
                    .map(|&x| s::polynomial_closed(x, e, t, b))
                    .collect()
            } else {
                lrs.iter()
                    .map(|&lr| s::polynomial_chain(lr, e, is_initial, t, b))
                    .collect()
            }
        }
        "cosine" => {
            if closed {
                base_lrs
                    .iter()
                    .map(|&x| s::cosine_closed(x, e, a, b))
                    .collect()
            } else {
                lrs.iter()
                    .zip(&base_lrs)
                    .map(|(&lr, &x)| s::cosine_chain(lr, x, e, is_initial, step_count, a, b))
                    .collect()
            }
        }
        "warm_restarts" => base_lrs
            .iter()
            .map(|&x| s::warm_restarts_lr(x, a, b, c))
            .collect(),
        other => return Err(Error::Value(format!("unknown schedule kind {other:?}")).into()),
    };
    Ok(Some(out))
}

/// `lrs[i] * factors[i]` (LambdaLR, MultiplicativeLR, warm-up and factor schedules).
#[pyfunction]
pub fn scale_lrs(lrs: Vec<f64>, factors: Vec<f64>) -> PyResult<Vec<f64>> {
    if lrs.len() != factors.len() {
        return Err(
            Error::Value(format!("{} lrs but {} factors", lrs.len(), factors.len())).into(),
        );
    }
    Ok(lrs.iter().zip(&factors).map(|(a, b)| a * b).collect())
}

/// CosineAnnealingWarmRestarts.step: `(T_cur, T_i, last_epoch, lrs)`.
#[pyfunction]
#[pyo3(signature = (t_cur, t_i, last_epoch, epoch, t_0, t_mult, eta_min, base_lrs))]
#[allow(clippy::too_many_arguments)]
pub fn warm_restarts_step(
    t_cur: f64,
    t_i: f64,
    last_epoch: i64,
    epoch: Option<f64>,
    t_0: i64,
    t_mult: i64,
    eta_min: f64,
    base_lrs: Vec<f64>,
) -> PyResult<(f64, f64, i64, Vec<f64>)> {
    let (t_cur, t_i, last_epoch) =
        s::warm_restarts_advance(t_cur, t_i, last_epoch, epoch, t_0, t_mult)
            .map_err(Error::Value)?;
    let lrs = base_lrs
        .iter()
        .map(|&b| s::warm_restarts_lr(b, t_cur, t_i, eta_min))
        .collect();
    Ok((t_cur, t_i, last_epoch, lrs))
}

/// CyclicLR.get_lr: `(lrs, momentums)`; `scale_fn` (a Python callable) replaces the
/// built-in mode when given. `momentums` is empty unless both momentum lists are given.
#[pyfunction]
#[pyo3(signature = (last_epoch, total_size, step_ratio, mode, gamma, scale_fn, scale_by_cycle, base_lrs, max_lrs, base_momentums=None, max_momentums=None))]
#[allow(clippy::too_many_arguments)]
pub fn cyclic_step(
    last_epoch: i64,
    total_size: f64,
    step_ratio: f64,
    mode: &str,
    gamma: f64,
    scale_fn: Option<Bound<'_, PyAny>>,
    scale_by_cycle: bool,
    base_lrs: Vec<f64>,
    max_lrs: Vec<f64>,
    base_momentums: Option<Vec<f64>>,
    max_momentums: Option<Vec<f64>>,
) -> PyResult<(Vec<f64>, Vec<f64>)> {
    let (cycle, sf) = s::cyclic_position(last_epoch, total_size, step_ratio);
    let scale = match scale_fn {
        Some(f) => {
            let arg: PyObject = if scale_by_cycle {
                (cycle as i64).into_pyobject(f.py())?.into_any().unbind()
            } else {
                last_epoch.into_pyobject(f.py())?.into_any().unbind()
            };
            f.call1((arg,))?.extract::<f64>()?
        }
        None => {
            let m = match mode {
                "triangular" => s::CyclicMode::Triangular,
                "triangular2" => s::CyclicMode::Triangular2,
                "exp_range" => s::CyclicMode::ExpRange { gamma },
                other => {
                    return Err(Error::Value(format!(
                        "mode is invalid and scale_fn is None (got {other:?})"
                    ))
                    .into())
                }
            };
            m.scale(cycle, last_epoch)
        }
    };
    let lrs = base_lrs
        .iter()
        .zip(&max_lrs)
        .map(|(&b, &m)| s::cyclic_lr(b, m, sf, scale))
        .collect();
    let moms = match (base_momentums, max_momentums) {
        (Some(b), Some(m)) => b
            .iter()
            .zip(&m)
            .map(|(&b, &m)| s::cyclic_momentum(b, m, sf, scale))
            .collect(),
        _ => Vec::new(),
    };
    Ok((lrs, moms))
}

/// OneCycleLR.get_lr: per group, `(lr, momentum)`. Reads each phase's start/end values
/// from the group by the key names in `phases` (torch's `_schedule_phases`).
#[pyfunction]
pub fn one_cycle_step(
    step_num: i64,
    total_steps: i64,
    groups: &Bound<'_, PyAny>,
    phases: &Bound<'_, PyAny>,
    cos: bool,
    momentum: bool,
) -> PyResult<Vec<(f64, f64)>> {
    let py = groups.py();
    let phases: Vec<Bound<'_, PyAny>> = phases.try_iter()?.collect::<PyResult<_>>()?;
    let mut out = Vec::new();
    for g in groups.try_iter()? {
        let g = g?;
        let value = |ph: &Bound<'_, PyAny>,
                     key: &Bound<'_, pyo3::types::PyString>|
         -> PyResult<f64> { g.get_item(ph.get_item(key)?)?.extract::<f64>() };
        let mut ph = Vec::with_capacity(phases.len());
        for p in &phases {
            ph.push(s::Phase {
                end_step: p.get_item(intern!(py, "end_step"))?.extract()?,
                start_lr: value(p, intern!(py, "start_lr"))?,
                end_lr: value(p, intern!(py, "end_lr"))?,
                start_momentum: if momentum {
                    value(p, intern!(py, "start_momentum"))?
                } else {
                    0.0
                },
                end_momentum: if momentum {
                    value(p, intern!(py, "end_momentum"))?
                } else {
                    0.0
                },
            });
        }
        out.push(s::one_cycle(step_num, total_steps, &ph, cos).map_err(Error::Value)?);
    }
    Ok(out)
}

/// ReduceLROnPlateau.step bookkeeping: `(best, num_bad_epochs, cooldown_counter, reduce)`.
#[pyfunction]
#[pyo3(signature = (mode, threshold_mode, threshold, patience, cooldown, best, num_bad_epochs, cooldown_counter, current))]
#[allow(clippy::too_many_arguments)]
pub fn plateau_step(
    mode: &str,
    threshold_mode: &str,
    threshold: f64,
    patience: i64,
    cooldown: i64,
    best: f64,
    num_bad_epochs: i64,
    cooldown_counter: i64,
    current: f64,
) -> PyResult<(f64, i64, i64, bool)> {
    let mode_max = match mode {
        "min" => false,
        "max" => true,
        _ => return Err(Error::Value(format!("mode {mode} is unknown!")).into()),
    };
    let threshold_abs = match threshold_mode {
        "rel" => false,
        "abs" => true,
        _ => {
            return Err(Error::Value(format!("threshold mode {threshold_mode} is unknown!")).into())
        }
    };
    let p = s::Plateau {
        mode_max,
        threshold_abs,
        threshold,
        patience,
        cooldown,
    };
    let (st, reduce) = p.step(
        s::PlateauState {
            best,
            num_bad_epochs,
            cooldown_counter,
        },
        current,
    );
    Ok((st.best, st.num_bad_epochs, st.cooldown_counter, reduce))
}

/// ReduceLROnPlateau._reduce_lr: the new lr per group, None where it stays.
#[pyfunction]
pub fn plateau_reduce(
    lrs: Vec<f64>,
    factor: f64,
    min_lrs: Vec<f64>,
    eps: f64,
) -> PyResult<Vec<Option<f64>>> {
    if lrs.len() != min_lrs.len() {
        return Err(
            Error::Value(format!("{} lrs but {} min_lrs", lrs.len(), min_lrs.len())).into(),
        );
    }
    Ok(lrs
        .iter()
        .zip(&min_lrs)
        .map(|(&lr, &m)| s::plateau_reduce(lr, factor, m, eps))
        .collect())
}

/// pytorch_warmup's factor ω at `step` for `kind` "linear"/"exponential" (params: period)
/// or "radam" (params: beta2, rho_inf, offset).
#[pyfunction]
pub fn warmup_factor(kind: &str, step: i64, params: &Bound<'_, PyDict>) -> PyResult<f64> {
    Ok(match kind {
        "linear" => s::linear_warmup(step, param(params, "warmup_period")?),
        "exponential" => s::exponential_warmup(step, param(params, "warmup_period")?),
        "radam" => s::radam_warmup(
            step,
            param(params, "beta2")?,
            param(params, "rho_inf")?,
            param(params, "offset")?,
        ),
        other => return Err(Error::Value(format!("unknown warm-up kind {other:?}")).into()),
    })
}

/// `(rho_inf, offset)` of RAdamWarmup for `beta2`.
#[pyfunction]
pub fn radam_warmup_params(beta2: f64) -> PyResult<(f64, i64)> {
    let ri = s::rho_inf(beta2);
    Ok((ri, s::radam_offset(beta2, ri).map_err(Error::Value)?))
}

/// Untuned warm-up periods: `int(2 / (1 - beta2))` (linear) or `int(1 / (1 - beta2))`.
#[pyfunction]
pub fn untuned_warmup_period(kind: &str, beta2: f64) -> PyResult<i64> {
    match kind {
        "linear" => Ok(s::untuned_linear_period(beta2)),
        "exponential" => Ok(s::untuned_exponential_period(beta2)),
        other => Err(Error::Value(format!("unknown warm-up kind {other:?}")).into()),
    }
}

fn shape(params: &Bound<'_, PyDict>, key: &str) -> PyResult<s::Shape> {
    let name: String = param(params, key)?;
    s::Shape::parse(&name).ok_or_else(|| {
        Error::Value(format!(
            "Unknown {} type: {name}, expected 'linear', 'cosine' or '1-sqrt'",
            &key[..key.len() - 5]
        ))
        .into()
    })
}

/// The lr factor of a named schedule at `step` ("noam" or a transformers-style name).
#[pyfunction]
pub fn schedule_factor(kind: &str, step: i64, params: &Bound<'_, PyDict>) -> PyResult<f64> {
    use s::HfSchedule as H;
    let w = || param::<i64>(params, "num_warmup_steps");
    let t = || param::<i64>(params, "num_training_steps");
    let h = match kind {
        "noam" => {
            return Ok(s::noam(
                step,
                param(params, "d_model")?,
                param(params, "warmup_steps")?,
            ))
        }
        "warmup_linear" => {
            return Ok(s::warmup_ramp(
                step,
                param(params, "warmup_steps")?,
                param(params, "start_factor")?,
            ));
        }
        "warmup_exponential" => {
            return Ok(s::exponential_warmup(step, param(params, "warmup_steps")?))
        }
        "constant" => H::Constant { warmup: w()? },
        "linear" => H::Linear {
            warmup: w()?,
            total: t()?,
        },
        "cosine" => H::Cosine {
            warmup: w()?,
            total: t()?,
            num_cycles: param(params, "num_cycles")?,
        },
        "cosine_with_restarts" => H::CosineHardRestarts {
            warmup: w()?,
            total: t()?,
            num_cycles: param(params, "num_cycles")?,
        },
        "polynomial" => H::Polynomial {
            warmup: w()?,
            total: t()?,
            lr_end: param(params, "lr_end")?,
            power: param(params, "power")?,
            lr_init: param(params, "lr_init")?,
        },
        "inverse_sqrt" => H::InverseSqrt {
            warmup: w()?,
            timescale: param(params, "timescale")?,
        },
        "cosine_with_min_lr" => H::CosineMinLr {
            warmup: w()?,
            total: t()?,
            num_cycles: param(params, "num_cycles")?,
            min_lr_rate: param(params, "min_lr_rate")?,
        },
        "warmup_stable_decay" => H::Wsd {
            warmup: w()?,
            stable: param(params, "num_stable_steps")?,
            decay: param(params, "num_decay_steps")?,
            min_lr_ratio: param(params, "min_lr_ratio")?,
            num_cycles: param(params, "num_cycles")?,
            warmup_shape: shape(params, "warmup_type")?,
            decay_shape: shape(params, "decay_type")?,
        },
        other => return Err(Error::Value(format!("unknown schedule {other:?}")).into()),
    };
    Ok(h.factor(step))
}

/// LR range test: the lr of iteration `i` (`mode` "exp" or "linear").
#[pyfunction]
pub fn range_test_lr(mode: &str, start: f64, end: f64, i: i64, num_iter: i64) -> PyResult<f64> {
    let exponential = match mode.to_ascii_lowercase().as_str() {
        "exp" => true,
        "linear" => false,
        _ => return Err(Error::Value(format!("expected one of (exp, linear), got {mode}")).into()),
    };
    if num_iter <= 1 {
        return Err(Error::Value("`num_iter` must be larger than 1".into()).into());
    }
    Ok(s::range_test_lr(exponential, start, end, i, num_iter))
}

/// LR range test bookkeeping: `(recorded loss, best loss, diverged)`.
#[pyfunction]
pub fn range_test_update(
    first: bool,
    loss: f64,
    prev: f64,
    best: f64,
    smooth_f: f64,
    diverge_th: f64,
) -> (f64, f64, bool) {
    s::range_test_update(first, loss, prev, best, smooth_f, diverge_th)
}

/// Index of the steepest descent of a loss curve (numpy.gradient's argmin), or None.
#[pyfunction]
pub fn steepest_descent(losses: Vec<f64>) -> Option<usize> {
    s::steepest_descent(&losses)
}

/// SWALR's lrs for this step, from the groups' `lr` and `swa_lr` (see `schedule::swalr`);
/// None when one is a tensor narrower than float64.
#[pyfunction]
pub fn swalr_lrs(
    groups: &Bound<'_, PyAny>,
    step_count: i64,
    anneal_epochs: i64,
    cosine: bool,
) -> PyResult<Option<Vec<f64>>> {
    let (Some(lrs), Some(swa)) = (
        group_lrs(groups)?,
        group_floats(groups, intern!(groups.py(), "swa_lr"))?,
    ) else {
        return Ok(None);
    };
    Ok(Some(
        lrs.iter()
            .zip(&swa)
            .map(|(&lr, &swa_lr)| s::swalr(lr, swa_lr, step_count, anneal_epochs, cosine))
            .collect(),
    ))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(narrow_tensor_lrs, m)?)?;
    m.add_function(wrap_pyfunction!(swalr_lrs, m)?)?;
    m.add_function(wrap_pyfunction!(range_test_lr, m)?)?;
    m.add_function(wrap_pyfunction!(range_test_update, m)?)?;
    m.add_function(wrap_pyfunction!(steepest_descent, m)?)?;
    m.add_function(wrap_pyfunction!(schedule_lrs, m)?)?;
    m.add_function(wrap_pyfunction!(scale_lrs, m)?)?;
    m.add_function(wrap_pyfunction!(warm_restarts_step, m)?)?;
    m.add_function(wrap_pyfunction!(cyclic_step, m)?)?;
    m.add_function(wrap_pyfunction!(one_cycle_step, m)?)?;
    m.add_function(wrap_pyfunction!(plateau_step, m)?)?;
    m.add_function(wrap_pyfunction!(plateau_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(warmup_factor, m)?)?;
    m.add_function(wrap_pyfunction!(radam_warmup_params, m)?)?;
    m.add_function(wrap_pyfunction!(untuned_warmup_period, m)?)?;
    m.add_function(wrap_pyfunction!(schedule_factor, m)?)?;
    Ok(())
}
