"""Every scheduler against torch.optim.lr_scheduler (the reference), 1000 steps, random
configurations, both optimizer families, one or several param groups; exact resume."""

from __future__ import annotations

import copy
import io
import random
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as tls

import ferrotorch.optim as fopt
from ferrotorch.optim import lr_scheduler as fls

TOL = 1e-12


def make_optimizer(family: str, groups: int, seed: int):
    rng = random.Random(seed)
    params = [[torch.zeros(2, requires_grad=True)] for _ in range(groups)]
    lrs = [rng.choice([0.1, 0.05, 0.3, 1.0]) for _ in range(groups)]
    spec = [{"params": p, "lr": lr} for p, lr in zip(params, lrs)]
    if family == "torch-sgd":
        return torch.optim.SGD(spec, lr=0.1, momentum=0.9)
    if family == "torch-adam":
        return torch.optim.Adam(spec, lr=0.1)
    if family == "ferro-sgd":
        return fopt.SGD(spec, lr=0.1, momentum=0.9)
    return fopt.AdamW(spec, lr=0.1)


def configs(name: str, rng: random.Random) -> dict:
    if name == "StepLR":
        return dict(step_size=rng.randint(1, 40), gamma=rng.choice([0.1, 0.5, 0.9]))
    if name == "MultiStepLR":
        return dict(milestones=sorted(rng.sample(range(1, 900), rng.randint(1, 6))) + [rng.randint(1, 50)] * rng.randint(0, 2), gamma=rng.choice([0.1, 0.3]))
    if name == "ConstantLR":
        return dict(factor=rng.choice([0.25, 1 / 3, 0.5, 0.9]), total_iters=rng.randint(1, 300))
    if name == "LinearLR":
        return dict(start_factor=rng.choice([0.01, 1 / 3, 0.5]), end_factor=rng.choice([1.0, 0.5, 0.1]), total_iters=rng.randint(1, 400))
    if name == "ExponentialLR":
        return dict(gamma=rng.choice([0.99, 0.995, 0.9]))
    if name == "PolynomialLR":
        return dict(total_iters=rng.randint(1, 900), power=rng.choice([1.0, 2.0, 0.5]))
    if name == "CosineAnnealingLR":
        return dict(T_max=rng.randint(1, 300), eta_min=rng.choice([0.0, 1e-4, 0.01]))
    if name == "CosineAnnealingWarmRestarts":
        return dict(T_0=rng.randint(1, 50), T_mult=rng.choice([1, 2, 3]), eta_min=rng.choice([0.0, 1e-3]))
    if name == "CyclicLR":
        mode = rng.choice(["triangular", "triangular2", "exp_range"])
        return dict(base_lr=0.001, max_lr=0.1, step_size_up=rng.randint(1, 100), step_size_down=rng.choice([None, 13, 57]), mode=mode, gamma=0.999)
    if name == "OneCycleLR":
        return dict(max_lr=0.1, total_steps=1000, pct_start=rng.choice([0.3, 0.25, 0.5]), anneal_strategy=rng.choice(["cos", "linear"]), three_phase=rng.random() < 0.5, div_factor=rng.choice([25.0, 10.0]), final_div_factor=1e4)
    if name == "LambdaLR":
        k = rng.choice([0.99, 0.995])
        return dict(lr_lambda=lambda e, k=k: k**e)
    if name == "MultiplicativeLR":
        return dict(lr_lambda=lambda e: 0.999 if e % 3 else 0.99)
    raise KeyError(name)


SIMPLE = ["StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR", "CosineAnnealingLR",
          "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR", "LambdaLR", "MultiplicativeLR"]


def group_values(opt):
    out = []
    for g in opt.param_groups:
        out.append(float(g["lr"]))
        if "momentum" in g:
            out.append(float(g["momentum"]))
        if "betas" in g:
            out.append(float(g["betas"][0]))
    return out


def assert_close_lists(a, b, what):
    assert len(a) == len(b), what
    for x, y in zip(a, b):
        assert abs(x - y) <= TOL * max(1.0, abs(y)), f"{what}: {x} vs {y}"


