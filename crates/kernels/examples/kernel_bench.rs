//! Raw kernel throughput, without Python or libtorch: `cargo run --release --example kernel_bench`.
use ferrotorch_kernels::{
    adam::Adam, common::GradIn, run, sgd::Sgd, sgd::SgdScalars, DType, Job, RayonPool,
};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let n: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let size: usize = std::env::args()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(262_144);
    let mut bufs: Vec<Vec<Vec<f32>>> = (0..n)
        .map(|k| {
            (0..4)
                .map(|j| {
                    (0..size)
                        .map(|i| ((i * 7 + j * 13 + k) % 97) as f32 * 0.01 + 0.001)
                        .collect()
                })
                .collect()
        })
        .collect();
    let adam = Adam {
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
    };
    let sgd = Sgd {
        lr: 1e-2,
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.0,
        nesterov: false,
        maximize: false,
        grad: GradIn {
            grad_scale: None,
            clip_coef: None,
        },
    };
    let mut jobs_a = Vec::new();
    let mut jobs_s = Vec::new();
    for b in bufs.iter_mut() {
        let ptr = |v: &mut Vec<f32>| v.as_mut_ptr() as *mut u8;
        let (p, g, s0, s1) = {
            let [p, g, s0, s1] = &mut b[..] else {
                unreachable!()
            };
            (ptr(p), ptr(g), ptr(s0), ptr(s1))
        };
        jobs_a.push(Job {
            dtype: DType::F32,
            numel: size,
            param: p,
            grad: g,
            states: [s0, s1, std::ptr::null_mut()],
            scalars: adam.scalars(10.0),
        });
        jobs_s.push(Job {
            dtype: DType::F32,
            numel: size,
            param: p,
            grad: g,
            states: [s0, std::ptr::null_mut(), std::ptr::null_mut()],
            scalars: SgdScalars { first_step: false },
        });
    }
    for _ in 0..3 {
        unsafe { run(&adam, &jobs_a, threads, &RayonPool).unwrap() };
    }
    let bytes_a = (n * size * 4 * 7) as f64;
    let bytes_s = (n * size * 4 * 5) as f64;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..10 {
            unsafe { run(&adam, &jobs_a, threads, &RayonPool).unwrap() };
        }
        let dt = t.elapsed().as_secs_f64() / 10.0;
        let t2 = Instant::now();
        for _ in 0..10 {
            unsafe { run(&sgd, &jobs_s, threads, &RayonPool).unwrap() };
        }
        let dt2 = t2.elapsed().as_secs_f64() / 10.0;
        println!(
            "adam {:.2} ms ({:.1} GB/s)   sgd {:.2} ms ({:.1} GB/s)",
            dt * 1e3,
            bytes_a / dt / 1e9,
            dt2 * 1e3,
            bytes_s / dt2 / 1e9
        );
    }
}
