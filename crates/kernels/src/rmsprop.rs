//! RMSprop with centering, momentum, weight decay and maximize.
//!
//! State order: `square_avg`, then `momentum_buffer` when `momentum > 0`, then `grad_avg`
//! when `centered`. Operation order follows torch's `_single_tensor_rmsprop`.

use crate::common::{lerp, GradIn, PreparedGrad, ReadGrad};
use crate::driver::{Algorithm, MAX_STATES};
use crate::elem::{Elem, OpFloat};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsProp {
    pub lr: f64,
    pub alpha: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub centered: bool,
    pub maximize: bool,
    /// How grads are unscaled/clipped as they are read.
    pub grad: GradIn,
}

impl Algorithm for RmsProp {
    type Scalars = ();
    const NAME: &'static str = "RMSprop";

    fn n_states(&self) -> usize {
        1 + usize::from(self.momentum > 0.0) + usize::from(self.centered)
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
        _: &(),
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        // One source, specialized so each loop body is branch-free and vectorizes.
        match (self.momentum > 0.0, self.centered) {
            (false, false) => self.body::<E, _, false, false>(read, p, g, st),
            (false, true) => self.body::<E, _, false, true>(read, p, g, st),
            (true, false) => self.body::<E, _, true, false>(read, p, g, st),
            (true, true) => self.body::<E, _, true, true>(read, p, g, st),
        }
    }
}

impl RmsProp {
    #[inline(always)]
    fn body<E: Elem, R: ReadGrad<E>, const MOMENTUM: bool, const CENTERED: bool>(
        &self,
        read: R,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        let [sq, s1, s2] = st;
        // The buffers present are packed in order: momentum_buffer before grad_avg.
        let (buf, gavg) = if MOMENTUM { (s1, s2) } else { (s2, s1) };
        let n = p.len();
        let (g, sq) = (&mut g[..n], &mut sq[..n]);
        let buf: &mut [E] = if MOMENTUM { &mut buf[..n] } else { buf };
        let gavg: &mut [E] = if CENTERED { &mut gavg[..n] } else { gavg };
        let o = <E::Op as OpFloat>::of;
        let (alpha, c, eps) = (o(self.alpha), o(1.0 - self.alpha), o(self.eps));
        let (mom, neg_lr, one) = (o(self.momentum), o(-self.lr), o(1.0));
        for i in 0..n {
            let param = p[i].load();
            let grad = read.read(&mut g[i], param);
            let square_avg = (c * grad).mul_add(grad, sq[i].load() * alpha);
            sq[i] = E::store(square_avg);
            let avg = if CENTERED {
                let ga = lerp(gavg[i].load(), grad, c);
                gavg[i] = E::store(ga);
                (-one * ga).mul_add(ga, square_avg).sqrt()
            } else {
                square_avg.sqrt()
            } + eps;
            p[i] = E::store(if MOMENTUM {
                let b = buf[i].load() * mom + one * grad / avg;
                buf[i] = E::store(b);
                b.mul_add(neg_lr, param)
            } else {
                param + neg_lr * grad / avg
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    #[test]
    fn centered_momentum_by_hand() {
        let a = RmsProp {
            lr: 0.01,
            alpha: 0.9,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.5,
            centered: true,
            maximize: false,
            grad: GradIn {
                grad_scale: None,
                clip_coef: None,
            },
        };
        let mut t = [Buffers {
            param: vec![1.0f64],
            grad: vec![2.0],
            states: vec![vec![0.0], vec![0.0], vec![0.0]],
        }];
        step(&a, (), &mut t, 1);
        let sq = 0.1 * 4.0;
        let ga = 0.1 * 2.0;
        let avg = (sq - ga * ga).sqrt() + 1e-8;
        let b = 2.0 / avg;
        assert!((t[0].states[0][0] - sq).abs() < 1e-15);
        assert!(
            (t[0].states[1][0] - b).abs() < 1e-12,
            "momentum_buffer is state 1"
        );
        assert!(
            (t[0].states[2][0] - ga).abs() < 1e-15,
            "grad_avg is state 2"
        );
        assert!((t[0].param[0] - (1.0 - 0.01 * b)).abs() < 1e-12);
    }

    #[test]
    fn centered_without_momentum_uses_slot_1_for_grad_avg() {
        let a = RmsProp {
            lr: 0.01,
            alpha: 0.9,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: true,
            maximize: false,
            grad: GradIn {
                grad_scale: None,
                clip_coef: None,
            },
        };
        let mut t = [Buffers {
            param: vec![1.0f64],
            grad: vec![2.0],
            states: vec![vec![0.0], vec![0.0]],
        }];
        step(&a, (), &mut t, 1);
        assert!((t[0].states[1][0] - 0.2).abs() < 1e-15);
        let avg = (0.4f64 - 0.04).sqrt() + 1e-8;
        assert!((t[0].param[0] - (1.0 - 0.01 * 2.0 / avg)).abs() < 1e-12);
    }
}
