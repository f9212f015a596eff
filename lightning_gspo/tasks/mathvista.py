"""MathVista-style visual math questions (a question about an image, a numeric answer) as image prompts.

The rows of Unsloth's vision-RL example (``AI4Math/MathVista``, split ``testmini``): a ``question``, the picture
in ``decoded_image`` (its ``image`` column is only a relative file name) and an ``answer``. Each row becomes a
chat prompt whose user message asks for the working inside ``<reasoning>...</reasoning>`` and the number inside
``<answer>...</answer>``, the row's picture in the ``image`` column, and the answer, so ``reward=math`` scores it.

Choices, and why:
- As in the guide, only rows whose answer is a number are kept (a warning counts the others): its correctness
  reward compares numbers, and multiple-choice letters or free text would only add noise.
- The layout tags are this project's (``lightning_gspo.rewards.math``), not the guide's ``<REASONING>`` /
  ``<SOLUTION>``, so the math rewards apply unchanged.
- The picture is not resized here: ``model.max_pixels`` bounds every image (the guide resizes to 512 x 512; the
  experiment sets max_pixels to the same pixel count, keeping the aspect ratio).
- The message content is the question as a string: the image goes before it when the prompt is rendered
  (``vision_prompts.place_images``, TRL's rule), the order the guide writes it in.
"""

from __future__ import annotations

import warnings

INSTRUCTION = (
    "First think it through inside <reasoning> and </reasoning>, then give only the final number inside "
    "<answer> and </answer>."
)


def make_dataset(
    path: str = "AI4Math/MathVista",
    split: str = "testmini",
    question_column: str = "question",
    answer_column: str = "answer",
    image_column: str = "decoded_image",
    max_samples: int | None = None,
):
    """A ``datasets.Dataset`` with ``prompt`` (chat messages), ``image`` (the picture), ``answer`` (a number as
    text) and ``question``, from a hub name, a local file or a ``save_to_disk`` directory (``load_prompts``)."""
    from lightning_gspo.data import load_prompts
    from lightning_gspo.rewards.math import parse_number

    ds = load_prompts(path, split)
    for column in (question_column, answer_column, image_column):
        if column not in ds.column_names:
            raise ValueError(
                f"the MathVista source {path!r} has no column {column!r}; its columns are {ds.column_names}. "
                "Set question_column / answer_column / image_column."
            )
    if max_samples is not None:
        ds = ds.select(range(min(max_samples, len(ds))))
    answers = [str(a).strip() for a in ds[answer_column]]
    keep = [i for i, a in enumerate(answers) if parse_number(a) is not None]
    if len(keep) < len(ds):
        warnings.warn(
            f"{len(ds) - len(keep)} of {len(ds)} MathVista rows have an answer that is not a number and were "
            "dropped (the correctness reward compares numbers).",
            UserWarning,
            stacklevel=2,
        )
    if not keep:
        raise ValueError(f"no MathVista row of {path!r} has a numeric answer.")
    ds = ds.select(keep)
    rows = {
        "prompt": [[{"role": "user", "content": f"{q.strip()}\n{INSTRUCTION}"}] for q in ds[question_column]],
        "image": ds[image_column],
        "answer": [answers[i] for i in keep],
        "question": ds[question_column],
    }
    from datasets import Dataset, Features, Image, Value

    features = Features(
        {
            "prompt": [{"role": Value("string"), "content": Value("string")}],
            "image": Image(),
            "answer": Value("string"),
            "question": Value("string"),
        }
    )
    return Dataset.from_dict(rows, features=features)


# Tokens a completion needs to hold an answer: the working in <reasoning> and the number in <answer>.
make_dataset.completion_tokens_needed = 256
