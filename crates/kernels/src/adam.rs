//! Adam and AdamW (`decoupled_weight_decay`), with amsgrad and maximize.
//!
//! State order: `exp_avg`, `exp_avg_sq`, then `max_exp_avg_sq` when `amsgrad`. The operation
//! order follows torch's `_single_tensor_adam` (and its fused CPU kernel for bf16/fp16):
//! `exp_avg.lerp_(grad, 1-beta1)`, `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1-beta2)`,
//! `denom = sqrt(v) / sqrt(bias_correction2) + eps`, `param.addcdiv_(exp_avg, denom, -step_size)`.
//! Where torch's vectorized CPU kernels fuse (`lerp`, `add(alpha=)`, `addcmul` =
//! `fmadd(value * t1, t2, self)`), so do these, so fp32 results agree to the last bit but for
//! torch's `sqrt`, which on AVX-512 CPUs is off by one ulp for ~17% of inputs.

use crate::common::{lerp, GradIn, PreparedGrad, ReadGrad};
use crate::driver::{Algorithm, MAX_STATES};
use crate::elem::{Elem, OpFloat};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    pub maximize: bool,
    /// AdamW: decay the parameter by `1 - lr * weight_decay` instead of adding to the grad.
    pub decoupled_weight_decay: bool,
    /// How grads are unscaled/clipped as they are read.
    pub grad: GradIn,
}

/// Per-tensor values derived (in f64, like torch) from the tensor's step count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    pub step_size: f64,
    pub bias_correction2_sqrt: f64,
}

impl Adam {
    /// `step` is the count after this step's increment (1 on the first step).
    pub fn scalars(&self, step: f64) -> AdamScalars {
        let bias_correction1 = 1.0 - self.beta1.powf(step);
        let bias_correction2 = 1.0 - self.beta2.powf(step);
        AdamScalars {
            step_size: self.lr / bias_correction1,
            bias_correction2_sqrt: bias_correction2.sqrt(),
        }
    }
}

impl Adam {
    #[inline(always)]
    fn body<E: Elem, R: ReadGrad<E>, const AMSGRAD: bool>(
        &self,
        read: R,
        s: &AdamScalars,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        let [m, v, vmax] = st;
        let n = p.len();
        let (g, m, v) = (&mut g[..n], &mut m[..n], &mut v[..n]);
        let vmax: &mut [E] = if AMSGRAD { &mut vmax[..n] } else { vmax };
        let o = <E::Op as OpFloat>::of;
        let (w1, beta2, c2) = (o(1.0 - self.beta1), o(self.beta2), o(1.0 - self.beta2));
        let decay = o(1.0 - self.lr * self.weight_decay);
        let (bc2_sqrt, eps, neg_step) = (o(s.bias_correction2_sqrt), o(self.eps), o(-s.step_size));
        let has_wd = self.weight_decay != 0.0;
        let decoupled = has_wd && self.decoupled_weight_decay;
        for i in 0..n {
            let mut param = p[i].load();
            if decoupled {
                param = param * decay;
            }
            let grad = read.read(&mut g[i], param);
            let exp_avg = lerp(m[i].load(), grad, w1);
            let exp_avg_sq = (c2 * grad).mul_add(grad, v[i].load() * beta2);
            m[i] = E::store(exp_avg);
            v[i] = E::store(exp_avg_sq);
            let second = if AMSGRAD {
                let mx = vmax[i].load().max_nan(exp_avg_sq);
                vmax[i] = E::store(mx);
                mx
            } else {
                exp_avg_sq
            };
            let denom = second.sqrt() / bc2_sqrt + eps;
            p[i] = E::store(param + neg_step * exp_avg / denom);
        }
    }
}

impl Algorithm for Adam {
    type Scalars = AdamScalars;
    const NAME: &'static str = "Adam";

    fn n_states(&self) -> usize {
        if self.amsgrad {
            3
        } else {
            2
        }
    }

    #[inline(always)]
    fn grad_reader<E: Elem>(&self) -> Option<PreparedGrad<E::Op>> {
        let l2 = (self.weight_decay != 0.0 && !self.decoupled_weight_decay)
            .then_some(<E::Op as OpFloat>::of(self.weight_decay));
        PreparedGrad::new(self.grad, self.maximize, l2)
    }

