"""The once-per-group image and prompt forward of a vision-language policy against the per-completion forward:
``lightning_gspo.policy_logprobs.per_token_logps`` (the fused path) on a tiny Qwen2.5-VL sized a little more like a
real one, G completions per prompt.

Modes, interleaved in one process, medians of the repeats after one warm-up:

- ``per completion``: every row runs its images through the vision tower and its whole sequence through the
  backbone (G x (vision + P + C));
- ``shared``: each distinct prompt's images and tokens run once and the completions attend to it
  (vision + P + G x C), at the default ``SHARE_MIN_SAVED_POSITIONS``.

Timed: the training forward and backward of the log-probs (vision tower frozen, as by default, and trainable),
and the no-grad pass that gives the rollout's old log-probs.

Usage::

    OMP_NUM_THREADS=1 python -P benchmarks/vlm_shared_prefix.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch

SIZE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_depth=4,
    vision_hidden_size=128,
    vision_intermediate_size=256,
    vision_num_heads=4,
    max_pixels=224 * 224,
)


def batch(proc, prompts: int, group: int, images: int, side: int, text: int, completion: tuple[int, int]):
    """Model inputs and completion mask: ``prompts`` prompts of ``text`` random digits after ``images`` pictures
    of side x side pixels, ``group`` completions each of random lengths in ``completion``."""
    from PIL import Image

    from lightning_gspo.image_batch import ImageBatch

    rng = np.random.default_rng(0)
    ids, pixels, grids, row_images, lengths = [], [], [], [], []
    for _ in range(prompts):
        pics = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(images)]
        words = "".join(rng.choice(list("0123456789+="), text))
        content = [*({"type": "image"} for _ in pics), {"type": "text", "text": words}]
        rendered = proc.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        row_ids, pv, grid = proc.encode(rendered, pics)
        first = sum(g.shape[0] for g in grids)
        pixels.append(pv)
        grids.append(grid)
        for _ in range(group):
            ids.append(row_ids)
            row_images.append(list(range(first, first + grid.shape[0])))
            lengths.append(int(rng.integers(completion[0], completion[1] + 1)))
    p, c, pad = max(map(len, ids)), max(lengths), proc.pad_token_id
    prompt = torch.tensor([[pad] * (p - len(x)) + x for x in ids])
    prompt_mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in ids])
    digits = torch.tensor(proc.tokenizer.convert_tokens_to_ids(list("0123456789")))
    mask = torch.arange(c)[None] < torch.tensor(lengths)[:, None]
    done = torch.where(mask, digits[torch.from_numpy(rng.integers(0, 10, (len(ids), c)))], pad)
    full = torch.cat([prompt, done], 1)
    image_batch = ImageBatch(torch.cat(pixels), torch.cat(grids), row_images, proc.image_token_id)
    inputs = {"input_ids": full, "attention_mask": torch.cat([prompt_mask, mask.long()], 1)}
    return {**inputs, **image_batch.model_inputs(full)}, mask, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2, help="distinct prompts in the micro-batch")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--images", type=int, default=1, help="images per prompt")
    ap.add_argument("--side", type=int, default=224, help="image side in pixels")
    ap.add_argument("--text", type=int, default=64, help="prompt text tokens (besides the image tokens)")
    ap.add_argument("--completion", type=int, nargs=2, default=(32, 64), help="completion lengths, min max")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "lightning_gspo_bench_vlm"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import lightning_gspo.policy_logprobs as logprobs_lib
    from lightning_gspo.models import ModelConfig, load_causal_lm, load_tokenizer
    from lightning_gspo.tiny_vlm import build_tiny_vlm
    from lightning_gspo.vlm_models import vision_tower

    path = str(build_tiny_vlm(a.model_dir, "digits", **SIZE))
    cfg = ModelConfig(name_or_path=path)
    model, proc = load_causal_lm(cfg).train(), load_tokenizer(cfg)
    tower = vision_tower(model)[1]
    inputs, mask, p = batch(proc, a.prompts, a.group, a.images, a.side, a.text, tuple(a.completion))
    grad = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    patches = []
    tower.register_forward_pre_hook(lambda m, args: patches.append(args[0].shape[0]))
    threshold = logprobs_lib.SHARE_MIN_SAVED_POSITIONS

    def step(shared: bool, what: str) -> float:
        logprobs_lib.SHARE_MIN_SAVED_POSITIONS = threshold if shared else 10**12
        tower.requires_grad_(what == "train, tower trained")
        t0 = time.perf_counter()
        if what == "old log-probs (no grad)":
            with torch.no_grad():
                logprobs_lib.per_token_logps(model, inputs, mask, 1.0, "fused")
        else:
            logps, _ = logprobs_lib.per_token_logps(model, inputs, mask, 1.0, "fused")
            (logps * grad).sum().backward()
            model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    whats = ("train, tower frozen", "train, tower trained", "old log-probs (no grad)")
    times = {(w, s): [] for w in whats for s in (False, True)}
    rows_through_tower = {}
    for rep in range(a.repeats + 1):
        for w in whats:
            for s in (False, True):
                patches.clear()
                t = step(s, w)
                rows_through_tower[s] = sum(patches)
                if rep:
                    times[(w, s)].append(t)

    n = sum(p.numel() for p in model.parameters())
    b, t = inputs["input_ids"].shape
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(
        f"tiny Qwen2.5-VL, {n / 1e6:.1f}M parameters (vision {sum(q.numel() for q in tower.parameters()) / 1e6:.1f}M, "
        f"{SIZE['vision_depth']} blocks); {a.prompts} prompts x G={a.group} = {b} rows; prompt {p} tokens "
        f"({a.images} x {a.side}x{a.side} image(s), {int((inputs['input_ids'] == proc.image_token_id).sum()) // b} "
        f"image tokens per row), completions {a.completion[0]}-{a.completion[1]} tokens (width {t - p}); "
        f"patch rows through the vision tower: {rows_through_tower[False]} per completion, "
        f"{rows_through_tower[True]} shared\n"
        f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"median of {a.repeats}; uptime: {load}\n"
    )
    print("| pass | per completion ms | shared ms | saved |")
    print("| --- | ---: | ---: | ---: |")
    for w in whats:
        alone, shared = (1000 * statistics.median(times[(w, s)]) for s in (False, True))
        print(f"| {w} | {alone:.0f} | {shared:.0f} | {1 - shared / alone:.0%} ({alone / shared:.2f}x) |")


if __name__ == "__main__":
    main()
