//! RAdam (`torch.optim.RAdam`): Adam with the variance rectification term, L2 or decoupled
//! weight decay. States: `exp_avg`, `exp_avg_sq`.

use crate::common::{in_dtype, lerp, GradIn, PreparedGrad, ReadGrad};
use crate::elem::{Elem, OpFloat};
use crate::{Algorithm, MAX_STATES};

#[derive(Clone, Copy, Debug)]
pub struct RAdam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decoupled_weight_decay: bool,
    pub maximize: bool,
    pub grad: GradIn,
}

/// Per-tensor values from the step count, in f64 as torch computes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RAdamScalars {
    pub bias_correction1: f64,
    pub bias_correction2_sqrt: f64,
    /// The rectification term when `rho_t > 5`, else None (plain momentum step).
    pub rect: Option<f64>,
}

impl RAdam {
    /// `step` is the count after this step's increment.
    pub fn scalars(&self, step: f64) -> RAdamScalars {
        let bias_correction1 = 1.0 - self.beta1.powf(step);
        let bias_correction2 = 1.0 - self.beta2.powf(step);
        let rho_inf = 2.0 / (1.0 - self.beta2) - 1.0;
        let rho_t = rho_inf - 2.0 * step * self.beta2.powf(step) / bias_correction2;
        let rect = (rho_t > 5.0).then(|| {
            ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                .powf(0.5)
        });
        RAdamScalars {
            bias_correction1,
            bias_correction2_sqrt: bias_correction2.powf(0.5),
            rect,
        }
    }
}

impl Algorithm for RAdam {
    type Scalars = RAdamScalars;
    const NAME: &'static str = "RAdam";

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
        s: &RAdamScalars,
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
        let (w1, beta2, c2, eps, lr) = (
            o(1.0 - self.beta1),
            o(self.beta2),
            o(1.0 - self.beta2),
            o(self.eps),
            o(self.lr),
        );
        let (bc1, bc2_sqrt) = (o(s.bias_correction1), o(s.bias_correction2_sqrt));
        let rect = s.rect.map(o);
        for i in 0..n {
            let mut param = p[i].load();
            if let Some(d) = decay {
                param = E::store(param * d).load();
            }
            // `grad.add(param, alpha=weight_decay)` is a tensor of the grad's dtype in torch.
            let grad = E::store(read.read(&mut g[i], param)).load();
            let exp_avg = E::store(lerp(m[i].load(), grad, w1));
            // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): two roundings.
            let decayed = E::store(v[i].load() * beta2).load();
            let exp_avg_sq = E::store((c2 * grad).mul_add(grad, decayed));
            m[i] = exp_avg;
            v[i] = exp_avg_sq;
            // torch: bias_corrected_exp_avg * lr [* adaptive_lr * rect], each a tensor op.
            let mut upd = E::store(E::store(exp_avg.load() / bc1).load() * lr).load();
            if let Some(r) = rect {
                let denom = E::store(E::store(exp_avg_sq.load().sqrt()).load() + eps).load();
                let adaptive = E::store(bc2_sqrt / denom).load();
                upd = E::store(E::store(upd * adaptive).load() * r).load();
            }
            p[i] = E::store(param - upd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    /// Early steps (rho_t <= 5) are plain bias-corrected momentum steps.
    #[test]
    fn early_steps_are_momentum_steps() {
        let a = RAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled_weight_decay: false,
            maximize: false,
            grad: GradIn::default(),
        };
        assert!(a.scalars(1.0).rect.is_none());
        assert!(a.scalars(6.0).rect.is_some());
        let mut t = [Buffers {
            param: vec![1.0f64],
            grad: vec![2.0],
            states: vec![vec![0.0], vec![0.0]],
        }];
        step(&a, a.scalars(1.0), &mut t, 1);
        // m = 0.2, m_hat = 0.2 / 0.1 = 2: p = 1 - 0.1 * 2
        assert!((t[0].param[0] - 0.8).abs() < 1e-12, "{}", t[0].param[0]);
    }
}
