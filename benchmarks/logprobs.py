"""Per-token log-probs from hidden states: forward + backward time and peak memory, side by side.

    python benchmarks/logprobs.py            # CPU: N=4096, H=896, V=151936 (Qwen2.5-0.5B's head), float32
    python benchmarks/logprobs.py --gpu      # CUDA: N=16384, H=4096, V=151936, bfloat16

Methods: the materialised path (``(h @ W.T / T).float().log_softmax(-1).gather``), ours
(``selective_logprobs``; on CUDA both backends), TRL 1.16's ``ChunkedLogProbFunction`` (called as TRL's fused
LM-head forward calls it) and Liger-Kernel's fused linear GRPO loss, when those packages import.

Scenarios: ``full`` (trainable head, every row has a gradient), ``sparse75`` (75% of rows receive an exactly
zero gradient, as zero-advantage groups do with beta = 0) and ``frozen`` (head without gradient, as with LoRA).

Each measurement is a forward, then ``(logps * g).sum().backward()``, timed separately after a device sync;
the median of ``--repeats`` runs is printed. Peak memory is what the step adds above its inputs, with and
without the gradients it returns (every method must hold those, so the "working" column is the one that
compares methods):

- CPU: each (method, scenario) runs in a fresh subprocess; the kernel's resident-set high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs``) after a small warm-up, minus the resident set just
  before the step. This sees every allocation (torch's, BLAS workspaces, the allocator's slack), which a
  profiler of torch allocations alone would not.
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step, in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import types
from functools import partial

import torch

SCENARIOS = ("full", "sparse75", "frozen")


# ------------------------------------------------------------------------------------------------------------
# Methods: each maps (hidden, weight, ids, temperature) to per-token log-probs (N,) carrying the graph
# ------------------------------------------------------------------------------------------------------------


def materialised(hidden, weight, ids, temperature):
    logits = hidden @ weight.T / temperature  # (N, V)
    return logits.float().log_softmax(-1).gather(1, ids[:, None]).squeeze(1)


def ours(backend, matmul=None):
    from lightning_gspo.kernels import logprobs_triton, selective_logprobs

    default = dict(logprobs_triton.MATMUL)

    def fn(h, w, ids, t):
        # read again by the backward, so it stays set until another method runs
        logprobs_triton.MATMUL = {k: matmul for k in default} if matmul else dict(default)
        return selective_logprobs(h, w, ids, temperature=t, backend=backend)

    return fn


def _trl_chunk_size():
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        return _CHUNKED_LOGPROB_CHUNK_SIZE
    except Exception:
        return 32768  # TRL 1.16's value


def make_method(name):
    """(callable, note) or raise ImportError."""
    if name == "materialised":
        return materialised, ""
    if name.startswith("ours"):
        # ours, ours-torch, ours-triton (its defaults), ours-triton-fused, ours-triton-cublas
        parts = name.split("-")
        backend = parts[1] if len(parts) > 1 else "auto"
        matmul = parts[2] if len(parts) > 2 else None
        note = {
            "cublas": "logits tiles from cuBLAS in float32, folded by the Triton kernels (forward and backward)",
            "fused": "logits formed by tl.dot inside the Triton kernels (forward and backward)",
        }.get(matmul, "")
        return ours(backend, matmul), note
    if name == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        note = ""
        try:
            import trl.trainer.utils  # noqa: F401  (its backward imports a ZeRO-3 helper from here)
        except Exception as err:
            stub = types.ModuleType("trl.trainer.utils")
            stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
            sys.modules["trl.trainer.utils"] = stub
            note = f"trl.trainer.utils not importable ({type(err).__name__}): its ZeRO-3 gather stubbed"
        chunk = _trl_chunk_size()

        def fn(h, w, ids, t):
            return ChunkedLogProbFunction.apply(h, w, None, ids, t, chunk, None, 1.0, ("log_probs",))[0]

        return fn, note
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        return LigerFusedLinearGRPOLoss, "computes the whole GRPO loss (beta = 0), not log-probs"
    raise ValueError(name)


# ------------------------------------------------------------------------------------------------------------
# One measurement
# ------------------------------------------------------------------------------------------------------------


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def inputs(n, h, v, dtype, device, scenario, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=gen, device=device)
    hidden = torch.randn(n, h, **kw).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, **kw) * h**-0.5).to(dtype)
    weight.requires_grad_(scenario != "frozen")
    ids = torch.randint(0, v, (n,), **kw)
    g = torch.randn(n, **kw)
    if scenario == "sparse75":
        g[torch.randperm(n, **kw)[: 3 * n // 4]] = 0
    return hidden, weight, ids, g


def _liger_step(cls, hidden, weight, ids, g, temperature, seq_len=512):
    """Liger's fused GRPO loss; rows are grouped into sequences, whose advantage plays the part of g."""
    n = hidden.shape[0]
    b = n // seq_len
    adv = g.view(b, seq_len)[:, 0].contiguous()
    loss_fn = cls(beta=0.0, use_ref_model=False, compiled=False, loss_type="bnpo", temperature=temperature)
    mask = torch.ones(b, seq_len, device=hidden.device)
    return loss_fn(hidden, weight, ids.view(b, seq_len), mask, adv)[0]


