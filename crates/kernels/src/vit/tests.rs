use super::*;
use crate::driver::Serial;

fn p<T>(v: &mut [T]) -> Ptr {
    Ptr(v.as_mut_ptr() as *mut u8)
}

#[test]
fn fast_exp_and_erf_are_accurate() {
    let mut worst_exp = 0f64;
    let mut worst_erf = 0f64;
    for i in -80000..=20000 {
        let x = i as f32 * 1e-3;
        let e = Act::exp(x) as f64;
        let want = (x as f64).exp();
        worst_exp = worst_exp.max(((e - want) / want).abs());
        let y = Act::erf(x / 8.0) as f64;
        worst_erf = worst_erf.max((y - libm::erf((x / 8.0) as f64)).abs());
    }
    assert!(worst_exp < 3e-7, "exp rel error {worst_exp}");
    assert!(worst_erf < 5e-7, "erf abs error {worst_erf}");
    assert!(Act::exp(f32::NAN).is_nan());
    assert_eq!(Act::exp(-1000f32), Act::exp(-87f32));
}

#[test]
fn dropout_keeps_about_1_minus_p_and_is_reproducible() {
    let d = Dropout {
        p: 0.3,
        seed: 12345,
    };
    let t = d.threshold();
    let kept = (0..200_000u64).filter(|&i| keep(d.seed, i, t)).count();
    let frac = kept as f64 / 200_000.0;
    assert!((frac - 0.7).abs() < 0.005, "{frac}");
    let again = (0..200_000u64).filter(|&i| keep(d.seed, i, t)).count();
    assert_eq!(kept, again);
    let other = (0..200_000u64)
        .filter(|&i| keep(d.seed + 1, i, t) != keep(d.seed, i, t))
        .count();
    assert!(other > 50_000);
}