@pytest.mark.parametrize("family", ["torch-sgd", "ferro-adam"])
@pytest.mark.parametrize("name", SIMPLE)
@pytest.mark.parametrize("seed", range(3))
def test_1000_steps_equal_torch(name, seed, family):
    rng = random.Random(seed * 101 + hash(name) % 1000)
    cfg = configs(name, rng)
    groups = 1 + seed % 3
    ours_opt, ref_opt = make_optimizer(family, groups, seed), make_optimizer(family, groups, seed)
    kw = dict(cfg)
    ours, ref = getattr(fls, name)(ours_opt, **kw), getattr(tls, name)(ref_opt, **kw)
    assert isinstance(ours, tls.LRScheduler) and isinstance(ours, getattr(tls, name))
    assert_close_lists(group_values(ours_opt), group_values(ref_opt), "initial")
    steps = 999 if name == "OneCycleLR" else 1000
    for i in range(steps):
        ours_opt.step()
        ref_opt.step()
        ours.step()
        ref.step()
        assert_close_lists(ours.get_last_lr(), ref.get_last_lr(), f"{name} {cfg} step {i}")
        assert_close_lists(group_values(ours_opt), group_values(ref_opt), f"{name} step {i} groups")


@pytest.mark.parametrize("name", ["StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR", "CosineAnnealingLR"])
def test_closed_form_with_epoch_argument(name):
    rng = random.Random(5)
    cfg = configs(name, rng)
    ours_opt, ref_opt = make_optimizer("torch-sgd", 2, 5), make_optimizer("torch-sgd", 2, 5)
    ours, ref = getattr(fls, name)(ours_opt, **cfg), getattr(tls, name)(ref_opt, **cfg)
    with pytest.warns(UserWarning):
        for epoch in [3, 10, 7, 250, 999, 0, 42]:
            ours.step(epoch)
            ref.step(epoch)
            assert_close_lists(ours.get_last_lr(), ref.get_last_lr(), f"{name} epoch {epoch}")


def test_warm_restarts_fractional_epochs_like_torch():
    for t_mult in (1, 2):
        ours_opt, ref_opt = make_optimizer("torch-sgd", 1, 0), make_optimizer("torch-sgd", 1, 0)
        ours = fls.CosineAnnealingWarmRestarts(ours_opt, T_0=7, T_mult=t_mult, eta_min=1e-4)
        ref = tls.CosineAnnealingWarmRestarts(ref_opt, T_0=7, T_mult=t_mult, eta_min=1e-4)
        iters = 13
        for epoch in range(60):
            for i in range(iters):
                ours.step(epoch + i / iters)
                ref.step(epoch + i / iters)
                assert_close_lists(ours.get_last_lr(), ref.get_last_lr(), f"epoch {epoch}+{i}/{iters}")
                assert ours.T_i == ref.T_i and ours.last_epoch == ref.last_epoch
                assert abs(ours.T_cur - ref.T_cur) < 1e-9


def test_cyclic_custom_scale_fn_and_adam_betas():
    for scale_mode in ("cycle", "iterations"):
        ours_opt, ref_opt = make_optimizer("ferro-adam", 2, 1), make_optimizer("torch-adam", 2, 1)
        kw = dict(base_lr=0.01, max_lr=0.1, step_size_up=9, scale_fn=lambda x: 0.5 ** (x / 10), scale_mode=scale_mode, base_momentum=0.8, max_momentum=0.95)
        ours, ref = fls.CyclicLR(ours_opt, **kw), tls.CyclicLR(ref_opt, **kw)
        for _ in range(300):
            ours_opt.step(), ref_opt.step(), ours.step(), ref.step()
            assert_close_lists(group_values(ours_opt), group_values(ref_opt), scale_mode)


