"""Rewards for tasks whose answer is one short string (the vision demo's colour code): the completion is exactly
the answer; and, as format terms, it is as long as the answer.

Exact match is what held-out accuracy should mean: "33" for "3" is not the answer (a prefix match would take it,
and the tiny model, left to a prefix reward, learns to say "33" and never stop). From random weights an exact match
is rare (the digit and then EOS, about 1 sample in 300), so ``conf/reward/exact_answer.yaml`` adds two smaller
terms: ``lightning_gspo.rewards.arithmetic.correctness_reward`` (the answer first) pays for the right digit at
once, and ``answer_length_reward`` pays for stopping after one character, right or wrong.
"""

from __future__ import annotations

from lightning_gspo.rewards.arithmetic import _text


def exact_answer_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion, without surrounding whitespace, is the expected answer, else 0.0."""
    return [
        1.0 if _text(c).strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer, strict=True)
    ]


def answer_length_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion, without surrounding whitespace, is as long as the expected answer (it stopped where
    the answer ends, right or wrong), else 0.0: a format term that pays for stopping."""
    return [
        1.0 if len(_text(c).strip()) == len(str(a).strip()) else 0.0
        for c, a in zip(completions, answer, strict=True)
    ]
