"""Generation engines side by side on a vision-language policy: transformers' ``generate`` (``HFGenerate``) against
``CachedGenerate`` on the tiny Qwen2.5-VL, the same image prompts and batch, in one process.

    python -P benchmarks/generation_engine_images.py                  # 4 prompts x 8 completions, 48 tokens
    python -P benchmarks/generation_engine_images.py --repeats 5 --tokens 32 64 --out /tmp/engines_vlm.md

The model is ``tiny-vlm:digits`` with a 4-block vision tower and images up to 224 x 224 (each 224 x 224 image is 16
x 16 patches, 64 image tokens after the 2 x 2 merge); each prompt holds one image, or two for every other prompt.
Sampling is at temperature 1. Two workloads: ``sampled`` stops rows at the model's EOS (the random model draws it
now and then, so lengths vary and early exit has work); ``full length`` names the image placeholder as the only EOS,
which both engines suppress, so every row decodes to the limit (full-batch decode steps). tokens/s counts the
completion tokens kept, up to and including an EOS. The prefill is where ``generate`` encodes every image once per
completion and the cached engine once per prompt. ``cached, no shared prefill`` encodes the images once per
completion too, which separates the tower's share of the gain from the loop's; ``cached, plain`` also turns off
early exit and the preallocated cache. Calls go round-robin over the engines, ``--repeats`` times after one warm-up
call each; the table gives medians. Greedy completions of both engines are compared once per length.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from lightning_gspo.config import GSPOConfig
from lightning_gspo.decode_engine import CachedGenerate
from lightning_gspo.models import ModelConfig, load_causal_lm, load_tokenizer
from lightning_gspo.rollout import HFGenerate, completion_mask, eos_ids, prompt_text


def records(n: int, side: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        count = 1 + i % 2
        images = [
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)
        ]
        out.append({"prompt": [{"role": "user", "content": f"{i}+{i * 7}="}], "images": images})
    return out


def measure(model, proc, ids, mask, images, g, n, eos, repeats, prompts, workload) -> list[str]:
    """Table rows of one length and EOS list: median seconds and tokens/s (completion tokens kept) per engine."""
    config = GSPOConfig(max_completion_length=n, num_generations=g, per_device_train_batch_size=prompts * g)
    engines = {
        "hf": HFGenerate(proc, config, eos),
        "cached": CachedGenerate(proc, config, eos),
        # the tower then encodes every image once per completion, as generate does
        "cached, no shared prefill": CachedGenerate(proc, config, eos, shared_prefill=False),
        "cached, plain": CachedGenerate(
            proc, config, eos, early_exit=False, shared_prefill=False, preallocate=False
        ),
    }
    greedy = [
        e.generate(model, ids, mask, g, images=images)
        for e in (HFGenerate(proc, config, eos, greedy=True), CachedGenerate(proc, config, eos, greedy=True))
    ]
    seconds: dict[str, list[float]] = {k: [] for k in engines}
    speed: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(repeats + 1):
        for name, engine in engines.items():
            torch.manual_seed(r)
            t = time.perf_counter()
            out = engine.generate(model, ids, mask, g, images=images)
            if r:  # the first round warms up
                seconds[name].append(time.perf_counter() - t)
                speed[name].append(int(completion_mask(out, eos)[0].sum()) / seconds[name][-1])
    hf = statistics.median(seconds["hf"])
    lines = []
    for name in engines:
        s, v = statistics.median(seconds[name]), statistics.median(speed[name])
        lines.append(f"| {n} | {workload} | {name} | {s:.3f} | {v:.0f} | {hf / s:.2f}x |")
    lines.append(f"| {n} | {workload} | greedy completions equal | {torch.equal(*greedy)} | | |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[48])
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--vision-depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(
        name_or_path="tiny-vlm:digits",
        tiny_dir=tempfile.mkdtemp(prefix="tiny_vlm_bench"),
        tiny={"vision_depth": args.vision_depth, "max_pixels": args.side * args.side},
    )
    model, proc = load_causal_lm(cfg), load_tokenizer(cfg)
    model.eval()
    rows = records(args.prompts, args.side)
    ids, mask, images, _ = proc.encode_prompts(
        [r["prompt"] for r in rows], rows, None, lambda p: prompt_text(p, proc)
    )
    g = args.generations
    lines = [
        f"tiny Qwen2.5-VL, vision depth {args.vision_depth}, {images.num_images} images of {args.side}x{args.side} "
        f"({int(images.image_grid_thw[0].prod()) // 4} tokens each), {args.prompts} prompts x {g} completions, "
        f"prompt width {ids.shape[1]}, {args.threads} thread(s), median of {args.repeats}",
        "",
        "| new tokens | workload | engine | seconds | tokens/s | vs hf |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    # The placeholder is suppressed by both engines, so as the only EOS no row ever stops.
    workloads = {"sampled": eos_ids(proc, model), "full length": [proc.image_token_id]}
    for n in args.tokens:
        for workload, eos in workloads.items():
            lines += measure(model, proc, ids, mask, images, g, n, eos, args.repeats, args.prompts, workload)
    lines += ["", f"load average (uptime): {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