def measure(method, scenario, n, h, v, dtype, device, repeats, temperature=0.7):
    """Times and peak memory of ``repeats`` forward+backward steps of one method in one scenario."""
    fn, note = make_method(method)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(hidden, weight, ids, g):
        t0 = time.perf_counter()
        if method == "liger":
            loss = _liger_step(fn, hidden, weight, ids, g, temperature)
        else:
            loss = (fn(hidden, weight, ids, temperature) * g).sum()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1

    # Warm-up at a small size: library initialisation, Triton compilation, thread pools.
    small = inputs(min(n, 1024), h, min(v, 4096), dtype, device, scenario)
    step(*small)
    if device == "cuda":
        step(*inputs(n, h, v, dtype, device, scenario, seed=1))  # compile for the real shapes too
    del small
    hidden, weight, ids, g = inputs(n, h, v, dtype, device, scenario)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes("VmRSS")
        _reset_hwm()
    times = [step(hidden, weight, ids, g)]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes("VmHWM") - base
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight) if t.grad is not None)
    for _ in range(repeats - 1):
        hidden.grad = weight.grad = None
        times.append(step(hidden, weight, ids, g))
    fwd = statistics.median(t[0] for t in times)
    bwd = statistics.median(t[1] for t in times)
    tot = statistics.median(t[0] + t[1] for t in times)
    return dict(
        method=method, scenario=scenario, fwd=fwd, bwd=bwd, total=tot, peak=peak, grads=grads, note=note
    )


