"""ferrotorch._compat under the torch that is running: every private torch internal it wraps
still exists and still means what ferrotorch relies on. CI runs this file against each
supported torch (2.13 in the README's run, 2.15 and 2.11 in their own runs)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import ferrotorch.optim as fopt
from ferrotorch import _compat


def test_scalar_dtype_is_torchs_step_dtype():
    assert _compat.scalar_dtype() == torch.float32
    assert _compat.scalar_dtype(is_fused=True) == torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert _compat.scalar_dtype() == torch.float64
    finally:
        torch.set_default_dtype(old)
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    ref = torch.optim.Adam([p])
    ref.step()
    assert ref.state[p]["step"].dtype == _compat.scalar_dtype()


def test_torch_step_runs_the_base_class_step_under_no_grad():
    p = torch.ones(3, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours, ref = fopt.SGD([p], lr=0.5), torch.optim.SGD([q], lr=0.5)
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    _compat.torch_step(type(ours), ours, None)  # in-place on a leaf: needs torch's no_grad
    ref.step()
    assert torch.equal(p, q)


def test_is_compiling_and_modes():
    assert _compat.is_compiling() is False
    assert _compat.modes_active() is False
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert _compat.modes_active()
    with torch.device("meta"):  # set_default_device's mode is not a reason to leave
        assert _compat.modes_active() is False


def test_check_fused_raises_torchs_error():
    _compat.check_fused(torch.zeros(2, requires_grad=True))
    with pytest.raises(RuntimeError, match="fused"):
        _compat.check_fused(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError):
        _compat.check_fused(torch.zeros(2, device="meta"))


def test_set_version_counters_and_bump_version():
    t = torch.zeros(2)
    v = t._version
    _compat.bump_version([t])
    assert t._version == v + 1
    _compat.set_version_counters((t,), (v + 5,))
    assert t._version == v + 5


def test_native_ok_and_is_wrapped():
    assert _compat.native_ok(torch.zeros(3))
    assert _compat.native_ok(torch.nn.Parameter(torch.zeros(3)))
    assert not _compat.native_ok(torch.zeros(3, device="meta"))
    assert not _compat.native_ok(torch.zeros(4)[::2])
    assert not _compat.native_ok(torch.zeros(3, dtype=torch.int32))
    with torch.inference_mode():
        assert not _compat.native_ok(torch.zeros(3))
    from torch.func import grad

    seen = []

    def f(x):
        seen.append((_compat.is_wrapped(x), _compat.native_ok(x)))
        return x.sum()

    grad(f)(torch.zeros(3))
    assert seen == [(True, False)]
    assert not _compat.is_wrapped(torch.zeros(3))


def test_disjoint():
    base = torch.zeros(10)
    assert _compat.disjoint([base[:5], base[5:]])
    assert not _compat.disjoint([base[:6], base[5:]])


def test_accelerator_devices_come_from_torch():
    assert not _compat.accelerator(torch.zeros(1))
    assert not _compat.accelerator(torch.zeros(1, device="meta"))
    if torch.cuda.is_available():
        assert _compat.accelerator(torch.zeros(1, device="cuda"))


def test_scheduler_helpers():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}, {"params": [], "lr": torch.tensor(0.2)}])
    assert [float(v) for v in _compat.param_groups_val_list(opt, "lr")] == [0.1, pytest.approx(0.2)]
    _compat.update_param_group_val(opt.param_groups[0], "lr", 0.5)
    _compat.update_param_group_val(opt.param_groups[1], "lr", 0.25)
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.is_tensor(opt.param_groups[1]["lr"]) and float(opt.param_groups[1]["lr"]) == 0.25
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _compat.warn_get_lr_called_within_step(sched)
    assert any("get_last_lr" in str(w.message) for w in caught)


def test_sparse_adam_is_torchs_functional_step():
    p = torch.zeros(4, 2)
    m, v = torch.zeros(4, 2), torch.zeros(4, 2)
    g = torch.sparse_coo_tensor([[1, 3]], torch.ones(2, 2), (4, 2))
    _compat.sparse_adam(p, g, m, v, 1, eps=1e-8, beta1=0.9, beta2=0.999, lr=0.1, maximize=False)
    ref = torch.nn.Parameter(torch.zeros(4, 2))
    ref.grad = g
    torch.optim.SparseAdam([ref], lr=0.1).step()
    assert torch.equal(p, ref.detach()) and p[0].abs().sum() == 0 and p[1].abs().sum() > 0


def test_adafactor_helpers_are_torchs():
    p = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    p.grad = torch.randn(3, 2, dtype=torch.float64)
    opt = torch.optim.Adafactor([p])
    _compat.graph_capture_health_check(opt)
    params, grads, rows, cols, variances, steps = _compat.adafactor_init_group(opt, opt.param_groups[0])
    assert params == [p] and grads[0] is p.grad and variances == [None]
    assert rows[0].shape == (3, 1) and cols[0].shape == (1, 2) and steps[0] is opt.state[p]["step"]
    ref = copy.deepcopy(opt)
    ref.param_groups[0]["params"][0].grad = p.grad.clone()  # a Parameter's deepcopy drops .grad
    with torch.no_grad():
        _compat.adafactor(params, grads, rows, cols, variances, steps, d=1.0, lr=0.01, beta2_decay=-0.8, weight_decay=0.0, eps1=None, eps2=1e-3, maximize=False, foreach=False)
    ref.step()
    assert torch.equal(p, ref.param_groups[0]["params"][0]) and int(steps[0]) == 1


def test_scheduler_private_attributes_and_hooks():
    """The private scheduler state ferrotorch reads and the hooks it overrides exist in this torch."""
    for cls_name, hooks in _compat.SCHEDULER_HOOKS.items():
        cls = getattr(torch.optim.lr_scheduler, cls_name)
        for hook in hooks:
            assert callable(getattr(cls, hook, None)), f"torch {torch.__version__}: {cls_name}.{hook} is gone"
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    assert not _compat.sched_is_initial(sched) and _compat.sched_step_count(sched) == 1
    _compat.set_last_lr(sched, [0.25])
    assert sched.get_last_lr() == [0.25]
    one = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10, anneal_strategy="linear")
    assert [ph["end_step"] for ph in _compat.one_cycle_phases(one)] == [2.0, 9]
    assert not _compat.one_cycle_cosine(one)
    cyc = torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1, scale_fn=lambda x: 0.5)
    assert _compat.cyclic_custom_scale_fn(cyc)(3.0) == 0.5
    assert _compat.cyclic_custom_scale_fn(torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1)) is None
    swa = torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_strategy="linear")
    assert _compat.swalr_anneal_kind(swa) == "linear"
    swa.anneal_func = lambda t: t
    assert _compat.swalr_anneal_kind(swa) is None

    class Ghost(torch.optim.Optimizer):
        def step(self, closure=None):
            return None

    _compat.mark_step_patched(Ghost.step)
    ghost = Ghost([torch.zeros(1)], {"lr": 1.0})
    _compat.mark_stepped(ghost)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.optim.lr_scheduler.StepLR(ghost, step_size=1).step()  # no step-order warning


def test_muon_helpers_are_torchs():
    from torch.optim import _muon

    for fn in (None, "original", "match_rms_adamw"):
        assert _compat.muon_adjusted_lr(0.02, fn, torch.Size([7, 3])) == _muon._adjust_lr(0.02, fn, torch.Size([7, 3]))
    x = torch.ones(3, 2, dtype=torch.bfloat16)
    _muon._zeropower_via_newtonschulz(x, (3.4445, -4.775, 2.0315), 1, 1e-7)
    assert _compat.muon_copies_bf16() == bool((x == 1).all())
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.grad = torch.randn(3, 2)
    opt = torch.optim.Muon([p])
    params, grads, bufs = _compat.muon_init_group(opt, opt.param_groups[0])
    assert params == [p] and grads[0] is p.grad and bufs[0] is opt.state[p]["momentum_buffer"]


def test_lbfgs_helpers_are_torchs():
    from torch.optim import lbfgs as _lbfgs
    from torch.optim.optimizer import _to_scalar

    assert _compat.to_scalar(torch.tensor([0.5])).dim() == 0 and _compat.to_scalar(0.5) == _to_scalar(0.5)
    x = torch.tensor([3.0], dtype=torch.float64)
    d = torch.tensor([-1.0], dtype=torch.float64)

    def obj(x0, t, d):  # f(x) = (x - 1)^2 along d from x0
        v = x0 + t * d
        return float((v - 1) ** 2), 2 * (v - 1)

    f, g = obj(x, 0.0, d)
    want = _lbfgs._strong_wolfe(obj, x, 1.0, d, f, g, g.dot(d))
    got = _compat.strong_wolfe(obj, x, 1.0, d, f, g, g.dot(d))
    assert got[0] == want[0] and got[2] == want[2] and got[3] == want[3]
