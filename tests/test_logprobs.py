"""selective_logprobs against a materialised float64 reference: values, gradients, sparsity, frozen head."""

import lightning_gspo.kernels.logprobs as lp_mod
import pytest
import torch
from lightning_gspo.kernels import selective_logprobs
from lightning_gspo.kernels.backend_and_precision import triton_available
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_available(DEVICE)[0], reason="Triton cannot run here")


def reference(hidden, weight, token_ids, temperature=1.0, bias=None):
    """Materialised float64 log-probs and entropy: the definition."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    logp = torch.log_softmax(z / temperature, -1)
    return logp.gather(1, token_ids[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def make(n=20, h=32, v=100, dtype=torch.float32, bias=True, device="cpu", scale=0.5):
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=device) * scale).to(dtype).requires_grad_()
    b = torch.randn(v, device=device).to(dtype).requires_grad_() if bias else None
    ids = torch.randint(0, v, (n,), device=device)
    return hidden, weight, b, ids


def grads_of(fn, tensors, g, g_ent=None):
    """Gradients of sum(g * logps + g_ent * entropy) w.r.t. ``tensors`` (None where a tensor got none)."""
    for t in tensors:
        t.grad = None
    logps, ent = fn()
    loss = (g * logps).sum() + (0 if g_ent is None else (g_ent * ent).sum())
    loss.backward()
    out = [None if t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return logps.detach(), torch.as_tensor(ent).detach(), out


@pytest.fixture(params=["fused", "cublas"])
def matmul_mode(request, monkeypatch):
    """Both ways the Triton backend forms logits: tl.dot inside its kernels, or a float32 tile from a matmul."""
    from lightning_gspo.kernels import logprobs_triton

    monkeypatch.setattr(logprobs_triton, "MATMUL", {"forward": request.param, "dlogits": request.param})
    return request.param


@pytest.fixture
def small_tiles(monkeypatch):
    """Let chunk_size split tiny problems into several row blocks and vocabulary blocks."""
    monkeypatch.setattr(lp_mod, "MIN_VOCAB_BLOCK", 16)


def check(hidden, weight, bias, ids, g, g_ent, temperature, atol, grad_tol=None, **kw):
    tensors = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    ours = grads_of(
        lambda: selective_logprobs(
            hidden, weight, ids, temperature=temperature, bias=bias, return_entropy=True, **kw
        ),
        tensors,
        g,
        g_ent,
    )
    ref = grads_of(lambda: reference(hidden, weight, ids, temperature, bias), tensors, g, g_ent)
    assert ours[0].dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ours[0].double(), ref[0], atol=atol, rtol=atol)
    torch.testing.assert_close(ours[1].double(), ref[1], atol=atol, rtol=atol)
    grad_tol = grad_tol or 10 * atol
    for a, b in zip(ours[2], ref[2]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), atol=grad_tol, rtol=grad_tol)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 64, 1000])
def test_torch_matches_reference(small_tiles, temperature, with_bias, chunk_size):
    hidden, weight, bias, ids = make(bias=with_bias)  # V = 100: never a multiple of the 16-column tiles
    g, g_ent = torch.randn(20), torch.randn(20)
    check(hidden, weight, bias, ids, g, g_ent, temperature, 1e-5, backend="torch", chunk_size=chunk_size)


def test_tile_plan_splits_rows_and_vocabulary(small_tiles):
    assert lp_mod._tile_plan(20, 100, 64) == (4, 16)
    assert lp_mod._tile_plan(20, 100, 1000) == (20, 50)
    assert lp_mod._tile_plan(1, 100, 64) == (1, 64)


def test_entropy_only_gradient(small_tiles):
    hidden, weight, bias, ids = make()
    check(
        hidden, weight, bias, ids, torch.zeros(20), torch.randn(20), 1.3, 1e-5, backend="torch", chunk_size=64
    )
    # logps unused: their incoming gradient is None, not zeros
    out = selective_logprobs(
        hidden, weight, ids, bias=bias, return_entropy=True, backend="torch", chunk_size=64
    )
    out[1].sum().backward()
    ref = reference(hidden.detach().requires_grad_(), weight, ids, 1.0, bias)
    torch.testing.assert_close(out[1].double(), ref[1], atol=1e-5, rtol=1e-5)
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_single_row():
    hidden, weight, bias, ids = make(n=1)
    check(hidden, weight, bias, ids, torch.randn(1), torch.randn(1), 0.5, 1e-5, backend="torch", chunk_size=8)


def test_logps_only_returns_a_tensor():
    hidden, weight, _, ids = make(bias=False)
    out = selective_logprobs(hidden, weight, ids, backend="torch")
    assert isinstance(out, torch.Tensor) and out.shape == (20,) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(hidden, weight, ids)[0], atol=1e-5, rtol=1e-5)


def test_empty_batch():
    hidden, weight, _, _ = make(n=0, bias=False)
    out = selective_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), backend="torch")
    assert out.shape == (0,)
    out.sum().backward()
    assert hidden.grad.shape == (0, 32) and not weight.grad.any()


def test_bf16_inputs(small_tiles):
    hidden, weight, bias, ids = make(dtype=torch.bfloat16)
    # bf16 inputs, float32 arithmetic: the float64 values of the bf16-rounded inputs; grads rounded once
    g = torch.randn(20)
    check(hidden, weight, bias, ids, g, torch.randn(20), 0.8, 1e-5, 8e-3, backend="torch", chunk_size=64)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_non_contiguous_hidden(backend):
    base = torch.randn(32, 20, device=DEVICE, requires_grad=True)
    _, weight, bias, ids = make(device=DEVICE)
    g = torch.randn(20, device=DEVICE)
    ours = grads_of(
        lambda: (selective_logprobs(base.t(), weight, ids, bias=bias, backend=backend), 0), [base], g
    )
    ref = grads_of(lambda: (reference(base.t(), weight, ids, 1.0, bias)[0], 0), [base], g)
    torch.testing.assert_close(ours[0].double(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[2][0].double(), ref[2][0].double(), atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("h", [32, 40])  # 40: the hidden size is not a multiple of the kernel's H block
def test_triton_matches_reference(small_tiles, matmul_mode, temperature, with_bias, h):
    hidden, weight, bias, ids = make(h=h, bias=with_bias, device=DEVICE)
    g, g_ent = torch.randn(20, device=DEVICE), torch.randn(20, device=DEVICE)
    g[::4] = 0
    # 300 logits a tile: 18 rows x 16 columns, so 2 row blocks and 7 vocabulary tiles (the last 4 wide)
    check(hidden, weight, bias, ids, g, g_ent, temperature, 2e-5, backend="triton", chunk_size=300)


@needs_triton
def test_triton_bf16(matmul_mode):
    hidden, weight, bias, ids = make(dtype=torch.bfloat16, device=DEVICE)
    g, g_ent = torch.randn(20, device=DEVICE), torch.randn(20, device=DEVICE)
    tensors = [hidden, weight, bias]
    ours = grads_of(
        lambda: selective_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, backend="triton"),
        tensors,
        g,
        g_ent,
    )
    ref = grads_of(lambda: reference(hidden, weight, ids, 1.0, bias), tensors, g, g_ent)
    torch.testing.assert_close(ours[0].double(), ref[0], atol=1e-5, rtol=1e-5)  # forward: float32 all the way
    torch.testing.assert_close(ours[1].double(), ref[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(ours[2], ref[2]):  # the logits' gradient is rounded to bf16 before the products
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02)


@needs_triton
def test_triton_forward_splits_merge():
    from lightning_gspo.kernels import logprobs_triton

    hidden, weight, bias, ids = make(device=DEVICE)
    with torch.no_grad():
        ref_lp, ref_ent = reference(hidden, weight, ids, 1.0, bias)
        for splits in (1, 3):
            lse, target, ent = logprobs_triton.forward_stats(
                hidden, weight, bias, ids, 1.0, True, splits=splits
            )
            torch.testing.assert_close((target - lse).double(), ref_lp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ent.double(), ref_ent, atol=1e-5, rtol=1e-5)


class RecomputeCounter:
    """Wraps the backward's tile function and counts the logits it recomputes."""

    def __init__(self, fn):
        self.fn, self.logits, self.rows_first_tile, self.calls = fn, 0, 0, 0

    def __call__(self, h, w, b, targets, v0, *args):
        self.calls += 1
        self.logits += h.shape[0] * w.shape[0]
        if v0 == 0:
            self.rows_first_tile += h.shape[0]
        return self.fn(h, w, b, targets, v0, *args)


