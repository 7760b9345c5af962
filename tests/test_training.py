"""ferrotorch optimizers inside real training loops: torch's schedulers, GradScaler, data."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import ferrotorch.optim as fopt
from conftest import bf16_ulps, feed_same_grads, make_params, rel_err


def twins(dtype=torch.float64, seed=0):
    return make_params(seed, dtype), make_params(seed, dtype)


SCHEDULERS = {
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=17),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=60),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=7),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", ["AdamW", "SGD"])
def test_torch_schedulers_drive_ferrotorch(opt_name, sched):
    """Schedulers (incl. OneCycle/Cyclic cycling momentum or Adam's betas) accept our optimizers."""
    pa, pb = twins()
    kw = {"lr": 0.01, "momentum": 0.9} if opt_name == "SGD" else {"lr": 0.01}
    ours = getattr(fopt, opt_name)(pa, **kw)
    ref = getattr(torch.optim, opt_name)(pb, foreach=False, **kw)
    so, sr = SCHEDULERS[sched](ours), SCHEDULERS[sched](ref)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        feed_same_grads(pa, pb, g)
        ours.step()
        ref.step()
        so.step()
        sr.step()
        assert so.get_last_lr() == sr.get_last_lr()
        assert ours.param_groups[0].get("betas") == ref.param_groups[0].get("betas")
        assert ours.param_groups[0].get("momentum") == ref.param_groups[0].get("momentum")
    assert max(rel_err(a, b) for a, b in zip(pa, pb)) <= 1e-12


def test_reduce_lr_on_plateau_and_no_order_warning(recwarn):
    pa, pb = twins()
    ours, ref = fopt.Adam(pa, lr=0.1), torch.optim.Adam(pb, lr=0.1, foreach=False)
    so = torch.optim.lr_scheduler.ReduceLROnPlateau(ours, patience=2, factor=0.5)
    sr = torch.optim.lr_scheduler.ReduceLROnPlateau(ref, patience=2, factor=0.5)
    g = torch.Generator().manual_seed(1)
    for epoch in range(20):
        feed_same_grads(pa, pb, g)
        ours.step()
        ref.step()
        so.step(1.0)  # a plateau: lr halves every 3 epochs
        sr.step(1.0)
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] < 0.1
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
    assert max(rel_err(a, b) for a, b in zip(pa, pb)) <= 1e-12


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("opt_name", ["Adam", "SGD", "Adagrad"])
def test_grad_scaler_skips_inf_steps_like_torch(opt_name, fused):
    """GradScaler: unscale, skip steps with inf/NaN grads, update the scale. With fused=True
    the scaler hands the optimizer grad_scale/found_inf, as torch's fused kernels expect."""
    torch.manual_seed(0)
    model_a = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model_b = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model_b.load_state_dict(model_a.state_dict())
    kw = {"lr": 0.01, "fused": fused}
    if opt_name == "SGD":
        kw["momentum"] = 0.9
    ours = getattr(fopt, opt_name)(model_a.parameters(), **kw)
    ref = getattr(torch.optim, opt_name)(model_b.parameters(), **kw)
    sa, sb = torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for step in range(12):
        for model, opt, scaler in ((model_a, ours, sa), (model_b, ref, sb)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if step in (3, 7):
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    assert sa.get_scale() == sb.get_scale() < 2.0**10
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if opt_name != "SGD":
        assert float(ours.state[model_a[0].weight]["step"]) == float(ref.state[model_b[0].weight]["step"]) == 10


def test_digits_mlp_same_loss_curve_as_torch():
    """A small real run: an MLP on scikit-learn's digits, ferrotorch vs torch.optim."""
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    curves = {}
    for lib in ("ferrotorch", "torch"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        head, backbone = list(model[2].parameters()), list(model[0].parameters())
        groups = [{"params": backbone, "lr": 1e-2}, {"params": head}]  # the seed's split
        opt = fopt.AdamW(groups, lr=3e-3) if lib == "ferrotorch" else torch.optim.AdamW(groups, lr=3e-3, foreach=False)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for epoch in range(10):
            perm = torch.randperm(len(X), generator=gen)
            for i in range(0, len(X), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                loss = F.cross_entropy(model(X[idx]), y[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
            sched.step()
        acc = (model(X).argmax(1) == y).float().mean().item()
        curves[lib] = (torch.tensor(losses), acc)
    (lf, af), (lt, at) = curves["ferrotorch"], curves["torch"]
    assert torch.allclose(lf, lt, rtol=1e-4, atol=1e-6), float((lf - lt).abs().max())
    assert af == pytest.approx(at, abs=2e-3) and af > 0.95


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad"])
def test_bf16_within_one_ulp_of_torch_fp32_math(name):
    """bf16 params: math in fp32, states in bf16, one rounding per element (as torch's fused
    CPU kernels). Reference: torch.optim's own fp32 step on upcast copies, rounded to bf16."""
    cls, tcls = getattr(fopt, name), getattr(torch.optim, name)
    kw = {"lr": 0.01}
    if name == "SGD":
        kw.update(momentum=0.9, nesterov=True)
    if name == "RMSprop":
        kw.update(momentum=0.5, centered=True)
    ps = make_params(11, torch.bfloat16)
    ours = cls(ps, **kw)
    g = torch.Generator().manual_seed(11)
    worst = 0
    for step in range(30):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        # Reference step from our current bf16 state, in fp32.
        ref_params = [p.detach().float().requires_grad_() for p in ps]
        ref = tcls(ref_params, foreach=False, **kw)
        if step:
            sd = ours.state_dict()
            ref.load_state_dict(copy.deepcopy(sd))  # fp32 copies of our state, own step tensors
        for rp, p in zip(ref_params, ps):
            rp.grad = p.grad.float()
        ref.step()
        ours.step()
        for p, rp in zip(ps, ref_params):
            expect = rp.detach().to(torch.bfloat16)
            if p.numel():
                ulps = (p.detach().view(torch.int16).int() - expect.view(torch.int16).int()).abs().max().item()
                worst = max(worst, ulps)
        for p, rp in zip(ps, ref_params):
            for key, v in ours.state[p].items():
                if key != "step":
                    worst = max(worst, bf16_ulps(v, ref.state[rp][key].to(torch.bfloat16)))
    assert worst <= 1, f"{name}: {worst} bf16 ulps"


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_bf16_matches_torch_fused_kernel(name):
    """Against torch's own fused CPU kernel (fp32 math, bf16 storage) over 50 steps.
    (torch's fused bf16 Adagrad first rounds lr and eps to bf16, so it is compared with
    torch's fp32 math above instead.)"""
    cls, tcls = getattr(fopt, name), getattr(torch.optim, name)
    pa, pb = make_params(12, torch.bfloat16), make_params(12, torch.bfloat16)
    ours, ref = cls(pa, lr=0.01), tcls(pb, lr=0.01, fused=True)
    g = torch.Generator().manual_seed(12)
    for _ in range(50):
        feed_same_grads(pa, pb, g, pull=0.0)
        ours.step()
        ref.step()
    for a, b in zip(pa, pb):
        assert bf16_ulps(a, b) <= 1, name


def test_bad_grad_shape_raises_and_changes_nothing():
    pa = make_params(13, torch.float32)
    opt = fopt.Adam(pa)
    for p in pa:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in pa]
    steps = [float(opt.state[p]["step"]) for p in pa]
    pa[4].grad.data = torch.ones(7)  # sidesteps the .grad setter's shape check
    with pytest.raises(ValueError, match=r"grad of parameter 4 has shape \[7\], but the parameter has shape \[4, 5\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(pa, before))
    assert steps == [float(opt.state[p]["step"]) for p in pa]


def test_non_tensor_params_rejected_like_torch():
    with pytest.raises(TypeError) as ours:
        fopt.SGD([1.0, 2.0], lr=0.1)
    with pytest.raises(TypeError) as ref:
        torch.optim.SGD([1.0, 2.0], lr=0.1)
    assert str(ours.value) == str(ref.value)


@pytest.mark.parametrize(
    "cls,kw",
    [
        ("Adam", dict(lr=-1.0)),
        ("Adam", dict(betas=(1.0, 0.999))),
        ("Adam", dict(eps=-1.0)),
        ("AdamW", dict(weight_decay=-0.1)),
        ("SGD", dict(lr=0.1, momentum=-0.5)),
        ("SGD", dict(lr=0.1, nesterov=True)),
        ("RMSprop", dict(alpha=-0.1)),
        ("Adagrad", dict(lr_decay=-1.0)),
        ("Adagrad", dict(initial_accumulator_value=-1.0)),
    ],
)
def test_constructor_validation_texts_are_torchs(cls, kw):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError) as ours:
        getattr(fopt, cls)(p, **kw)
    with pytest.raises(ValueError) as ref:
        getattr(torch.optim, cls)(p, **kw)
    assert str(ours.value) == str(ref.value)


def test_differentiable_falls_back_to_torch():
    """differentiable=True runs torch's own step: gradients flow back to the lr."""
    results = []
    for cls in (fopt.SGD, torch.optim.SGD):
        leaf = torch.ones(3, requires_grad=True)
        w = leaf.clone()  # a non-leaf parameter, as torch's differentiable tests use
        lr = torch.tensor(0.1, requires_grad=True)
        opt = cls([w], lr=lr, momentum=0.9, differentiable=True)
        w.grad = torch.full((3,), 2.0)
        opt.step()
        w.sum().backward()
        results.append((w.detach().clone(), lr.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_step_in_forked_child_after_parallel_step_in_parent():
    """DataLoader workers are forked: the child must not wait on the parent's pool threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ps = [torch.randn(200_000, requires_grad=True) for _ in range(4)]
        opt = fopt.Adam(ps)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()  # starts the pool in the parent
        pid = os.fork()
        if pid == 0:
            try:
                opt.step()
                os._exit(0)
            except BaseException:
                os._exit(3)
        import time

        deadline = time.time() + 60
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            pytest.fail("forked child hung in optimizer.step()")
    finally:
        torch.set_num_threads(old)


def test_version_check_message():
    import ferrotorch

    # The extension records the torch it was compiled against; it is the one running.
    assert ferrotorch.REQUIRED_TORCH == ferrotorch._native.TORCH_VERSION
    assert torch.__version__.split("+")[0] == ferrotorch.REQUIRED_TORCH


def test_wrong_torch_version_is_a_clear_import_error():
    """Under another torch, importing ferrotorch raises ImportError naming the version."""
    import subprocess

    code = "import torch; torch.__version__ = '2.99.0+cpu'\ntry:\n    import ferrotorch\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import ferrotorch

    assert "IMPORTERROR" in out.stdout and "2.99.0+cpu" in out.stdout
    assert f"built against torch {ferrotorch.REQUIRED_TORCH}" in out.stdout
    assert f"torch=={ferrotorch.REQUIRED_TORCH}" in out.stdout


def test_grad_with_wrong_dtype_is_a_type_error():
    p = torch.zeros(3, requires_grad=True)
    opt = fopt.SGD([p], lr=0.1)
    p.grad = torch.ones(3)
    p.grad.data = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="grad of parameter 0 has dtype Double, but the parameter has dtype Float"):
        opt.step()
    assert not p.any()



@pytest.mark.parametrize("name", ["Adamax", "RAdam", "Adadelta", "Rprop", "NAdam", "ASGD"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_matches_torch_single_tensor(name, dtype):
    """torch has no fused kernel for these: its reference is the single-tensor path, which
    rounds every intermediate tensor (and add()'s alpha) to the parameter's dtype; the kernels
    round at the same points. Over 30 steps single-ulp differences random-walk, so the check
    is norm-wise: within 2 ulps of the tensor's scale."""
    cls, tcls = getattr(fopt, name), getattr(torch.optim, name)
    kw = {"lr": 0.01} if name == "Rprop" else {"lr": 0.01, "weight_decay": 0.01}
    pa, pb = make_params(14, dtype), make_params(14, dtype)
    ours, ref = cls(pa, **kw), tcls(pb, foreach=False, **kw)
    g = torch.Generator().manual_seed(14)
    eps = torch.finfo(dtype).eps
    for step in range(30):
        feed_same_grads(pa, pb, g, pull=0.1)
        ours.step()
        ref.step()
        for a, b in zip(pa, pb):
            if a.numel():
                err = rel_err(a.detach().float(), b.detach().float())
                assert err <= 2 * eps, f"{name} {dtype} step {step}: relative error {err:.3g}"
