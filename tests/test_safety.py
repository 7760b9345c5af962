"""Whatever a user does to tensors, state and param groups between two steps, the next
step gives torch.optim's result (foreach=False) or torch's error: never a crash, a write
into another tensor, a race or a silently ignored change (issue #11).

Each class of mutation runs in its own subprocess (`python tests/test_safety.py CLASS`), so
a crash fails one test instead of the whole run; the subprocess runs every variant for
every optimizer and compares with torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

OPTIMIZERS = {
    "Adam": {"lr": 0.1},
    "AdamW": {"lr": 0.1, "amsgrad": True},
    "SGD": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True},
    "Adagrad": {"lr": 0.1},
    "Adamax": {"lr": 0.02, "weight_decay": 0.01},
    "RAdam": {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1},
    "Adadelta": {"lr": 1.0, "rho": 0.8},
    "Rprop": {"lr": 0.01, "etas": (0.4, 1.3)},
    "NAdam": {"lr": 0.01, "weight_decay": 0.01, "decoupled_weight_decay": True},
    "ASGD": {"lr": 0.01, "t0": 1.0, "weight_decay": 0.01},
}


def _make(mod, name, params, **extra):
    kw = dict(OPTIMIZERS[name], **extra)
    if mod is torch.optim:
        kw["foreach"] = False
    return getattr(mod, name)(params, **kw)


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def _run(name, shapes, mutate, steps=3, extra=None, build=None):
    """Runs the same loop with torch.optim and ferrotorch.optim; `mutate(opt, params, step)`
    is applied to both after each step. Returns (torch_params, ferro_params, states)."""
    import ferrotorch.optim as fopt

    out = []
    for mod in (torch.optim, fopt):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = build(mod, params) if build else _make(mod, name, params, **(extra or {}))
        result = None
        try:
            for step in range(steps):
                _grads([p for grp in opt.param_groups for p in grp["params"]], step)
                opt.step()
                mutate(opt, params, step)
        except Exception as e:  # noqa: BLE001
            result = e
        live = [p for grp in opt.param_groups for p in grp["params"]]
        out.append((result, [p.detach().clone() for p in live], opt))
    (te, tp, topt), (fe, fp, fopt_) = out
    if te is not None or fe is not None:
        assert type(te) is type(fe) or (te is not None and fe is not None and isinstance(fe, type(te))), (
            f"torch raised {te!r}, ferrotorch raised {fe!r}"
        )
        return
    for a, b in zip(tp, fp):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    tlive = [p for grp in topt.param_groups for p in grp["params"]]
    flive = [p for grp in fopt_.param_groups for p in grp["params"]]
    for tp_, fp_ in zip(tlive, flive):
        ts, fs = topt.state.get(tp_, {}), fopt_.state.get(fp_, {})
        assert ts.keys() == fs.keys(), (ts.keys(), fs.keys())
        for key, v in ts.items():
            if torch.is_tensor(v):
                torch.testing.assert_close(fs[key], v, rtol=1e-5, atol=1e-6, check_dtype=False)


def _each_state_tensor(opt, fn, with_step=True):
    for st in opt.state.values():
        for k, v in list(st.items()):
            if torch.is_tensor(v) and (with_step or k != "step"):
                fn(st, k, v)


# ---- classes of mutation ---------------------------------------------------------------
def _moved_state(name, more=()):
    """Class 1: state memory moves under a cached pointer."""
    def clone_data(opt, params, step):
        _each_state_tensor(opt, lambda st, k, v: setattr(v, "data", v.data.clone()))
        import gc
        gc.collect()

    def share(opt, params, step):
        _each_state_tensor(opt, lambda st, k, v: v.share_memory_())

    def bf16_round_trip(opt, params, step):
        _each_state_tensor(opt, lambda st, k, v: setattr(v, "data", v.data.bfloat16().float()), with_step=False)

    def step_data(opt, params, step):
        for st in opt.state.values():
            if "step" in st:
                st["step"].data = st["step"].data.clone() + 0

    def swap(opt, params, step):
        _each_state_tensor(opt, lambda st, k, v: torch.utils.swap_tensors(v, v.clone() * 1.0), with_step=False)

    for m in (clone_data, share, bf16_round_trip, step_data, swap):
        _run(name, [(40,), (8, 5), *more], m, steps=4)


def _stale_plan(name, more=()):
    """Class 2: changes torch re-reads every step."""
    def clear(opt, params, step):
        if step == 1:
            opt.state.clear()

    def delete_one(opt, params, step):
        opt.state.pop(params[0], None)

    def replace_state(opt, params, step):
        for st in opt.state.values():
            for k in list(st):
                if k != "step" and torch.is_tensor(st[k]):
                    st[k] = torch.full_like(st[k], 0.5)

    def replace_param(opt, params, step):
        if step == 0:
            new = torch.nn.Parameter(torch.ones(40))
            opt.param_groups[0]["params"][0] = new

    def transpose(opt, params, step):
        if step == 0:
            params[1].data = params[1].data.t().contiguous()
        if step == 1:
            params[1].t_()

    def shrink(opt, params, step):
        if step == 0:
            params[0].data = params[0].data[:10]
            opt.state.pop(params[0], None)

    def reshape(opt, params, step):
        if step == 0:
            params[0].data = torch.zeros(5, 8)
            opt.state.pop(params[0], None)

    def stagger(opt, params, step):
        # step counts 2, 1, 2 after the next step: scalars derived from the count (bias
        # corrections) must follow each parameter, not the previous one's.
        if step == 0:
            opt.state.pop(params[1], None)

    for m in (clear, delete_one, replace_state, replace_param, transpose, shrink, reshape):
        _run(name, [(40,), (6, 6), *more], m, steps=4)
    _run(name, [(40,), (6, 6), (7,), *more], stagger, steps=4)


# 300 more parameters: with their grads and state, over 512 tensors, so the native step
# reads their layouts on two threads (OMP_NUM_THREADS=2) instead of one.
MANY = [(3,), (2, 2), (5,)] * 100


def _many(name):
    """Classes 1 to 4 in groups large enough that tensor layouts are read, and buffers
    checked for overlap, on two threads: each result must still be matched to its own
    parameter, and a subclass, a transposed or moved tensor, or shared memory anywhere in
    the group must be seen."""
    _moved_state(name, MANY)
    _stale_plan(name, MANY)

    def subclass_inside(mod, params):
        odd = params[150].detach().clone().as_subclass(_Logged).requires_grad_()
        return _make(mod, name, params[:150] + [odd] + params[151:])

    _run(name, MANY, lambda *a: None, build=subclass_inside, steps=3)

    def strided(opt, params, step):
        if step == 0:
            for p in params[1::7]:
                if p.dim() == 2:
                    p.t_()

    _run(name, MANY, strided, steps=3)

    if name == "SGD":
        _overlap_across_threads()
    for n in (3, 1100):
        _versions_bumped(name, n)


def _versions_bumped(name, n):
    """A step changes every stepped parameter's version, as torch's in-place ops do, so
    autograd still refuses a backward through a graph that saved a parameter the step
    changed (1100 parameters: bumped on two threads)."""
    import ferrotorch.optim as fopt

    errors = []
    for mod in (torch.optim, fopt):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(2, generator=g)) for _ in range(n)]
        opt = _make(mod, name, ps)
        _grads(ps, 0)
        opt.step()
        _grads(ps, 1)
        x = torch.randn(2, generator=g, requires_grad=True)
        y = sum((p * x).sum() for p in ps)  # saves every p for x's grad
        before = [p._version for p in ps]
        opt.step()
        assert all(p._version > v for p, v in zip(ps, before)), f"{mod.__name__}: a version did not change"
        try:
            y.backward()
            errors.append(None)
        except RuntimeError as e:
            errors.append("modified by an inplace operation" in str(e))
    assert errors[0] == errors[1] == True, errors  # noqa: E712


def _overlap_across_threads():
    """From 512 tensors the layouts are read in blocks on two threads, each sorting the
    memory ranges of its own blocks; the overlap check then merges the threads' lists. A
    momentum buffer that is the first parameter's memory, at several positions (so in
    blocks that the other thread usually reads), must be found — the native step reports
    `serial` and changes nothing — and the step must give torch's numbers."""
    import ferrotorch.optim as fopt

    results = []
    for mod in (torch.optim, fopt):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(3, generator=g)) for _ in range(1400)]
        opt = _make(mod, "SGD", ps)
        _grads(ps, 0)
        opt.step()
        if mod is fopt:
            for k in (1, 100, 700, 1001, 1399) * 3:
                own = opt.state[ps[k]]["momentum_buffer"]
                opt.state[ps[k]]["momentum_buffer"] = ps[0].detach()
                before = [p.detach().clone() for p in ps]
                _, _, serial = opt._spec.step(opt.state, opt.param_groups[0], None, None, [])
                assert serial, f"memory shared by parameter 0 and buffer {k} went unnoticed"
                assert all(torch.equal(a, b) for a, b in zip(before, ps))
                opt.state[ps[k]]["momentum_buffer"] = own
        opt.state[ps[-1]]["momentum_buffer"] = ps[0].detach()
        for step in range(1, 3):
            _grads(ps, step)
            opt.step()
        results.append(torch.stack([p.detach().clone() for p in ps]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def _aliasing(name):
    """Class 3: the same memory twice in one group."""
    def same_param_twice(mod, params):
        return _make(mod, name, [params[0], params[0], params[1]])

    _run(name, [(30,), (30,)], lambda *a: None, build=same_param_twice, steps=3)

    def grad_is_other_param(opt, params, step):
        pass

    import ferrotorch.optim as fopt

    results = []
    for mod in (torch.optim, fopt):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(30, generator=g)) for _ in range(3)]
        opt = _make(mod, name, ps)
        for step in range(3):
            ps[0].grad = torch.randn(30, generator=g)
            ps[1].grad = ps[0].detach()  # another parameter's memory, updated in the same step
            ps[2].grad = ps[0].grad  # one grad shared by two parameters
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # a view of one parameter used as another
    base = []
    for mod in (torch.optim, fopt):
        w = torch.randn(60, generator=torch.Generator().manual_seed(3))
        a, b = torch.nn.Parameter(w[:40].clone()), None
        b = torch.nn.Parameter(a.detach()[20:])  # overlaps a's second half
        opt = _make(mod, name, [a, b])
        for step in range(3):
            _grads([a, b], step)
            opt.step()
        base.append((a.detach().clone(), b.detach().clone()))
    torch.testing.assert_close(base[1][0], base[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base[1][1], base[0][1], rtol=1e-5, atol=1e-6)


class _Logged(torch.Tensor):
    """A `__torch_function__` subclass that must be stepped by torch, not by raw pointers."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def _subclasses(name):
    """Class 4: tensor subclasses and tensors without storage never reach the kernels."""
    import ferrotorch.optim as fopt

    results = []
    for mod in (torch.optim, fopt):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(20, generator=g).as_subclass(_Logged))
        q = torch.nn.Parameter(torch.randn(20, generator=g))
        opt = _make(mod, name, [p, q])
        for step in range(3):
            _grads([p, q], step)
            opt.step()
        results.append([p.detach().clone().as_subclass(torch.Tensor), q.detach().clone()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a)
    # meta params: torch's result (or its error)
    errs = []
    for mod in (torch.optim, fopt):
        p = torch.nn.Parameter(torch.empty(10, device="meta"))
        p.grad = torch.empty(10, device="meta")
        opt = _make(mod, name, [p])
        try:
            opt.step()
            errs.append(None)
        except Exception as e:  # noqa: BLE001
            errs.append(type(e))
    assert errs[0] == errs[1] or (errs[0] and errs[1] and issubclass(errs[1], errs[0])), errs
    # fused=True on params the fused path cannot take: torch's error, at the same call
    if name in ("Adam", "AdamW", "SGD", "Adagrad"):
        got = []
        for mod in (torch.optim, fopt):
            p = torch.nn.Parameter(torch.empty(10, device="meta"))
            try:
                opt = getattr(mod, name)([p], **dict(OPTIMIZERS[name], fused=True))
                p.grad = torch.empty(10, device="meta")
                opt.step()
                got.append(None)
            except Exception as e:  # noqa: BLE001
                got.append((type(e), str(e)[:40]))
        assert got[0] == got[1] or (got[0] and got[1] and issubclass(got[1][0], got[0][0])), got


def _hooks(name):
    """Class 6: hooks run and updates are all-or-nothing."""
    import ferrotorch.optim as fopt

    # A migration pre-hook fixes an old checkpoint before ferrotorch's own check sees it.
    p = torch.nn.Parameter(torch.randn(5))
    src = _make(torch.optim, name, [p])
    p.grad = torch.randn(5)
    src.step()
    sd = src.state_dict()
    old = {"state": sd["state"], "param_groups": [{k: v for k, v in g.items() if k not in ("lr",)} | {"learning_rate": g["lr"]} for g in sd["param_groups"]]}

    def migrate(opt, state_dict):
        groups = [dict(g) for g in state_dict["param_groups"]]
        for g in groups:
            g["lr"] = g.pop("learning_rate")
        return {"state": state_dict["state"], "param_groups": groups}

    for mod in (torch.optim, fopt):
        opt = _make(mod, name, [p])
        opt.register_load_state_dict_pre_hook(migrate)
        opt.load_state_dict(old)
        assert opt.param_groups[0]["lr"] == sd["param_groups"][0]["lr"]
    # clip_grad_norm_and_step with a stride-0 grad: the result of clipping then stepping.
    results = []
    for mod in ("torch", "ferro"):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(8, generator=g)) for _ in range(3)]
        opt = _make(torch.optim if mod == "torch" else fopt, name, ps)
        for step in range(2):
            _grads(ps, step)
            ps[1].grad = torch.randn(1, generator=torch.Generator().manual_seed(step)).expand(8)
            if mod == "torch":
                total = torch.nn.utils.get_total_norm([p.grad for p in ps])
                coef = torch.clamp(0.5 / (total + 1e-6), max=1.0)
                for p in ps:
                    p.grad = p.grad * coef
                opt.step()
            else:
                opt.clip_grad_norm_and_step(0.5)
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _compiled(name):
    """Class 5: torch.compile(opt.step) in a process that never built a torch.optim optimizer:
    the native kernel runs (behind a graph break), with torch's numbers."""
    import ferrotorch.optim as fopt

    p = torch.nn.Parameter(torch.randn(16))
    ref = p.detach().clone().requires_grad_()
    opt = _make(fopt, name, [p])
    calls = []

    class Counting:  # the native spec, counting its steps
        def __init__(self, spec):
            self._s = spec

        def __getattr__(self, key):
            return getattr(self._s, key)

        def step(self, *a, **k):
            calls.append(1)
            return self._s.step(*a, **k)

    opt._spec = Counting(type(opt)._spec)
    step = torch.compile(opt.step, backend="eager")
    for i in range(3):
        g = torch.randn(16, generator=torch.Generator().manual_seed(i))
        p.grad = g.clone()
        step()
    assert calls, "torch's traced step ran, not the native one"
    ropt = _make(torch.optim, name, [ref])
    for i in range(3):
        ref.grad = torch.randn(16, generator=torch.Generator().manual_seed(i))
        ropt.step()
    torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def _state_keys(name):
    """Class 2, how state is found: the native step looks `optimizer.state[p]` up with p's
    address as its hash once the first key of the call hashes to it (torch.Tensor.__hash__
    is `id(self)`). A different `__hash__` must be called for every lookup, as torch calls
    it, and plain tensors and Parameters mixed in a group must each find their own state."""
    import ferrotorch.optim as fopt

    orig = torch.Tensor.__hash__
    calls = [0]

    def counting(div):
        def h(self):
            calls[0] += 1
            return id(self) // div

        return h

    try:
        for div in (1, 16):
            torch.Tensor.__hash__ = counting(div)
            _run(name, [(40,), (8, 5), (3,)], lambda *a: None, steps=3)
            ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
            opt = _make(fopt, name, ps)
            for step in range(2):
                _grads(ps, step)
                calls[0] = 0
                opt.step()
            # id: the one check of the call; otherwise the check, then every lookup hashes
            # (Python 3.13 keeps the known-hash lookup internal: every lookup hashes there).
            known = div == 1 and sys.version_info < (3, 13)
            assert calls[0] == (1 if known else 1 + len(ps)), (div, calls[0])
    finally:
        torch.Tensor.__hash__ = orig

    def mixed(mod, params):
        plain = [p.detach().clone().requires_grad_() for p in params[:2]]
        return _make(mod, name, [plain[0], params[2], plain[1], params[3]])

    _run(name, [(12,), (3, 4), (5,), (2, 2)], lambda *a: None, build=mixed, steps=3)


CLASSES = {
    "many": _many,
    "state_keys": _state_keys,
    "moved_state": _moved_state,
    "stale_plan": _stale_plan,
    "aliasing": _aliasing,
    "subclasses": _subclasses,
    "hooks": _hooks,
    "compiled": _compiled,
}


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_mutation_class_matches_torch(cls):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, __file__, cls], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "OK" in r.stdout


