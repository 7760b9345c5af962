"""Issue #11 for the training helpers: clipping, EMA and checkpoints give torch's (timm's)
result or torch's error for every input, and only plain CPU tensors reach the kernels.

Cases that could crash the process (a raw pointer into a meta, fake or distributed tensor)
run in a subprocess that must exit cleanly."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ferrotorch.nn.utils import clip_grad_norm_, clip_grad_value_, get_total_norm
from ferrotorch.train import ModelEMA

HERE = Path(__file__).resolve().parent


def in_subprocess(case: str, *args: object) -> None:
    """Runs ``case(*args)`` (a function of this module) in a fresh interpreter."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_safety_helpers as t; t.{case}(*{args!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{case} exited with {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def outcome(fn):
    try:
        return ("returned", fn())
    except Exception as e:  # noqa: BLE001 - the error itself is compared
        return ("raised", type(e), str(e))


def assert_same_tensor(x, y) -> None:
    """Same type, dtype, shape, device and (for real data) the same values, NaNs and signs."""
    if x is None or y is None:
        assert x is None and y is None
        return
    assert type(x) is type(y) and x.dtype == y.dtype and x.shape == y.shape and x.device == y.device
    if hasattr(x, "full_tensor"):  # DTensor
        x, y = x.full_tensor(), y.full_tensor()
    if x.is_meta or type(x).__name__ == "FakeTensor":
        return
    x, y = x.detach().as_subclass(torch.Tensor), y.detach().as_subclass(torch.Tensor)
    torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(x), torch.signbit(y))


def assert_same_outcome(make, ours, ref) -> None:
    """``ours`` and ``ref`` on twin inputs from ``make()``: the same result or the same error,
    and the same gradients afterwards."""
    a, b = make(), make()
    oa, ob = outcome(lambda: ours(a)), outcome(lambda: ref(b))
    assert oa[0] == ob[0], (oa, ob)
    if oa[0] == "raised":
        assert oa[1:] == ob[1:]
    elif isinstance(oa[1], torch.Tensor) or isinstance(ob[1], torch.Tensor):
        assert_same_tensor(oa[1], ob[1])
    for x, y in zip(a, b):
        assert_same_tensor(x.grad, y.grad)


def params(dtype=torch.float32, shapes=((3,), (4, 5), (2, 1, 3)), device="cpu", scale=3.0, empty=False):
    g = torch.Generator().manual_seed(0)
    ps = []
    for s in shapes + (((0,),) if empty else ()):
        p = torch.nn.Parameter(torch.zeros(s, dtype=dtype, device=device))
        p.grad = (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
        ps.append(p)
    if ps[1].grad.numel() and device != "meta":
        ps[1].grad.view(-1)[3] = 0.0
    return ps


# ---------------------------------------------------------------- clipping

ODD_NORMS = [0, 0.0, 0.5, -1, -1.0, -0.5, 3, 2.5, -2, math.inf, -math.inf, float("nan"), "inf", "-inf"]


@pytest.mark.parametrize("norm_type", ODD_NORMS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("error_if_nonfinite", [False, True])
@pytest.mark.parametrize("empty", [False, True])
def test_clip_grad_norm_odd_norm_types_are_torchs(norm_type, dtype, error_if_nonfinite, empty):
    make = lambda: params(dtype, empty=empty)  # noqa: E731
    for max_norm in (0.3, 1e9):
        assert_same_outcome(
            make,
            lambda ps: clip_grad_norm_(ps, max_norm, norm_type, error_if_nonfinite),
            lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type, error_if_nonfinite),
        )
    assert_same_outcome(
        make,
        lambda ps: get_total_norm([p.grad for p in ps], norm_type, error_if_nonfinite),
        lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps], norm_type, error_if_nonfinite),
    )


@pytest.mark.parametrize("norm_type", [1, 2, True, "2"], ids=repr)
def test_clip_grad_norm_int_and_str_norm_types_match_torch(norm_type):
    """1 and 2 run in Rust (accumulated in float64): torch's result to rounding."""
    pa, pb = params(), params()
    ours, ref = clip_grad_norm_(pa, 0.3, norm_type), torch.nn.utils.clip_grad_norm_(pb, 0.3, norm_type)
    assert ours.dtype == ref.dtype and float(ours) == pytest.approx(float(ref), rel=1e-6)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clip_value", [float("nan"), math.inf, -math.inf, -1.0, 0.0, -0.0, 1, 1e-45])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_clip_grad_value_odd_values_are_torchs(clip_value, dtype):
    assert_same_outcome(
        lambda: params(dtype),
        lambda ps: clip_grad_value_(ps, clip_value),
        lambda ps: torch.nn.utils.clip_grad_value_(ps, clip_value),
    )


