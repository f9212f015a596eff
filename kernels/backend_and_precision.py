"""Where a kernel runs and in which precision it computes: the choices both kernel families share.

- Backend: ``"auto"`` takes Triton on CUDA and PyTorch elsewhere; an explicit ``"triton"`` is refused, with the
  reason, where Triton cannot run (no triton, or CPU tensors without the interpreter). Settings a Triton kernel
  does not compute send ``"auto"`` to PyTorch, with one warning per set of settings, and are refused, by name,
  under ``"triton"``.
- Precision: arithmetic is float32 whatever the input dtype, and float64 stays float64 so that
  ``torch.autograd.gradcheck`` can check the autograd Functions.
- Matmuls of 16-bit operands write float32 without rounding the product to 16 bits first: on CUDA through
  ``out_dtype`` where torch supports it, on the CPU (whose 16-bit matmuls write 16 bits) by upcasting the
  operands.
"""

from __future__ import annotations

import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton")
_warned_fallbacks: set[str] = set()


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton path can run for tensors on ``device``, and if not, why."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, (
        f"tensors are on {device.type}; the Triton kernel runs on CUDA, or on the CPU only under Triton's "
        "interpreter (set TRITON_INTERPRET=1 before triton is imported)"
    )


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available(device)[0] else "torch"
    if backend == "triton":
        ok, why = triton_available(device)
        if not ok:
            raise ValueError(f"backend='triton' cannot run: {why}. Use backend='torch' or 'auto'.")
    return backend


def resolve_backend_covering(backend: str, device: torch.device, uncovered: dict, covered: str) -> str:
    """``resolve_backend``, then PyTorch where Triton would run but its kernel does not compute the settings in
    ``uncovered`` (field name -> value; ``covered`` says what the kernel does compute)."""
    which = resolve_backend(backend, device)
    if which != "triton" or not uncovered:
        return which
    named = ", ".join(f"{k}={v!r}" for k, v in uncovered.items())
    if backend == "triton":
        raise ValueError(
            f"backend='triton' does not cover {named}: the Triton kernel computes {covered}. Use backend='torch' "
            "or 'auto'."
        )
    key = ",".join(uncovered)
    if key not in _warned_fallbacks:
        _warned_fallbacks.add(key)
        # Frames: here, the kernel's entry point, and its caller (named).
        warnings.warn(
            f"backend='auto' computes this with PyTorch: the Triton kernel does not cover {named}.",
            UserWarning,
            stacklevel=3,
        )
    return "torch"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mm_f32(a: torch.Tensor, b: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` written in ``acc_dtype``: no rounding of the product to bfloat16 first."""
    if a.dtype == acc_dtype:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=acc_dtype)
        except (TypeError, RuntimeError):
            pass
    return a.to(acc_dtype) @ b.to(acc_dtype)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in float32/64 and ``a``, ``b`` possibly bfloat16."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):
            acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def matmul_operand(x: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    # CPU matmuls of bfloat16/float16 write the same dtype; upcast so the logits are not rounded.
    return x if x.is_cuda else x.to(acc_dtype)