def test_grad_of_a_non_leaf_parameter_warns_as_in_torch():
    """The native step reads `p.grad` from the tensor itself; torch's warning for a non-leaf
    parameter's grad still reaches Python as a UserWarning, as torch's own step gives it."""
    import ferrotorch.optim as fopt

    for mod in (torch.optim, fopt):
        a = torch.zeros(3, requires_grad=True)
        leaf = torch.nn.Parameter(torch.ones(2))
        leaf.grad = torch.ones(2)
        opt = mod.SGD([leaf], lr=0.1)
        opt.param_groups[0]["params"].append(a * 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        assert any("not a leaf Tensor" in str(w.message) for w in caught), mod
        assert torch.equal(leaf.detach(), torch.full((2,), 0.9))


@pytest.mark.parametrize("repeat", range(3))
def test_aliasing_is_deterministic(repeat):
    """Duplicates in one group give the same numbers on every run (no race)."""
    import ferrotorch.optim as fopt

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1 << 17))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fopt.Adam([p, p], lr=0.1)
        ref = torch.nn.Parameter(p.detach().clone())
        ropt = torch.optim.Adam([ref, ref], lr=0.1, foreach=False)
    for _ in range(3):
        g = torch.randn(1 << 17)
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ropt.step()
    assert torch.equal(p.detach(), ref.detach())