class Traced(torch.Tensor):
    """A ``__torch_function__`` subclass that records the torch calls made on it."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_clip_torch_function_subclass_grad_goes_through_torch():
    def make():
        ps = params()
        ps[1].grad = ps[1].grad.as_subclass(Traced)
        return ps

    for ours, ref in [
        (lambda ps: clip_grad_norm_(ps, 0.3), lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.3)),
        (lambda ps: clip_grad_value_(ps, 0.3), lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.3)),
        (lambda ps: get_total_norm([p.grad for p in ps]), lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps])),
    ]:
        Traced.calls.clear()
        assert_same_outcome(make, ours, ref)
        assert Traced.calls  # torch's implementation saw the subclass


@pytest.mark.parametrize("kind", ["same_param_twice", "overlapping_views", "neg_view", "transposed", "inference", "create_graph", "mixed_dtypes"])
def test_clip_unusual_plain_grads_are_torchs(kind):
    def make():
        ps = params()
        if kind == "same_param_twice":
            ps = ps + [ps[0]]
        elif kind == "overlapping_views":
            buf = torch.randn(8, generator=torch.Generator().manual_seed(2)) * 3
            ps = [torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(5))]
            ps[0].grad, ps[1].grad = buf[:5], buf[3:]
        elif kind == "neg_view":
            ps[0].grad = torch._neg_view(ps[0].grad)
        elif kind == "transposed":
            ps[1].grad = ps[1].grad.t().contiguous().t()
        elif kind == "inference":
            with torch.inference_mode():
                ps[0].grad = ps[0].grad.clone()
        elif kind == "create_graph":
            ps[0].grad = ps[0].grad.clone().requires_grad_()
        elif kind == "mixed_dtypes":
            ps[2] = torch.nn.Parameter(ps[2].detach().double())
            ps[2].grad = torch.linspace(-3, 3, ps[2].numel(), dtype=torch.float64).view(ps[2].shape)
        return ps

    for fn in ("clip_grad_norm_", "clip_grad_value_"):
        ours = getattr(sys.modules["ferrotorch.nn.utils"], fn)
        ref = getattr(torch.nn.utils, fn)
        assert_same_outcome(make, lambda ps: ours(ps, 0.3), lambda ps: ref(ps, 0.3))


def test_clip_marks_grads_modified_like_torch():
    """A gradient saved for another backward and then clipped makes that backward fail,
    as with torch's in-place mul_/clamp_."""
    for ours, ref in [(clip_grad_norm_, torch.nn.utils.clip_grad_norm_), (clip_grad_value_, torch.nn.utils.clip_grad_value_)]:
        results = []
        for fn in (ours, ref):
            ps = params()
            w = torch.ones(3, requires_grad=True)
            y = (w * ps[0].grad).sum()  # saves ps[0].grad
            fn(ps, 0.3)
            results.append(outcome(y.backward)[:2])
        assert results[0] == results[1] and results[0][0] == "raised"


def case_clip_meta() -> None:
    for norm_type in (2.0, 1.0, math.inf, 0.5):
        assert_same_outcome(
            lambda: params(device="meta"),
            lambda ps: clip_grad_norm_(ps, 0.3, norm_type),
            lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.3, norm_type),
        )
    assert_same_outcome(lambda: params(device="meta"), lambda ps: clip_grad_value_(ps, 0.3), lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.3))


def case_clip_stride0() -> None:
    def make():
        ps = params()
        ps[1].grad = torch.full((1, 1), 2.0).expand(4, 5)  # stride 0: one element, 20 views
        return ps

    for max_norm in (0.3, 1e9):
        assert_same_outcome(make, lambda ps: clip_grad_norm_(ps, max_norm), lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm))
    assert_same_outcome(make, lambda ps: clip_grad_value_(ps, 0.3), lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.3))
    assert_same_outcome(
        make, lambda ps: get_total_norm([p.grad for p in ps]), lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps])
    )


