//! Rprop (`torch.optim.Rprop`): per-element step sizes grown or shrunk by the sign of
//! `grad * prev`. States: `prev`, `step_size`.

use crate::common::{in_dtype, GradIn, PreparedGrad, ReadGrad};
use crate::elem::{Elem, OpFloat};
use crate::{Algorithm, MAX_STATES};

#[derive(Clone, Copy, Debug)]
pub struct Rprop {
    pub etaminus: f64,
    pub etaplus: f64,
    pub step_size_min: f64,
    pub step_size_max: f64,
    pub maximize: bool,
    pub grad: GradIn,
}

/// torch's `x.sign()`, `(0 < x) - (x < 0)`: -1, 0 or 1, and 0 for NaN.
#[inline(always)]
fn sign<O: OpFloat>(x: O) -> O {
    if x > O::of(0.0) {
        O::of(1.0)
    } else if x < O::of(0.0) {
        O::of(-1.0)
    } else {
        O::of(0.0)
    }
}

impl Algorithm for Rprop {
    type Scalars = ();
    const NAME: &'static str = "Rprop";

    fn n_states(&self) -> usize {
        2
    }

    #[inline(always)]
    fn grad_reader<E: Elem>(&self) -> Option<PreparedGrad<E::Op>> {
        PreparedGrad::new(self.grad, self.maximize, None)
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
        let [prev, size, _] = st;
        let n = p.len();
        let (g, prev, size) = (&mut g[..n], &mut prev[..n], &mut size[..n]);
        let o = <E::Op as OpFloat>::of;
        // `sign[...] = etaplus` stores the factors in the grad's dtype.
        let (plus, minus) = (in_dtype::<E>(self.etaplus), in_dtype::<E>(self.etaminus));
        let (lo, hi) = (o(self.step_size_min), o(self.step_size_max));
        let (zero, one) = (o(0.0), o(1.0));
        for i in 0..n {
            // No weight decay in Rprop: the reader never uses the parameter it is given.
            let grad = read.read(&mut g[i], zero);
            let s = sign(E::store(grad * prev[i].load()).load());
            let factor = if s > zero {
                plus
            } else if s < zero {
                minus
            } else {
                one
            };
            // step_size.mul_(sign).clamp_(min, max); NaN propagates through clamp.
            let mut ss = E::store(size[i].load() * factor).load();
            #[allow(clippy::eq_op)] // x == x is false only for NaN, which clamp propagates
            if ss == ss {
                ss = if ss < lo {
                    lo
                } else if ss > hi {
                    hi
                } else {
                    ss
                };
            }
            let ss = E::store(ss);
            size[i] = ss;
            let grad = if factor == minus { zero } else { grad };
            prev[i] = E::store(grad);
            p[i] = E::store(p[i].load() - sign(grad) * ss.load());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    /// Same sign grows the step, a sign change shrinks it and skips the update.
    #[test]
    fn grows_and_shrinks_by_hand() {
        let a = Rprop {
            etaminus: 0.5,
            etaplus: 1.2,
            step_size_min: 1e-6,
            step_size_max: 50.0,
            maximize: false,
            grad: GradIn::default(),
        };
        let mut t = [Buffers {
            param: vec![1.0f64, 1.0],
            grad: vec![2.0, 2.0],
            states: vec![vec![0.0, 0.0], vec![0.1, 0.1]],
        }];
        step(&a, (), &mut t, 1); // prev = 0: factor 1, step 0.1
        assert_eq!(t[0].param, vec![0.9, 0.9]);
        t[0].grad = vec![3.0, -3.0];
        step(&a, (), &mut t, 1);
        assert!((t[0].states[1][0] - 0.12).abs() < 1e-15 && (t[0].param[0] - 0.78).abs() < 1e-12);
        assert_eq!(t[0].states[1][1], 0.05);
        assert_eq!((t[0].param[1], t[0].states[0][1]), (0.9, 0.0));
    }
}
