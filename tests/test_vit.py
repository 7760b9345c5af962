"""ferrotorch.nn.ViT (Rust forward/backward) against vit-pytorch's ViT and torch autograd."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from ferrotorch.nn import ViT

vit_pytorch = pytest.importorskip("vit_pytorch")

CONFIGS = [
    dict(image_size=8, patch_size=2, num_classes=5, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8),
    dict(image_size=(8, 12), patch_size=4, num_classes=3, dim=12, depth=1, heads=1, mlp_dim=20, dim_head=12, pool="mean", channels=2),
    dict(image_size=16, patch_size=4, num_classes=10, dim=32, depth=3, heads=4, mlp_dim=64, dim_head=8, pool="mean"),
    dict(image_size=12, patch_size=(3, 4), num_classes=7, dim=24, depth=2, heads=3, mlp_dim=48, dim_head=6, channels=1),
    # cls pooling without the out projection (one head of width dim)
    dict(image_size=8, patch_size=4, num_classes=3, dim=12, depth=2, heads=1, mlp_dim=20, dim_head=12, channels=2),
]


# Big enough (65 tokens x 8 images, dim 256) that the Linears go through oneDNN, which the
# tiny configurations above are below the size threshold for.
MEDIUM = dict(image_size=32, patch_size=4, num_classes=10, dim=256, depth=2, heads=4, mlp_dim=512, dim_head=64)


def assert_grads_match(ours, ref, tol=1e-4):
    """Every parameter's gradient equals the reference's within `tol`, relative to the
    reference gradient's largest entry (empty parameters have none to compare)."""
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        if b.numel() == 0:
            continue
        assert float((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)) < tol, name


def image_shape(kw, batch):
    size = kw["image_size"] if isinstance(kw["image_size"], tuple) else (kw["image_size"],) * 2
    return (batch, kw.get("channels", 3), *size)