@pytest.mark.filterwarnings("ignore:.*(NaN|invalid value):RuntimeWarning")  # the garbage row's forward
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_zero_gradient_rows_cost_nothing(small_tiles, matmul_mode, monkeypatch, backend):
    hidden, weight, bias, ids = make(device=DEVICE if backend == "triton" else "cpu")
    n, v = 20, 100
    if backend == "triton":
        from lightning_gspo.kernels import logprobs_triton as target_mod

        name = "dlogits"
    else:
        target_mod, name = lp_mod, "_dlogits_torch"
    counter = RecomputeCounter(getattr(target_mod, name))
    monkeypatch.setattr(target_mod, name, counter)
    g = torch.zeros(n, device=hidden.device)
    live = torch.tensor([1, 4, 5, 13, 19], device=hidden.device)
    g[live] = torch.randn(len(live), device=hidden.device)
    with torch.no_grad():
        hidden[2] = float("nan")  # a padded row holding garbage, with zero gradient: must not leak
    tensors = [hidden, weight, bias]
    _, _, sparse = grads_of(
        lambda: selective_logprobs(
            hidden, weight, ids, bias=bias, return_entropy=True, backend=backend, chunk_size=64
        ),
        tensors,
        g,
    )
    assert counter.rows_first_tile == len(live)
    assert counter.logits == len(live) * v  # only live rows' logits were recomputed
    # Same gradients as the dense reference over the live rows alone (garbage rows cannot contribute)
    keep = torch.ones(n, dtype=torch.bool, device=hidden.device)
    keep[2] = False
    h_clean = hidden.detach()[keep].requires_grad_()
    _, _, dense = grads_of(
        lambda: reference(h_clean, weight, ids[keep], 1.0, bias), [h_clean, weight, bias], g[keep]
    )
    atol = 2e-5
    torch.testing.assert_close(sparse[0][keep].double(), dense[0].double(), atol=atol, rtol=atol)
    assert not sparse[0][~keep].any()
    for a, b in zip(sparse[1:], dense[1:]):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=atol)


