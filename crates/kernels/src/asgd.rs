//! ASGD (`torch.optim.ASGD`): SGD with a decaying step size and a running average of the
//! parameter. State: `ax` (and the scalars `eta`, `mu`).

use crate::common::{in_dtype, GradIn, PreparedGrad, ReadGrad};
use crate::elem::{Elem, OpFloat};
use crate::{Algorithm, MAX_STATES};

#[derive(Clone, Copy, Debug)]
pub struct Asgd {
    /// torch's default dtype is float64 (new `eta`/`mu` values are not rounded to f32).
    pub default_f64: bool,
    pub lr: f64,
    pub lambd: f64,
    pub alpha: f64,
    pub t0: f64,
    pub weight_decay: f64,
    pub maximize: bool,
    pub grad: GradIn,
}

/// This step's `eta` and `mu` (the values before they are updated for the next step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AsgdScalars {
    pub eta: f64,
    pub mu: f64,
}

impl Asgd {
    /// The `eta` and `mu` torch stores for the step after `step`.
    pub fn next(&self, step: f64) -> (f64, f64) {
        let eta = self.lr / (1.0 + self.lambd * self.lr * step).powf(self.alpha);
        let mu = 1.0 / f64::max(1.0, step - self.t0);
        (eta, mu)
    }
}

impl Algorithm for Asgd {
    type Scalars = AsgdScalars;
    const NAME: &'static str = "ASGD";

    fn n_states(&self) -> usize {
        1
    }

    #[inline(always)]
    fn grad_reader<E: Elem>(&self) -> Option<PreparedGrad<E::Op>> {
        let l2 = (self.weight_decay != 0.0).then_some(in_dtype::<E>(self.weight_decay));
        PreparedGrad::new(self.grad, self.maximize, l2)
    }

    #[inline(always)]
    fn update<E: Elem, R: ReadGrad<E>>(
        &self,
        read: R,
        s: &AsgdScalars,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        if s.mu != 1.0 {
            self.body::<E, _, true>(read, s, p, g, st)
        } else {
            self.body::<E, _, false>(read, s, p, g, st)
        }
    }
}

impl Asgd {
    /// One loop per averaging mode, so neither carries a branch per element.
    #[inline(always)]
    fn body<E: Elem, R: ReadGrad<E>, const AVERAGE: bool>(
        &self,
        read: R,
        s: &AsgdScalars,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        let [ax, _, _] = st;
        let n = p.len();
        let (g, ax) = (&mut g[..n], &mut ax[..n]);
        let o = <E::Op as OpFloat>::of;
        let decay = o(1.0 - self.lambd * s.eta);
        let neg_eta = in_dtype::<E>(-s.eta);
        // `mu` is a one-element tensor: `mul_(mu)` computes in the parameter's dtype.
        let mu = in_dtype::<E>(s.mu);
        for i in 0..n {
            let p0 = p[i].load();
            // grad.add(param, alpha=wd) reads the parameter before the decay
            let grad = E::store(read.read(&mut g[i], p0)).load();
            let param = E::store(p0 * decay).load();
            let param = E::store(grad.mul_add(neg_eta, param));
            p[i] = param;
            ax[i] = if AVERAGE {
                let a = ax[i].load();
                let diff = E::store(E::store(param.load() - a).load() * mu).load();
                E::store(a + diff)
            } else {
                param
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    #[test]
    fn one_step_by_hand() {
        let a = Asgd {
            default_f64: false,
            lr: 0.1,
            lambd: 1e-4,
            alpha: 0.75,
            t0: 1e6,
            weight_decay: 0.0,
            maximize: false,
            grad: GradIn::default(),
        };
        let mut t = [Buffers {
            param: vec![1.0f64],
            grad: vec![2.0],
            states: vec![vec![0.0]],
        }];
        step(&a, AsgdScalars { eta: 0.1, mu: 1.0 }, &mut t, 1);
        let want = 1.0 * (1.0 - 1e-4 * 0.1) - 0.1 * 2.0;
        assert!((t[0].param[0] - want).abs() < 1e-12);
        assert_eq!(t[0].states[0][0], t[0].param[0]);
        let (eta, mu) = a.next(1.0);
        assert!((eta - 0.1 / (1.0 + 1e-5f64).powf(0.75)).abs() < 1e-15 && mu == 1.0);
    }
}
