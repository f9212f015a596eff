"""The demo task: single-digit addition modulo 10, ``"3+9="`` -> ``"2"``.

Small and well posed, so RL from random weights learns it on a CPU in minutes: chance is 0.1, and a policy
that has learnt it scores 1.0 on every prompt.
"""

from __future__ import annotations

import random


def make_dataset(num_prompts: int = 4096, seed: int = 0, modulus: int = 10):
    """A ``datasets.Dataset`` with columns ``prompt`` ("a+b=") and ``answer`` ("(a+b) mod modulus")."""
    from datasets import Dataset

    if num_prompts < 1:
        raise ValueError(f"num_prompts={num_prompts} must be >= 1.")
    rng = random.Random(seed)
    rows = {"prompt": [], "answer": []}
    for _ in range(num_prompts):
        a, b = rng.randrange(10), rng.randrange(10)
        rows["prompt"].append(f"{a}+{b}=")
        rows["answer"].append(str((a + b) % modulus))
    return Dataset.from_dict(rows)
