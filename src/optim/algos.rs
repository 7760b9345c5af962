//! Each fused optimizer declared once: its name, its state, how its hyper-parameters are
//! read from a param group, and which kernel runs it. Everything else (Python classes,
//! validation, dispatch) is derived from these declarations.

use ferrotorch_kernels::{
    adadelta::Adadelta, adagrad::Adagrad, adam::Adam, adamax::Adamax, asgd::Asgd,
    asgd::AsgdScalars, common::GradIn, nadam::NAdam, radam::RAdam, rmsprop::RmsProp, rprop::Rprop,
    sgd::Sgd, sgd::SgdScalars, Algorithm,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::access::Scalar;
use crate::errors::{Error, Result};

/// What an optimizer does with a sparse gradient.
#[derive(Clone, Copy, Debug)]
pub enum Sparse {
    /// torch raises this error.
    Reject(&'static str),
    /// torch's own single-tensor function handles it.
    Torch,
}

/// The fixed facts of one algorithm.
#[derive(Debug)]
pub struct Spec {
    /// Registry key (`ferrotorch._native.optimizer_spec(name)`).
    pub name: &'static str,
    /// torch's class name, used in messages.
    pub label: &'static str,
    /// The per-parameter scalar state tensors (one element each) the step reads and
    /// updates, `step` first where torch counts steps.
    pub scalars: &'static [&'static str],
    pub sparse: Sparse,
}

impl Spec {
    pub fn has_step(&self) -> bool {
        self.scalars.first() == Some(&"step")
    }
}

/// A kernel-backed optimizer: the kernel's [`Algorithm`] plus how a param group configures
/// it. Its state tensors all have the parameter's shape.
pub trait Fused: Algorithm + Send + Sized + 'static {
    const SPEC: Spec;
    /// State keys in the kernel's order, for this group's settings.
    fn state_keys(g: &Bound<'_, PyDict>) -> Result<Vec<&'static str>>;
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self>;
    /// Per-tensor kernel scalars, updating the scalar state (`SPEC.scalars`, in order: bump
    /// `step`…) as torch does before its elementwise math; `first` tells that the state
    /// was created for this step (SGD seeds its momentum with the grad). Scalars that
    /// depend on the step count alone go through `cache`.
    fn scalars(&self, state: &[Scalar], first: bool, cache: &mut Cache<Self>) -> Self::Scalars;
}

/// The [`StepCache`] of algorithm `A`'s kernel scalars.
pub type Cache<A> = StepCache<<A as Algorithm>::Scalars>;

/// The kernel scalars of the last step count seen in one call. The parameters of a group
/// share their step count (after the first step), so `powf` and friends run once per call
/// instead of once per parameter (a tenth of a small parameter's step).
pub struct StepCache<S>(Option<(u64, S)>);

impl<S: Copy> Default for StepCache<S> {
    fn default() -> Self {
        StepCache(None)
    }
}

impl<S: Copy> StepCache<S> {
    /// `of(step)`, computed only when `step` differs from the last one.
    pub fn get(&mut self, step: f64, of: impl FnOnce(f64) -> S) -> S {
        match self.0 {
            Some((bits, s)) if bits == step.to_bits() => s,
            _ => {
                let s = of(step);
                self.0 = Some((step.to_bits(), s));
                s
            }
        }
    }
}

fn get<'py>(g: &Bound<'py, PyDict>, key: &str) -> Result<Bound<'py, PyAny>> {
    g.get_item(key)
        .map_err(|e| Error::Runtime(e.to_string()))?
        .ok_or_else(|| {
            Error::Value(format!(
                "param_group is missing the hyper-parameter '{key}'"
            ))
        })
}

/// A hyper-parameter as a float; 1-element tensors (lr, betas, weight_decay) are accepted.
fn float(g: &Bound<'_, PyDict>, key: &str) -> Result<f64> {
    let v = get(g, key)?;
    v.extract::<f64>().map_err(|_| {
        let ty = v
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        Error::Type(format!(
            "param_group['{key}'] must be a float or a 1-element tensor, got {ty}"
        ))
    })
}

fn flag(g: &Bound<'_, PyDict>, key: &str) -> Result<bool> {
    match g.get_item(key).map_err(|e| Error::Runtime(e.to_string()))? {
        None => Ok(false),
        Some(v) => v
            .is_truthy()
            .map_err(|e| Error::Type(format!("param_group['{key}']: {e}"))),
    }
}

/// A pair hyper-parameter (`betas`, `etas`, `step_sizes`).
fn pair(g: &Bound<'_, PyDict>, key: &str) -> Result<(f64, f64)> {
    let v = get(g, key)?;
    let bad = || Error::Type(format!("param_group['{key}'] must be a pair of floats"));
    let item = |i: usize| -> Result<f64> {
        v.get_item(i)
            .map_err(|_| bad())?
            .extract::<f64>()
            .map_err(|_| bad())
    };
    Ok((item(0)?, item(1)?))
}

