"""ferrotorch.optim.swa_utils.SWALR against torch.optim.swa_utils.SWALR: the same lrs bit for
bit over random configurations (strategy, anneal length, per-group swa_lr, a schedule
before it, tensor lrs), the same errors and warnings, and state dicts that move both ways."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.optim.swa_utils as tswa
from torch.optim import lr_scheduler as tls

import ferrotorch.optim as fopt
from ferrotorch.optim import lr_scheduler as fls
from ferrotorch.optim import swa_utils as fswa


def _opt(mod, lrs, tensor_lr=False):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    groups = [{"params": [p], "lr": torch.tensor(lr) if tensor_lr else lr} for p, lr in zip(params, lrs)]
    return mod.SGD(groups, lr=0.1)


def _run(opt_mod, swa_mod, sched_mod, cfg, steps):
    opt = _opt(opt_mod, cfg["lrs"], cfg["tensor_lr"])
    pre = sched_mod.ExponentialLR(opt, gamma=cfg["gamma"])
    for _ in range(cfg["pre_steps"]):
        opt.step()
        pre.step()
    swa = swa_mod.SWALR(opt, swa_lr=cfg["swa_lr"], anneal_epochs=cfg["anneal_epochs"], anneal_strategy=cfg["strategy"])
    seen = [[float(g["lr"]) for g in opt.param_groups]]
    for _ in range(steps):
        opt.step()
        swa.step()
        seen.append([float(g["lr"]) for g in opt.param_groups])
    return seen, swa.get_last_lr()


def _configs(n):
    rng = random.Random(0)
    for _ in range(n):
        groups = rng.randint(1, 3)
        lrs = [10 ** rng.uniform(-4, 0) for _ in range(groups)]
        swa_lr = [10 ** rng.uniform(-5, -1) for _ in range(groups)] if rng.random() < 0.5 else 10 ** rng.uniform(-5, -1)
        yield {
            "lrs": lrs,
            "swa_lr": swa_lr,
            "anneal_epochs": rng.choice([0, 1, 2, 3, 7, 25]),
            "strategy": rng.choice(["cos", "linear"]),
            "gamma": rng.uniform(0.5, 1.0),
            "pre_steps": rng.randint(0, 4),
            "tensor_lr": rng.random() < 0.2,
        }


@pytest.mark.parametrize("cfg", list(_configs(40)), ids=lambda c: f"{c['strategy']}-{c['anneal_epochs']}-{len(c['lrs'])}")
def test_lrs_equal_torchs_bit_for_bit(cfg):
    ours, ours_last = _run(fopt, fswa, fls, cfg, 40)
    ref, ref_last = _run(torch.optim, tswa, tls, cfg, 40)
    assert ours == ref
    assert [float(v) for v in ours_last] == [float(v) for v in ref_last]


def test_is_torchs_class_and_names_swa_lr_in_the_groups():
    opt = _opt(fopt, [0.1, 0.2])
    s = fswa.SWALR(opt, swa_lr=[0.01, 0.02])
    assert isinstance(s, tswa.SWALR) and isinstance(s, tls.LRScheduler)
    assert [g["swa_lr"] for g in opt.param_groups] == [0.01, 0.02]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"swa_lr": 0.1, "anneal_strategy": "step"},
        {"swa_lr": 0.1, "anneal_epochs": -1},
        {"swa_lr": 0.1, "anneal_epochs": 2.5},
        {"swa_lr": [0.1, 0.2, 0.3]},
    ],
)
def test_errors_are_torchs(kwargs):
    with pytest.raises(Exception) as ref:
        tswa.SWALR(_opt(torch.optim, [0.1, 0.2]), **kwargs)
    with pytest.raises(type(ref.value)) as ours:
        fswa.SWALR(_opt(fopt, [0.1, 0.2]), **kwargs)
    assert str(ours.value) == str(ref.value)


def test_verbose_is_refused_as_torch_refuses_it():
    # SWALR never took ``verbose``; the other schedulers' compatibility shim must not add it.
    with pytest.raises(TypeError):
        tswa.SWALR(_opt(torch.optim, [0.1]), 0.05, 10, "cos", -1, True)
    with pytest.raises(TypeError):
        fswa.SWALR(_opt(fopt, [0.1]), 0.05, 10, "cos", -1, True)
    with pytest.raises(TypeError):
        fswa.SWALR(_opt(fopt, [0.1]), 0.05, verbose=True)


def test_get_lr_outside_step_warns_like_torch():
    s = fswa.SWALR(_opt(fopt, [0.1]), swa_lr=0.05)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        s.get_lr()
    assert any("get_last_lr()" in str(x.message) for x in w)


def test_an_anneal_function_of_the_users_own_is_honoured():
    def run(swa_mod, opt_mod):
        opt = _opt(opt_mod, [0.3])
        s = swa_mod.SWALR(opt, swa_lr=0.01, anneal_epochs=5)
        s.anneal_func = lambda t: t**2
        out = []
        for _ in range(8):
            opt.step()
            s.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    assert run(fswa, fopt) == run(tswa, torch.optim)


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_moves_both_ways_mid_anneal(direction):
    src_mods, dst_mods = (torch.optim, tswa), (fopt, fswa)
    if direction == "ours_to_torch":
        src_mods, dst_mods = dst_mods, src_mods
    opt = _opt(src_mods[0], [0.2, 0.1])
    s = src_mods[1].SWALR(opt, swa_lr=[0.02, 0.03], anneal_epochs=6, anneal_strategy="linear")
    for _ in range(3):
        opt.step()
        s.step()
    osd, ssd = opt.state_dict(), s.state_dict()
    expect = []
    for _ in range(5):
        opt.step()
        s.step()
        expect.append([g["lr"] for g in opt.param_groups])

    opt2 = _opt(dst_mods[0], [0.2, 0.1])
    s2 = dst_mods[1].SWALR(opt2, swa_lr=[0.02, 0.03], anneal_epochs=6, anneal_strategy="linear")
    opt2.load_state_dict(osd)
    s2.load_state_dict(ssd)
    got = []
    for _ in range(5):
        opt2.step()
        s2.step()
        got.append([g["lr"] for g in opt2.param_groups])
    assert got == expect


def test_lr_curve_leaves_the_optimizer_alone():
    opt = _opt(fopt, [0.5])
    s = fswa.SWALR(opt, swa_lr=0.05, anneal_epochs=4, anneal_strategy="linear")
    curve = s.lr_curve(6)
    assert opt.param_groups[0]["lr"] == 0.5
    real = []
    for _ in range(6):
        real.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert curve[:, 0].tolist() == real
