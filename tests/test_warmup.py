"""Warm-up against the real pytorch_warmup package, and transformers-style schedules
against Hugging Face transformers' own get_*_schedule functions."""

from __future__ import annotations


import pytest
import torch
from torch.optim import lr_scheduler as tls

import ferrotorch.optim as fopt
from ferrotorch.optim import lr_scheduler as fls
from ferrotorch.optim import warmup as fwarm

pytorch_warmup = pytest.importorskip("pytorch_warmup")


def optimizer(family: str, groups: int = 2):
    params = [{"params": [torch.zeros(2, requires_grad=True)], "lr": 0.1 * (i + 1), "betas": (0.9, [0.999, 0.99, 0.98][i % 3])} for i in range(groups)]
    if family == "torch":
        return torch.optim.AdamW(params, lr=0.1)
    return fopt.AdamW(params, lr=0.1)


WARMUPS = {
    "LinearWarmup": dict(warmup_period=50),
    "ExponentialWarmup": dict(warmup_period=30),
    "UntunedLinearWarmup": {},
    "UntunedExponentialWarmup": {},
    "RAdamWarmup": {},
}
CHAINS = {
    "none": None,
    "StepLR": lambda m, o: m.StepLR(o, step_size=40, gamma=0.5),
    "ExponentialLR": lambda m, o: m.ExponentialLR(o, gamma=0.995),
    "CosineAnnealingLR": lambda m, o: m.CosineAnnealingLR(o, T_max=500),
}


@pytest.mark.parametrize("family", ["torch", "ferro"])
@pytest.mark.parametrize("chain", list(CHAINS))
@pytest.mark.parametrize("name", list(WARMUPS))
def test_same_lrs_as_pytorch_warmup(name, chain, family):
    oo, ro = optimizer(family), optimizer(family)
    so = CHAINS[chain](fls, oo) if CHAINS[chain] else None
    sr = CHAINS[chain](tls, ro) if CHAINS[chain] else None
    wo = getattr(fwarm, name)(oo, **WARMUPS[name])
    wr = getattr(pytorch_warmup, name)(ro, **WARMUPS[name])
    for step in range(600):
        oo.step()
        ro.step()
        with wo.dampening():
            if so:
                so.step()
        with wr.dampening():
            if sr:
                sr.step()
        a = [g["lr"] for g in oo.param_groups]
        b = [g["lr"] for g in ro.param_groups]
        assert a == pytest.approx(b, rel=1e-12, abs=0), f"{name}+{chain} step {step}"
        assert wo.last_step == wr.last_step
    assert set(wo.state_dict()) == set(wr.state_dict())


def test_seed_loop_delays_scheduler_until_warmup_ends():
    """Seed 001's pattern: step the scheduler only once the warm-up period has passed."""
    warmup_period = 20
    runs = []
    for mod, wmod in ((fls, fwarm), (tls, pytorch_warmup)):
        opt = fopt.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
        sched = mod.StepLR(opt, step_size=10, gamma=0.5)
        warm = wmod.LinearWarmup(opt, warmup_period)
        lrs = []
        for _ in range(100):
            opt.step()
            with warm.dampening():
                if warm.last_step + 1 >= warmup_period:
                    sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        runs.append(lrs)
    assert runs[0] == pytest.approx(runs[1], rel=1e-12)


def test_state_dict_resume():
    opt = optimizer("ferro")
    warm = fwarm.RAdamWarmup(opt)
    for _ in range(37):
        with warm.dampening():
            pass
    state = warm.state_dict()
    opt2 = optimizer("ferro")
    warm2 = fwarm.RAdamWarmup(opt2)
    warm2.load_state_dict(state)
    for _ in range(10):
        with warm.dampening():
            pass
        with warm2.dampening():
            pass
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


