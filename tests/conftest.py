"""Offline test harness: environment, tiny random models of the real classes, test photos.

Nothing here downloads. Models are built from configs, saved with ``save_pretrained`` and loaded back
through the production ``load_*`` code, the way transformers tests itself.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Must run before anything imports transformers / ultralytics / textgrad.
_SANDBOX = Path(tempfile.mkdtemp(prefix="refine-tests-"))
atexit.register(shutil.rmtree, _SANDBOX, ignore_errors=True)
os.environ.update({
    "HOME": str(_SANDBOX / "home"),
    "HF_HOME": str(_SANDBOX / "hf"),
    "XDG_CACHE_HOME": str(_SANDBOX / "cache"),
    "YOLO_CONFIG_DIR": str(_SANDBOX / "ultralytics"),
    "MPLCONFIGDIR": str(_SANDBOX / "mpl"),
    "REFINE_CACHE_DIR": str(_SANDBOX / "refine-cache"),
    "OPENAI_API_KEY": "sk-test-not-a-real-key",
})
from refine.offline import set_offline_env  # noqa: E402

set_offline_env(log_dir=_SANDBOX / "textgrad-logs")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def _site_file(module: str, *parts: str) -> Path:
    import importlib

    return Path(importlib.import_module(module).__file__).parent.joinpath(*parts)


@pytest.fixture(scope="session")
def sandbox() -> Path:
    return _SANDBOX


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(sandbox) -> Path:
    from refine.offline.tokenizer import write_gpt2_tokenizer_files

    return write_gpt2_tokenizer_files(sandbox / "gpt2-tokenizer")


@pytest.fixture(scope="session")
def tiny_student_dir(sandbox, gpt2_tokenizer_dir) -> Path:
    """A saved random ViT + GPT-2 VisionEncoderDecoderModel with the real GPT-2 tokenizer."""
    from refine.offline.models import build_vit_gpt2

    return build_vit_gpt2(sandbox / "tiny-vit-gpt2", size="tiny", tokenizer_cache=str(gpt2_tokenizer_dir))


@pytest.fixture
def tiny_student(tiny_student_dir):
    from refine.stages.student import load_student

    torch.manual_seed(0)
    return load_student(tiny_student_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def bus_path() -> Path:
    return _site_file("ultralytics", "assets", "bus.jpg")


@pytest.fixture(scope="session")
def zidane_path() -> Path:
    return _site_file("ultralytics", "assets", "zidane.jpg")


@pytest.fixture(scope="session")
def grace_hopper_path() -> Path:
    return _site_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")


@pytest.fixture(scope="session")
def photos(bus_path, zidane_path, grace_hopper_path) -> dict[str, Image.Image]:
    return {p.stem: Image.open(p).convert("RGB") for p in (bus_path, zidane_path, grace_hopper_path)}


def draw_scene(shapes: list[tuple[str, str, tuple[int, int, int, int]]], size: tuple[int, int] = (96, 64)) -> Image.Image:
    """An image with ``(kind, colour, box)`` shapes drawn on white; kind is 'circle' or 'square'."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for kind, colour, box in shapes:
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=colour)
    return image


@pytest.fixture
def drawn_images() -> dict[str, Image.Image]:
    return {
        "red-circle": draw_scene([("circle", "red", (10, 10, 40, 40))]),
        "blue-square": draw_scene([("square", "blue", (50, 20, 80, 50))]),
        "both": draw_scene([("circle", "red", (5, 5, 30, 30)), ("square", "blue", (50, 20, 80, 50))]),
        "gray": Image.new("L", (40, 40), 128),  # not RGB on purpose
    }


@pytest.fixture
def four_pairs(drawn_images):
    """Four preference pairs on the drawn images (three refined, one ranked), and the images."""
    from refine.stages.pairs import PreferencePair

    images = {k: v for k, v in drawn_images.items()}
    pairs = [
        PreferencePair("red-circle", "a red circle", "a blue square and a red circle", "refined"),
        PreferencePair("blue-square", "a blue square", "two blue squares", "refined"),
        PreferencePair("both", "a red circle and a blue square", "a red circle", "refined"),
        PreferencePair("gray", "an empty gray picture", "a dog on a bed", "ranked"),
    ]
    return pairs, images
