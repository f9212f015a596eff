"""End to end against TRL's GRPOTrainer on a vision-language model: the same GSPO run on the same tiny Qwen2.5-VL.

    python -P benchmarks/vs_trl_vlm.py                          # 24 steps x 2 seeds, the two trainers side by side
    python -P benchmarks/vs_trl_vlm.py --steps 6 --seeds 2      # short runs (about 3 minutes)
    python -P benchmarks/vs_trl_vlm.py --tiny --steps 4 --seeds 1  # the default tiny VLM: a check (about 1 minute)
    python -P benchmarks/vs_trl_vlm.py --sequential --threads 2 # one after the other, each on a quiet machine

Results and their reading: docs/benchmarks.md, "End to end against TRL on a vision-language model". The machinery
(subprocess per run, timing, peak RSS, the per-part profile, the tables) is ``vs_trl.py``'s; this file adds the
model, the images, the reward functions, TRL's processing class and the vision tower's own clock.

- The model: ``lightning_gspo.tiny_vlm.build_tiny_vlm`` made larger (``VLM``: 4 vision blocks 128 wide, 4 language
  layers 128 wide, images of 224 x 224 pixels, i.e. 256 patches and 64 image tokens each), random weights, the
  printable-ASCII vocabulary, written once and loaded by both trainers from the same directory.
- The data: ``NUM_PROMPTS`` generated pictures (1 to 9 dark dots on a light background, seeded) in an
  ``image`` column, as TRL expects for VLMs, the number in a ``count`` column, and one fixed question.
- The rewards: ``count_reward`` (1 when the completion's first number is the count) and ``digit_reward`` (the
  share of the completion's characters that are digits, weight 0.5). The second varies between random
  completions, so nearly every group has reward variance and both trainers do their whole work each step (a
  zero-advantage group is one lightning-gspo need not backpropagate at beta = 0).
- The settings: GSPO (sequence level, eps 3e-4 / 4e-4, ``loss_type=grpo``), off-policy (``num_iterations=2``),
  G = 8, 16 completions per micro-batch, 2 micro-batches per optimizer step (4 prompts per generation batch),
  completions up to 16 tokens, temperature 1, beta 0, lr 1e-4 constant, float32, no gradient checkpointing;
  ``vs_trl.COMMON`` for the rest. The vision tower is frozen in both: lightning-gspo's default
  (``model.train_vision_tower=false``), and TRL given the model object with the tower's ``requires_grad`` off;
  TRL left to itself trains the tower (huggingface/trl#6617), which would compare different work.
- TRL's processing class: TRL builds one with ``AutoProcessor.from_pretrained``, and Qwen2.5-VL's processor insists
  on a video processor, which needs torchvision (a CUDA build on PyPI that does not load beside CPU torch).
  ``ImageOnlyQwen2_5_VLProcessor`` is transformers' own ``Qwen2_5_VLProcessor`` with the video processor left out
  of its sub-processors (its ``__init__`` no longer names one), so TRL's calls (``apply_chat_template`` with
  images, ``__call__(images=, text=)``, ``.tokenizer``, ``.image_processor``) run transformers' code unchanged.
  ``check_processor`` shows, before any run, that it gives TRL the same ids, pixel values and grids as the
  reference processing (the PIL image processor and the placeholder widened per merged patch,
  ``lightning_gspo.vision.VisionProcessor``) and as lightning-gspo's own prompt encoding.

Measured as in ``vs_trl.py`` (completions/s, optimizer steps/s, peak RSS in training, the per-part profile:
generation, old log-probs, policy forward, backward, ...), plus the vision tower: its time, its calls and the images
it encoded per optimizer step, in all and in the policy forward. Both trainers repeat each prompt's image once per
completion (the tower sees G copies in every forward; TRL also in its old-log-probs pass); a forward that encodes
the image and the prompt once per group shows there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # vs_trl beside this file (-P keeps it off sys.path)

import vs_trl  # noqa: E402

NUM_PROMPTS = 256
IMAGE_SIZE = 224
QUESTION = "How many dots are in the picture? Answer with the number."
# The tiny VLM, larger: the vision tower's cost must be visible beside the language model's.
VLM = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_depth=4,
    vision_hidden_size=128,
    vision_intermediate_size=256,
    vision_num_heads=4,
    max_pixels=IMAGE_SIZE * IMAGE_SIZE,
)
VOCAB = "ascii"
ALGO = dict(
    num_generations=8,
    per_device_train_batch_size=16,
    gradient_accumulation_steps=2,
    num_iterations=2,
    max_completion_length=16,
    learning_rate=1e-4,
)
STEPS, SEEDS = 24, 2


# ------------------------------------------------------------------------------------------------------------
# Data and rewards
# ------------------------------------------------------------------------------------------------------------


def dots_dataset(n: int = NUM_PROMPTS, seed: int = 0):
    """``n`` rows: a 224 x 224 picture of 1-9 dots (``image``), their number (``count``) and the fixed question."""
    import random

    from datasets import Dataset
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    rows = {"prompt": [], "image": [], "count": []}
    for _ in range(n):
        background = tuple(rng.randrange(160, 256) for _ in range(3))
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
        draw = ImageDraw.Draw(image)
        count = rng.randint(1, 9)
        for _ in range(count):
            r = rng.randint(8, 20)
            x, y = rng.randint(r, IMAGE_SIZE - r), rng.randint(r, IMAGE_SIZE - r)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(0, 140) for _ in range(3)))
        rows["prompt"].append([{"role": "user", "content": QUESTION}])
        rows["image"].append(image)
        rows["count"].append(count)
    return Dataset.from_dict(rows)


def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def count_reward(completions, count, **kwargs) -> list[float]:
    """1 when the completion's first number is the number of dots."""
    found = [re.search(r"\d+", _text(c)) for c in completions]
    return [float(m is not None and int(m.group()) == k) for m, k in zip(found, count)]


