"""Rewards for the arithmetic tasks: is the answer right, and is the completion only a number (the tiny demo);
is the last number the sum, and is the answer short (an instruct model's chat answers)."""

from __future__ import annotations

import re

_ONLY_NUMBER = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?\d[\d,]*")
# Characters an answer may take before brevity_reward starts to fall: a number with some room for a word.
BRIEF = 8


def correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion begins with the expected answer (chance is 0.1 for one digit), else 0.0.

    A prefix match keeps the signal dense from a random start, when the model rarely stops after one token;
    ``format_reward`` is what asks for nothing but the number.
    """
    return [
        1.0 if _text(c).lstrip().startswith(str(a).strip()) else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion is a number and nothing else, else 0.0."""
    return [1.0 if _ONLY_NUMBER.fullmatch(_text(c)) else 0.0 for c in completions]


def number_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the last number in the completion (thousands separators allowed) is the expected answer: an
    instruct model may write "37 + 45 = 82" or "The answer is 82."; ``brevity_reward`` asks it to be short."""
    out = []
    for c, a in zip(completions, answer, strict=True):
        numbers = _NUMBER.findall(_text(c))
        out.append(1.0 if numbers and numbers[-1].replace(",", "") == str(a).strip() else 0.0)
    return out


def brevity_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for a non-empty answer of at most ``BRIEF`` characters, falling as ``BRIEF / length`` beyond."""
    lengths = [len(_text(c).strip()) for c in completions]
    return [0.0 if n == 0 else min(1.0, BRIEF / n) for n in lengths]


def _text(completion) -> str:
    # Conversational completions arrive as a list of messages, as in TRL.
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion
