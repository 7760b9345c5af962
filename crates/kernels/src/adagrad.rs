//! Adagrad with lr decay, weight decay and maximize. State: `sum`.
//!
//! Follows torch's `_single_tensor_adagrad`: `clr = lr / (1 + (step - 1) * lr_decay)`,
//! `sum.addcmul_(grad, grad, value=1)`, `param.addcdiv_(grad, sum.sqrt() + eps, value=-clr)`.

use crate::common::{GradIn, PreparedGrad, ReadGrad};
use crate::driver::{Algorithm, MAX_STATES};
use crate::elem::{Elem, OpFloat};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adagrad {
    pub lr: f64,
    pub lr_decay: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub maximize: bool,
    /// How grads are unscaled/clipped as they are read.
    pub grad: GradIn,
}

/// Per tensor: the decayed learning rate for this tensor's step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdagradScalars {
    pub clr: f64,
}

impl Adagrad {
    /// `step` is the count after this step's increment.
    pub fn scalars(&self, step: f64) -> AdagradScalars {
        AdagradScalars {
            clr: self.lr / (1.0 + (step - 1.0) * self.lr_decay),
        }
    }
}

impl Algorithm for Adagrad {
    type Scalars = AdagradScalars;
    const NAME: &'static str = "Adagrad";

    fn n_states(&self) -> usize {
        1
    }

    #[inline(always)]
    fn grad_reader<E: Elem>(&self) -> Option<PreparedGrad<E::Op>> {
        let l2 = (self.weight_decay != 0.0).then_some(<E::Op as OpFloat>::of(self.weight_decay));
        PreparedGrad::new(self.grad, self.maximize, l2)
    }

    #[inline(always)]
    fn update<E: Elem, R: ReadGrad<E>>(
        &self,
        read: R,
        s: &AdagradScalars,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        let [sum, _, _] = st;
        let n = p.len();
        let (g, sum) = (&mut g[..n], &mut sum[..n]);
        let o = <E::Op as OpFloat>::of;
        let (eps, neg_clr, one) = (o(self.eps), o(-s.clr), o(1.0));
        for i in 0..n {
            let param = p[i].load();
            let grad = read.read(&mut g[i], param);
            let acc = (one * grad).mul_add(grad, sum[i].load());
            sum[i] = E::store(acc);
            p[i] = E::store(param + neg_clr * grad / (acc.sqrt() + eps));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    #[test]
    fn lr_decay_and_accumulator_by_hand() {
        let a = Adagrad {
            lr: 0.1,
            lr_decay: 0.5,
            weight_decay: 0.0,
            eps: 1e-10,
            maximize: false,
            grad: GradIn {
                grad_scale: None,
                clip_coef: None,
            },
        };
        let mut t = [Buffers {
            param: vec![1.0f64],
            grad: vec![2.0],
            states: vec![vec![0.1]],
        }];
        step(&a, a.scalars(1.0), &mut t, 1);
        let p1 = 1.0 - 0.1 * 2.0 / ((4.1f64).sqrt() + 1e-10);
        assert!((t[0].param[0] - p1).abs() < 1e-15);
        t[0].grad[0] = -1.0;
        step(&a, a.scalars(2.0), &mut t, 1);
        let p2 = p1 + (0.1 / 1.5) * 1.0 / ((5.1f64).sqrt() + 1e-10);
        assert!((t[0].param[0] - p2).abs() < 1e-15);
        assert_eq!(t[0].states[0][0], 5.1);
    }
}