def matmul_rate(n, h, v, dtype, device, repeats=5):
    """FLOP/s of one plain (N, H) @ (H, V) product, the unit of the 8NHV / 6NHV floors."""
    a = torch.randn(n, h, device=device, dtype=dtype)
    b = torch.randn(v, h, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        c = a @ b.T
        sync()
        times.append(time.perf_counter() - t0)
        del c
    return 2 * n * h * v / statistics.median(times[1:])


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------


def _run_worker(args, method, scenario):
    cmd = [sys.executable, __file__, "--worker", method, scenario, "--n", str(args.n), "--h", str(args.h)]
    cmd += ["--v", str(args.v), "--dtype", args.dtype, "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return dict(method=method, scenario=scenario, error=(proc.stderr.strip().splitlines() or ["?"])[-1])


def _available(method):
    try:
        make_method(method)
        return None
    except ImportError as err:
        return f"not installed ({err.name or err})"
    except Exception as err:
        return f"not usable ({type(err).__name__}: {err})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA sizes and methods")
    p.add_argument("--n", type=int)
    p.add_argument("--h", type=int)
    p.add_argument("--v", type=int, default=151_936)
    p.add_argument("--dtype", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int)
    p.add_argument("--methods", nargs="*")
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "SCENARIO"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--sweep", action="store_true", help="CUDA: try a few Triton block shapes first")
    args = p.parse_args()
    device = "cuda" if args.gpu else "cpu"
    args.n = args.n or (16_384 if args.gpu else 4096)
    args.h = args.h or (4096 if args.gpu else 896)
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    args.repeats = args.repeats or (5 if args.gpu else 3)
    dtype = getattr(torch, args.dtype)

    if args.worker:
        row = measure(*args.worker, args.n, args.h, args.v, dtype, "cpu", args.repeats)
        print(json.dumps(row))
        return

    methods = args.methods or (
        [
            "materialised",
            "ours-triton",
            "ours-triton-fused",
            "ours-triton-cublas",
            "ours-torch",
            "trl",
            "liger",
        ]
        if args.gpu
        else ["materialised", "ours", "trl"]
    )
    where = torch.cuda.get_device_name() if args.gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"N={args.n} H={args.h} V={args.v} {args.dtype} on {where}, torch {torch.__version__}, median of "
        f"{args.repeats}"
    )
    if args.gpu:
        a = torch.ones(4, 4, device="cuda", dtype=dtype)
        try:
            torch.mm(a, a, out_dtype=torch.float32)
            print("torch.mm(out_dtype=float32) from bf16: supported")
        except Exception as err:
            print(f"torch.mm(out_dtype=float32) from bf16: not supported ({type(err).__name__})")
    rows, skipped = [], {}
    live = []
    for method in methods:
        why = _available(method)
        if why:
            skipped[method] = why
        else:
            live.append(method)
    if args.gpu:
        if args.sweep:
            sweep(args.n, args.h, args.v, dtype)
        for method in live:
            for scenario in args.scenarios:
                print(f"  measuring {method} / {scenario} ...", file=sys.stderr, flush=True)
                try:
                    rows.append(
                        measure(method, scenario, args.n, args.h, args.v, dtype, device, args.repeats)
                    )
                except Exception as err:  # keep the other methods' numbers
                    rows.append(dict(method=method, scenario=scenario, error=f"{type(err).__name__}: {err}"))
                torch.cuda.empty_cache()
    else:
        # One fresh process per (method, scenario, round), the rounds interleaved so that a change of load on
        # a shared machine falls on every method alike.
        load = os.getloadavg()[0]
        runs = {}
        for rnd in range(args.repeats):
            for method in live:
                for scenario in args.scenarios:
                    print(f"  round {rnd}: {method} / {scenario} ...", file=sys.stderr, flush=True)
                    runs.setdefault((method, scenario), []).append(_run_worker(args, method, scenario))
        for rs in runs.values():
            good = [r for r in rs if "error" not in r]
            if not good:
                rows.append(rs[0])
                continue
            row = dict(good[0], peak=max(r["peak"] for r in good))
            for key in ("fwd", "bwd", "total"):
                row[key] = statistics.median(r[key] for r in good)
            rows.append(row)
        print(f"load average (1 min) before: {load:.2f}, after: {os.getloadavg()[0]:.2f}")
    report(rows, skipped, args, dtype, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, skipped=skipped, args=vars(args)), f, indent=1)