@pytest.mark.filterwarnings("ignore:.*(NaN|invalid value):RuntimeWarning")  # the garbage row's forward
@pytest.mark.parametrize("frozen", [False, True])
def test_single_tile_is_kept_for_the_backward(monkeypatch, frozen):
    """All logits in one tile: the backward reuses the forward's tile (no logits recomputed) and gives the
    reference gradients, for sparse rows and an entropy gradient too."""
    hidden, weight, bias, ids = make()
    if frozen:
        weight.requires_grad_(False)
    n = hidden.shape[0]
    g, g_ent = torch.zeros(n), torch.zeros(n)
    live = torch.tensor([0, 3, 7, 8, 19])
    g[live], g_ent[live[:3]] = torch.randn(5), torch.randn(3)
    with torch.no_grad():
        hidden[2] = float("nan")  # a padded row holding garbage, with zero gradient: must not leak
    tiles = []
    real_tile = lp_mod._logits_tile
    monkeypatch.setattr(lp_mod, "_logits_tile", lambda h, *a: tiles.append(h.shape[0]) or real_tile(h, *a))
    tensors = [t for t in (hidden, weight, bias) if t.requires_grad]
    lp, ent, ours = grads_of(
        lambda: selective_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, backend="torch"),
        tensors,
        g,
        g_ent,
    )
    assert tiles == [n]  # the forward's one tile, and nothing recomputed in the backward
    keep = torch.arange(n) != 2
    h_clean = hidden.detach()[keep].requires_grad_()
    ref_tensors = [h_clean] + tensors[1:]
    ref_lp, ref_ent, ref = grads_of(
        lambda: reference(h_clean, weight, ids[keep], 1.0, bias), ref_tensors, g[keep], g_ent[keep]
    )
    torch.testing.assert_close(lp[keep].double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[keep].double(), ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[0][keep].double(), ref[0].double(), atol=2e-5, rtol=2e-5)
    assert not ours[0][~keep].any()
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=2e-5)


