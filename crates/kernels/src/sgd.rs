//! SGD with momentum, dampening, Nesterov, weight decay and maximize.
//!
//! State: `momentum_buffer` when `momentum != 0`. As in torch's `_single_tensor_sgd`, the
//! first step with a gradient sets the buffer to the (decayed) gradient itself; later steps
//! do `buf.mul_(momentum).add_(grad, alpha=1-dampening)`. `add_(x, alpha)` is an fmadd in
//! torch's vectorized CPU kernels, so it is one here too.

use crate::common::{GradIn, PreparedGrad, ReadGrad};
use crate::driver::{Algorithm, MAX_STATES};
use crate::elem::{Elem, OpFloat};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
    /// How grads are unscaled/clipped as they are read.
    pub grad: GradIn,
}

/// Per tensor: whether its momentum buffer is being created by this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgdScalars {
    pub first_step: bool,
}

impl Algorithm for Sgd {
    type Scalars = SgdScalars;
    const NAME: &'static str = "SGD";

    fn n_states(&self) -> usize {
        usize::from(self.momentum != 0.0)
    }

    #[inline(always)]
    fn grad_reader<E: Elem>(&self) -> Option<PreparedGrad<E::Op>> {
        let wd = (self.weight_decay != 0.0).then_some(<E::Op as OpFloat>::of(self.weight_decay));
        PreparedGrad::new(self.grad, self.maximize, wd)
    }

    #[inline(always)]
    fn update<E: Elem, R: ReadGrad<E>>(
        &self,
        read: R,
        s: &SgdScalars,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        // One source, specialized so each loop body is branch-free and vectorizes.
        match (self.momentum != 0.0, s.first_step, self.nesterov) {
            (false, _, _) => self.body::<E, _, false, false, false>(read, p, g, st),
            (true, true, false) => self.body::<E, _, true, true, false>(read, p, g, st),
            (true, true, true) => self.body::<E, _, true, true, true>(read, p, g, st),
            (true, false, false) => self.body::<E, _, true, false, false>(read, p, g, st),
            (true, false, true) => self.body::<E, _, true, false, true>(read, p, g, st),
        }
    }
}

impl Sgd {
    #[inline(always)]
    fn body<
        E: Elem,
        R: ReadGrad<E>,
        const MOMENTUM: bool,
        const FIRST: bool,
        const NESTEROV: bool,
    >(
        &self,
        read: R,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        let [buf, _, _] = st;
        let n = p.len();
        let g = &mut g[..n];
        let buf: &mut [E] = if MOMENTUM { &mut buf[..n] } else { buf };
        let o = <E::Op as OpFloat>::of;
        let neg_lr = o(-self.lr);
        let (mom, keep) = (o(self.momentum), o(1.0 - self.dampening));
        for i in 0..n {
            let param = p[i].load();
            let mut grad = read.read(&mut g[i], param);
            if MOMENTUM {
                let b = if FIRST {
                    grad
                } else {
                    grad.mul_add(keep, buf[i].load() * mom)
                };
                buf[i] = E::store(b);
                grad = if NESTEROV { b.mul_add(mom, grad) } else { b };
            }
            p[i] = E::store(grad.mul_add(neg_lr, param));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    fn sgd() -> Sgd {
        Sgd {
            lr: 0.1,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
            grad: GradIn {
                grad_scale: None,
                clip_coef: None,
            },
        }
    }

    #[test]
    fn plain_sgd() {
        let a = sgd();
        let mut t = [Buffers {
            param: vec![1.0f64, 2.0],
            grad: vec![0.5, -1.0],
            states: vec![],
        }];
        step(&a, SgdScalars { first_step: false }, &mut t, 1);
        assert_eq!(t[0].param, vec![0.95, 2.1]);
    }

    /// Heavy-ball momentum by hand over three steps, with dampening and weight decay.
    #[test]
    fn momentum_dampening_weight_decay_by_hand() {
        let a = Sgd {
            momentum: 0.9,
            dampening: 0.1,
            weight_decay: 0.01,
            ..sgd()
        };
        let mut t = [Buffers {
            param: vec![1.0f64],
            grad: vec![0.0],
            states: vec![vec![0.0]],
        }];
        let (mut p, mut b) = (1.0f64, 0.0f64);
        for (k, g) in [0.5, -0.25, 1.0].into_iter().enumerate() {
            t[0].grad[0] = g;
            step(&a, SgdScalars { first_step: k == 0 }, &mut t, 1);
            let d = g + 0.01 * p;
            b = if k == 0 { d } else { 0.9 * b + 0.9 * d };
            p -= 0.1 * b;
            assert!((t[0].param[0] - p).abs() < 1e-14);
            assert!((t[0].states[0][0] - b).abs() < 1e-14);
        }
    }

    #[test]
    fn nesterov_by_hand() {
        let a = Sgd {
            momentum: 0.5,
            nesterov: true,
            ..sgd()
        };
        let mut t = [Buffers {
            param: vec![0.0f32],
            grad: vec![1.0],
            states: vec![vec![0.0]],
        }];
        step(&a, SgdScalars { first_step: true }, &mut t, 1);
        // buf = 1, update = g + 0.5 * buf = 1.5
        assert!((t[0].param[0] + 0.15).abs() < 1e-7);
        step(&a, SgdScalars { first_step: false }, &mut t, 1);
        // buf = 0.5 + 1 = 1.5, update = 1 + 0.75 = 1.75
        assert!((t[0].param[0] + 0.325).abs() < 1e-6);
    }
}