ACTIONS = [
    "step", "clone_state", "clear_state", "pop_state", "replace_state", "transpose_param", "replace_param",
    "shrink_param", "share_memory", "lr", "grad_none", "grad_is_param", "grad_noncontig", "swap_state",
]


def _apply(action, opt, params, rng):
    group = opt.param_groups[0]
    ps = group["params"]
    i = rng % len(ps)
    p = ps[i]
    if action == "clone_state":
        _each_state_tensor(opt, lambda st, k, v: setattr(v, "data", v.data.clone()))
    elif action == "clear_state":
        opt.state.clear()
    elif action == "pop_state":
        opt.state.pop(p, None)
    elif action == "replace_state":
        for k, v in list(opt.state.get(p, {}).items()):
            if torch.is_tensor(v) and k != "step":
                opt.state[p][k] = v.clone() * 0.5
    elif action == "transpose_param" and p.dim() == 2:
        p.data = p.data.t()  # non-contiguous: torch's path
        opt.state.pop(p, None)
    elif action == "replace_param":
        ps[i] = torch.nn.Parameter(torch.full_like(p, 0.25))
    elif action == "shrink_param" and p.dim() == 1 and p.numel() > 2:
        p.data = p.data[: p.numel() // 2]
        opt.state.pop(p, None)
    elif action == "share_memory":
        _each_state_tensor(opt, lambda st, k, v: v.share_memory_())
    elif action == "lr":
        group["lr"] = group["lr"] * 0.5
    elif action == "swap_state":
        _each_state_tensor(opt, lambda st, k, v: torch.utils.swap_tensors(v, v.clone()), with_step=False)


def _grads_for(action, ps, step, rng):
    _grads(ps, step)
    if action == "grad_none":
        ps[rng % len(ps)].grad = None
    elif action == "grad_is_param" and len(ps) > 1:
        a, b = ps[rng % len(ps)], ps[(rng + 1) % len(ps)]
        if a.shape == b.shape and a is not b:
            a.grad = b.detach()
    elif action == "grad_noncontig":
        p = ps[rng % len(ps)]
        if p.dim() == 2:
            p.grad = torch.randn(p.shape[::-1], generator=torch.Generator().manual_seed(step)).t()


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        name=st.sampled_from(sorted(OPTIMIZERS)),
        actions=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 7)), min_size=1, max_size=8),
    )
    def test_random_mutations_between_steps_match_torch(name, actions):
        """A hypothesis sweep: random mutations of params, state and groups between steps."""
        import ferrotorch.optim as fopt

        results = []
        for mod in (torch.optim, fopt):
            g = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(12,), (4, 4), (4, 4)]]
            opt = _make(mod, name, params)
            err = None
            try:
                for step, (action, rng) in enumerate(actions):
                    _grads_for(action, opt.param_groups[0]["params"], step, rng)
                    opt.step()
                    _apply(action, opt, params, rng)
            except Exception as e:  # noqa: BLE001
                err = type(e)
            results.append((err, [p.detach().clone() for p in opt.param_groups[0]["params"]]))
        (te, tp), (fe, fp) = results
        assert te == fe or (te and fe and issubclass(fe, te)), (te, fe)
        for a, b in zip(tp, fp):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

except ImportError:  # hypothesis is part of the test extra
    pass


if __name__ == "__main__":
    failures = []
    for opt_name in OPTIMIZERS:
        try:
            CLASSES[sys.argv[1]](opt_name)
        except Exception as e:  # noqa: BLE001
            import traceback

            failures.append(opt_name)
            print(f"FAIL {opt_name}: {e!r}")
            traceback.print_exc()
    print("OK" if not failures else f"FAILED {failures}")
    sys.exit(1 if failures else 0)
