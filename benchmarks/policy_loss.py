"""Forward + backward time and peak memory of the policy loss: Triton kernels against the PyTorch reference.

    python benchmarks/policy_loss.py [--reps 50]

Times one ``policy_loss`` call and its ``backward()`` (median over ``--reps`` runs after warm-up, CUDA
events), float32 log-probs, beta = 0.04 (so the reference log-probs are read), at 64k and 1M scored tokens,
for the token (GRPO) and sequence (GSPO) levels. "triton fn" is the autograd Function alone, without the
metrics (whose NaN-aware min/max copies to the host in both backends); "kernels (graph)" is the GPU time
of the two Triton kernels alone, replayed from a CUDA graph, so no Python or launch overhead is in it. The
floor is the memory traffic the loss cannot avoid, each of logps, old, ref (4 bytes), the mask (1 byte) read
once and the gradient (4 bytes) written once, at the bandwidth a device-to-device copy reaches on this
machine.

On a machine without CUDA it says so and times only the PyTorch path: Triton's interpreter runs kernels in
Python, so its times say nothing about kernel speed.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch
from lightning_gspo.kernels.policy_loss import _check_spec, policy_loss

SIZES = ((64, 1024), (1024, 1024))  # (B, T): 64k and 1M tokens
LEVELS = ("token", "sequence")
BYTES_PER_TOKEN = 4 + 4 + 4 + 1 + 4  # logps, old, ref, mask read; grad written


def make_inputs(B: int, T: int, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    logps = -3 * torch.rand(B, T, device=device, generator=g)  # (B, T)
    old = logps + 0.3 * torch.randn(B, T, device=device, generator=g)  # (B, T)
    ref = logps + 0.3 * torch.randn(B, T, device=device, generator=g)  # (B, T)
    lengths = torch.randint(T // 4, T + 1, (B,), device=device, generator=g)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (B, T)
    advantages = torch.randn(B, device=device, generator=g)  # (B,)
    return logps.requires_grad_(), old, advantages, mask, ref


def step_fn(backend: str, level: str, inputs):
    logps, old, advantages, mask, ref = inputs
    kwargs = dict(importance_sampling_level=level, loss_type="grpo", beta=0.04, epsilon_low=0.2)
    if backend == "triton fn":
        from lightning_gspo.kernels.policy_loss_triton import TritonPolicyLoss

        spec = _check_spec(level, "grpo", 0.2, None, None, 0.04, True, None)

        def step():
            loss, _ = TritonPolicyLoss.apply(logps, old, advantages, mask, ref, spec, None)
            loss.backward()

        return step

    def step():
        loss, _ = policy_loss(logps, old, advantages, mask, ref, backend=backend, **kwargs)
        loss.backward()

    return step


def kernels_graph_fn(level: str, inputs):
    """The forward and backward launches alone, for a CUDA-graph replay."""
    from lightning_gspo.kernels.policy_loss_triton import (
        _params,
        policy_loss_backward,
        policy_loss_forward,
    )

    logps, old, advantages, mask, ref = inputs
    spec = _check_spec(level, "grpo", 0.2, None, None, 0.04, True, None)
    params = _params(spec, torch.float32, logps.device)
    scale = torch.full((logps.shape[0],), 1.0 / logps.shape[0], device=logps.device)

    def step():
        stats = policy_loss_forward(logps, old, advantages, mask, ref, spec, params)
        policy_loss_backward(logps, old, advantages, mask, ref, spec, params, stats, scale)

    return step


def profile(level: str, B: int, T: int) -> None:
    """Where the time of one Triton-backend call goes, host and device, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    inputs = make_inputs(B, T, "cuda")
    step = step_fn("triton", level, inputs)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            inputs[0].grad = None
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def time_cuda(step, logps, reps: int) -> tuple[float, float]:
    """Median milliseconds of one forward + backward, and the peak memory above the inputs (MiB)."""
    for _ in range(5):
        logps.grad = None
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        logps.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    logps.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def time_cpu(step, logps, reps: int) -> float:
    import time

    step()
    times = []
    for _ in range(reps):
        logps.grad = None
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second a device-to-device copy moves (read + written), median of 10."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y.copy_(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * 2**30 / statistics.median(times)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="also profile one Triton call at 64k tokens")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print(f"machine: {platform.processor() or platform.machine()} (CPU), torch {torch.__version__}")
        print("No CUDA GPU: Triton would run in its interpreter, whose times are not kernel speed.")
        print("Timing the PyTorch path only.\n")
        print("| backend | level | B x T | fwd+bwd ms |")
        print("| --- | --- | --- | ---: |")
        for B, T in SIZES:
            for level in LEVELS:
                inputs = make_inputs(B, T, "cpu")
                ms = time_cpu(step_fn("torch", level, inputs), inputs[0], max(3, args.reps // 10))
                print(f"| torch | {level} | {B} x {T} | {ms:.2f} |")
        return

    import triton
    import triton.testing

    name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth()
    print(f"machine: {name}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + written)")
    print(
        f"floor: {BYTES_PER_TOKEN} bytes per token (fp32 logps, old, ref and bool mask read; fp32 grad "
        "written)\n"
    )
    print("| backend | level | B x T | tokens | fwd+bwd ms | peak extra MiB | floor ms | x floor |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for B, T in SIZES:
        floor_ms = B * T * BYTES_PER_TOKEN / bandwidth * 1e3
        for level in LEVELS:
            inputs = make_inputs(B, T, "cuda")
            for backend in ("torch", "triton", "triton fn"):
                ms, peak = time_cuda(step_fn(backend, level, inputs), inputs[0], args.reps)
                print(
                    f"| {backend} | {level} | {B} x {T} | {B * T:,} | {ms:.3f} | {peak:.1f} | {floor_ms:.4f} "
                    f"| {ms / floor_ms:.1f} |"
                )
            ms = triton.testing.do_bench_cudagraph(kernels_graph_fn(level, inputs), rep=100)
            print(
                f"| kernels (graph) | {level} | {B} x {T} | {B * T:,} | {ms:.4f} | | {floor_ms:.4f} "
                f"| {ms / floor_ms:.1f} |"
            )
            del inputs
            torch.cuda.empty_cache()
    if args.profile:
        profile("sequence", *SIZES[0])


if __name__ == "__main__":
    main()