def case_clip_fake() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        for norm_type in (2.0, 0.5):
            assert_same_outcome(
                params, lambda ps: clip_grad_norm_(ps, 0.3, norm_type), lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.3, norm_type)
            )
        assert_same_outcome(params, lambda ps: clip_grad_value_(ps, 0.3), lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.3))
    # fake tensors made outside the mode
    fake = lambda: [mode.from_tensor(p) for p in params()]  # noqa: E731
    assert type(fake()[0].grad).__name__ == "FakeTensor"
    assert_same_outcome(fake, lambda ps: clip_grad_norm_(ps, 0.3), lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.3))
    # real tensors inside an active FakeTensorMode: torch's error
    real_a, real_b = params(), params()
    with FakeTensorMode():
        oa = outcome(lambda: clip_grad_norm_(real_a, 0.3))
        ob = outcome(lambda: torch.nn.utils.clip_grad_norm_(real_b, 0.3))
    assert oa[0] == ob[0] == "raised" and oa[1:] == ob[1:]
    for x, y in zip(real_a, real_b):
        assert_same_tensor(x.grad, y.grad)


def case_clip_functionalize() -> None:
    def run(fn):
        def f(t):
            h = torch.zeros(t.shape, requires_grad=True)
            h.grad = t  # a functional wrapper: a plain torch.Tensor without storage of its own
            fn([h], 0.3)
            return h.grad

        return outcome(lambda: torch.func.functionalize(f)(torch.tensor([1.0, -2.0, 0.1])))

    for ours, ref in [(clip_grad_value_, torch.nn.utils.clip_grad_value_), (clip_grad_norm_, torch.nn.utils.clip_grad_norm_)]:
        oa, ob = run(ours), run(ref)
        assert oa[0] == ob[0]
        if oa[0] == "raised":
            assert oa[1:] == ob[1:]
        else:
            assert_same_tensor(oa[1], ob[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_dtensor() -> None:
    """DTensor params and grads on a one-process gloo group: torch's (all-reduced) norm."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from timm.utils import ModelEmaV3

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        mesh = init_device_mesh("cpu", (1,))

        def make():
            g = torch.Generator().manual_seed(0)
            ps = []
            for shape, placement in [((4, 3), Shard(0)), ((5,), Replicate())]:
                p = torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=g), mesh, [placement]))
                p.grad = distribute_tensor(torch.randn(shape, generator=g) * 3, mesh, [placement])
                ps.append(p)
            return ps

        for norm_type in (2.0, 1.0, math.inf, 0.5):
            assert_same_outcome(
                make, lambda ps: clip_grad_norm_(ps, 0.3, norm_type), lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.3, norm_type)
            )
        assert_same_outcome(make, lambda ps: clip_grad_value_(ps, 0.3), lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.3))

        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        for name, p in list(net.named_parameters()):
            setattr(net, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
        ours, ref = ModelEMA(net, decay=0.7), ModelEmaV3(net, decay=0.7)
        for step in range(3):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(1.0)
            ours.update(net, step)
            ref.update(net, step)
        for a, b in zip(ours.module.state_dict().values(), ref.module.state_dict().values()):
            assert_same_tensor(a, b)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["case_clip_meta", "case_clip_stride0", "case_clip_fake", "case_clip_functionalize", "case_ema_meta_and_fake"])
def test_risky_tensors_in_subprocess(case):
    in_subprocess(case)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_dtensor_in_subprocess():
    pytest.importorskip("timm")
    in_subprocess("case_dtensor")


# ---------------------------------------------------------------- EMA

class TiedLM(torch.nn.Module):
    """An embedding and an output head sharing one weight, with a BatchNorm in between."""

    def __init__(self, vocab: int = 3000, dim: int = 48) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mid = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.BatchNorm1d(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.mid(self.emb(x)))))


def train_and_average(net, emas, steps=6, **kw):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        opt.zero_grad()
        net(torch.randint(0, net.emb.num_embeddings, (16,), generator=g)).logsumexp(-1).mean().backward()
        opt.step()
        for ema in emas:
            ema.update(net, step=step)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("kw", [dict(decay=0.9), dict(decay=0.99, use_warmup=True), dict(decay=0.8, exclude_buffers=True)])
def test_ema_tied_weights_equal_timm(foreach, kw):
    timm_ema = pytest.importorskip("timm.utils.model_ema")
    torch.manual_seed(0)
    net = TiedLM()
    ours, ref = ModelEMA(net, **kw), timm_ema.ModelEmaV3(net, foreach=foreach, **kw)
    assert ours.module.head.weight is ours.module.emb.weight
    train_and_average(net, [ours, ref])
    for (k, a), (_, b) in zip(ours.module.state_dict().items(), ref.module.state_dict().items()):
        assert torch.equal(a, b), k


def test_ema_unusual_tensors_equal_timm():
    """A subclass buffer, a non-contiguous and an expanded model buffer, a negative view,
    another dtype: each goes through torch's lerp_, in list order, as in timm (whose
    foreach path torch refuses for a negative view)."""
    timm_ema = pytest.importorskip("timm.utils.model_ema")

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
    for name, shape in [("traced", (5,)), ("strided", (6, 4)), ("neg", (3,))]:
        net.register_buffer(name, torch.randn(shape))
    net.register_buffer("fp16", torch.randn(7, dtype=torch.float16))
    ours, ref = ModelEMA(net, decay=0.6), timm_ema.ModelEmaV3(net, decay=0.6, foreach=False)
    for m in (net, ours.module, ref.module):  # (deepcopy cannot copy these kinds)
        m.traced = m.traced.as_subclass(Traced)
        m.strided = m.strided.t().contiguous().t()
        m.neg = torch._neg_view(m.neg.neg())
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(1.5).add_(0.25)
            for name in ("traced", "neg", "fp16"):
                getattr(net, name).add_(1.0)
            net.strided = torch.full((1, 1), float(step)).expand(6, 4)  # stride 0 on the model side
        Traced.calls.clear()
        ours.update(net, step)
        assert Traced.calls
        ref.update(net, step)
    for (k, a), (_, b) in zip(ours.module.state_dict().items(), ref.module.state_dict().items()):
        assert_same_tensor(a, b)


def test_ema_marks_average_modified():
    net = TiedLM(vocab=50, dim=8)
    ema = ModelEMA(net, decay=0.5)
    before = ema.module.mid.weight._version
    ema.update(net)
    assert ema.module.mid.weight._version > before


def case_ema_meta_and_fake() -> None:
    from timm.utils import ModelEmaV3
    from torch._subclasses.fake_tensor import FakeTensorMode

    for ctx in ("meta", "fake"):
        torch.manual_seed(0)
        mode = FakeTensorMode()
        # (deepcopy cannot copy fake tensors and timm's RNG cannot live on meta: the
        # averages are built as modules of their own)
        ours, ref = ModelEMA(TiedLM(64, 8), decay=0.9), ModelEmaV3(TiedLM(64, 8), decay=0.9)
        with torch.device("meta") if ctx == "meta" else mode:
            net, ours.module, ref.module = TiedLM(64, 8), TiedLM(64, 8), TiedLM(64, 8)
        outs = []
        for ema in (ours, ref):
            with mode if ctx == "fake" else contextlib.nullcontext():
                outs.append(outcome(lambda: ema.update(net, step=3)))
        assert outs[0] == outs[1] == ("returned", None), outs
        for x, y in zip(ours.module.state_dict().values(), ref.module.state_dict().values()):
            assert_same_tensor(x, y)


# ---------------------------------------------------------------- checkpoints

def ckpt_model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def case_ckpt_child(directory: str, metrics: list, block_at: int, kind: str, which: str) -> None:
    """Saves ``metrics`` with a CheckpointManager on ``directory``; at save ``block_at`` it
    stops inside the ``which`` file's write (``kind``: "write", half the bytes written to
    the temporary file; "replaced", just after the rename), says "blocked" and waits to be
    killed."""
    import ferrotorch.train.checkpoint as ck
    from ferrotorch.train import CheckpointManager

    state = {"i": -1}

    def block():
        print("blocked", flush=True)
        sys.stdin.read()  # until killed (or the parent is gone)
        os._exit(1)

    real_save, real_replace = torch.save, os.replace

    def save(obj, f, *a, **k):
        if state["i"] == block_at and kind == "write" and which in Path(f.name).name:
            import io

            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            block()
        return real_save(obj, f, *a, **k)

    def replace(src, dst):
        real_replace(src, dst)
        if state["i"] == block_at and kind == "replaced" and Path(dst).name.startswith(which):
            block()

    torch.save, ck.os.replace = save, replace
    mgr = CheckpointManager(directory, keep_best=3, mode="min")
    model = ckpt_model()
    for i, metric in enumerate(metrics):
        state["i"] = i
        with torch.no_grad():
            model.weight.fill_(metric)
        mgr.save(metric, model=model, epoch=i)
        print("saved", i, flush=True)


def metric_of(path) -> float:
    return torch.load(path, weights_only=True)["metric"]


def test_checkpoint_manager_recovers_after_kills(tmp_path):
    """A run SIGKILLed inside its saves, again and again: each restart ranks the best
    checkpoints as one uninterrupted manager fed the committed saves (the reference), never
    replaces a better one by a worse one, and no temporary file survives."""
    import random
    import signal

    from ferrotorch.train import CheckpointManager

    run, ref_dir = tmp_path / "run", tmp_path / "ref"
    ref = CheckpointManager(ref_dir, keep_best=3, mode="min")
    rng = random.Random(0)
    last_metric, kills = None, 0
    for attempt in range(12):
        metrics = [round(rng.uniform(0.0, 2.0), 1) for _ in range(4)]  # ties happen
        block_at, kind, which = rng.randrange(4), rng.choice(["write", "replaced"]), rng.choice(["last", "best"])
        code = (
            f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_safety_helpers as t; "
            f"t.case_ckpt_child({str(run)!r}, {metrics!r}, {block_at}, {kind!r}, {which!r})"
        )
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        saved, blocked = 0, False
        for line in child.stdout:
            if line.startswith("saved"):
                saved += 1
            elif line.startswith("blocked"):
                blocked = True
                child.send_signal(signal.SIGKILL)
                break
        child.stdin.close()
        rc = child.wait(timeout=600)
        assert rc == (-signal.SIGKILL if blocked else 0), (attempt, rc)
        kills += blocked
        # the saves that completed, and what the killed one committed
        for m in metrics[:saved]:
            ref.save(m)
            last_metric = m
        if blocked:
            m = metrics[saved]
            if which == "best" or kind == "replaced":
                last_metric = m  # last.pt is written first
            if which == "best" and kind == "replaced":
                ref.save(m)
        mgr = CheckpointManager(run, keep_best=3, mode="min")
        assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]
        assert [metric_of(p) for p in mgr.kept()] == [metric_of(p) for p in ref.kept()]
        assert metric_of(mgr.last()) == last_metric
    assert kills >= 8
    # worse checkpoints do not replace better ones; a better one becomes the best
    kept = {p: p.read_bytes() for p in mgr.kept()}
    worst = max(metric_of(p) for p in kept)
    mgr.save(worst + 1.0, model=ckpt_model())
    assert {p: p.read_bytes() for p in mgr.kept()} == kept
    mgr.save(-1.0, model=ckpt_model())
    assert metric_of(mgr.best()) == -1.0 and len(mgr.kept()) == 3
    assert len(list(run.glob("best-*.pt"))) == 3


def test_checkpoint_manager_leaves_others_files(tmp_path):
    """Only its own temporary files whose writer is gone are removed: not those of a live
    process, of another host, of other names, nor anything else."""
    from ferrotorch.train import CheckpointManager

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        names = {
            f".last.pt.tmp-{dead.pid}": False,  # legacy name: this host
            f".best-7.pt.tmp-{dead.pid}@{socket.gethostname()}": False,
            f".last.pt.tmp-{live.pid}@{socket.gethostname()}": True,
            f".last.pt.tmp-{os.getpid()}@{socket.gethostname()}": True,
            f".best-2.pt.tmp-{dead.pid}@another-host": True,
            f".mine.pt.tmp-{dead.pid}": True,
            "notes.txt": True,
            "best-x.pt": True,
            ".best-3.pt.tmp-12x": True,
        }
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / "best-5.pt").write_bytes(b"not a checkpoint")
        mgr = CheckpointManager(tmp_path, keep_best=2)
        assert {n for n, keep in names.items() if keep} | {"best-5.pt"} == {p.name for p in tmp_path.iterdir()}
        assert mgr.best() is None and mgr.last() is None
        p = mgr.save(1.0, model=ckpt_model())
        assert p.name == "best-8.pt"  # after the numbers already used (7: a temporary file)
        assert (tmp_path / "best-5.pt").read_bytes() == b"not a checkpoint"
    finally:
        live.stdin.close()
        live.wait()


def full_state(*objs):
    """Every tensor and value of the objects' state_dicts (deep copies) and the RNG states."""
    import copy
    import random

    import numpy as np

    return [copy.deepcopy(o.state_dict()) for o in objs] + [torch.get_rng_state(), np.random.get_state(), random.getstate()]