#[test]
fn layer_norm_forward_and_backward_match_finite_differences() {
    let (rows, d) = (3usize, 7usize);
    let mut x: Vec<f64> = (0..rows * d)
        .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.3)
        .collect();
    let mut w: Vec<f64> = (0..d).map(|i| 1.0 + 0.1 * i as f64).collect();
    let mut b: Vec<f64> = (0..d).map(|i| 0.05 * i as f64).collect();
    let gy: Vec<f64> = (0..rows * d)
        .map(|i| ((i * 13 % 7) as f64 - 3.0) * 0.2)
        .collect();
    let fwd =
        |x: &mut Vec<f64>, w: &mut Vec<f64>, b: &mut Vec<f64>| -> (Vec<f64>, Vec<f64>, Vec<f64>) {
            let mut y = vec![0.0; rows * d];
            let mut mean = vec![0.0; rows];
            let mut rstd = vec![0.0; rows];
            let op = LnFwd {
                x: p(x),
                w: p(w),
                b: p(b),
                y: p(&mut y),
                mean: p(&mut mean),
                rstd: p(&mut rstd),
                d,
                eps: 1e-5,
            };
            unsafe { layer_norm(&op, DType::F64, rows, 1, &Serial) };
            (y, mean, rstd)
        };
    let loss = |x: &mut Vec<f64>, w: &mut Vec<f64>, b: &mut Vec<f64>| -> f64 {
        fwd(x, w, b).0.iter().zip(&gy).map(|(a, g)| a * g).sum()
    };
    let (_, mut mean, mut rstd) = fwd(&mut x, &mut w, &mut b);
    let mut gy2 = gy.clone();
    let mut gx = vec![1.0; rows * d]; // accumulate onto ones
    let op = LnBwd {
        gy: p(&mut gy2),
        x: p(&mut x),
        mean: p(&mut mean),
        rstd: p(&mut rstd),
        w: p(&mut w),
        gx: p(&mut gx),
        accumulate: true,
        d,
    };
    let gwb = unsafe { layer_norm_backward(&op, DType::F64, rows, 2, &Serial) };
    let h = 1e-6;
    for i in 0..rows * d {
        let mut xp = x.clone();
        xp[i] += h;
        let mut xm = x.clone();
        xm[i] -= h;
        let num = (loss(&mut xp, &mut w.clone(), &mut b.clone())
            - loss(&mut xm, &mut w.clone(), &mut b.clone()))
            / (2.0 * h);
        assert!(
            (gx[i] - 1.0 - num).abs() < 1e-7,
            "x {i}: {} vs {num}",
            gx[i] - 1.0
        );
    }
    for j in 0..d {
        let mut wp = w.clone();
        wp[j] += h;
        let mut wm = w.clone();
        wm[j] -= h;
        let num = (loss(&mut x.clone(), &mut wp, &mut b.clone())
            - loss(&mut x.clone(), &mut wm, &mut b.clone()))
            / (2.0 * h);
        assert!((gwb[j] - num).abs() < 1e-7);
        let gb: f64 = (0..rows).map(|r| gy[r * d + j]).sum();
        assert!((gwb[d + j] - gb).abs() < 1e-12);
    }
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let n = 5usize;
    let x0: Vec<f64> = (0..2 * n)
        .map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.7)
        .collect();
    let go: Vec<f64> = (0..2 * n)
        .map(|i| ((i * 3 % 4) as f64 - 1.5) * 0.4)
        .collect();
    let drop = Dropout { p: 0.25, seed: 7 };
    let h = 1e-6;
    // GELU with dropout
    let gl = |x: &[f64]| -> f64 {
        let mut xs = x.to_vec();
        let mut y = vec![0.0; x.len()];
        let op = GeluFwd {
            x: p(&mut xs),
            y: p(&mut y),
            dropout: drop,
        };
        unsafe { gelu_forward(&op, DType::F64, x.len(), 1, &Serial) };
        y.iter().zip(&go).map(|(a, g)| a * g).sum()
    };
    let mut xs = x0.clone();
    let mut g = go.clone();
    let mut y = vec![0.0; 2 * n];
    let op = GeluBwd {
        x: p(&mut xs),
        g: p(&mut g),
        y: p(&mut y),
        dropout: drop,
    };
    unsafe { gelu_backward(&op, DType::F64, 2 * n, 1, &Serial) };
    for i in 0..2 * n {
        let (mut xp, mut xm) = (x0.clone(), x0.clone());
        xp[i] += h;
        xm[i] -= h;
        let num = (gl(&xp) - gl(&xm)) / (2.0 * h);
        assert!((g[i] - num).abs() < 1e-8, "gelu {i}: {} vs {num}", g[i]);
        let want = 0.5 * x0[i] * (1.0 + libm::erf(x0[i] / 2f64.sqrt()));
        let m = if keep(drop.seed, i as u64, drop.threshold()) {
            1.0 / 0.75
        } else {
            0.0
        };
        assert!((y[i] - want * m).abs() < 1e-15);
    }
}

#[test]
fn attention_matches_naive_and_finite_differences() {
    // (11, 3): 33 units run 2 per piece, so pieces start and end inside a batch element
    for (bsz, heads) in [(2usize, 2usize), (11, 3)] {
        attention_case(bsz, heads);
    }
}