def digit_reward(completions, **kwargs) -> list[float]:
    """The share of the completion's characters that are digits: varies between random completions."""
    texts = [_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


# ------------------------------------------------------------------------------------------------------------
# TRL's processing class and model
# ------------------------------------------------------------------------------------------------------------


def image_only_processor(model_dir: str):
    """transformers' ``Qwen2_5_VLProcessor`` without a video processor (see the module notes), set up as TRL sets
    the one it builds (left padding and truncation)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        # ProcessorMixin takes its sub-processors from __init__'s parameter names: without video_processor here
        # it neither asks for one nor looks one up (the lookup is what needs torchvision).
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left", truncation_side="left")
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    return ImageOnlyQwen2_5_VLProcessor(image_processor, tok, chat_template=tok.chat_template)


def trl_inputs(model_dir: str):
    """(model, processing class) for TRL: the VLM with its vision tower frozen, and the image-only processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    from lightning_gspo.vlm_models import vision_tower

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    vision_tower(model)[1].requires_grad_(False)  # as lightning-gspo's default does
    return model, image_only_processor(model_dir)


def check_processor(model_dir: str, rows: int = 4) -> str:
    """Compare, on the first ``rows`` prompts, what TRL computes with ``image_only_processor`` (its generation
    path: ``apply_chat_template`` on messages holding the images; its forward path: ``__call__`` on the rendered
    texts) with the reference processing (``VisionProcessor`` composing the PIL image processor and the
    tokenizer) and with lightning-gspo's prompt encoding. Raises on any difference; a one-line summary."""
    import torch
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    from lightning_gspo.models import ModelConfig, load_tokenizer
    from lightning_gspo.vision_prompts import encode_prompts

    proc = image_only_processor(model_dir)
    ours = load_tokenizer(ModelConfig(name_or_path=model_dir))
    assert ours.processor is None, (
        "torchvision loaded: the reference should then be transformers' own processor"
    )
    data = dots_dataset(rows)
    records = [data[i] for i in range(rows)]
    messages = [prepare_multimodal_messages(r["prompt"], images=[r["image"]]) for r in records]
    generation = proc.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    texts = [apply_chat_template({"prompt": m}, proc)["prompt"] for m in messages]
    forward = proc(images=[[r["image"]] for r in records], text=texts, padding=True, return_tensors="pt")
    ids, mask, batch, _ = encode_prompts(
        ours,
        [r["prompt"] for r in records],
        records,
        None,
        lambda m: ours.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
    )
    start = 0
    for i, r in enumerate(records):
        ref_ids, ref_pixels, ref_grid = ours.encode(texts[i], [r["image"]])
        n = int(ref_grid.prod())
        mine = ids[i][mask[i].bool()].tolist()
        problems = {
            "generation ids": generation["input_ids"][i] != ref_ids,
            "forward ids": forward["input_ids"][i][forward["attention_mask"][i].bool()].tolist() != ref_ids,
            "forward pixel values": not torch.equal(forward["pixel_values"][start : start + n], ref_pixels),
            "generation pixel values": not torch.equal(
                torch.as_tensor(generation["pixel_values"][start : start + n]), ref_pixels
            ),
            "grid": not torch.equal(forward["image_grid_thw"][i : i + 1], ref_grid),
            "lightning-gspo ids": mine != ref_ids,
            "lightning-gspo pixel values": not torch.equal(batch.pixel_values[start : start + n], ref_pixels),
        }
        bad = [k for k, v in problems.items() if v]
        if bad:
            raise AssertionError(f"prompt {i}: TRL's processing class differs from the reference in {bad}")
        start += n
    return (
        f"TRL's processing class matches the reference on {rows} prompts: ids ({len(ref_ids)} tokens, "
        f"{ref_ids.count(ours.image_token_id)} image tokens), pixel values ({n} x {ref_pixels.shape[1]}) and grids, and lightning-gspo's "
        "encoding gives the same"
    )


# The task as vs_trl.py's helpers look it up (reward functions, dataset, TRL's model and processing class).
vs_trl.TASKS["dots"] = dict(
    funcs=("count_reward", "digit_reward"),
    weights=[1.0, 0.5],
    reward_funcs=(count_reward, digit_reward),
    dataset=dots_dataset,
    trl_inputs=trl_inputs,
)


# ------------------------------------------------------------------------------------------------------------
# Inside a run
# ------------------------------------------------------------------------------------------------------------


def clock_vision_tower(rec: vs_trl.Recorder) -> None:
    """Time every call of the Qwen2.5-VL vision tower and count the images and patches it encodes (one class
    for both trainers, wrapped from the outside), in all and apart for the calls under autograd (the policy
    forward; the others are generation and the old log-probs)."""
    import torch
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    tower = qwen.Qwen2_5_VisionTransformerPretrainedModel
    real = tower.forward

    def counted(self, hidden_states, *args, **kwargs):
        grid = kwargs.get("grid_thw", args[0] if args else None)
        images = 0 if grid is None else int(grid.shape[0])
        for key in (
            ("vision tower", "vision tower, policy forward") if torch.is_grad_enabled() else ("vision tower",)
        ):
            rec.calls[f"{key} images"] += images
            rec.calls[f"{key} patches"] += int(hidden_states.shape[0])
        t0 = time.perf_counter()
        try:
            return real(self, hidden_states, *args, **kwargs)
        finally:
            rec.add_time("vision tower", time.perf_counter() - t0)
            if torch.is_grad_enabled():
                rec.add_time("vision tower, policy forward", time.perf_counter() - t0)

    tower.forward = counted


def child(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    if job["trainer"] == "build":
        from lightning_gspo.tiny_vlm import build_tiny_vlm

        build_tiny_vlm(job["model_dir"], VOCAB, **job["vlm"])
        Path(job["result"]).write_text(json.dumps(check_processor(job["model_dir"])))
        return
    rec = vs_trl.Recorder(job["device"], job["task"])
    clock_vision_tower(rec)
    (vs_trl.run_ours if job["trainer"] == "ours" else vs_trl.run_trl)(job, rec)
    Path(job["result"]).write_text(json.dumps(rec.result(job["algo"]["num_generations"])))


# ------------------------------------------------------------------------------------------------------------
# The parent
# ------------------------------------------------------------------------------------------------------------


def vision_report(runs: list[dict]) -> str:
    """The vision tower's share: ms, calls and images encoded per optimizer step (first seed), and per
    completion trained on."""
    lines = [
        "",
        "The vision tower (first seed; its time is inside the parts above):",
        "",
        "| | lightning-gspo | TRL GRPOTrainer | ours / TRL |",
        "| --- | ---: | ---: | ---: |",
    ]
    first = {n: next(r for r in runs if r["trainer"] == n) for n in ("ours", "trl")}
    rows = []
    for name in ("ours", "trl"):
        res = first[name]["raw"]
        steps = len(res["step_ends"])
        calls = res["calls"]
        times = res["times"]
        row = {
            "ms per optimizer step": times.get("vision tower", 0.0) / steps * 1e3,
            "share of the loop": times.get("vision tower", 0.0) / (res["end"] - res["start"]),
            "calls per optimizer step": calls.get("vision tower", 0) / steps,
            "images encoded per optimizer step": calls.get("vision tower images", 0) / steps,
            "patches encoded per optimizer step": calls.get("vision tower patches", 0) / steps,
        }
        key = "vision tower, policy forward"
        row[f"{key}: ms per optimizer step"] = times.get(key, 0.0) / steps * 1e3
        row[f"{key}: images per optimizer step"] = calls.get(f"{key} images", 0) / steps
        row["ms per image encoded"] = row["ms per optimizer step"] / max(
            row["images encoded per optimizer step"], 1
        )
        rows.append(row)
    for key in rows[0]:
        ours, trl = rows[0][key], rows[1][key]
        ratio = f"{ours / trl:.2f}" if trl else "n/a"
        fmt = (lambda x: f"{x:.1%}") if key == "share of the loop" else (lambda x: vs_trl._fmt(x, 1))
        lines.append(f"| {key} | {fmt(ours)} | {fmt(trl)} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps per run (default {STEPS})")
    p.add_argument("--seeds", type=int, default=SEEDS, help=f"runs per trainer (default {SEEDS})")
    p.add_argument(
        "--threads", type=int, help="torch.set_num_threads per run (default 1 side by side, else 2)"
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="one trainer after the other, each started on a quiet machine (default: both at once)",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="the tiny VLM's defaults (2 vision blocks 32 wide, 112 x 112 images) instead of VLM: a quick check",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", default="outputs/bench_vs_trl", help="the tiny VLM is written under vlm/ here")
    p.add_argument("--busy", type=float, default=0.15, help="--sequential: others' cores that disturb a run")
    p.add_argument("--retries", type=int, default=3, help="--sequential: re-runs of a disturbed run")
    p.add_argument("--max-wait", type=float, default=1800, help="--sequential: seconds to wait for quiet")
    p.add_argument("--out", help="also write the report (markdown) here")
    p.add_argument("--raw", help="also write every run's raw measurements (JSON) here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    period = ALGO["num_iterations"]  # optimizer steps per generation batch
    if a.steps < 2 * period:  # the first generation batch is the warm-up; one more is measured
        p.error(f"--steps must be at least {2 * period}")
    threads = a.threads or (2 if a.sequential else 1)
    with tempfile.TemporaryDirectory(prefix="vs_trl_vlm_") as tmp:
        tmp = Path(tmp)
        base = dict(
            size="vlm",
            task="dots",
            algo={**ALGO, "reward_weights": vs_trl.TASKS["dots"]["weights"]},
            ours={},  # generation_engine='auto' picks what a VLM samples with
            steps=a.steps,
            threads=threads,
            device=a.device,
            model_dir=str(Path(a.models).resolve() / ("tiny" if a.tiny else "vlm")),
            vlm={} if a.tiny else VLM,
            script=str(Path(__file__).resolve()),
        )
        build = {**base, "trainer": "build", "seed": 0, "result": str(tmp / "build.json")}
        vs_trl.spawn(build, tmp / "build.log")
        check = json.loads(Path(build["result"]).read_text())
        print(f"[{time.strftime('%H:%M:%S')}] {check}", flush=True)
        load = os.getloadavg()
        if a.sequential:
            runs = vs_trl.sequential_runs(base, a.seeds, tmp, a.busy, a.retries, a.max_wait)
        else:
            runs = vs_trl.side_by_side_runs(base, a.seeds, tmp)
        for r in runs:
            r["profile"] = vs_trl.profile(r["raw"])
        title = (
            "vlm: the tiny VLM's defaults (--tiny)" if a.tiny else "vlm: tiny Qwen2.5-VL, 224 x 224 images"
        )
        text = vs_trl.report(title, runs, base) + vision_report(runs)
        text += (
            f"\nmodel: {base['vlm'] or 'the defaults'}, vocabulary {VOCAB}; {check}; load average at the start "
            f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n"
        )
    print("\n" + text, flush=True)
    if a.out:
        Path(a.out).write_text(text)
    if a.raw:
        Path(a.raw).write_text(json.dumps({"settings": base, "runs": runs, "check": check}, indent=1))


if __name__ == "__main__":
    main()