def test_reduce_lr_on_plateau_all_modes():
    rng = random.Random(3)
    for mode in ("min", "max"):
        for threshold_mode in ("rel", "abs"):
            ours_opt, ref_opt = make_optimizer("ferro-sgd", 3, 2), make_optimizer("torch-sgd", 3, 2)
            kw = dict(mode=mode, factor=0.5, patience=rng.randint(0, 4), threshold=0.01, threshold_mode=threshold_mode, cooldown=rng.randint(0, 3), min_lr=[0.0, 1e-3, 1e-2], eps=1e-8)
            ours, ref = fls.ReduceLROnPlateau(ours_opt, **kw), tls.ReduceLROnPlateau(ref_opt, **kw)
            metric = 1.0
            for i in range(1000):
                metric += rng.gauss(0, 0.01) + (0.001 if i % 50 < 25 else -0.002)
                ours.step(metric)
                ref.step(torch.tensor(metric))
                assert_close_lists(ours.get_last_lr(), ref.get_last_lr(), f"{mode}/{threshold_mode} step {i}")
                assert ours.num_bad_epochs == ref.num_bad_epochs and ours.cooldown_counter == ref.cooldown_counter
            assert ours.state_dict().keys() == ref.state_dict().keys()


def test_sequential_and_chained_equal_torch():
    for family in ("torch-sgd", "ferro-adam"):
        oo, ro = make_optimizer(family, 2, 4), make_optimizer(family, 2, 4)

        def build(m, o):
            return m.SequentialLR(o, [m.LinearLR(o, 0.1, total_iters=20), m.CosineAnnealingLR(o, T_max=300), m.ExponentialLR(o, 0.99)], milestones=[20, 400])

        ours, ref = build(fls, oo), build(tls, ro)
        for i in range(1000):
            oo.step(), ro.step(), ours.step(), ref.step()
            assert_close_lists(ours.get_last_lr(), ref.get_last_lr(), f"sequential {i}")
        oo, ro = make_optimizer(family, 2, 4), make_optimizer(family, 2, 4)
        ours = fls.ChainedScheduler([fls.ConstantLR(oo, 0.5, 40), fls.ExponentialLR(oo, 0.995), fls.StepLR(oo, 100, 0.5)])
        ref = tls.ChainedScheduler([tls.ConstantLR(ro, 0.5, 40), tls.ExponentialLR(ro, 0.995), tls.StepLR(ro, 100, 0.5)])
        for i in range(1000):
            oo.step(), ro.step(), ours.step(), ref.step()
            assert_close_lists(ours.get_last_lr(), ref.get_last_lr(), f"chained {i}")


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


RESUMABLE = {
    "ConstantLR": lambda m, o: m.ConstantLR(o, factor=0.25, total_iters=150),
    "LinearLR": lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=300),
    "StepLR": lambda m, o: m.StepLR(o, 30, 0.5),
    "MultiStepLR": lambda m, o: m.MultiStepLR(o, [50, 120, 500], 0.3),
    "ExponentialLR": lambda m, o: m.ExponentialLR(o, 0.995),
    "PolynomialLR": lambda m, o: m.PolynomialLR(o, 600, 2.0),
    "CosineAnnealingLR": lambda m, o: m.CosineAnnealingLR(o, 200, 1e-4),
    "CosineAnnealingWarmRestarts": lambda m, o: m.CosineAnnealingWarmRestarts(o, 20, 2),
    "CyclicLR": lambda m, o: m.CyclicLR(o, 0.01, 0.1, 37),
    "OneCycleLR": lambda m, o: m.OneCycleLR(o, 0.1, total_steps=1000),
    "SequentialLR": lambda m, o: m.SequentialLR(o, [m.ConstantLR(o, 0.25, 80), m.LinearLR(o, 0.5, total_iters=90), m.CosineAnnealingLR(o, 400)], [100, 200]),
    "ChainedScheduler": lambda m, o: m.ChainedScheduler([m.ConstantLR(o, 0.5, 60), m.ExponentialLR(o, 0.999)]),
    "NoamLR": lambda m, o: fls.NoamLR(o, 64, 100),
    "LambdaLR": lambda m, o: m.LambdaLR(o, lambda e: 0.999**e),
    "MultiplicativeLR": lambda m, o: m.MultiplicativeLR(o, lambda e: 0.999),
    "WarmupThenCosine": lambda m, o: fls.SequentialLR(o, [fls.WarmupLR(o, 50, 0.1), m.CosineAnnealingLR(o, 900)], [50]),
    "WarmupLR": lambda m, o: fls.WarmupLR(o, 120, start_factor=0.1),
}


