"""Rewards for the arithmetic task: is the answer right, and is the completion only a number."""

from __future__ import annotations

import re

_ONLY_NUMBER = re.compile(r"-?\d+")


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


def _text(completion) -> str:
    # Conversational completions arrive as a list of messages, as in TRL.
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion
