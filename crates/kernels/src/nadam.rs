//! NAdam (`torch.optim.NAdam`): Adam with Nesterov momentum and momentum decay, L2 or
//! decoupled weight decay. States: `exp_avg`, `exp_avg_sq` (and the scalar `mu_product`).

use crate::common::{in_dtype, lerp, GradIn, PreparedGrad, ReadGrad};
use crate::elem::{Elem, OpFloat};
use crate::{Algorithm, MAX_STATES};

#[derive(Clone, Copy, Debug)]
pub struct NAdam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum_decay: f64,
    pub decoupled_weight_decay: bool,
    pub maximize: bool,
    pub grad: GradIn,
}

/// Per-tensor values from the step and `mu_product`, in f64 as torch computes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NAdamScalars {
    pub bias_correction2: f64,
    /// `-lr * (1 - mu) / (1 - mu_product)`, the grad's weight.
    pub grad_weight: f64,
    /// `-lr * mu_next / (1 - mu_product * mu_next)`, exp_avg's weight.
    pub avg_weight: f64,
}

impl NAdam {
    /// `mu` and `mu_next` of the step `step` (after its increment).
    pub fn mus(&self, step: f64) -> (f64, f64) {
        let mu = self.beta1 * (1.0 - 0.5 * 0.96f64.powf(step * self.momentum_decay));
        let mu_next = self.beta1 * (1.0 - 0.5 * 0.96f64.powf((step + 1.0) * self.momentum_decay));
        (mu, mu_next)
    }

    /// `mu_product` is the value after this step's `mu_product *= mu`.
    pub fn scalars(&self, step: f64, mu: f64, mu_next: f64, mu_product: f64) -> NAdamScalars {
        NAdamScalars {
            bias_correction2: 1.0 - self.beta2.powf(step),
            grad_weight: -self.lr * (1.0 - mu) / (1.0 - mu_product),
            avg_weight: (-self.lr * mu_next) / (1.0 - mu_product * mu_next),
        }
    }
}

impl Algorithm for NAdam {
    type Scalars = NAdamScalars;
    const NAME: &'static str = "NAdam";

    fn n_states(&self) -> usize {
        2
    }

    #[inline(always)]
    fn grad_reader<E: Elem>(&self) -> Option<PreparedGrad<E::Op>> {
        let l2 = (self.weight_decay != 0.0 && !self.decoupled_weight_decay)
            .then_some(in_dtype::<E>(self.weight_decay));
        PreparedGrad::new(self.grad, self.maximize, l2)
    }

    #[inline(always)]
    fn update<E: Elem, R: ReadGrad<E>>(
        &self,
        read: R,
        s: &NAdamScalars,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        let [m, v, _] = st;
        let n = p.len();
        let (g, m, v) = (&mut g[..n], &mut m[..n], &mut v[..n]);
        let o = <E::Op as OpFloat>::of;
        let has_wd = self.weight_decay != 0.0;
        let decay =
            (has_wd && self.decoupled_weight_decay).then_some(o(1.0 - self.lr * self.weight_decay));

        let (w1, beta2, c2, eps) = (
            o(1.0 - self.beta1),
            o(self.beta2),
            o(1.0 - self.beta2),
            o(self.eps),
        );
        let (bc2, gw, aw) = (o(s.bias_correction2), o(s.grad_weight), o(s.avg_weight));
        for i in 0..n {
            let mut param = p[i].load();
            if let Some(d) = decay {
                param = E::store(param * d).load();
            }
            let grad = E::store(read.read(&mut g[i], param)).load();
            let exp_avg = E::store(lerp(m[i].load(), grad, w1));
            let decayed = E::store(v[i].load() * beta2).load();
            let exp_avg_sq = E::store((c2 * grad).mul_add(grad, decayed));
            m[i] = exp_avg;
            v[i] = exp_avg_sq;
            // denom = exp_avg_sq.div(bias_correction2).sqrt().add_(eps)
            let denom = E::store(E::store(exp_avg_sq.load() / bc2).load().sqrt()).load();
            let denom = E::store(denom + eps).load();
            let param = E::store(param + gw * (grad / denom)).load();
            p[i] = E::store(param + aw * (exp_avg.load() / denom));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    /// One step from zero state, by hand.
    #[test]
    fn first_step_by_hand() {
        let a = NAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum_decay: 4e-3,
            decoupled_weight_decay: false,
            maximize: false,
            grad: GradIn::default(),
        };
        let (mu, mu_next) = a.mus(1.0);
        let s = a.scalars(1.0, mu, mu_next, mu);
        let mut t = [Buffers {
            param: vec![1.0f64],
            grad: vec![2.0],
            states: vec![vec![0.0], vec![0.0]],
        }];
        step(&a, s, &mut t, 1);
        let (m, v) = (0.2, 0.004);
        let denom = (v / (1.0 - 0.999f64)).sqrt() + 1e-8;
        let want = 1.0 + s.grad_weight * 2.0 / denom + s.avg_weight * m / denom;
        assert!(
            (t[0].param[0] - want).abs() < 1e-12,
            "{} vs {want}",
            t[0].param[0]
        );
    }
}