def sweep(n, h, v, dtype):
    """Times the Triton kernels under a few block shapes, checks they agree, keeps the fastest."""
    from lightning_gspo.kernels import logprobs_triton as kern

    hidden, weight, ids, _ = inputs(n, h, v, dtype, "cuda", "full")
    hidden, weight = hidden.detach(), weight.detach()
    default = dict(kern.MATMUL)
    kern.MATMUL = {"forward": "fused", "dlogits": "fused"}
    lse_ref = kern.forward_stats(hidden, weight, None, ids, 1.0, False)[0]
    cols = 8192
    g = torch.randn(n, device="cuda")
    mm_shapes = ((128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4))
    fold_shapes = ((32, 256, 16, 8, 2), (64, 128, 16, 4, 2), (16, 512, 16, 4, 2))
    for kernel, shapes in (("forward", mm_shapes), ("dlogits", mm_shapes), ("fold", fold_shapes)):
        key = (kernel, "16bit")
        best = (float("inf"), kern.CUDA_BLOCKS[key])
        mode = "cublas" if kernel == "fold" else "fused"
        kern.MATMUL = {"forward": mode, "dlogits": mode}
        for bn, bv, bh, warps, stages in shapes:
            kern.CUDA_BLOCKS[key] = dict(
                BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps, num_stages=stages
            )
            if kernel == "dlogits":
                run = partial(kern.dlogits, hidden, weight[:cols], None, ids, 0, lse_ref, None, g, None, 1.0)
                flops = 2 * n * h * cols
            else:
                tile = (n, max(128, (1 << 27) // n // 128 * 128))
                run = partial(kern.forward_stats, hidden, weight, None, ids, 1.0, False, tile=tile)
                flops = 2 * n * h * v
            try:
                out = run()
                err = 0.0 if kernel == "dlogits" else (out[0] - lse_ref).abs().max().item()
                times = []
                for _ in range(3):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    run()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                t = statistics.median(times)
                print(
                    f"sweep {kernel} {bn}x{bv}x{bh} w{warps} s{stages}: {flops / t / 1e12:.0f} TFLOP/s, "
                    f"{t * 1e3:.1f} ms (max |lse - fused default| {err:.1e})",
                    flush=True,
                )
                if t < best[0] and err < 1e-3:
                    best = (t, dict(kern.CUDA_BLOCKS[key]))
            except Exception as exc:
                print(f"sweep {kernel} {bn}x{bv}x{bh} w{warps} s{stages}: failed {type(exc).__name__}: {exc}")
        kern.CUDA_BLOCKS[key] = best[1]
        print(f"sweep {kernel}: using {best[1]}", flush=True)
    kern.MATMUL = default
    torch.cuda.empty_cache()


def report(rows, skipped, args, dtype, device):
    mib = 2**20
    nhv = args.n * args.h * args.v
    rate = matmul_rate(args.n, args.h, args.v, dtype, device) if device == "cuda" else None
    ok = {(r["method"], r["scenario"]): r for r in rows if "error" not in r}
    print()
    print(
        "| scenario | method | fwd s | bwd s | fwd+bwd s | vs materialised | peak MiB | working MiB |"
        + (" vs floor |" if rate else "")
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if rate else ""))
    for r in rows:
        if "error" in r:
            print(f"| {r['scenario']} | {r['method']} | error: {r['error']} |")
            continue
        ref = ok.get(("materialised", r["scenario"]))
        rel = f"{r['total'] / ref['total']:.2f}x" if ref else "-"
        work = r["peak"] - r["grads"]
        line = (
            f"| {r['scenario']} | {r['method']} | {r['fwd']:.3f} | {r['bwd']:.3f} | {r['total']:.3f} | {rel} | "
            f"{r['peak'] / mib:.0f} | {work / mib:.0f} |"
        )
        if rate:
            flops = (6 if r["scenario"] == "frozen" else 8) * nhv
            line += f" {r['total'] / (flops / rate):.2f}x |"
        print(line)
    if rate:
        print(
            f"\nplain bf16 matmul (N,H)@(H,V): {rate / 1e12:.0f} TFLOP/s; floor = 8NHV (6NHV frozen) at that rate"
        )
    print("\nworking = peak above inputs minus the gradients returned (hidden.grad, weight.grad)")
    for r in rows:
        if r.get("note"):
            print(f"note ({r['method']}): {r['note']}")
    for m, why in skipped.items():
        print(f"skipped {m}: {why}")
    # The targets
    full_ref, full_ours = (
        ok.get(("materialised", "full")),
        ok.get(("ours", "full")) or ok.get(("ours-triton", "full")),
    )
    sparse_ours = ok.get(("ours", "sparse75")) or ok.get(("ours-triton", "sparse75"))
    if full_ref and full_ours:
        mem = (full_ours["peak"] - full_ours["grads"]) / max(1, full_ref["peak"] - full_ref["grads"])
        print(
            f"\nours / materialised, full: time {full_ours['total'] / full_ref['total']:.2f}x, working memory "
            f"{100 * mem:.1f}%"
        )
        if sparse_ours:
            print(
                f"ours sparse75 backward / ours full backward: {sparse_ours['bwd'] / full_ours['bwd']:.2f}x; "
                f"/ materialised full backward: {sparse_ours['bwd'] / full_ref['bwd']:.2f}x"
            )


if __name__ == "__main__":
    main()
