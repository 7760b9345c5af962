"""``verbose``, which torch <= 2.6 schedulers took and torch 2.13 refuses (seeds 000 and 001
write ``ReduceLROnPlateau(..., verbose=True)``): ferrotorch accepts it with torch's
deprecation warning and prints the lr changes in torch 2.1's words. The lrs are checked
against torch 2.13's schedulers (without verbose); the expected messages are built from
torch's lrs with torch 2.1's format strings (``LRScheduler.print_lr`` and
``ReduceLROnPlateau._reduce_lr``)."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as tls

import ferrotorch.optim as fopt
from ferrotorch.optim import lr_scheduler as fls

DEPRECATED = re.escape("The verbose parameter is deprecated. Please use get_last_lr() to access the learning rate.")

# Every torch.optim.lr_scheduler class whose torch 2.1 constructor took verbose.
CASES = {
    "LambdaLR": dict(lr_lambda=lambda e: 0.9**e),
    "MultiplicativeLR": dict(lr_lambda=lambda e: 0.95),
    "StepLR": dict(step_size=3, gamma=0.5),
    "MultiStepLR": dict(milestones=[2, 5], gamma=0.1),
    "ConstantLR": dict(factor=0.5, total_iters=4),
    "LinearLR": dict(start_factor=0.25, total_iters=5),
    "ExponentialLR": dict(gamma=0.9),
    "PolynomialLR": dict(total_iters=6, power=2.0),
    "CosineAnnealingLR": dict(T_max=7, eta_min=1e-3),
    "CyclicLR": dict(base_lr=0.01, max_lr=0.1, step_size_up=3),
    "OneCycleLR": dict(max_lr=0.1, total_steps=12),
    "CosineAnnealingWarmRestarts": dict(T_0=3, T_mult=2),
}
STEPS = 11


def epoch_str(epoch):
    # torch 2.1: ("%.2f" if isinstance(epoch, float) else "%.5d") % epoch
    return ("%.2f" if isinstance(epoch, float) else "%.5d") % epoch


def adjusting(lrs, epoch=None):
    if epoch is None:
        return [f"Adjusting learning rate of group {i} to {lr:.4e}." for i, lr in enumerate(lrs)]
    return [f"Epoch {epoch_str(epoch)}: adjusting learning rate of group {i} to {lr:.4e}." for i, lr in enumerate(lrs)]


def make_opt(mod):
    params = [{"params": [torch.zeros(2, requires_grad=True)], "lr": 0.1}, {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.05}]
    return mod.SGD(params, lr=0.1, momentum=0.9)


def positional(cls, opt, kw, verbose):
    """The constructor's arguments in torch's order, verbose last (torch <= 2.6's place)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return (opt, *[kw.get(p.name, p.default) for p in params], verbose)


def lrs_of(opt):
    return [float(g["lr"]) for g in opt.param_groups]


@pytest.mark.parametrize("form", ["keyword", "positional"])
@pytest.mark.parametrize("name", list(CASES))
def test_verbose_warns_and_prints_like_torch_2_1(name, form, capsys):
    ref_opt = make_opt(torch.optim)
    ref = getattr(tls, name)(ref_opt, **CASES[name])
    expected_lrs = [lrs_of(ref_opt)]
    for _ in range(STEPS):
        ref_opt.step()
        ref.step()
        expected_lrs.append(lrs_of(ref_opt))

    opt = make_opt(fopt)
    cls = getattr(fls, name)
    with pytest.warns(UserWarning, match=DEPRECATED) as record:
        if form == "keyword":
            sched = cls(opt, **CASES[name], verbose=True)
        else:
            sched = cls(*positional(getattr(tls, name), opt, CASES[name], True))
    assert record[0].filename == __file__  # points at the caller, as a deprecation should
    got_lrs = [lrs_of(opt)]
    for _ in range(STEPS):
        opt.step()
        sched.step()
        got_lrs.append(lrs_of(opt))
    np.testing.assert_allclose(got_lrs, expected_lrs, rtol=1e-12, atol=0)

    lines = capsys.readouterr().out.splitlines()
    if name == "CosineAnnealingWarmRestarts":  # its own step() printed the epoch it reached
        want = [line for e, lrs in enumerate(expected_lrs) for line in adjusting(lrs, e)]
    else:  # LRScheduler.step(): every step, the initial one included
        want = [line for lrs in expected_lrs for line in adjusting(lrs)]
    assert lines == want


@pytest.mark.parametrize("name", list(CASES) + ["ReduceLROnPlateau"])
def test_verbose_false_warns_silently_and_default_does_neither(name, capsys, recwarn):
    kw = CASES.get(name, {})
    opt = make_opt(fopt)
    with pytest.warns(UserWarning, match=DEPRECATED):
        s = getattr(fls, name)(opt, **kw, verbose=False)
    opt2 = make_opt(fopt)
    recwarn.clear()
    s2 = getattr(fls, name)(opt2, **kw)
    assert not [w for w in recwarn if "verbose" in str(w.message)]
    assert "verbose" not in s2.state_dict()  # default: the same state keys as torch's
    for _ in range(4):
        opt.step(), opt2.step()
        if name == "ReduceLROnPlateau":
            s.step(1.0), s2.step(1.0)
        else:
            s.step(), s2.step()
    assert capsys.readouterr().out == ""


def plateau_lines(lr_history):
    """torch 2.1's ReduceLROnPlateau._reduce_lr message for every reduction in a history
    of (epoch, lrs before, lrs after)."""
    return [
        f"Epoch {epoch_str(epoch)}: reducing learning rate of group {i} to {after[i]:.4e}."
        for epoch, before, after in lr_history
        for i in range(len(before))
        if after[i] != before[i]
    ]


@pytest.mark.parametrize("form", ["keyword", "positional"])
def test_reduce_lr_on_plateau_verbose(form, capsys):
    metrics = [1.0, 0.9, 0.95, 0.97, 0.99, 0.98, 0.97, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7, 0.7]
    kw = dict(mode="min", factor=0.5, patience=2, cooldown=1, min_lr=[0.0, 0.02])
    ref_opt = make_opt(torch.optim)
    ref = tls.ReduceLROnPlateau(ref_opt, **kw)
    history = []
    for epoch, m in enumerate(metrics, start=1):
        before = lrs_of(ref_opt)
        ref.step(m)
        history.append((epoch, before, lrs_of(ref_opt)))

    opt = make_opt(fopt)
    with pytest.warns(UserWarning, match=DEPRECATED):
        if form == "keyword":
            sched = fls.ReduceLROnPlateau(opt, **kw, verbose=True)
        else:
            sched = fls.ReduceLROnPlateau(*positional(tls.ReduceLROnPlateau, opt, kw, True))
    got = []
    for m in metrics:
        sched.step(m)
        got.append(lrs_of(opt))
    assert got == [after for _, _, after in history]
    assert any(b != a for _, b, a in history)  # the test does reduce
    assert capsys.readouterr().out.splitlines() == plateau_lines(history)


def test_plateau_epoch_argument_is_printed_as_torch_2_1_did(capsys):
    opt = make_opt(fopt)
    with pytest.warns(UserWarning):
        sched = fls.ReduceLROnPlateau(opt, patience=0, verbose=True)
    ref_opt = make_opt(torch.optim)
    ref = tls.ReduceLROnPlateau(ref_opt, patience=0)
    history = []
    for epoch, m in [(1, 1.0), (2, 2.0), (3.5, 3.0)]:
        before = lrs_of(ref_opt)
        with pytest.warns(UserWarning, match="epoch parameter"):
            ref.step(m, epoch)
        with pytest.warns(UserWarning, match="epoch parameter"):
            sched.step(m, epoch)
        history.append((epoch, before, lrs_of(ref_opt)))
        assert lrs_of(opt) == lrs_of(ref_opt)
    assert capsys.readouterr().out.splitlines() == plateau_lines(history)


def test_sequential_lr_takes_verbose_and_members_print(capsys):
    ref_opt = make_opt(torch.optim)
    ref = tls.SequentialLR(ref_opt, [tls.LinearLR(ref_opt, 0.1, total_iters=3), tls.ExponentialLR(ref_opt, 0.9)], milestones=[3])
    ref_lrs = [lrs_of(ref_opt)]
    for _ in range(6):
        ref_opt.step(), ref.step()
        ref_lrs.append(lrs_of(ref_opt))

    opt = make_opt(fopt)
    warm = fls.LinearLR(opt, 0.1, total_iters=3)
    with pytest.warns(UserWarning, match=DEPRECATED):
        decay = fls.ExponentialLR(opt, 0.9, verbose=True)
    capsys.readouterr()
    with pytest.warns(UserWarning, match=DEPRECATED):
        sched = fls.SequentialLR(opt, [warm, decay], milestones=[3], verbose=True)
    lrs = [lrs_of(opt)]
    for _ in range(6):
        opt.step(), sched.step()
        lrs.append(lrs_of(opt))
    np.testing.assert_allclose(lrs, ref_lrs, rtol=1e-12, atol=0)
    # torch 2.1: SequentialLR itself printed nothing; the ExponentialLR member printed its
    # restart at the milestone (step(0): "Epoch 00000") and its later steps.
    want = adjusting(ref_lrs[3], 0) + [line for l in ref_lrs[4:] for line in adjusting(l)]
    assert capsys.readouterr().out.splitlines() == want


def test_lr_curve_of_a_verbose_scheduler_prints_nothing(capsys):
    opt = make_opt(fopt)
    with pytest.warns(UserWarning):
        sched = fls.CosineAnnealingLR(opt, T_max=10, verbose=True)
    capsys.readouterr()
    ref_opt = make_opt(torch.optim)
    ref = tls.CosineAnnealingLR(ref_opt, T_max=10)
    want = []
    for _ in range(5):
        want.append(lrs_of(ref_opt))
        ref_opt.step(), ref.step()
    np.testing.assert_allclose(sched.lr_curve(5), want, rtol=1e-12, atol=0)
    assert capsys.readouterr().out == ""


def test_too_many_positional_arguments_still_fail():
    opt = make_opt(fopt)
    with pytest.raises(TypeError):
        fls.StepLR(opt, 2, 0.5, -1, True, "extra")
    with pytest.raises(TypeError):
        fls.ChainedScheduler([fls.StepLR(opt, 2)], opt, True)  # never took verbose


# ---- the seeds' loops ---------------------------------------------------------------------


def seed_000_loop(optim, verbose):
    """Seed 000's ReduceLROnPlateau example (MNIST → a small synthetic set), with
    ``import torch.optim as optim`` swapped for ``import ferrotorch.optim as optim``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 10)
    X, y = torch.randn(128, 20), torch.randint(0, 10, (128,))
    train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 20), torch.randint(0, 10, (64,))), batch_size=64)
    optimizer = optim.Adam(model.parameters(), lr=0.001, weight_decay=1e-4)
    extra = dict(verbose=True) if verbose else {}
    scheduler = optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=5, **extra)
    criterion = torch.nn.CrossEntropyLoss()
    lrs = []
    for epoch in range(100):  # as the seed
        model.train()
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
        model.eval()
        val_loss = 0.0
        with torch.no_grad():
            for inputs, targets in val_loader:
                val_loss += criterion(model(inputs), targets).item()
        before = [g["lr"] for g in optimizer.param_groups]
        scheduler.step(val_loss / len(val_loader))
        lrs.append((epoch + 1, before, [g["lr"] for g in optimizer.param_groups]))
    return lrs, [p.detach().clone() for p in model.parameters()]


def test_seed_000_reduce_lr_on_plateau_loop(capsys):
    ref_lrs, ref_params = seed_000_loop(torch.optim, verbose=False)
    capsys.readouterr()
    with pytest.warns(UserWarning, match=DEPRECATED):
        lrs, params = seed_000_loop(fopt, verbose=True)
    np.testing.assert_allclose([a for *_, a in lrs], [a for *_, a in ref_lrs], rtol=1e-12, atol=0)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b)
    assert len(plateau_lines(ref_lrs)) >= 2  # the loop does reduce
    assert capsys.readouterr().out.splitlines() == plateau_lines(ref_lrs)


def seed_001_loop(lr_scheduler, optim, verbose):
    """Seed 001's ReduceLROnPlateau example: ``import torch.optim.lr_scheduler as
    lr_scheduler`` swapped for ferrotorch's, a constant validation loss (its
    ``calculate_validation_loss`` returns ``torch.tensor(0.1)``), patience 10."""
    torch.manual_seed(1)
    model = torch.nn.Linear(10, 2)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.01)
    extra = dict(verbose=True) if verbose else {}
    scheduler = lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=10, **extra)
    data_loader = [(torch.randn(32, 10), torch.randint(0, 2, (32,))) for _ in range(5)]

    def calculate_validation_loss():
        return torch.tensor(0.1)

    history = []
    for epoch in range(40):
        model.train()
        for batch_inputs, batch_targets in data_loader:
            optimizer.zero_grad()
            loss = criterion(model(batch_inputs), batch_targets)
            loss.backward()
            optimizer.step()
        model.eval()
        val_loss = calculate_validation_loss()
        before = [g["lr"] for g in optimizer.param_groups]
        scheduler.step(val_loss)
        print(f'Epoch {epoch+1}, Loss: {loss.item()}, Validation Loss: {val_loss}, Learning Rate: {optimizer.param_groups[0]["lr"]}')
        history.append((epoch + 1, before, [g["lr"] for g in optimizer.param_groups]))
    return history


def test_seed_001_reduce_lr_on_plateau_loop(capsys):
    ref = seed_001_loop(tls, torch.optim, verbose=False)
    ref_out = capsys.readouterr().out.splitlines()
    with pytest.warns(UserWarning, match=DEPRECATED):
        ours = seed_001_loop(fls, fopt, verbose=True)
    out = capsys.readouterr().out.splitlines()
    np.testing.assert_allclose([a for *_, a in ours], [a for *_, a in ref], rtol=1e-12, atol=0)
    reductions = plateau_lines(ref)
    assert len(reductions) >= 2
    assert [line for line in out if "reducing learning rate" in line] == reductions
    # The seed's own prints, with torch 2.1's reduction messages in between.
    merged = []
    for (epoch, before, after), line in zip(ref, ref_out):
        merged += plateau_lines([(epoch, before, after)]) + [line]
    assert len(out) == len(merged)
    for a, b in zip(out, merged):
        if "reducing" in b:
            assert a == b
        else:  # the seed prints loss.item() with all digits: compare the numbers
            assert a.split(", Loss:")[0] == b.split(", Loss:")[0]
            assert a.split("Learning Rate: ")[1] == b.split("Learning Rate: ")[1]