@pytest.mark.parametrize(
    "call,err",
    [
        (lambda o: fwarm.LinearWarmup(o, warmup_period=0), "warmup_period must be a positive integer, but is 0."),
        (lambda o: fwarm.LinearWarmup(o, warmup_period=[5]), "The size of warmup_period (1) does not match the size of param_groups (2)."),
        (lambda o: fwarm.LinearWarmup(o, warmup_period=[5, 2.0]), "An element in warmup_period, float, is not an int."),
        (lambda o: fwarm.LinearWarmup(o, warmup_period="10"), "10 (str) is not a list nor an int."),
        (lambda o: fwarm.LinearWarmup(object(), warmup_period=3), None),
    ],
)
def test_error_texts_match_pytorch_warmup(call, err):
    opt = optimizer("ferro")
    with pytest.raises((TypeError, ValueError)) as ours:
        call(opt)
    ref_call = {
        "warmup_period must be a positive integer, but is 0.": lambda o: pytorch_warmup.LinearWarmup(o, warmup_period=0),
        "The size of warmup_period (1) does not match the size of param_groups (2).": lambda o: pytorch_warmup.LinearWarmup(o, warmup_period=[5]),
        "An element in warmup_period, float, is not an int.": lambda o: pytorch_warmup.LinearWarmup(o, warmup_period=[5, 2.0]),
        "10 (str) is not a list nor an int.": lambda o: pytorch_warmup.LinearWarmup(o, warmup_period="10"),
        None: lambda o: pytorch_warmup.LinearWarmup(object(), warmup_period=3),
    }[err]
    with pytest.raises((TypeError, ValueError)) as ref:
        ref_call(opt)
    assert type(ours.value) is type(ref.value) and str(ours.value).split(" at 0x")[0].split("object")[-1] == str(ref.value).split(" at 0x")[0].split("object")[-1]


def test_radam_warmup_rejects_small_beta2_like_pytorch_warmup():
    opt = fopt.Adam([torch.zeros(1, requires_grad=True)], betas=(0.9, 0.5))
    with pytest.raises(ValueError) as ours:
        fwarm.RAdamWarmup(opt)
    with pytest.raises(ValueError) as ref:
        pytorch_warmup.RAdamWarmup(opt)
    assert str(ours.value) == str(ref.value)


# ---- pytorch_warmup 0.2.0's functions and warmup_factor signatures (issue #12) --------------

BETA2S = [0.6000001, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999]


def test_module_exports_every_pytorch_warmup_name():
    assert set(pytorch_warmup.__all__) <= set(fwarm.__all__)
    for name in pytorch_warmup.__all__:
        assert callable(getattr(fwarm, name)), name


@pytest.mark.parametrize("beta2", BETA2S)
def test_radam_helpers_equal_pytorch_warmup(beta2):
    rho_inf = fwarm.rho_inf_fn(beta2)
    assert rho_inf == pytorch_warmup.rho_inf_fn(beta2)
    for t in list(range(1, 60)) + [100, 1000, 10_000]:
        assert fwarm.rho_fn(t, beta2, rho_inf) == pytorch_warmup.rho_fn(t, beta2, rho_inf)
        # rho_inf need not be rho_inf_fn(beta2): the functions take it as given.
        assert fwarm.rho_fn(t, beta2, rho_inf + 3.5) == pytorch_warmup.rho_fn(t, beta2, rho_inf + 3.5)
    assert fwarm.get_offset(beta2, rho_inf) == pytorch_warmup.get_offset(beta2, rho_inf)
    assert fwarm.get_offset(beta2=beta2, rho_inf=rho_inf + 2) == pytorch_warmup.get_offset(beta2=beta2, rho_inf=rho_inf + 2)
    # RAdamWarmup's parameters are built from these.
    opt = fopt.Adam([torch.zeros(1, requires_grad=True)], betas=(0.9, beta2))
    assert fwarm.RAdamWarmup(opt).warmup_params == pytorch_warmup.RAdamWarmup(opt).warmup_params


@pytest.mark.parametrize("beta2", [0.6, 0.5, 0.0])
def test_get_offset_rejects_small_beta2_like_pytorch_warmup(beta2):
    with pytest.raises(ValueError) as ref:
        pytorch_warmup.get_offset(beta2, 5.0)
    with pytest.raises(ValueError) as ours:
        fwarm.get_offset(beta2, 5.0)
    assert str(ours.value) == str(ref.value)


@pytest.mark.parametrize("name", list(WARMUPS))
def test_warmup_factor_takes_pytorch_warmups_arguments(name):
    wo = getattr(fwarm, name)(optimizer("ferro"), **WARMUPS[name])
    wr = getattr(pytorch_warmup, name)(optimizer("torch"), **WARMUPS[name])
    for params in wr.warmup_params:
        for step in [0, 1, 2, 5, 17, 49, 50, 51, 300, 5000]:
            ref = wr.warmup_factor(step, **params)
            assert wo.warmup_factor(step, **params) == pytest.approx(ref, rel=1e-14, abs=0)
            # positionally, in the order of the signature (step, warmup_period) / (step, beta2, rho_inf, offset)
            assert wo.warmup_factor(step, *params.values()) == pytest.approx(wr.warmup_factor(step, *params.values()), rel=1e-14, abs=0)
    if name in ("LinearWarmup", "ExponentialWarmup"):
        for period in (1, 7, 2000):
            for step in (0, 3, 6, 1999, 2000):
                assert wo.warmup_factor(step, period) == pytest.approx(wr.warmup_factor(step, period), rel=1e-14, abs=0)