@pytest.mark.parametrize(
    "kw,batch", [(kw, b) for kw in CONFIGS for b in (1, 5)] + [(MEDIUM, 8), (dict(MEDIUM, pool="mean"), 8)]
)
def test_logits_and_every_gradient_match_vit_pytorch(kw, batch):
    torch.manual_seed(0)
    ref = vit_pytorch.ViT(**kw)
    ours = ViT(**kw)
    ours.load_state_dict(ref.state_dict())  # strict: same keys
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(image_shape(kw, batch), requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    lo, lr = ours(x), ref(x2)
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(lr)
    lo.backward(g)
    lr.backward(g)
    assert_grads_match(ours, ref)
    assert float((x.grad - x2.grad).abs().max() / x2.grad.abs().max()) < 1e-4
    # an empty parameter (the cls token without one) gets an empty gradient, not None
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert (a.grad is None, a.grad is not None and a.grad.shape) == (b.grad is None, b.grad is not None and b.grad.shape), name


@pytest.mark.parametrize("fused", [True, False], ids=["rust-kernels", "tch-ops"])
@pytest.mark.parametrize("variant", ["vit-pytorch", "dropout", "timm-avg", "timm-cls-dropout"])
def test_gradcheck_fp64(variant, fused):
    """torch.autograd.gradcheck (finite differences of our forward against our backward), for
    the fused CPU kernels and for the tch-op path that CUDA tensors take. With dropout the
    seed is fixed in the config, so the masks are the same on every call."""
    torch.manual_seed(1)
    kw = dict(image_size=4, patch_size=2, num_classes=3, dim=6, depth=1, heads=2, mlp_dim=8, dim_head=3, channels=1)
    if variant == "dropout":
        kw.update(dropout=0.3, emb_dropout=0.2)
    if variant == "timm-avg":
        kw.update(pool="mean", qkv_bias=True, layer_norm_eps=1e-6, patch_norm=False, class_token=True, fc_norm=True)
    if variant == "timm-cls-dropout":
        # the pruned last layer (token 0 only) with a qkv bias, two layers and every dropout
        kw.update(depth=2, qkv_bias=True, patch_norm=False, dropout=0.3, emb_dropout=0.2)
    model = ViT(**kw).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    params = model._ordered_params()
    from ferrotorch.nn.vit import _ViTFunction

    cfg = model._config(train="dropout" in variant)
    cfg["fused"] = fused
    assert torch.autograd.gradcheck(lambda x, *p: _ViTFunction.apply(cfg, x, *p), (x, *params), eps=1e-6, atol=1e-6)


def test_dropout_train_and_eval_modes():
    torch.manual_seed(2)
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8, dropout=0.3, emb_dropout=0.2)
    x = torch.randn(3, 3, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    a, b = model(x), model(x)
    assert not torch.equal(a, b)
    torch.manual_seed(5)
    c = model(x)
    torch.manual_seed(5)
    assert torch.equal(c, model(x))  # masks come from torch's generator
    c.sum().backward()
    assert all(p.grad is not None for p in model._ordered_params())


@pytest.mark.parametrize("chunk", [0, 1, 3, 64])
@pytest.mark.parametrize("kw", [CONFIGS[0], CONFIGS[2]], ids=["cls", "mean"])
def test_no_grad_inference_in_chunks_matches_vit_pytorch(kw, chunk):
    """Under torch.no_grad() the batch runs `inference_chunk` images at a time and saves
    nothing; the logits are still vit-pytorch's, whatever the chunk (7 is not a multiple)."""
    torch.manual_seed(4)
    ref = vit_pytorch.ViT(**kw).eval()
    ours = ViT(**kw).eval()
    ours.load_state_dict(ref.state_dict())
    ours.inference_chunk = chunk
    x = torch.randn(image_shape(kw, 7))
    with torch.no_grad():
        lo, lr = ours(x), ref(x)
    assert not lo.requires_grad
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), lr, rtol=1e-4, atol=1e-5)
    for p in ours.parameters():  # frozen weights: no autograd graph either
        p.requires_grad_(False)
    torch.testing.assert_close(ours(x), lr, rtol=1e-4, atol=1e-5)
    from ferrotorch import _native

    params = ours._ordered_params()
    _, saved, _ = _native.vit_forward(x, params, **ours._config(train=False), infer_chunk=max(chunk, 1))
    assert saved == []  # nothing kept for a backward that cannot come


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() itself
def test_onednn_matmuls_follow_torch_backends_mkldnn():
    """Big CPU matmuls go through oneDNN, unless torch.backends.mkldnn is switched off; both
    ways give vit-pytorch's logits and gradients."""
    from torch.profiler import profile

    torch.manual_seed(11)
    ref = vit_pytorch.ViT(**MEDIUM)
    ours = ViT(**MEDIUM)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(image_shape(MEDIUM, 8))
    lr = ref(x)
    lr.sum().backward()
    for enabled in (True, False):
        ours.zero_grad()
        with torch.backends.mkldnn.flags(enabled=enabled), profile() as prof:
            lo = ours(x)
            lo.sum().backward()
        calls = {e.key: e.count for e in prof.key_averages()}
        assert (calls.get("aten::mkldnn_convolution", 0) > 0) == enabled, calls
        torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
        assert_grads_match(ours, ref)


def test_no_grad_in_train_mode_draws_the_same_dropout_as_with_grad():
    """Dropout masks hash positions within the batch, so with dropout on the no-grad path
    runs the batch whole, as the autograd path does."""
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8, dropout=0.3, emb_dropout=0.2)
    model.inference_chunk = 2
    x = torch.randn(5, 3, 8, 8)
    torch.manual_seed(6)
    with_grad = model(x)
    torch.manual_seed(6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), with_grad.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "x,err,match",
    [
        (torch.randn(2, 3, 8, 9), ValueError, r"expected images of shape \(batch, 3, 8, 8\), got \(2, 3, 8, 9\)"),
        (torch.randn(2, 1, 8, 8), ValueError, "got \\(2, 1, 8, 8\\)"),
        (torch.randn(2, 3, 8, 8, dtype=torch.float64), TypeError, "dtype torch.float64"),
        ("not a tensor", TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(x, err, match):
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=16, depth=1, heads=2, mlp_dim=32, dim_head=8)
    with pytest.raises(err, match=match):
        model(x)


def test_bad_configuration():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ViT(image_size=10, patch_size=4, num_classes=2, dim=8, depth=1, heads=1, mlp_dim=8)
    with pytest.raises(ValueError, match="pool"):
        ViT(image_size=8, patch_size=4, num_classes=2, dim=8, depth=1, heads=1, mlp_dim=8, pool="max")


def test_digits_training_matches_vit_pytorch():
    """A short real run on scikit-learn's 8x8 digits: same seed, optimizer and data give the
    same accuracy as vit-pytorch."""
    datasets = pytest.importorskip("sklearn.datasets")
    import ferrotorch.optim as fopt

    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    Xtr, ytr, Xte, yte = X[:1400], y[:1400], X[1400:], y[1400:]
    kw = dict(image_size=8, patch_size=2, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8, channels=1)
    accs = {}
    for lib in ("ferrotorch", "vit-pytorch"):
        torch.manual_seed(0)
        ref = vit_pytorch.ViT(**kw)
        model = ref
        if lib == "ferrotorch":
            model = ViT(**kw)
            model.load_state_dict(ref.state_dict())
        opt = fopt.AdamW(model.parameters(), lr=3e-3) if lib == "ferrotorch" else torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False)
        g = torch.Generator().manual_seed(1)
        for epoch in range(4):
            perm = torch.randperm(len(Xtr), generator=g)
            for i in range(0, len(Xtr), 64):
                idx = perm[i : i + 64]
                opt.zero_grad()
                F.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            accs[lib] = (model(Xte).argmax(1) == yte).float().mean().item()
    assert accs["ferrotorch"] == pytest.approx(accs["vit-pytorch"], abs=0.01)
    assert accs["ferrotorch"] > 0.7  # 4 short epochs