def test_all_zero_gradient_skips_the_backward(monkeypatch):
    hidden, weight, bias, ids = make()
    counter = RecomputeCounter(lp_mod._dlogits_torch)
    monkeypatch.setattr(lp_mod, "_dlogits_torch", counter)
    logps = selective_logprobs(hidden, weight, ids, bias=bias, backend="torch")
    (logps * 0).sum().backward()
    assert counter.calls == 0
    assert not hidden.grad.any() and not weight.grad.any() and not bias.grad.any()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_frozen_head_does_no_weight_gradient_work(small_tiles, monkeypatch, backend):
    calls = []
    real = lp_mod._weight_grad_tile
    monkeypatch.setattr(lp_mod, "_weight_grad_tile", lambda *a, **k: calls.append(1) or real(*a, **k))
    device = DEVICE if backend == "triton" else "cpu"
    hidden, weight, _, ids = make(bias=False, device=device)
    g = torch.randn(20, device=device)
    weight.requires_grad_(False)
    ours = grads_of(
        lambda: (selective_logprobs(hidden, weight, ids, backend=backend, chunk_size=64), 0), [hidden], g
    )
    assert weight.grad is None and calls == []
    ref = grads_of(lambda: (reference(hidden, weight, ids)[0], 0), [hidden], g)
    torch.testing.assert_close(ours[2][0].double(), ref[2][0].double(), atol=2e-5, rtol=2e-5)
    weight.requires_grad_(True)
    grads_of(
        lambda: (selective_logprobs(hidden, weight, ids, backend=backend, chunk_size=64), 0), [hidden], g
    )
    assert len(calls) > 0  # the counter would see the work if there were any


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(lp_mod, "MIN_VOCAB_BLOCK", 8)
    n, h, v = 4, 3, 19  # 16 logits a tile: 2 rows x 8 columns, so 2 row blocks x 3 vocabulary tiles
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, v, (n,))

    def fn(hidden, weight, bias):
        kw = dict(temperature=0.9, return_entropy=True, backend="torch", chunk_size=16)
        return selective_logprobs(hidden, weight, ids, bias=bias, **kw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny products: thread hand-offs would cost more than the work
    try:
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    finally:
        torch.set_num_threads(threads)


class LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_holds_the_logits():
    n, h, v = 64, 8, 300  # N V = 19200 logits; the head is 2400 numbers; tiles of at most 1024 logits
    hidden, weight, bias, ids = make(n=n, h=h, v=v)
    with LargestAllocation() as mode:
        logps, ent = selective_logprobs(
            hidden, weight, ids, bias=bias, return_entropy=True, backend="torch", chunk_size=1024
        )
        (logps.sum() + ent.sum()).backward()
    assert mode.largest <= max(1024, v * h)
    with LargestAllocation() as dense:
        reference(hidden, weight, ids, 1.0, bias)[0].sum().backward()
    assert dense.largest >= n * v  # the probe sees a materialised path


def test_validation_errors(monkeypatch):
    hidden, weight, bias, ids = make()
    f = selective_logprobs
    cases = [
        (lambda: f(hidden[0], weight, ids), "hidden must be a \\(N, H\\)"),
        (lambda: f(hidden.long(), weight, ids), "hidden must be a floating"),
        (lambda: f(hidden, weight[0], ids), "weight must be a \\(V, H\\)"),
        (lambda: f(hidden, weight[:, :5], ids), "weight has hidden size 5"),
        (lambda: f(hidden, weight.double(), ids), "weight dtype"),
        (lambda: f(hidden, weight, ids[:5]), "token_ids must be \\(N,\\)"),
        (lambda: f(hidden, weight, ids.float()), "token_ids must be an int64"),
        (lambda: f(hidden, weight, ids - 1000), "token_ids must lie in \\[0, 100\\)"),
        (lambda: f(hidden, weight, ids + 100), "token_ids must lie in \\[0, 100\\)"),
        (lambda: f(hidden, weight, ids, temperature=0.0), "temperature"),
        (lambda: f(hidden, weight, ids, temperature=-1.0), "temperature"),
        (lambda: f(hidden, weight, ids, temperature=float("nan")), "temperature"),
        (lambda: f(hidden, weight, ids, temperature=float("inf")), "temperature"),
        (lambda: f(hidden, weight, ids, temperature="1"), "temperature"),
        (lambda: f(hidden, weight, ids, bias=bias[:5]), "bias must be \\(V,\\)"),
        (lambda: f(hidden, weight, ids, bias=torch.ones(100, dtype=torch.long)), "bias must be a floating"),
        (lambda: f(hidden, weight, ids, backend="cuda"), "backend='cuda' is not one of"),
        (lambda: f(hidden, weight, ids, chunk_size=0), "chunk_size"),
    ]
    if triton_available(DEVICE)[0]:
        h64, w64 = hidden.detach().double().to(DEVICE), weight.detach().double().to(DEVICE)
        cases.append((lambda: f(h64, w64, ids.to(DEVICE), backend="triton"), "float64"))
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        f(hidden, weight, ids, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("frozen", [False, True])
def test_gpu_sizes_bf16(matmul_mode, frozen):
    n, h, v = 2048, 1024, 50_000
    hidden, weight, _, ids = make(n=n, h=h, v=v, dtype=torch.bfloat16, bias=False, device="cuda", scale=0.05)
    weight.requires_grad_(not frozen)
    g = torch.randn(n, device="cuda")
    g[: n // 2] = 0
    tensors = [hidden] + ([] if frozen else [weight])
    for backend in ("triton", "torch"):
        ours = grads_of(
            lambda b=backend: selective_logprobs(hidden, weight, ids, return_entropy=True, backend=b),
            tensors,
            g,
        )
        ref = grads_of(lambda: reference(hidden, weight, ids), tensors, g)
        torch.testing.assert_close(ours[0].double(), ref[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours[1].double(), ref[1], atol=1e-4, rtol=1e-4)
        assert len(ours[2]) == (1 if frozen else 2) and all(x is not None for x in ours[2])
        for a, b in zip(ours[2], ref[2]):
            scale = b.float().abs().max()
            assert (a.float() - b.float()).abs().max() <= 0.02 * scale, backend
    if frozen:
        selective_logprobs(hidden, weight, ids).sum().backward()
        assert weight.grad is None