@pytest.mark.parametrize("family", ["torch-sgd", "ferro-adam"])
@pytest.mark.parametrize("name", list(RESUMABLE))
@pytest.mark.parametrize("order", ["scheduler-first", "optimizer-first"])
def test_resume_is_exact(name, family, order):
    """Checkpoint optimizer + scheduler at step k, rebuild both, keep stepping: the lrs equal
    the uninterrupted run (torch's own ConstantLR/LinearLR/SequentialLR fail this)."""
    k = random.Random(hash((name, family, order)) % 997).randint(1, 700)
    build = RESUMABLE[name]
    opt = make_optimizer(family, 2, 7)
    sched = build(fls, opt)
    full = []
    for i in range(1000):
        if i == k:
            ckpt = save_load({"opt": opt.state_dict(), "sched": sched.state_dict()})
        opt.step()
        sched.step()
        full.append(group_values(opt))
    opt2 = make_optimizer(family, 2, 7)
    if order == "optimizer-first":
        opt2.load_state_dict(ckpt["opt"])
        sched2 = build(fls, opt2)
    else:
        sched2 = build(fls, opt2)
        opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for i in range(k, 1000):
        opt2.step()
        sched2.step()
        assert_close_lists(group_values(opt2), full[i], f"{name} resumed at {k}, step {i}")


def test_torch_resume_bug_is_real_and_ours_is_fixed():
    """The reference: torch 2.13's ConstantLR rebuilt on a restored optimizer applies its
    factor again (0.025 instead of 0.1 at step 100)."""
    results = {}
    for m in (tls, fls):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        sched = m.ConstantLR(opt, factor=0.25, total_iters=50)
        for _ in range(100):
            opt.step()
            sched.step()
        ckpt = {"opt": copy.deepcopy(opt.state_dict()), "sched": sched.state_dict()}
        opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        opt2.load_state_dict(ckpt["opt"])
        sched2 = m.ConstantLR(opt2, factor=0.25, total_iters=50)
        sched2.load_state_dict(ckpt["sched"])
        opt2.step()
        sched2.step()
        results[m.__name__] = opt2.param_groups[0]["lr"]
    assert results["torch.optim.lr_scheduler"] == pytest.approx(0.025)
    assert results["ferrotorch.optim.lr_scheduler"] == pytest.approx(0.1)


def test_state_dicts_cross_load_between_torch_and_ferrotorch():
    for name in ["StepLR", "CosineAnnealingLR", "OneCycleLR", "CyclicLR", "LinearLR"]:
        build = RESUMABLE[name]
        to, fo = make_optimizer("torch-sgd", 2, 1), make_optimizer("torch-sgd", 2, 1)
        ts, fs = build(tls, to), build(fls, fo)
        for _ in range(77):
            to.step(), fo.step(), ts.step(), fs.step()
        assert set(ts.state_dict()) == set(fs.state_dict())
        fs.load_state_dict(save_load(ts.state_dict()))  # torch -> ferrotorch
        ts.load_state_dict(save_load(fs.state_dict()))  # ferrotorch -> torch
        for _ in range(50):
            to.step(), fo.step(), ts.step(), fs.step()
            assert_close_lists(ts.get_last_lr(), fs.get_last_lr(), name)


def test_warmup_in_front_of_reduce_on_plateau():
    """pytorch#68978: a warm-up phase, then ReduceLROnPlateau, in one SequentialLR."""
    opt = fopt.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    warm = fls.LinearLR(opt, start_factor=0.01, total_iters=5)
    plateau = fls.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    sched = fls.SequentialLR(opt, [warm, plateau], milestones=[5])
    lrs = [opt.param_groups[0]["lr"]]
    for epoch in range(12):
        opt.step()
        sched.step(1.0)  # a flat metric: the plateau phase halves the lr every 2 bad epochs
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.001)
    assert lrs[5] == pytest.approx(0.1)  # warm-up done
    assert lrs[-1] < 0.1 / 4
    with pytest.raises(TypeError, match="pass the metric"):
        sched.step()
    with pytest.raises(ValueError):
        tls.SequentialLR(opt, [tls.LinearLR(opt), tls.ReduceLROnPlateau(opt)], milestones=[5])


