"""Randomly initialised models of the real classes, saved like hub checkpoints.

Used where weights cannot be downloaded: the test suite (tiny sizes) and the benchmarks (real sizes;
timing does not depend on weight values). Every builder writes a directory that the production
``load_*`` functions read with ``from_pretrained``, so the loading code under test is the real one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from refine.offline.tokenizer import GPT2_VOCAB_SIZE, load_gpt2_tokenizer

# name -> (ViT kwargs, GPT-2 kwargs). "base" is nlpconnect/vit-gpt2-image-captioning's architecture:
# ViT-base/16 at 224 px and GPT-2 124M.
VIT_GPT2_SIZES = {
    "tiny": (
        dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    ),
    "base": (
        dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
        dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    ),
}


def random_vit_gpt2(vit_kwargs: dict, gpt2_kwargs: dict, seed: int = 0):
    """A random ViT + GPT-2 ``VisionEncoderDecoderModel`` over GPT-2's vocabulary, EOS as every special
    token (as ViT-GPT2 does). ``vit_kwargs`` / ``gpt2_kwargs`` go to ``ViTConfig`` / ``GPT2Config``."""
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

    eos = GPT2_VOCAB_SIZE - 1
    torch.manual_seed(seed)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**vit_kwargs),
        GPT2Config(vocab_size=GPT2_VOCAB_SIZE, bos_token_id=eos, eos_token_id=eos, **gpt2_kwargs),
    )
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    model = VisionEncoderDecoderModel(config=config)
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.eos_token_id = gen.bos_token_id = eos
    return model


def build_vit_gpt2(out_dir: str | os.PathLike, size: str = "tiny", seed: int = 0, tokenizer_cache: str | None = None) -> Path:
    """Save a random ViT + GPT-2 ``VisionEncoderDecoderModel`` with the real GPT-2 tokenizer."""

    vit_kwargs, gpt2_kwargs = VIT_GPT2_SIZES[size]
    model = random_vit_gpt2(vit_kwargs, gpt2_kwargs, seed)
    side = vit_kwargs["image_size"]
    processor = vit_image_processor(side)
    tokenizer = load_gpt2_tokenizer(tokenizer_cache)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def vit_image_processor(side: int):
    """A ``ViTImageProcessor`` for ``side``-pixel square inputs scaled to [-1, 1] (mean = std = 0.5), as
    ViT-GPT2's is; the toy student's and the random models' alike."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