def test_tch_op_path_matches_vit_pytorch_too():
    """The path CUDA tensors take (tch ops instead of the CPU kernels), forced on CPU."""
    torch.manual_seed(3)
    kw = CONFIGS[2]
    ref = vit_pytorch.ViT(**kw)
    ours = ViT(**kw)
    ours.load_state_dict(ref.state_dict())
    from ferrotorch.nn.vit import _ViTFunction

    x = torch.randn(3, 3, 16, 16)
    cfg = ours._config(train=False)
    cfg["fused"] = False
    lo = _ViTFunction.apply(cfg, x, *ours._ordered_params())
    lr = ref(x)
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
    lo.sum().backward()
    lr.sum().backward()
    assert_grads_match(ours, ref)


@pytest.mark.parametrize("kw", CONFIGS, ids=range(len(CONFIGS)))
@pytest.mark.parametrize("train", [False, True])
def test_gpu_path_matches_vit_pytorch(kw, train):
    """What CUDA images run (torch ops under autograd, attention through
    F.scaled_dot_product_attention when no attention dropout is active), forced on CPU:
    vit-pytorch's logits and gradients. With dropout in training the attention falls back
    to the explicit product and the kernels' masks, so it equals the Rust kernels' run."""
    from ferrotorch.nn.vit import _functional_forward

    torch.manual_seed(7)
    ref = vit_pytorch.ViT(**kw)
    ours = ViT(**kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(image_shape(kw, 3))
    lo = _functional_forward(ours._config(train), x, ours._ordered_params(), sdpa=True)
    lr = ref(x)
    torch.testing.assert_close(lo, lr, rtol=1e-4, atol=1e-5)
    lo.sum().backward()
    lr.sum().backward()
    assert_grads_match(ours, ref)
    # with dropout active the explicit attention and the kernels' masks are used
    drop = ViT(**kw, dropout=0.2, emb_dropout=0.1).double()
    xd = x.double()
    torch.manual_seed(8)
    cfg = drop._config(True)
    a = _functional_forward(cfg, xd, drop._ordered_params(), sdpa=True)
    b = _functional_forward(cfg, xd, drop._ordered_params(), sdpa=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tch_op_path_half_precision_backward(dtype):
    """The tch-op path (CUDA's) in bf16/fp16, as autocast runs it: LayerNorm statistics are
    kept in fp32 (as torch's CUDA kernel returns them), so the backward must bring each
    gradient back to its tensor's dtype before the next matmul. Gradients come back in the
    parameters' dtype and agree with the fp32 run to half precision."""
    torch.manual_seed(5)
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=32, depth=2, heads=4, mlp_dim=64, dim_head=8)
    from ferrotorch.nn.vit import _ViTFunction

    x = torch.randn(4, 3, 8, 8)
    cfg = dict(model._config(train=True), fused=False)
    grads = {}
    for dt in (torch.float32, dtype):
        params = [p.detach().to(dt).requires_grad_() for p in model._ordered_params()]
        _ViTFunction.apply(cfg, x.to(dt), *params).float().pow(2).sum().backward()
        grads[dt] = [p.grad for p in params]
    for i, (g32, gh) in enumerate(zip(grads[torch.float32], grads[dtype])):
        assert gh.dtype == dtype, i
        err = float((gh.float() - g32).abs().max() / g32.abs().max().clamp_min(1e-6))
        assert err < 5e-2, (i, err)


def test_dropout_masks_agree_between_kernel_and_tch_paths():
    """Both paths draw the same hash-based masks, so with dropout on they give the same
    logits and gradients (the tch path is what CUDA runs)."""
    torch.manual_seed(4)
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8, dropout=0.3, emb_dropout=0.2).double()
    from ferrotorch.nn.vit import _ViTFunction

    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    cfg = model._config(train=True)
    outs = []
    for fused in (True, False):
        model.zero_grad()
        out = _ViTFunction.apply(dict(cfg, fused=fused), x, *model._ordered_params())
        out.pow(2).sum().backward()
        outs.append((out.detach(), [p.grad.clone() for p in model._ordered_params()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    kept = (outs[0][0] != 0).float().mean()
    assert kept > 0.5


def test_saved_activations_follow_torch_semantics():
    """Activations live in ctx.save_for_backward: a second backward without retain_graph
    raises torch's own error, retain_graph=True works, and a parameter changed in place
    between forward and backward is caught."""
    torch.manual_seed(6)
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=16, depth=1, heads=2, mlp_dim=32, dim_head=8)
    x = torch.randn(2, 3, 8, 8)
    out = model(x).sum()
    out.backward(retain_graph=True)
    g1 = [p.grad.clone() for p in model.parameters()]
    out.backward()
    for p, g in zip(model.parameters(), g1):
        torch.testing.assert_close(p.grad, 2 * g)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.backward()
    out = model(x).sum()
    with torch.no_grad():
        model.mlp_head.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_activation_memory_is_released_after_backward():
    """The saved activations are freed when backward finishes (no tape kept alive)."""
    import weakref

    torch.manual_seed(7)
    model = ViT(image_size=8, patch_size=2, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32, dim_head=8)
    out = model(torch.randn(2, 3, 8, 8))
    node = out.grad_fn
    n_saved = len(node.saved_tensors)
    assert n_saved > len(model._ordered_params())  # parameters plus activations
    out.sum().backward()
    with pytest.raises(RuntimeError, match="freed|second time"):
        node.saved_tensors
    del weakref


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_reused_buffers_never_change_a_live_graph():
    """Activation buffers are reused only once torch has freed them: a graph kept alive with
    retain_graph=True gives bit-identical gradients after other steps have run (and reused
    every buffer freed meanwhile)."""
    torch.manual_seed(8)
    model = ViT(**dict(MEDIUM, depth=1))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out1 = model(x1)
    g = torch.randn_like(out1)
    out1.backward(g, retain_graph=True)
    first = _grads(model)
    for _ in range(3):
        model.zero_grad()
        model(x2).square().sum().backward()
    model.zero_grad()
    out1.backward(g)
    for a, b in zip(_grads(model), first):
        assert torch.equal(a, b)


def test_empty_cache_releases_the_buffers_and_changes_no_result():
    import ferrotorch
    from ferrotorch import _native

    torch.manual_seed(9)
    model = ViT(**CONFIGS[0])
    x = torch.randn(3, 3, 8, 8)

    def step():
        model.zero_grad()
        model(x).sum().backward()
        return _grads(model)

    first = step()
    assert _native.vit_cached_bytes() > 0  # the step's buffers wait for the next one
    again = step()
    ferrotorch.nn.empty_cache()
    assert _native.vit_cached_bytes() == 0
    fresh = step()
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_models_training_in_threads_match_serial_training():
    """Two threads train their own models at once (the GIL is released in the kernels, so
    they take and return buffers concurrently): the same gradients as one after the other."""
    import threading

    torch.manual_seed(10)
    models = [ViT(**CONFIGS[2]) for _ in range(2)]
    xs = [torch.randn(5, 3, 16, 16) for _ in range(2)]

    def train(i, out):
        res = []
        for _ in range(4):
            models[i].zero_grad()
            models[i](xs[i]).square().sum().backward()
            res.append(_grads(models[i]))
        out[i] = res

    serial, threaded = [None, None], [None, None]
    for i in range(2):
        train(i, serial)
    threads = [threading.Thread(target=train, args=(i, threaded)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for a_step, b_step in zip(serial[i], threaded[i]):
            for a, b in zip(a_step, b_step):
                assert torch.equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_children_train_while_the_parent_trains_in_a_thread():
    """DataLoader workers and multiprocessing pools are forked from a process whose other
    threads may be taking and returning buffers at that moment: each child trains with the
    buffers it inherited and gets the parent's gradients, and no child waits forever."""
    import threading
    import time

    torch.manual_seed(11)
    model, busy = ViT(**CONFIGS[2]), ViT(**CONFIGS[2])
    x, xb = torch.randn(5, 3, 16, 16), torch.randn(7, 3, 16, 16)

    def step(m, inp):
        m.zero_grad()
        m(inp).square().sum().backward()
        return _grads(m)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the children (DataLoader workers run on one thread too)
    try:
        expected = step(model, x)
    finally:
        torch.set_num_threads(threads)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            step(busy, xb)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(6):
            pid = os.fork()
            if pid == 0:  # the child: no threads but this one
                code = 3
                try:
                    torch.set_num_threads(1)
                    got = [step(model, x) for _ in range(2)]
                    code = 0 if all(torch.equal(a, b) for g in got for a, b in zip(g, expected)) else 4
                finally:
                    os._exit(code)
            deadline = time.time() + 120
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0, "forked child got other gradients or failed"
                    break
                if time.time() > deadline:
                    os.kill(pid, 9)
                    pytest.fail("forked child hung")
                time.sleep(0.02)
    finally:
        stop.set()
        worker.join()


timm = pytest.importorskip("timm")


@pytest.mark.parametrize(
    "kw",
    [
        dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=7),
        dict(img_size=(16, 24), patch_size=8, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=5, global_pool="avg"),
        dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=3, global_pool="avg", class_token=False),
        dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=3, qkv_bias=False, fc_norm=True, global_pool="avg"),
    ],
)
def test_from_timm_gives_timm_logits_and_gradients(kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(8)
    tm = VisionTransformer(**kw).eval()
    with torch.no_grad():  # timm inits some of these at zero; make every weight count
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = ViT.from_timm(tm).eval()
    h, w = kw["img_size"] if isinstance(kw["img_size"], tuple) else (kw["img_size"],) * 2
    x = torch.randn(3, kw.get("in_chans", 3), h, w, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    lo, lt = ours(x), tm(x2)
    torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(lt)
    lo.backward(g)
    lt.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    # the conv patch embedding's gradient, mapped back to the conv layout
    gw = ours.to_patch_embedding[2].weight.grad
    conv = tm.patch_embed.proj.weight
    gw_conv = gw.reshape(conv.shape[0], conv.shape[2], conv.shape[3], conv.shape[1]).permute(0, 3, 1, 2)
    torch.testing.assert_close(gw_conv, conv.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.mlp_head.weight.grad, tm.head.weight.grad, rtol=1e-4, atol=1e-5)


def test_from_timm_rejects_unsupported_models():
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(ValueError, match="layer scale"):
        ViT.from_timm(VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3, init_values=0.1))
    with pytest.raises(ValueError, match="register tokens"):
        ViT.from_timm(VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3, reg_tokens=2))
    with pytest.raises(ValueError, match="expected a timm VisionTransformer"):
        ViT.from_timm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kw,batch", [(CONFIGS[2], 4), (MEDIUM, 8)], ids=["small", "onednn"])
def test_autocast_bf16_close_to_vit_pytorch_under_autocast(kw, batch):
    """Under torch.autocast('cpu', bfloat16) the whole model runs in bf16 (LayerNorm, softmax,
    GELU computed in fp32 inside the kernels); fp32 parameters get fp32 gradients close to
    vit-pytorch's under the same autocast."""
    torch.manual_seed(9)
    ref = vit_pytorch.ViT(**kw)
    ours = ViT(**kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(image_shape(kw, batch))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lo, lr = ours(x), ref(x)
    assert lo.dtype == torch.bfloat16
    with torch.no_grad():
        full = ref(x)
    # both are bf16 approximations of the fp32 logits, to a similar degree
    err_ours = float((lo.detach().float() - full).abs().max() / full.abs().max())
    err_ref = float((lr.detach().float() - full).abs().max() / full.abs().max())
    assert err_ours < 0.05 and err_ours < 3 * err_ref + 0.01, (err_ours, err_ref)
    lo.float().sum().backward()
    lr.float().sum().backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        if b.numel() == 0:
            continue
        assert a.grad.dtype == torch.float32
        rel = float((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12))
        assert rel < 0.1, (name, rel)