    #[inline(always)]
    fn update<E: Elem, R: ReadGrad<E>>(
        &self,
        read: R,
        s: &AdamScalars,
        p: &mut [E],
        g: &mut [E],
        st: [&mut [E]; MAX_STATES],
    ) {
        if self.amsgrad {
            self.body::<E, _, true>(read, s, p, g, st)
        } else {
            self.body::<E, _, false>(read, s, p, g, st)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::testing::{step, Buffers};

    fn adam() -> Adam {
        Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
            decoupled_weight_decay: false,
            grad: GradIn {
                grad_scale: None,
                clip_coef: None,
            },
        }
    }

    /// First Adam step from zero state moves every element by lr * sign(grad)
    /// (up to eps): m = (1-b1) g, v = (1-b2) g^2, m_hat / sqrt(v_hat) = sign(g).
    #[test]
    fn first_step_is_lr_times_sign() {
        let a = adam();
        let mut t = [Buffers {
            param: vec![1.0f64, -2.0, 0.5],
            grad: vec![0.3, -4.0, 1e-3],
            states: vec![vec![0.0; 3], vec![0.0; 3]],
        }];
        step(&a, a.scalars(1.0), &mut t, 1);
        for (p, p0) in t[0].param.iter().zip([1.0 - 1e-3, -2.0 + 1e-3, 0.5 - 1e-3]) {
            assert!((p - p0).abs() < 1e-7, "{p} vs {p0}");
        }
        assert!((t[0].states[0][1] - (-0.4)).abs() < 1e-12);
        assert!((t[0].states[1][1] - 0.016).abs() < 1e-12);
    }

    /// Hand-derived second step with weight decay (L2) and amsgrad.
    #[test]
    fn two_steps_l2_amsgrad_by_hand() {
        let a = Adam {
            weight_decay: 0.1,
            amsgrad: true,
            lr: 0.01,
            ..adam()
        };
        let mut t = [Buffers {
            param: vec![2.0f64],
            grad: vec![1.0],
            states: vec![vec![0.0], vec![0.0], vec![0.0]],
        }];
        step(&a, a.scalars(1.0), &mut t, 1);
        // g = 1 + 0.1*2 = 1.2: m = 0.12, v = 0.00144, p = 2 - 0.01 * 1.2/(1.2 + eps/sqrt(bc2)...)
        let (m1, v1) = (0.12, 0.001 * 1.44);
        let p1 = 2.0 - 0.01 / 0.1 * m1 / (v1.sqrt() / (0.001f64).sqrt() + 1e-8);
        assert!((t[0].param[0] - p1).abs() < 1e-12);
        t[0].grad[0] = -0.5;
        step(&a, a.scalars(2.0), &mut t, 1);
        let g2 = -0.5 + 0.1 * p1;
        let m2 = 0.9 * m1 + 0.1 * g2;
        let v2 = 0.999 * v1 + 0.001 * g2 * g2;
        let vmax = f64::max(v1, v2);
        let p2 =
            p1 - 0.01 / (1.0 - 0.81) * m2 / (vmax.sqrt() / (1.0 - 0.999f64 * 0.999).sqrt() + 1e-8);
        assert!(
            (t[0].param[0] - p2).abs() < 1e-12,
            "{} vs {p2}",
            t[0].param[0]
        );
        assert!((t[0].states[2][0] - vmax).abs() < 1e-15 * vmax);
    }

    #[test]
    fn adamw_decays_param_and_maximize_flips() {
        let a = Adam {
            weight_decay: 0.5,
            decoupled_weight_decay: true,
            maximize: true,
            lr: 0.1,
            ..adam()
        };
        let mut t = [Buffers {
            param: vec![1.0f32],
            grad: vec![2.0],
            states: vec![vec![0.0], vec![0.0]],
        }];
        step(&a, a.scalars(1.0), &mut t, 1);
        // p = 1 * (1 - 0.05) + 0.1 (ascent: sign of -grad is -1, subtracting gives +)
        assert!((t[0].param[0] - 1.05).abs() < 1e-6, "{}", t[0].param[0]);
    }

    /// Threads and chunking do not change a single bit.
    #[test]
    fn parallel_equals_serial() {
        let a = Adam {
            amsgrad: true,
            weight_decay: 0.01,
            ..adam()
        };
        let make = || -> Vec<Buffers<f32>> {
            (0..7)
                .map(|k| {
                    let n = [0, 1, 3, 70_000, 17, 100_003, 5][k];
                    let f = |i: usize, s: f32| ((i as f32 * 0.37 + s).sin()) * (k as f32 + 1.0);
                    Buffers {
                        param: (0..n).map(|i| f(i, 0.1)).collect(),
                        grad: (0..n).map(|i| f(i, 1.3)).collect(),
                        states: vec![vec![0.0; n], vec![0.0; n], vec![0.0; n]],
                    }
                })
                .collect()
        };
        let (mut x, mut y) = (make(), make());
        for s in 1..4 {
            step(&a, a.scalars(s as f64), &mut x, 1);
            step(&a, a.scalars(s as f64), &mut y, 2);
        }
        for (a, b) in x.iter().zip(&y) {
            assert_eq!(a.param, b.param);
            assert_eq!(a.states, b.states);
        }
    }

    #[test]
    fn bf16_is_computed_in_f32_and_rounded_once() {
        use half::bf16;
        let a = Adam { lr: 0.1, ..adam() };
        let mut t = [Buffers {
            param: vec![bf16::from_f32(1.0)],
            grad: vec![bf16::from_f32(0.5)],
            states: vec![vec![bf16::ZERO], vec![bf16::ZERO]],
        }];
        step(&a, a.scalars(1.0), &mut t, 1);
        assert_eq!(t[0].param[0].to_f32(), bf16::from_f32(0.9).to_f32());
        assert_eq!(t[0].states[0][0].to_f32(), bf16::from_f32(0.05).to_f32());
    }

    #[test]
    fn nan_grad_propagates() {
        let a = adam();
        let mut t = [Buffers {
            param: vec![1.0f32, 1.0],
            grad: vec![f32::NAN, 1.0],
            states: vec![vec![0.0; 2], vec![0.0; 2]],
        }];
        step(&a, a.scalars(1.0), &mut t, 1);
        assert!(t[0].param[0].is_nan());
        assert!(!t[0].param[1].is_nan());
    }

    #[test]
    fn grad_scale_unscales_and_stores_back() {
        let a = Adam {
            grad: GradIn {
                grad_scale: Some(4.0),
                clip_coef: None,
            },
            ..adam()
        };
        let mut t = [Buffers {
            param: vec![1.0f32],
            grad: vec![8.0],
            states: vec![vec![0.0], vec![0.0]],
        }];
        step(&a, a.scalars(1.0), &mut t, 1);
        assert_eq!(t[0].grad[0], 2.0);
        assert!((t[0].states[0][0] - 0.2).abs() < 1e-7);
    }
}
