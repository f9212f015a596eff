"""The vision demo task: the same question for every picture, an answer only the picture holds.

``make_dataset`` draws small pictures with PIL, deterministically from a seed, next to one fixed chat prompt:
- ``kind="colour"``: a filled shape (circle, square or triangle) of one of four colours, at a random place and
  size on a light background of random tone; the answer is the colour's code, ``COLOURS``' key ("1" red, ...).
- ``kind="dots"``: one to four black dots at random, non-overlapping places; the answer is how many.

Choices, and why:
- Four classes, so chance is 0.25 and a policy that cannot see the picture cannot score much above it: the text
  is identical in every row, and so are the answers' frequencies (drawn uniformly).
- The answer is one digit, so the tiny digits-only model (``tiny-vlm:digits``) can write it in one token.
- The pictures are small (56 x 56 by default: a 4 x 4 grid of 14-pixel patches, 4 image tokens after the
  2 x 2 merge), which keeps a CPU run to minutes.
- The splits are disjoint by construction: each picture belongs to the split its pixels' hash names (one in
  eight to validation, one in eight to test, the rest to training), and each split's stream keeps only its own.
  Held-out accuracy is measured on pictures never trained on, whatever the sizes and seeds of the splits.
- Shapes vary in kind, place and size and backgrounds in tone, so the answer sits at no fixed place in the
  picture: the policy has to read the image tokens, not one position of them.
"""

from __future__ import annotations

import hashlib
import io
import random

QUESTION = {"colour": "What colour is the shape?", "dots": "How many dots?"}
# The colour codes: the answer is the key. Far apart in RGB, each jittered a little per picture.
COLOURS = {"1": (220, 40, 40), "2": (40, 170, 60), "3": (40, 70, 220), "4": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
# A picture's split: its hash modulo 8 (0 validation, 1 test, 2-7 training).
SPLITS = {"validation": 0, "test": 1, "train": 2}
_BUCKETS = 8


def make_dataset(
    num_images: int = 2048,
    seed: int = 0,
    kind: str = "colour",
    size: int = 56,
    split: str = "train",
    blank: bool = False,
):
    """A ``datasets.Dataset`` with columns ``prompt`` (one user message, the same for every row), ``image`` (a
    ``datasets`` Image feature) and ``answer`` (one digit), ``num_images`` rows of ``split``.

    ``blank=True`` is the control: the same rows and answers, every picture replaced by one plain grey square, so
    nothing in a row tells its answer and no policy can beat always giving the commonest one."""
    from datasets import Dataset, Features, Image, Value

    if kind not in QUESTION:
        raise ValueError(f"kind={kind!r} is not a shapes task; use one of {', '.join(map(repr, QUESTION))}.")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(map(repr, SPLITS))}.")
    if num_images < 1 or size < 28:
        raise ValueError(f"num_images={num_images} must be >= 1 and size={size} >= 28 (one merged patch).")
    draw = _colour_picture if kind == "colour" else _dots_picture
    rows = {"prompt": [], "image": [], "answer": []}
    message = [{"role": "user", "content": QUESTION[kind]}]
    grey = _png(_plain(size))
    for png, answer in _pictures(draw, seed, split, size, num_images):
        rows["prompt"].append(message)
        rows["image"].append({"bytes": grey if blank else png, "path": None})
        rows["answer"].append(answer)
    features = Features(
        {
            "prompt": [{"role": Value("string"), "content": Value("string")}],
            "image": Image(),
            "answer": Value("string"),
        }
    )
    return Dataset.from_dict(rows, features=features)


def _pictures(draw, seed: int, split: str, size: int, count: int):
    """``count`` (png bytes, answer) pairs from ``split``'s own stream, each a picture of ``split``."""
    rng = random.Random(f"shapes:{seed}:{split}")
    out = []
    while len(out) < count:
        answer = rng.choice(list(COLOURS))
        png = _png(draw(rng, answer, size))
        if picture_split(png) == split:
            out.append((png, answer))
    return out


def picture_split(png: bytes) -> str:
    """The split a picture (its PNG bytes) belongs to."""
    bucket = int.from_bytes(hashlib.sha1(png).digest()[:4], "big") % _BUCKETS
    return next((name for name, b in SPLITS.items() if b == bucket), "train")


def _plain(size: int, tone: int = 128):
    from PIL import Image

    return Image.new("RGB", (size, size), (tone, tone, tone))


def _colour_picture(rng: random.Random, answer: str, size: int):
    from PIL import ImageDraw

    image = _plain(size, rng.randrange(200, 256))
    colour = tuple(min(255, max(0, c + rng.randrange(-25, 26))) for c in COLOURS[answer])
    side = rng.randrange(size // 3, size * 2 // 3)
    x, y = rng.randrange(0, size - side), rng.randrange(0, size - side)
    shape = rng.choice(SHAPES)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((x, y, x + side, y + side), fill=colour)
    elif shape == "square":
        pen.rectangle((x, y, x + side, y + side), fill=colour)
    else:
        pen.polygon([(x + side // 2, y), (x, y + side), (x + side, y + side)], fill=colour)
    return image


def _dots_picture(rng: random.Random, answer: str, size: int):
    from PIL import ImageDraw

    image = _plain(size, rng.randrange(200, 256))
    pen = ImageDraw.Draw(image)
    radius = max(3, size // 14)
    centres: list[tuple[int, int]] = []
    while len(centres) < int(answer):  # rejection sampling: dots never touch, so each one counts
        c = (rng.randrange(radius, size - radius), rng.randrange(radius, size - radius))
        if all((c[0] - a) ** 2 + (c[1] - b) ** 2 > (2 * radius + 2) ** 2 for a, b in centres):
            centres.append(c)
    for a, b in centres:
        pen.ellipse((a - radius, b - radius, a + radius, b + radius), fill=(0, 0, 0))
    return image


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# Tokens a completion needs to hold an answer: one digit and an EOS.
make_dataset.completion_tokens_needed = 2
