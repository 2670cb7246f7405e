"""The benchmark's inputs: images shipped with installed packages, drawn scenes, captions, caption pairs.

Nothing is downloaded. Photos come from ultralytics (``bus.jpg``, ``zidane.jpg``) and matplotlib
(``grace_hopper.jpg``); the rest are drawn, each different, so no two requests carry the same image.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image, ImageDraw

from refine.images.records import ImageRecord, record_from_image, record_from_path

COLOURS = ("red", "blue", "green", "orange", "purple", "black", "teal", "brown", "gold", "navy")


def shipped_photo(name: str) -> Path:
    """``bus`` / ``zidane`` (ultralytics assets) or ``grace_hopper`` (matplotlib sample data)."""
    where = {"bus": ("ultralytics", "assets", "bus.jpg"), "zidane": ("ultralytics", "assets", "zidane.jpg"),
             "grace_hopper": ("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")}
    if name not in where:
        raise ValueError(f"no shipped photo {name!r}; choose one of {', '.join(where)}")
    module, *parts = where[name]
    # find_spec, not import: importing ultralytics sets OMP_NUM_THREADS=1 for this process and its children.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{module} is not installed, so its sample image {name!r} is not available")
    return Path(spec.origin).parent.joinpath(*parts)


def drawn_scene(i: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """Scene ``i``: ``i % 3 + 1`` circles and squares in distinct colours and places on white."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    w, h = size
    for k in range(i % 3 + 1):
        colour = COLOURS[(i + 3 * k) % len(COLOURS)]
        x0 = (37 * i + 90 * k) % (w - 60)
        y0 = (53 * i + 70 * k) % (h - 60)
        box = (x0, y0, x0 + 40 + 5 * (i % 4), y0 + 40 + 5 * (k % 3))
        (draw.ellipse if (i + k) % 2 else draw.rectangle)(box, fill=colour)
    return image


def bench_records(n: int = 10) -> list[ImageRecord]:
    """``n`` distinct images: the three shipped photos, then drawn scenes."""
    records = [record_from_path(shipped_photo(name)) for name in ("bus", "zidane", "grace_hopper")][:n]
    records += [record_from_image(f"drawn-{i}", drawn_scene(i)) for i in range(n - len(records))]
    return records


_CAPTIONS = [
    "a man standing in front of a red double decker bus",
    "two men in suits talking at a party",
    "a woman in a military uniform posing for a portrait",
    "a red square on a white background",
    "two blue circles next to each other on a white wall",
    "a small green ball and two boxes on a table",
    "an orange circle floating in an empty room",
    "a purple square and a black square side by side",
    "three coloured shapes scattered on white paper",
    "a gold coin lying on a white sheet",
]


def captions(n: int) -> list[str]:
    """``n`` different captions, one per image, so no two prompts repeat (textgrad's cache keys on prompts)."""
    return [_CAPTIONS[i % len(_CAPTIONS)] + (f" number {i // len(_CAPTIONS)}" if i >= len(_CAPTIONS) else "")
            for i in range(n)]


# Single-token words in GPT-2's vocabulary (each with its leading space), so a caption of k words is k tokens.
_WORDS = ("a red dog on the green grass next to two small white cats and one old man with his black hat under "
          "the blue sky near a big tree").split()


def token_captions(tokenizer, n_tokens: int, count: int, offset: int = 0) -> list[str]:
    """``count`` different captions of exactly ``n_tokens`` tokens each (checked with ``tokenizer``)."""
    out = []
    for i in range(count):
        start = (offset + i) % (len(_WORDS) - n_tokens + 1)
        text = " ".join(_WORDS[start : start + n_tokens])
        got = len(tokenizer(text, add_special_tokens=False).input_ids)
        if got != n_tokens:
            raise ValueError(f"caption {text!r} is {got} tokens, not {n_tokens}: pick single-token words for this tokenizer")
        out.append(text)
    return out
