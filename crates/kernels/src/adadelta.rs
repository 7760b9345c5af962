//! Adadelta (`torch.optim.Adadelta`). States: `square_avg`, `acc_delta`.

use crate::common::{in_dtype, GradIn, PreparedGrad, ReadGrad};
use crate::elem::{Elem, OpFloat};
use crate::{Algorithm, MAX_STATES};

#[derive(Clone, Copy, Debug)]
pub struct Adadelta {
    pub lr: f64,
    pub rho: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub maximize: bool,
    pub grad: GradIn,
}

impl Algorithm for Adadelta {
    type Scalars = ();
    const NAME: &'static str = "Adadelta";

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
        _: &(),
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        let [sq, acc, _] = st;
        let n = p.len();
        let (g, sq, acc) = (&mut g[..n], &mut sq[..n], &mut acc[..n]);
        let o = <E::Op as OpFloat>::of;
        let (rho, c, eps, neg_lr) = (o(self.rho), o(1.0 - self.rho), o(self.eps), o(-self.lr));
        for i in 0..n {
            let param = p[i].load();
            // `grad.add(param, alpha=weight_decay)` is a tensor of the grad's dtype in torch.
            let grad = E::store(read.read(&mut g[i], param)).load();
            // square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho): two roundings.
            let decayed = E::store(sq[i].load() * rho).load();
            let square_avg = E::store((c * grad).mul_add(grad, decayed));
            sq[i] = square_avg;
            // std = (square_avg + eps).sqrt(); delta = (acc_delta + eps).sqrt() / std * grad
            let std = E::store(E::store(square_avg.load() + eps).load().sqrt()).load();
            let a = acc[i].load();
            let delta = E::store(E::store(a + eps).load().sqrt()).load();
            let delta = E::store(E::store(delta / std).load() * grad).load();
            acc[i] = E::store((c * delta).mul_add(delta, E::store(a * rho).load()));
            p[i] = E::store(delta.mul_add(neg_lr, param));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    #[test]
    fn one_step_by_hand() {
        let a = Adadelta {
            lr: 1.0,
            rho: 0.9,
            eps: 1e-6,
            weight_decay: 0.0,
            maximize: false,
            grad: GradIn::default(),
        };
        let mut t = [Buffers {
            param: vec![1.0f64],
            grad: vec![2.0],
            states: vec![vec![0.0], vec![0.0]],
        }];
        step(&a, (), &mut t, 1);
        let sq = 0.1 * 4.0;
        let delta = (1e-6f64).sqrt() / (sq + 1e-6f64).sqrt() * 2.0;
        assert!((t[0].states[0][0] - sq).abs() < 1e-12);
        assert!((t[0].states[1][0] - 0.1 * delta * delta).abs() < 1e-15);
        assert!((t[0].param[0] - (1.0 - delta)).abs() < 1e-12);
    }
}