impl Fused for Adam {
    const SPEC: Spec = Spec {
        name: "adam",
        label: "Adam",
        scalars: &["step"],
        sparse: Sparse::Reject(
            "Adam does not support sparse gradients, please consider SparseAdam instead",
        ),
    };
    fn state_keys(g: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        Ok(if flag(g, "amsgrad")? {
            vec!["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        } else {
            vec!["exp_avg", "exp_avg_sq"]
        })
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        let (beta1, beta2) = pair(g, "betas")?;
        Ok(Adam {
            lr: float(g, "lr")?,
            beta1,
            beta2,
            eps: float(g, "eps")?,
            weight_decay: float(g, "weight_decay")?,
            amsgrad: flag(g, "amsgrad")?,
            maximize: flag(g, "maximize")?,
            decoupled_weight_decay: flag(g, "decoupled_weight_decay")?,
            grad,
        })
    }
    fn scalars(&self, s: &[Scalar], _: bool, cache: &mut Cache<Self>) -> Self::Scalars {
        cache.get(s[0].bump(), |step| Adam::scalars(self, step))
    }
}

impl Fused for Sgd {
    const SPEC: Spec = Spec {
        name: "sgd",
        label: "SGD",
        scalars: &[],
        sparse: Sparse::Torch,
    };
    fn state_keys(g: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        Ok(if float(g, "momentum")? != 0.0 {
            vec!["momentum_buffer"]
        } else {
            vec![]
        })
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        Ok(Sgd {
            lr: float(g, "lr")?,
            momentum: float(g, "momentum")?,
            dampening: float(g, "dampening")?,
            weight_decay: float(g, "weight_decay")?,
            nesterov: flag(g, "nesterov")?,
            maximize: flag(g, "maximize")?,
            grad,
        })
    }
    fn scalars(&self, _: &[Scalar], first: bool, _: &mut Cache<Self>) -> Self::Scalars {
        SgdScalars { first_step: first }
    }
}

impl Fused for RmsProp {
    const SPEC: Spec = Spec {
        name: "rmsprop",
        label: "RMSprop",
        scalars: &["step"],
        sparse: Sparse::Reject("RMSprop does not support sparse gradients"),
    };
    fn state_keys(g: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        let mut keys = vec!["square_avg"];
        if float(g, "momentum")? > 0.0 {
            keys.push("momentum_buffer");
        }
        if flag(g, "centered")? {
            keys.push("grad_avg");
        }
        Ok(keys)
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        Ok(RmsProp {
            lr: float(g, "lr")?,
            alpha: float(g, "alpha")?,
            eps: float(g, "eps")?,
            weight_decay: float(g, "weight_decay")?,
            momentum: float(g, "momentum")?,
            centered: flag(g, "centered")?,
            maximize: flag(g, "maximize")?,
            grad,
        })
    }
    fn scalars(&self, s: &[Scalar], _: bool, _: &mut Cache<Self>) -> Self::Scalars {
        s[0].bump();
    }
}

impl Fused for Adagrad {
    const SPEC: Spec = Spec {
        name: "adagrad",
        label: "Adagrad",
        scalars: &["step"],
        sparse: Sparse::Torch,
    };
    fn state_keys(_: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        Ok(vec!["sum"])
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        Ok(Adagrad {
            lr: float(g, "lr")?,
            lr_decay: float(g, "lr_decay")?,
            weight_decay: float(g, "weight_decay")?,
            eps: float(g, "eps")?,
            maximize: flag(g, "maximize")?,
            grad,
        })
    }
    fn scalars(&self, s: &[Scalar], _: bool, cache: &mut Cache<Self>) -> Self::Scalars {
        cache.get(s[0].bump(), |step| Adagrad::scalars(self, step))
    }
}

impl Fused for Adamax {
    const SPEC: Spec = Spec {
        name: "adamax",
        label: "Adamax",
        scalars: &["step"],
        sparse: Sparse::Reject("Adamax does not support sparse gradients"),
    };
    fn state_keys(_: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        Ok(vec!["exp_avg", "exp_inf"])
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        let (beta1, beta2) = pair(g, "betas")?;
        Ok(Adamax {
            lr: float(g, "lr")?,
            beta1,
            beta2,
            eps: float(g, "eps")?,
            weight_decay: float(g, "weight_decay")?,
            maximize: flag(g, "maximize")?,
            grad,
        })
    }
    fn scalars(&self, s: &[Scalar], _: bool, cache: &mut Cache<Self>) -> Self::Scalars {
        cache.get(s[0].bump(), |step| Adamax::scalars(self, step))
    }
}

impl Fused for RAdam {
    const SPEC: Spec = Spec {
        name: "radam",
        label: "RAdam",
        scalars: &["step"],
        sparse: Sparse::Reject("RAdam does not support sparse gradients"),
    };
    fn state_keys(_: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        Ok(vec!["exp_avg", "exp_avg_sq"])
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        let (beta1, beta2) = pair(g, "betas")?;
        Ok(RAdam {
            lr: float(g, "lr")?,
            beta1,
            beta2,
            eps: float(g, "eps")?,
            weight_decay: float(g, "weight_decay")?,
            decoupled_weight_decay: flag(g, "decoupled_weight_decay")?,
            maximize: flag(g, "maximize")?,
            grad,
        })
    }
    fn scalars(&self, s: &[Scalar], _: bool, cache: &mut Cache<Self>) -> Self::Scalars {
        cache.get(s[0].bump(), |step| RAdam::scalars(self, step))
    }
}

impl Fused for Adadelta {
    const SPEC: Spec = Spec {
        name: "adadelta",
        label: "Adadelta",
        scalars: &["step"],
        sparse: Sparse::Reject("Adadelta does not support sparse gradients"),
    };
    fn state_keys(_: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        Ok(vec!["square_avg", "acc_delta"])
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        Ok(Adadelta {
            lr: float(g, "lr")?,
            rho: float(g, "rho")?,
            eps: float(g, "eps")?,
            weight_decay: float(g, "weight_decay")?,
            maximize: flag(g, "maximize")?,
            grad,
        })
    }
    fn scalars(&self, s: &[Scalar], _: bool, _: &mut Cache<Self>) -> Self::Scalars {
        s[0].bump();
    }
}

impl Fused for Rprop {
    const SPEC: Spec = Spec {
        name: "rprop",
        label: "Rprop",
        scalars: &["step"],
        sparse: Sparse::Reject("Rprop does not support sparse gradients"),
    };
    fn state_keys(_: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        Ok(vec!["prev", "step_size"])
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        let (etaminus, etaplus) = pair(g, "etas")?;
        let (step_size_min, step_size_max) = pair(g, "step_sizes")?;
        Ok(Rprop {
            etaminus,
            etaplus,
            step_size_min,
            step_size_max,
            maximize: flag(g, "maximize")?,
            grad,
        })
    }
    fn scalars(&self, s: &[Scalar], _: bool, _: &mut Cache<Self>) -> Self::Scalars {
        s[0].bump();
    }
}

impl Fused for NAdam {
    const SPEC: Spec = Spec {
        name: "nadam",
        label: "NAdam",
        scalars: &["step", "mu_product"],
        sparse: Sparse::Reject("NAdam does not support sparse gradients"),
    };
    fn state_keys(_: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        Ok(vec!["exp_avg", "exp_avg_sq"])
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        let (beta1, beta2) = pair(g, "betas")?;
        Ok(NAdam {
            lr: float(g, "lr")?,
            beta1,
            beta2,
            eps: float(g, "eps")?,
            weight_decay: float(g, "weight_decay")?,
            momentum_decay: float(g, "momentum_decay")?,
            decoupled_weight_decay: flag(g, "decoupled_weight_decay")?,
            maximize: flag(g, "maximize")?,
            grad,
        })
    }
    fn scalars(&self, s: &[Scalar], _: bool, _: &mut Cache<Self>) -> Self::Scalars {
        let step = s[0].bump();
        let (mu, mu_next) = self.mus(step);
        // `mu_product *= mu` in the tensor's dtype, then read back as torch's `.item()`.
        let mu_product = s[1].mul(mu);
        NAdam::scalars(self, step, mu, mu_next, mu_product)
    }
}

impl Fused for Asgd {
    const SPEC: Spec = Spec {
        name: "asgd",
        label: "ASGD",
        scalars: &["step", "eta", "mu"],
        sparse: Sparse::Torch,
    };
    fn state_keys(_: &Bound<'_, PyDict>) -> Result<Vec<&'static str>> {
        Ok(vec!["ax"])
    }
    fn from_group(g: &Bound<'_, PyDict>, grad: GradIn) -> Result<Self> {
        let default_f64 = (|| -> PyResult<bool> {
            let torch = g.py().import("torch")?;
            torch
                .call_method0("get_default_dtype")?
                .eq(torch.getattr("float64")?)
        })()
        .map_err(|e| Error::Runtime(e.to_string()))?;
        Ok(Asgd {
            default_f64,
            lr: float(g, "lr")?,
            lambd: float(g, "lambd")?,
            alpha: float(g, "alpha")?,
            t0: float(g, "t0")?,
            weight_decay: float(g, "weight_decay")?,
            maximize: flag(g, "maximize")?,
            grad,
        })
    }
    fn scalars(&self, s: &[Scalar], _: bool, _: &mut Cache<Self>) -> Self::Scalars {
        let step = s[0].bump();
        let now = AsgdScalars {
            eta: s[1].get(),
            mu: s[2].get(),
        };
        let (eta, mu) = self.next(step);
        // torch: `eta.copy_(torch.as_tensor(value))`, a tensor of the default dtype first.
        let round = |v: f64| if self.default_f64 { v } else { v as f32 as f64 };
        s[1].set(round(eta));
        s[2].set(round(mu));
        now
    }
}
