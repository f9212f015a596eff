"""GSM8K-style math word problems as chat prompts, with the final number as the ``answer`` column.

Choices, and why:
- Rows are GSM8K's: a ``question`` and an ``answer`` whose last line is ``#### <number>``. Only that number is
  kept (commas dropped, so "1,250" becomes "1250"); the worked solution is not shown to the policy.
- Prompts are chat messages: a system message asking for the reasoning inside ``<reasoning>...</reasoning>``
  and the bare number inside ``<answer>...</answer>``, then the question as the user's message. The tokenizer's
  chat template (with the generation prompt) turns them into text, so one data set serves every chat model.
- Rows whose answer has no ``####`` line, or whose final answer is not a number, are dropped with a warning
  that counts them: a reward against a missing answer would only add noise.
- The default source is a 50-problem sample shipped with the package, so the task runs with no network; give a
  local jsonl/json/parquet/csv file, a ``save_to_disk`` directory, or a hub name ('openai/gsm8k', subset
  'main') for the real set.
"""

from __future__ import annotations

import re
import warnings
from importlib.resources import files
from pathlib import Path
from typing import Any

SYSTEM_PROMPT = (
    "Solve the math problem. Think it through step by step inside <reasoning> and </reasoning>, then give only "
    "the final number inside <answer> and </answer>, like this:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n42\n</answer>"
)

_FINAL = re.compile(r"####\s*(.+?)\s*$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def sample_path() -> Path:
    """The GSM8K-style sample shipped with the package (50 problems, written for it)."""
    return Path(str(files("lightning_gspo").joinpath("data", "gsm8k_sample.jsonl")))


def extract_hash_answer(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution, without thousands separators; None if absent
    or not a number."""
    lines = [line for line in str(solution).strip().splitlines() if "####" in line]
    if not lines:
        return None
    match = _FINAL.search(lines[-1][lines[-1].rindex("####") :])
    if match is None:
        return None
    value = match.group(1).replace(",", "").replace("$", "").strip().rstrip(".")
    return value if _NUMBER.fullmatch(value) else None


def chat_prompt(question: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": question.strip()}]


def make_dataset(
    path: str | Path | None = None,
    split: str = "train",
    subset: str | None = "main",
    system_prompt: str | None = SYSTEM_PROMPT,
    question_column: str = "question",
    answer_column: str = "answer",
    max_samples: int | None = None,
):
    """A ``datasets.Dataset`` with ``prompt`` (chat messages), ``answer`` (the final number as text) and
    ``question``.

    Args:
        path: a local file or directory (read by ``lightning_gspo.data.load_prompts``), a hub name, or None for
            the packaged sample.
        split: the split to read from a hub name or a saved ``DatasetDict``.
        subset: the hub configuration ('main' for openai/gsm8k); unused for local files.
        system_prompt: the system message; None or '' leaves it out.
        question_column, answer_column: where the question and the ``####`` solution are.
        max_samples: keep only the first this many rows.
    """
    ds = _load(sample_path() if path is None else path, split, subset)
    for column in (question_column, answer_column):
        if column not in ds.column_names:
            raise ValueError(
                f"the GSM8K source {path!r} has no column {column!r}; its columns are {ds.column_names}. "
                "Set question_column / answer_column."
            )
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    rows: dict[str, list[Any]] = {"prompt": [], "answer": [], "question": []}
    dropped = []
    for i, (question, solution) in enumerate(zip(ds[question_column], ds[answer_column])):
        answer = extract_hash_answer(solution)
        if answer is None or not str(question or "").strip():
            dropped.append(i)
            continue
        rows["prompt"].append(chat_prompt(question, system_prompt))
        rows["answer"].append(answer)
        rows["question"].append(question)
    if dropped:
        warnings.warn(
            f"{len(dropped)} of {len(ds)} GSM8K rows have no question or no '#### <number>' final answer and "
            f"were dropped (row indices {dropped[:10]}{' ...' if len(dropped) > 10 else ''}).",
            UserWarning,
            stacklevel=2,
        )
    if not rows["prompt"]:
        raise ValueError(f"no usable GSM8K rows in {path!r}: every answer lacks a '#### <number>' line.")
    from datasets import Dataset

    return Dataset.from_dict(rows)


def _load(source: str | Path, split: str, subset: str | None):
    from lightning_gspo.data import FILE_FORMATS, load_prompts

    text = str(source)
    path = Path(text).expanduser()
    if path.suffix in FILE_FORMATS and not path.exists():
        raise FileNotFoundError(f"GSM8K data file {text!r} does not exist.")
    is_local = path.exists() or text.startswith((".", "/", "~"))
    if is_local or subset is None:
        return load_prompts(source, split)
    import datasets

    return datasets.load_dataset(text, subset, split=split)


# Tokens a completion needs to hold an answer: a worked solution in <reasoning> and the number in <answer>.
make_dataset.completion_tokens_needed = 256
