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


# The real-model job's prompt: a chat question an instruct model answers, asking for the bare number so a
# correct answer is also a short one.
CHAT_QUESTION = "What is {a} + {b}? Reply with only the number."


def make_chat_dataset(num_prompts: int = 4096, seed: int = 0, digits: int = 2):
    """Chat prompts for an instruct model: ``[{"role": "user", "content": "What is 37 + 45? ..."}]`` with the sum
    as ``answer``; both operands have ``digits`` digits (10..99 for two)."""
    from datasets import Dataset

    if num_prompts < 1 or digits < 1:
        raise ValueError(f"num_prompts={num_prompts} and digits={digits} must be >= 1.")
    rng = random.Random(seed)
    low, high = (10 ** (digits - 1) if digits > 1 else 0), 10**digits
    rows = {"prompt": [], "answer": []}
    for _ in range(num_prompts):
        a, b = rng.randrange(low, high), rng.randrange(low, high)
        rows["prompt"].append([{"role": "user", "content": CHAT_QUESTION.format(a=a, b=b)}])
        rows["answer"].append(str(a + b))
    return Dataset.from_dict(rows)


# Tokens a completion needs to hold an answer: one digit and an EOS.
make_dataset.completion_tokens_needed = 2


# Tokens a completion needs to hold an answer: up to three digits, an EOS, and room for a word or two.
make_chat_dataset.completion_tokens_needed = 8
