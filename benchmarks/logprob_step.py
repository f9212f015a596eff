"""One policy forward and backward through ``lightning_gspo.policy_logprobs.per_token_logps`` (the fused path), as the
training step runs it, with and without the two shortcuts it takes:

- ``shared``: each distinct prompt goes through the backbone once and its completions attend to its keys and
  values (taken only where at least ``SHARE_MIN_SAVED_POSITIONS`` prompt positions are saved);
- ``kept tile``: when the logits of the micro-batch fit in one tile, the backward reuses it instead of
  recomputing the (N, H) x (H, V) product.

Rows (each in the same process, interleaved, median of the repeats after two warm-ups):

- ``whole, recompute``: every row through the whole sequence, logits recomputed in the backward (neither);
- ``whole``: every row through the whole sequence (kept tile only);
- ``shared``: the shared-prompt forward, forced on whatever it saves (both).

Usage::

    python -P benchmarks/logprob_step.py MODEL_DIR --rows 8 --group 4 --prompt 96 --completion 16

MODEL_DIR is any causal LM directory (``benchmarks/vs_trl.py`` writes a Qwen2.5-0.5B-shaped one with random
weights to ``outputs/bench_vs_trl/qwen0.5b``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rows", type=int, default=8, help="completions in the micro-batch")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--prompt", type=int, default=4, help="prompt tokens")
    ap.add_argument("--completion", type=int, default=8, help="completion tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import lightning_gspo.kernels.logprobs as lp
    from transformers import AutoModelForCausalLM

    import lightning_gspo.policy_logprobs as logprobs_lib

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, min(vocab, 1000), (-(-a.rows // a.group), a.prompt), generator=g)
    ids = torch.cat(
        [
            prompts.repeat_interleave(a.group, 0)[: a.rows],
            torch.randint(3, min(vocab, 1000), (a.rows, a.completion), generator=g),
        ],
        1,
    )
    attn = torch.ones_like(ids)
    cmask = torch.ones(a.rows, a.completion, dtype=torch.bool)
    grad = torch.randn(a.rows, a.completion, generator=g)

    real_shared, real_forward = logprobs_lib._shared_prompt_hidden, lp._forward_torch
    modes = {
        "whole, recompute": dict(shared=False, keep=False),
        "whole": dict(shared=False, keep=True),
        "shared": dict(shared=True, keep=True),
    }
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for rep in range(a.repeats + 2):
        for name, mode in modes.items():
            logprobs_lib._shared_prompt_hidden = real_shared if mode["shared"] else (lambda *args: None)
            logprobs_lib.SHARE_MIN_SAVED_POSITIONS = 1
            lp._forward_torch = (
                real_forward
                if mode["keep"]
                else (lambda *args, keep_tile=False: real_forward(*args, keep_tile=False))
            )
            t0 = time.perf_counter()
            logps, _ = logprobs_lib.per_token_logps(
                model, {"input_ids": ids, "attention_mask": attn}, cmask, 1.0, "fused", True
            )
            t1 = time.perf_counter()
            (logps * grad).sum().backward()
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if rep >= 2:
                times[name].append((t1 - t0, t2 - t1))
    print(
        f"{a.model}: {a.rows} rows, {a.group} per prompt, prompt {a.prompt} + completion {a.completion} "
        f"tokens, {a.threads} threads, median of {a.repeats}\n"
    )
    print("| mode | forward ms | backward ms | total ms | vs whole, recompute |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = None
    for name, t in times.items():
        fwd, bwd = (1000 * statistics.median(x) for x in zip(*t))
        base = base or fwd + bwd
        print(f"| {name} | {fwd:.0f} | {bwd:.0f} | {fwd + bwd:.0f} | {(fwd + bwd) / base:.2f}x |")


if __name__ == "__main__":
    main()
