use super::*;

#[test]
fn python_modulo_and_floor_division() {
    assert_eq!(py_mod(-3.0, 4.0), 1.0);
    assert_eq!(py_mod(3.0, -4.0), -1.0);
    assert_eq!(py_mod(8.0, 4.0), 0.0);
    assert_eq!(py_floordiv(-7, 2), -4);
    assert_eq!(py_floordiv(7, 2), 3);
}

#[test]
fn step_lr_decays_every_step_size_epochs() {
    let mut lr = 1.0;
    let mut seen = vec![];
    for e in 0..7 {
        lr = step_chain(lr, e, 3, 0.5);
        seen.push(lr);
    }
    assert_eq!(seen, vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]);
    assert_eq!(step_closed(1.0, 6, 3, 0.5), 0.25);
}

#[test]
fn chained_cosine_equals_closed_form_closely() {
    let (base, t_max, eta_min) = (0.1, 10.0, 0.001);
    let mut lr = base;
    for e in 0..=40 {
        lr = cosine_chain(lr, base, e, e == 0, e + 1, t_max, eta_min);
        assert!(
            (lr - cosine_closed(base, e, t_max, eta_min)).abs() < 1e-12,
            "epoch {e}"
        );
    }
}

#[test]
fn warm_restarts_fractional_epochs() {
    // T_0 = 10, T_mult = 2: epoch 25 lies 15 into the second cycle of length 20.
    let (t_cur, t_i, last) = warm_restarts_advance(0.0, 10.0, 0, Some(25.5), 10, 2).unwrap();
    assert_eq!((t_cur, t_i, last), (15.5, 20.0, 25));
    assert!(warm_restarts_advance(0.0, 10.0, 0, Some(-1.0), 10, 2).is_err());
}

#[test]
fn one_cycle_endpoints_and_overrun() {
    let phases = [
        Phase {
            end_step: 29.0,
            start_lr: 0.004,
            end_lr: 0.1,
            start_momentum: 0.95,
            end_momentum: 0.85,
        },
        Phase {
            end_step: 99.0,
            start_lr: 0.1,
            end_lr: 4e-7,
            start_momentum: 0.85,
            end_momentum: 0.95,
        },
    ];
    let (lr0, m0) = one_cycle(0, 100, &phases, true).unwrap();
    assert!((lr0 - 0.004).abs() < 1e-15 && (m0 - 0.95).abs() < 1e-15);
    assert!((one_cycle(29, 100, &phases, true).unwrap().0 - 0.1).abs() < 1e-15);
    assert!(one_cycle(101, 100, &phases, true)
        .unwrap_err()
        .contains("Tried to step 101 times"));
}

#[test]
fn plateau_waits_patience_then_cools_down() {
    let p = Plateau {
        mode_max: false,
        threshold_abs: false,
        threshold: 1e-4,
        patience: 2,
        cooldown: 1,
    };
    let mut s = PlateauState {
        best: f64::INFINITY,
        num_bad_epochs: 0,
        cooldown_counter: 0,
    };
    let mut reductions = vec![];
    for _ in 0..8 {
        let (n, r) = p.step(s, 1.0);
        s = n;
        reductions.push(r);
    }
    // epoch 0 sets best; bad epochs 1,2,3 -> reduce at 3; cooldown 1 eats epoch 4.
    assert_eq!(
        reductions,
        vec![false, false, false, true, false, false, false, true]
    );
    assert_eq!(plateau_reduce(0.1, 0.1, 0.0, 1e-8), Some(0.1 * 0.1));
    assert_eq!(plateau_reduce(1e-9, 0.1, 0.0, 1e-8), None);
}

#[test]
fn warmup_factors() {
    assert_eq!(linear_warmup(0, 4), 0.25);
    assert_eq!(linear_warmup(10, 4), 1.0);
    assert!((exponential_warmup(0, 1) - (1.0 - (-1.0f64).exp())).abs() < 1e-16);
    assert_eq!(untuned_linear_period(0.999), 1999);
    let ri = rho_inf(0.999);
    let off = radam_offset(0.999, ri).unwrap();
    assert!(rho(off as f64, 0.999, ri) > 4.0 && rho((off - 1) as f64, 0.999, ri) <= 4.0);
    assert!(radam_offset(0.5, rho_inf(0.5)).is_err());
}

#[test]
fn range_test_ramp_smoothing_and_suggestion() {
    assert_eq!(range_test_lr(true, 1e-5, 1.0, 0, 11), 1e-5);
    assert!((range_test_lr(true, 1e-5, 1.0, 10, 11) - 1.0).abs() < 1e-12);
    assert_eq!(range_test_lr(false, 0.0, 1.0, 5, 11), 0.5);
    let (l, b, d) = range_test_update(false, 2.0, 1.0, 1.0, 0.5, 5.0);
    assert_eq!((l, b, d), (1.5, 1.0, false));
    assert!(range_test_update(false, 100.0, 1.0, 1.0, 0.0, 5.0).2);
    assert_eq!(steepest_descent(&[3.0, 2.9, 2.0, 1.0, 1.1, 5.0]), Some(2));
    assert_eq!(steepest_descent(&[1.0]), None);
}

#[test]
fn noam_peaks_at_warmup() {
    let w = 100;
    let peak = noam(w - 1, 512.0, w);
    assert!(noam(w - 2, 512.0, w) < peak && noam(w, 512.0, w) < peak);
}

#[test]
fn swalr_reaches_swa_lr_and_stays() {
    // Linear anneal over 4 steps from 1.0 to 0.2: the chained form moves a quarter of the
    // remaining way per step and lands on swa_lr exactly.
    let mut lr = 1.0;
    let mut seen = Vec::new();
    for step_count in 1..8 {
        lr = swalr(lr, 0.2, step_count, 4, false);
        seen.push(lr);
    }
    assert_eq!(seen[0], 1.0);
    assert!((seen[2] - 0.6).abs() < 1e-15, "{seen:?}");
    assert_eq!(&seen[4..], &[0.2, 0.2, 0.2]);
    // No anneal: swa_lr from the first step on.
    assert_eq!(swalr(1.0, 0.05, 1, 0, true), 0.05);
    // Cosine: half way is the mean.
    let mut lr = 1.0;
    for step_count in 1..=3 {
        lr = swalr(lr, 0.0, step_count, 4, true);
    }
    assert!((lr - 0.5).abs() < 1e-15, "{lr}");
}