def test_base_warmup_raises_not_implemented_like_pytorch_warmup():
    for mod in (pytorch_warmup, fwarm):
        opt = optimizer("ferro")
        with pytest.raises(NotImplementedError):
            mod.BaseWarmup(opt, [dict(warmup_period=3)] * 2)
        lrs = [g["lr"] for g in opt.param_groups]
        with pytest.raises(NotImplementedError):
            mod.BaseWarmup.warmup_factor(object(), 0, warmup_period=3)
        assert [g["lr"] for g in opt.param_groups] == lrs


def test_seed_style_subclass_of_base_warmup_runs_the_same():
    """Seed 001 shows BaseWarmup's source; a user's own subclass works on ours as on theirs."""
    from pytorch_warmup.base import get_warmup_params as ref_params

    def make(base, get_params):
        class SquareWarmup(base):
            def __init__(self, optimizer, warmup_period, last_step=-1):
                super().__init__(optimizer, get_params(warmup_period, len(optimizer.param_groups)), last_step)

            def warmup_factor(self, step, warmup_period):
                return min(1.0, ((step + 1) / warmup_period) ** 2)

        return SquareWarmup

    runs = []
    for base, get_params, sched_mod in ((fwarm.BaseWarmup, fwarm.get_warmup_params, fls), (pytorch_warmup.BaseWarmup, ref_params, tls)):
        opt = optimizer("ferro")
        sched = sched_mod.CosineAnnealingLR(opt, T_max=80)
        warm = make(base, get_params)(opt, [10, 25])
        lrs = []
        for _ in range(60):
            opt.step()
            with warm.dampening():
                sched.step()
            lrs.extend(g["lr"] for g in opt.param_groups)
        runs.append(lrs)
    assert runs[0] == pytest.approx(runs[1], rel=1e-12)


transformers_opt = pytest.importorskip("transformers.optimization")

HF = {
    "get_constant_schedule_with_warmup": dict(num_warmup_steps=37),
    "get_linear_schedule_with_warmup": dict(num_warmup_steps=50, num_training_steps=700),
    "get_cosine_schedule_with_warmup": dict(num_warmup_steps=50, num_training_steps=700, num_cycles=0.7),
    "get_cosine_with_hard_restarts_schedule_with_warmup": dict(num_warmup_steps=20, num_training_steps=700, num_cycles=3),
    "get_polynomial_decay_schedule_with_warmup": dict(num_warmup_steps=40, num_training_steps=650, lr_end=1e-4, power=2.0),
    "get_inverse_sqrt_schedule": dict(num_warmup_steps=60),
    "get_cosine_with_min_lr_schedule_with_warmup": dict(num_warmup_steps=30, num_training_steps=700, min_lr=1e-3),
    "get_wsd_schedule": dict(num_warmup_steps=30, num_decay_steps=200, num_training_steps=700, warmup_type="cosine", decay_type="1-sqrt", min_lr_ratio=0.05),
    "get_constant_schedule": {},
}


@pytest.mark.parametrize("name", list(HF))
def test_transformers_schedules_equal_hugging_face(name):
    oo, ro = optimizer("ferro"), optimizer("torch")
    ours = getattr(fls, name)(oo, **HF[name])
    ref = getattr(transformers_opt, name)(ro, **HF[name])
    for step in range(800):
        assert ours.get_last_lr() == pytest.approx(ref.get_last_lr(), rel=1e-12, abs=1e-15), f"{name} step {step}"
        oo.step(), ro.step(), ours.step(), ref.step()
    for wt in ("linear", "1-sqrt"):
        oo, ro = optimizer("ferro"), optimizer("torch")
        kw = dict(num_warmup_steps=10, num_decay_steps=50, num_stable_steps=40, warmup_type=wt, decay_type=wt)
        ours, ref = fls.get_wsd_schedule(oo, **kw), transformers_opt.get_wsd_schedule(ro, **kw)
        for _ in range(120):
            assert ours.get_last_lr() == pytest.approx(ref.get_last_lr(), rel=1e-12, abs=1e-15)
            oo.step(), ro.step(), ours.step(), ref.step()