def test_noam_and_warmup_lr_against_lambdalr():
    d, w = 512, 400
    oo, ro = make_optimizer("torch-adam", 1, 0), make_optimizer("torch-adam", 1, 0)
    ours = fls.NoamLR(oo, d_model=d, warmup_steps=w)
    ref = tls.LambdaLR(ro, lambda e: d**-0.5 * min((e + 1) ** -0.5, (e + 1) * w**-1.5))
    for i in range(2000):
        oo.step(), ro.step(), ours.step(), ref.step()
        assert_close_lists(ours.get_last_lr(), ref.get_last_lr(), f"noam {i}")
    oo, ro = make_optimizer("torch-adam", 2, 0), make_optimizer("torch-adam", 2, 0)
    ours = fls.WarmupLR(oo, warmup_steps=50, start_factor=0.2)
    ref = tls.LambdaLR(ro, lambda e: 1.0 if e >= 50 else 0.2 + (1.0 - 0.2) * e / 50)
    for i in range(100):
        oo.step(), ro.step(), ours.step(), ref.step()
        assert_close_lists(ours.get_last_lr(), ref.get_last_lr(), f"warmup {i}")


def test_lr_curve_leaves_everything_untouched():
    opt = make_optimizer("ferro-sgd", 2, 0)
    sched = fls.OneCycleLR(opt, max_lr=0.1, total_steps=300)
    before = copy.deepcopy(opt.param_groups[0]["lr"]), sched.last_epoch
    curve = sched.lr_curve(300)
    mom = sched.lr_curve(300, key="momentum")
    assert curve.shape == (300, 2) and mom.shape == (300, 2)
    assert (opt.param_groups[0]["lr"], sched.last_epoch) == before
    # The curve is what stepping produces.
    seen = []
    for _ in range(300):
        seen.append(group_values(opt)[0])
        opt.step()
        sched.step()
    assert_close_lists(curve[:, 0].tolist(), seen, "curve")
    plateau = fls.ReduceLROnPlateau(make_optimizer("torch-sgd", 1, 0), patience=0)
    with pytest.raises(TypeError, match="metric"):
        plateau.lr_curve(5)
    assert plateau.lr_curve(3, metrics=[1.0, 1.0, 1.0])[-1, 0] < 0.1 * 1.0001


@pytest.mark.parametrize(
    "build,err,match",
    [
        (lambda o: fls.StepLR(object(), 3), TypeError, "is not an Optimizer"),
        (lambda o: fls.ConstantLR(o, factor=1.5), ValueError, "between 0 and 1"),
        (lambda o: fls.LinearLR(o, start_factor=0.0), ValueError, "greater than 0"),
        (lambda o: fls.OneCycleLR(o, 0.1, total_steps=10, pct_start=1.5), ValueError, "pct_start"),
        (lambda o: fls.OneCycleLR(o, 0.1, total_steps=0), ValueError, "total_steps"),
        (lambda o: fls.CosineAnnealingWarmRestarts(o, T_0=0), ValueError, "T_0"),
        (lambda o: fls.ReduceLROnPlateau(o, factor=1.0), ValueError, "Factor should be < 1.0"),
        (lambda o: fls.ReduceLROnPlateau(o, mode="up"), ValueError, "mode up is unknown"),
        (lambda o: fls.CyclicLR(o, 0.1, 1.0, mode="zigzag"), ValueError, "mode is invalid"),
        (lambda o: fls.NoamLR(o, 0, 10), ValueError, "d_model"),
        (lambda o: fls.WarmupLR(o, -3), ValueError, "warmup_steps"),
    ],
)
def test_bad_arguments_raise_like_torch(build, err, match):
    opt = make_optimizer("torch-sgd", 1, 0)
    with pytest.raises(err, match=match):
        build(opt)


def test_one_cycle_past_total_steps_raises_torchs_error():
    opt = make_optimizer("torch-sgd", 1, 0)
    ours = fls.OneCycleLR(opt, 0.1, total_steps=5)
    for _ in range(4):
        ours.step()
    with pytest.raises(ValueError, match="Tried to step 6 times. The specified number of total steps is 5"):
        ours.step()
        ours.step()


