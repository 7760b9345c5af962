//! Times the ViT kernels on the benchmark's shapes (batch 64, 65 tokens, dim 256, mlp 512,
//! 8 heads of 32), one thread: `cargo run -p ferrotorch-kernels --release --example vit_bench`
//! (fp32) or `... --example vit_bench -- bf16` (the kernels as autocast runs them).
use ferrotorch_kernels::vit::*;
use ferrotorch_kernels::{DType, Serial};
use std::time::Instant;

fn p<T>(v: &mut [T]) -> Ptr {
    Ptr(v.as_mut_ptr() as *mut u8)
}

fn time(name: &str, elems: usize, f: &mut dyn FnMut()) {
    f();
    let mut best = f64::MAX;
    for _ in 0..10 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{name:<24} {:8.3} ms  {:6.2} ns/elem",
        best * 1e3,
        best * 1e9 / elems as f64
    );
}

fn main() {
    let (rows, d, mlp, n) = (64 * 65usize, 256usize, 512usize, 65usize);
    let mut x: Vec<f32> = (0..rows * mlp)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.004)
        .collect();
    let mut y = vec![0f32; rows * mlp];
    let mut g = vec![0.5f32; rows * mlp];
    let (mut w, mut b) = (vec![1f32; d], vec![0f32; d]);
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    for v in [&mut x, &mut y, &mut g, &mut w, &mut b] {
        enc(v);
    }
    time("layer_norm", rows * d, &mut || unsafe {
        layer_norm(
            &LnFwd {
                x: p(&mut x),
                w: p(&mut w),
                b: p(&mut b),
                y: p(&mut y),
                mean: p(&mut mean),
                rstd: p(&mut rstd),
                d,
                eps: 1e-5,
            },
            dt(),
            rows,
            1,
            &Serial,
        )
    });
    time("layer_norm_backward", rows * d, &mut || unsafe {
        layer_norm_backward(
            &LnBwd {
                gy: p(&mut g),
                x: p(&mut x),
                mean: p(&mut mean),
                rstd: p(&mut rstd),
                w: p(&mut w),
                gx: p(&mut y),
                accumulate: true,
                d,
            },
            dt(),
            rows,
            1,
            &Serial,
        );
    });
    let ne = rows * mlp;
    time("gelu_forward", ne, &mut || unsafe {
        gelu_forward(
            &GeluFwd {
                x: p(&mut x),
                y: p(&mut y),
                dropout: Dropout::OFF,
            },
            dt(),
            ne,
            1,
            &Serial,
        )
    });
    time("gelu_backward", ne, &mut || unsafe {
        gelu_backward(
            &GeluBwd {
                x: p(&mut x),
                g: p(&mut g),
                y: p(&mut y),
                dropout: Dropout::OFF,
            },
            dt(),
            ne,
            1,
            &Serial,
        )
    });
    let mut qkv: Vec<f32> = (0..rows * 3 * d)
        .map(|i| ((i * 31 % 100) as f32) * 0.01 - 0.5)
        .collect();
    let (mut o, mut gq) = (vec![0f32; rows * d], vec![0f32; rows * 3 * d]);
    enc(&mut qkv);
    let at = Attention {
        qkv: p(&mut qkv),
        b: 64,
        n,
        heads: 8,
        dh: 32,
        scale: 32f64.powf(-0.5),
        dropout: Dropout::OFF,
    };
    time("attention", rows * d, &mut || unsafe {
        attention(&at, p(&mut o), dt(), 1, &Serial)
    });
    time("attention_backward", rows * d, &mut || unsafe {
        attention_backward(&at, p(&mut y), p(&mut gq), dt(), 1, &Serial)
    });
    time("add_dropout (residual)", rows * d, &mut || unsafe {
        add_dropout(
            &AddDropout {
                h: p(&mut x),
                y: p(&mut g),
                out: p(&mut y),
                dropout: Dropout::OFF,
            },
            dt(),
            rows * d,
            1,
            &Serial,
        )
    });
}

/// The element type timed: `bf16` as the first argument (the buffers then hold bf16 values,
/// as autocast runs the kernels), fp32 otherwise. LayerNorm's statistics stay fp32.
fn dt() -> DType {
    if std::env::args().nth(1).as_deref() == Some("bf16") {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Rewrites `v`'s values as bf16 in the first half of its buffer when timing bf16.
fn enc(v: &mut [f32]) {
    if dt() == DType::BF16 {
        let bits: Vec<u16> = v
            .iter()
            .map(|x| half::bf16::from_f32(*x).to_bits())
            .collect();
        // SAFETY: `v` has room for twice as many u16 as it has f32.
        let u = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u16, bits.len()) };
        u.copy_from_slice(&bits);
    }
}
