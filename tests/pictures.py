"""Pictures and a reward shared by the vision-language tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def picture(h: int, w: int, seed: int = 0) -> Image.Image:
    """Random RGB noise of h x w pixels; the seed and the size decide it."""
    rng = np.random.default_rng(seed + 7 * h + w)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def odd_digits(completions, **kwargs):
    """Varies between random completions, so groups have non-zero advantages."""
    return [float(sum(ch in "13579" for ch in c[0]["content"])) for c in completions]