def test_state_dict_of_another_class_is_rejected():
    opt = make_optimizer("torch-sgd", 1, 0)
    step_state = tls.StepLR(opt, 3).state_dict()
    with pytest.raises(ValueError, match="not written by a CosineAnnealingLR"):
        fls.CosineAnnealingLR(opt, 10).load_state_dict(step_state)
    with pytest.raises(ValueError, match="2 learning rates, the optimizer has 1"):
        bad = fls.StepLR(opt, 3).state_dict()
        bad["_last_lr"] = [0.1, 0.2]
        fls.StepLR(opt, 3).load_state_dict(bad)


def test_plateau_resume_is_exact():
    rng = random.Random(11)
    metrics = [1.0 + rng.gauss(0, 0.05) + (0.01 * (i % 40)) for i in range(600)]
    opt = make_optimizer("ferro-sgd", 2, 3)
    sched = fls.ReduceLROnPlateau(opt, patience=2, cooldown=1, factor=0.7)
    full = []
    for i, m in enumerate(metrics):
        if i == 250:
            ckpt = save_load({"opt": opt.state_dict(), "sched": sched.state_dict()})
        sched.step(m)
        full.append(group_values(opt))
    opt2 = make_optimizer("ferro-sgd", 2, 3)
    sched2 = fls.ReduceLROnPlateau(opt2, patience=2, cooldown=1, factor=0.7)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    for i in range(250, 600):
        sched2.step(metrics[i])
        assert group_values(opt2) == full[i]


def test_sequential_milestones_must_increase():
    opt = make_optimizer("torch-sgd", 1, 0)
    with pytest.raises(ValueError, match="strictly increasing"):
        fls.SequentialLR(opt, [fls.ConstantLR(opt), fls.ExponentialLR(opt, 0.9), fls.StepLR(opt, 3)], milestones=[10, 5])


TENSOR_LR_SCHEDULES = {
    "StepLR": lambda m, o: m.StepLR(o, 2, 0.7),
    "MultiStepLR": lambda m, o: m.MultiStepLR(o, [2, 5], 0.3),
    "ConstantLR": lambda m, o: m.ConstantLR(o, 0.37, 4),
    "LinearLR": lambda m, o: m.LinearLR(o, 0.13, 0.9, 6),
    "ExponentialLR": lambda m, o: m.ExponentialLR(o, 0.93),
    "PolynomialLR": lambda m, o: m.PolynomialLR(o, 7, 1.7),
    "CosineAnnealingLR": lambda m, o: m.CosineAnnealingLR(o, 7, 1e-4),
    "CosineAnnealingWarmRestarts": lambda m, o: m.CosineAnnealingWarmRestarts(o, 3, 2, 1e-4),
    "CyclicLR": lambda m, o: m.CyclicLR(o, 0.001, 0.1, 3, cycle_momentum=False),
    "OneCycleLR": lambda m, o: m.OneCycleLR(o, 0.1, total_steps=20, cycle_momentum=False),
    "LambdaLR": lambda m, o: m.LambdaLR(o, lambda e: 0.9**e),
    "MultiplicativeLR": lambda m, o: m.MultiplicativeLR(o, lambda e: 0.91),
    "ReduceLROnPlateau": lambda m, o: m.ReduceLROnPlateau(o, patience=0, factor=0.37),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(TENSOR_LR_SCHEDULES))
def test_tensor_lrs_follow_torch_bit_for_bit(name, dtype):
    """``lr=torch.tensor(...)`` (torch.compile's recipe): torch's chained formulas run in the
    tensor's dtype (float32 by default); ours must give the same numbers, not f64 ones."""

    def run(sched_mod, optim_mod):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = optim_mod.SGD([p], lr=torch.tensor(0.0123456789, dtype=dtype))
        sched = TENSOR_LR_SCHEDULES[name](sched_mod, opt)
        seen = []
        for _ in range(15):
            opt.step()
            sched.step(1.0) if name == "ReduceLROnPlateau" else sched.step()
            lr = opt.param_groups[0]["lr"]
            assert isinstance(lr, torch.Tensor) and lr.dtype == dtype
            seen.append(lr.item())
        return seen

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run(fls, fopt) == run(tls, torch.optim)