fn attention_case(bsz: usize, heads: usize) {
    let (n, dh) = (5usize, 3usize);
    let len = bsz * n * 3 * heads * dh;
    let qkv0: Vec<f64> = (0..len)
        .map(|i| ((i * 29 % 17) as f64 - 8.0) * 0.15)
        .collect();
    let go: Vec<f64> = (0..bsz * n * heads * dh)
        .map(|i| ((i * 11 % 7) as f64 - 3.0) * 0.3)
        .collect();
    for drop in [Dropout::OFF, Dropout { p: 0.3, seed: 99 }] {
        let run = |qkv: &[f64]| -> Vec<f64> {
            let mut q = qkv.to_vec();
            let mut o = vec![0.0; bsz * n * heads * dh];
            let a = Attention {
                qkv: p(&mut q),
                b: bsz,
                n,
                heads,
                dh,
                scale: 0.6,
                dropout: drop,
            };
            unsafe { attention(&a, p(&mut o), DType::F64, 2, &Serial) };
            o
        };
        let o = run(&qkv0);
        // naive reference
        let at = |b: usize, i: usize, part: usize, h: usize, d: usize| {
            qkv0[((b * n + i) * 3 + part) * heads * dh + h * dh + d]
        };
        let t = drop.threshold();
        for b in 0..bsz {
            for h in 0..heads {
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            0.6 * (0..dh)
                                .map(|d| at(b, i, 0, h, d) * at(b, j, 1, h, d))
                                .sum::<f64>()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..dh {
                        let want: f64 = (0..n)
                            .map(|j| {
                                let keepj = !drop.active()
                                    || keep(
                                        drop.seed,
                                        (((b * heads + h) * n + i) * n + j) as u64,
                                        t,
                                    );
                                let sc = if drop.active() {
                                    if keepj {
                                        1.0 / 0.7
                                    } else {
                                        0.0
                                    }
                                } else {
                                    1.0
                                };
                                e[j] / z * sc * at(b, j, 2, h, d)
                            })
                            .sum();
                        let got = o[(b * n + i) * heads * dh + h * dh + d];
                        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
                    }
                }
            }
        }
        let mut q = qkv0.clone();
        let mut g = go.clone();
        let mut gq = vec![0.0; len];
        let a = Attention {
            qkv: p(&mut q),
            b: bsz,
            n,
            heads,
            dh,
            scale: 0.6,
            dropout: drop,
        };
        unsafe { attention_backward(&a, p(&mut g), p(&mut gq), DType::F64, 2, &Serial) };
        let h = 1e-6;
        for i in (0..len).step_by(if bsz > 2 { 7 } else { 1 }) {
            let (mut xp, mut xm) = (qkv0.clone(), qkv0.clone());
            xp[i] += h;
            xm[i] -= h;
            let lp: f64 = run(&xp).iter().zip(&go).map(|(a, b)| a * b).sum();
            let lm: f64 = run(&xm).iter().zip(&go).map(|(a, b)| a * b).sum();
            let num = (lp - lm) / (2.0 * h);
            assert!((gq[i] - num).abs() < 1e-8, "qkv {i}: {} vs {num}", gq[i]);
        }
    }
}

#[test]
fn patches_gather_and_scatter_are_inverse_permutations() {
    let (b, c, h, w, ph, pw) = (2usize, 3usize, 4usize, 6usize, 2usize, 3usize);
    let n = b * c * h * w;
    let mut img: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut pat = vec![0f32; n];
    let mut op = Patches {
        img: p(&mut img),
        patches: p(&mut pat),
        c,
        h,
        w,
        ph,
        pw,
        backward: false,
    };
    unsafe { patches(&op, DType::F32, b, 2, &Serial) };
    // spot check against the einops formula
    let (gw, pd) = (w / pw, ph * pw * c);
    for (bi, gy, gx, p1, p2, ch) in [(1, 1, 0, 1, 2, 2), (0, 0, 1, 0, 1, 1)] {
        let want = img[((bi * c + ch) * h + gy * ph + p1) * w + gx * pw + p2];
        assert_eq!(
            pat[(bi * (h / ph) * gw + gy * gw + gx) * pd + (p1 * pw + p2) * c + ch],
            want
        );
    }
    let mut sorted = pat.clone();
    sorted.sort_by(f32::total_cmp);
    assert_eq!(sorted, img);
    let mut back = vec![0f32; n];
    op.img = p(&mut back);
    op.backward = true;
    unsafe { patches(&op, DType::F32, b, 2, &Serial) };
    assert_eq!(back, img);
}
