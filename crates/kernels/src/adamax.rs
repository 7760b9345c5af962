//! Adamax (`torch.optim.Adamax`): Adam with an infinity-norm second moment.
//! States: `exp_avg`, `exp_inf`.

use crate::common::{in_dtype, lerp, GradIn, PreparedGrad, ReadGrad};
use crate::elem::{Elem, OpFloat};
use crate::{Algorithm, MAX_STATES};

#[derive(Clone, Copy, Debug)]
pub struct Adamax {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub maximize: bool,
    pub grad: GradIn,
}

/// `lr / (1 - beta1^step)`, in f64 as torch computes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamaxScalars {
    pub clr: f64,
}

impl Adamax {
    /// `step` is the count after this step's increment.
    pub fn scalars(&self, step: f64) -> AdamaxScalars {
        AdamaxScalars {
            clr: self.lr / (1.0 - self.beta1.powf(step)),
        }
    }
}

impl Algorithm for Adamax {
    type Scalars = AdamaxScalars;
    const NAME: &'static str = "Adamax";

    fn n_states(&self) -> usize {
        2
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
        s: &AdamaxScalars,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        let [m, u, _] = st;
        let n = p.len();
        let (g, m, u) = (&mut g[..n], &mut m[..n], &mut u[..n]);
        let o = <E::Op as OpFloat>::of;
        let (w1, beta2, eps, neg_clr) =
            (o(1.0 - self.beta1), o(self.beta2), o(self.eps), o(-s.clr));
        for i in 0..n {
            let param = p[i].load();
            // `grad.add(param, alpha=weight_decay)` is a tensor of the grad's dtype in torch.
            let grad = E::store(read.read(&mut g[i], param)).load();
            let exp_avg = E::store(lerp(m[i].load(), grad, w1));
            // torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(eps)): NaN propagates.
            let decayed = E::store(u[i].load() * beta2).load();
            let bound = E::store(E::store(grad.abs()).load() + eps).load();
            let exp_inf = E::store(decayed.max_nan(bound));
            m[i] = exp_avg;
            u[i] = exp_inf;
            p[i] = E::store(param + neg_clr * (exp_avg.load() / exp_inf.load()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    /// Two hand-computed steps: m = lerp, u = max(beta2 u, |g| + eps), p -= clr m / u.
    #[test]
    fn two_steps_by_hand() {
        let a = Adamax {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            maximize: false,
            grad: GradIn::default(),
        };
        let mut t = [Buffers {
            param: vec![1.0f64],
            grad: vec![2.0],
            states: vec![vec![0.0], vec![0.0]],
        }];
        step(&a, a.scalars(1.0), &mut t, 1);
        let (m1, u1) = (0.2, 2.0 + 1e-8);
        let p1 = 1.0 - 0.1 / 0.1 * m1 / u1;
        assert!((t[0].param[0] - p1).abs() < 1e-12);
        t[0].grad[0] = -1.0;
        step(&a, a.scalars(2.0), &mut t, 1);
        let m2 = 0.9 * m1 - 0.1;
        let u2 = f64::max(0.99 * u1, 1.0 + 1e-8);
        let p2 = p1 - 0.1 / (1.0 - 0.81) * m2 / u2;
        assert!(
            (t[0].param[0] - p2).abs() < 1e-12,
            "{} vs {p2}",
            t[0].param[0]
        );
    }
}
