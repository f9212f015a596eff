"""Rewards for math word problems (GSM8K-style): is the final answer right, and is the completion laid out as
asked (``<reasoning>...</reasoning>`` then ``<answer>...</answer>``).

Choices, and why:
- The answer is the content of the last ``<answer>...</answer>`` block. A completion without one scores 0:
  guessing "the last number in the text" would reward a policy for ignoring the requested format.
- Numbers are compared as numbers, exactly (as fractions, so 18.50 equals 18.5 and 0.1 + 0.2 questions do not
  hit float error): thousands separators ("1,250"), a sign, decimals, a dollar sign before or after the sign,
  a trailing full stop and a trailing percent sign are accepted. Text made only of number characters that does
  not parse ("12.3.4", "1,23", "--5") is malformed and scores 0.
- Anything else ("3/4", "\\frac{3}{4}", "18 dollars") goes to Hugging Face's ``math_verify`` when it is installed
  (``pip install 'lightning-gspo[math]'``), which handles LaTeX and fractions; without it such answers score 0.
  ``math_verify`` is not the first choice for plain numbers because it is lenient where a reward should not be
  ("12.3.4" parses as 12.3, "12 or 13" as 13) and slower; an answer offering several values ("12 or 13",
  "12; 13") scores 0 on either path.
- A gold answer that is not a number makes that sample's reward None (left out, with a warning), not 0.
"""

from __future__ import annotations

import re
import threading
import warnings
from fractions import Fraction

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LAYOUT = re.compile(r"\s*<reasoning>\s*\S.*?</reasoning>\s*<answer>\s*\S.*?</answer>\s*", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_NUMBER_CHARS = re.compile(r"[\d\s,.$%+-]+")
_HEDGE = re.compile(r"\b(?:or|and)\b|[;|]", re.IGNORECASE)
TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")


def extract_answer(completion) -> str | None:
    """The stripped content of the last ``<answer>...</answer>`` block, or None."""
    found = _ANSWER.findall(_text(completion))
    return found[-1].strip() if found else None


def parse_number(text) -> Fraction | None:
    """A plain number written the ways people write them, as an exact fraction; None when it is not one.

    Accepts "1,250", "-3", "18.50", "$12", "-$5", "$-5", "7." and "20%"; rejects "12.3.4", "1,23", "" and words.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return Fraction(str(text))
    s = str(text).strip().rstrip(".").strip()
    if s.endswith("%"):
        s = s[:-1].strip()
    sign = ""
    if s[:1] in "+-" and s:
        sign, s = s[0], s[1:].lstrip()
    if s.startswith("$"):
        s = s[1:].lstrip()
    if not sign and s[:1] in "+-" and s:
        sign, s = s[0], s[1:]
    if not _NUMBER.fullmatch(s) or s[:1] in "+-":
        return None
    return Fraction(sign + s.replace(",", ""))


def answers_match(predicted: str, gold) -> bool | None:
    """Whether ``predicted`` states the gold answer; None when the gold answer is not a number."""
    target = parse_number(gold)
    if target is None:
        return None
    value = parse_number(predicted)
    if value is not None:
        return value == target
    if _NUMBER_CHARS.fullmatch(predicted) or not predicted.strip():
        return False  # number characters that do not form a number: malformed
    if _HEDGE.search(predicted):
        return False  # several candidate answers ("12 or 13"): math_verify would take the last one
    return _math_verify(str(gold), predicted)


def correctness_reward(prompts, completions, answer, **kwargs) -> list[float | None]:
    """1.0 when the last <answer> block holds the gold number, 0.0 when it does not or is missing."""
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        predicted = extract_answer(completion)
        if predicted is None:
            rewards.append(0.0)
            continue
        match = answers_match(predicted, gold)
        if match is None:
            warnings.warn(
                f"correctness_reward: the gold answer {gold!r} is not a number; that sample is left out.",
                UserWarning,
                stacklevel=2,
            )
            rewards.append(None)
        else:
            rewards.append(1.0 if match else 0.0)
    return rewards


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for ``<reasoning>...</reasoning>`` followed by ``<answer>...</answer>``, both non-empty, and nothing
    else around them; 0.0 otherwise."""
    return [1.0 if _LAYOUT.fullmatch(_text(c)) else 0.0 for c in completions]


def tag_count_reward(prompts, completions, **kwargs) -> list[float]:
    """0.25 for each of the four tags that appears exactly once: a denser signal than ``format_reward`` while a
    policy is still learning the layout."""
    return [sum(0.25 for tag in TAGS if _text(c).count(tag) == 1) for c in completions]


def _math_verify(gold: str, predicted: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    # math_verify's time limits use SIGALRM, which only the main thread may set.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(parse(gold, parsing_timeout=limit), parse(predicted, parsing_timeout=limit),
                           timeout_seconds=limit))  # fmt: skip
    except Exception:  # a parser failure on model output is a wrong answer, not a crashed run
        return False


def _text(completion) -> str:
    # Conversational completions arrive as a list of messages, as in TRL.
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return str(completion)