def assert_same_state(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif hasattr(a, "dtype") and hasattr(a, "shape"):  # numpy
        assert (a == b).all()
    else:
        assert a == b or (a != a and b != b), (a, b)


def training_objects(opt_cls, hidden=5, groups=1, seed=0):
    from ferrotorch.train import EarlyStopping

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.Linear(hidden, 2))
    ps = list(model.parameters())
    opt = opt_cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}] if groups == 2 else ps, lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    stopper = EarlyStopping(patience=3)
    ema = ModelEMA(model, decay=0.5)
    for step in range(3 + seed):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        ema.update(model)
        stopper.step(1.0 / (step + 1))
    return dict(model=model, optimizer=opt, scheduler=sched, scaler=scaler, early_stopping=stopper, ema=ema)


def optimizer_classes():
    import ferrotorch.optim as fopt

    return [torch.optim.AdamW, fopt.AdamW]


@pytest.mark.parametrize("opt_cls", optimizer_classes(), ids=lambda c: c.__module__.split(".")[0] + "." + c.__name__)
@pytest.mark.parametrize(
    "bad",
    ["optimizer_groups", "model_shape", "model_missing_key", "scheduler", "scaler", "early_stopping", "ema_shape", "rng"],
)
def test_failed_load_changes_nothing(tmp_path, opt_cls, bad):
    """Whatever part of a checkpoint does not fit, load_checkpoint raises the error torch's
    own load_state_dict raises for it (or a ValueError naming it) and leaves the model,
    optimizer, scheduler, scaler, early stopping, EMA and RNG states exactly as they were."""
    import copy

    import ferrotorch.train.checkpoint as ck

    hidden, groups = 6 if bad in ("model_shape", "ema_shape") else 5, 2 if bad == "optimizer_groups" else 1
    src = training_objects(opt_cls, hidden, groups, seed=1)
    if bad == "ema_shape":
        src["model"] = training_objects(opt_cls, seed=1)["model"]
    path = tmp_path / "c.pt"
    ck.save_checkpoint(path, epoch=1, **src)
    payload = torch.load(path, weights_only=True)
    if bad == "model_missing_key":
        del payload["model"]["0.bias"]
    elif bad == "scheduler":
        payload["scheduler"] = "not a dict"
    elif bad == "scaler":
        payload["scaler"] = {}
    elif bad == "early_stopping":
        del payload["early_stopping"]["best"]
    elif bad == "rng":
        payload["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
    torch.save(payload, path)

    dst = training_objects(opt_cls)
    twin = copy.deepcopy(dst)  # torch's error, raised by the first part that does not fit
    expected = None
    for name, obj in twin.items():
        o = outcome(lambda: obj.load_state_dict(ck._restore(payload[name])))
        if o[0] == "raised":
            expected = o
            break
    if expected is None:  # only the RNG state is bad
        expected = outcome(lambda: ck._set_rng_state(payload["rng"]))
    assert expected[0] == "raised"

    before = full_state(*dst.values())
    got = outcome(lambda: ck.load_checkpoint(path, **dst))
    assert got[:3] == expected[:3]
    assert_same_state(full_state(*dst.values()), before)
    # and the objects still work: a good checkpoint loads and training goes on
    ck.save_checkpoint(tmp_path / "good.pt", **training_objects(opt_cls, seed=2))
    ck.load_checkpoint(tmp_path / "good.pt", **dst)
    dst["optimizer"].zero_grad()
    dst["model"](torch.randn(8, 4)).sum().backward()
    dst["optimizer"].step()
