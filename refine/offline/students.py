"""Tiny random students of every architecture refine trains, saved like hub checkpoints.

ViT-GPT2 lives in ``refine.offline.models``. Here: CLIP vision + GPT-2 and ViT + BERT decoders
(``VisionEncoderDecoderModel``), BLIP (``BlipForConditionalGeneration``), GIT (``GitForCausalLM``) and
BLIP-2 with an OPT language model (``Blip2ForConditionalGeneration``). Each is the real class with
small dimensions and random weights, with a processor whose tokenizer is built offline: GPT-2's BPE
(``refine.offline.tokenizer``) or a small BERT WordPiece vocabulary (:func:`bert_tokenizer`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from refine.offline.tokenizer import GPT2_VOCAB_SIZE, load_gpt2_tokenizer

SIDE = 32  # image side in pixels
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_VISION = dict(image_size=SIDE, patch_size=8, **TINY)
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
# The hub models' sizes (random weights; the benchmark's timing does not depend on their values):
# Salesforce/blip-image-captioning-base (ViT-B/16 at 384 px, a 12-layer BERT-base text decoder) and
# microsoft/git-base (CLIP ViT-B/16 at 224 px, a 6-layer text decoder).
SIZES = {
    "blip": {"tiny": (TINY_VISION, TINY, 64, None), "base": (dict(image_size=384, patch_size=16, **BASE), BASE, 512, 30524)},
    "git": {"tiny": (TINY_VISION, TINY, 64, None),
            "base": (dict(image_size=224, patch_size=16, **BASE), {**BASE, "num_hidden_layers": 6}, 1024, 30522)},
}
WORDS = ("a an the and of on in with to is two three four five six seven eight nine man woman person people "
         "dog cat bus car street red green blue yellow circle square triangle picture photo table ball tie "
         "sitting standing next near small large white black").split()


def bert_tokenizer(out_dir: Path, extra_special: tuple[str, ...] = ()):
    """A ``BertTokenizer`` over a small WordPiece vocabulary (special tokens, ``WORDS``, letters and
    ``##`` continuations), written to ``out_dir`` and loaded back. BERT has no EOS: ``[SEP]`` ends."""
    from transformers import BertTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *letters, *("##" + t for t in letters)]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizer(str(out_dir / "vocab.txt"), do_lower_case=True)
    if extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return tokenizer


def _save(out: Path, model, processor) -> Path:
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_clip_gpt2(out_dir: str | os.PathLike, seed: int = 0, tokenizer_cache: str | None = None) -> Path:
    """CLIP's vision tower + GPT-2 over cross-attention: what ``VisionEncoderDecoderModel.
    from_encoder_decoder_pretrained("openai/clip-vit-base-patch32", "gpt2")`` builds, tiny."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GitProcessor,
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
    )

    torch.manual_seed(seed)
    eos = GPT2_VOCAB_SIZE - 1
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        CLIPVisionConfig(**TINY_VISION), GPT2Config(vocab_size=GPT2_VOCAB_SIZE, n_embd=32, n_layer=2, n_head=2,
                                                    n_positions=64, bos_token_id=eos, eos_token_id=eos))
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    model = VisionEncoderDecoderModel(config=config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    return _save(Path(out_dir), model, GitProcessor(image_processor=image_processor,
                                                     tokenizer=load_gpt2_tokenizer(tokenizer_cache)))


def build_vit_bert(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A ViT encoder + BERT decoder whose config names no start, end or pad token (as
    ``from_encoder_decoder_pretrained(vit, "bert-base-uncased")`` leaves it): the tokenizer's [CLS],
    [SEP] and [PAD] must stand in."""
    from transformers import (
        BertConfig,
        GitProcessor,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    from refine.offline.models import vit_image_processor

    torch.manual_seed(seed)
    out = Path(out_dir)
    tokenizer = bert_tokenizer(out / "_vocab")
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**TINY_VISION), BertConfig(vocab_size=len(tokenizer), max_position_embeddings=64, **TINY))
    model = VisionEncoderDecoderModel(config=config)
    return _save(out, model, GitProcessor(image_processor=vit_image_processor(SIDE), tokenizer=tokenizer))


def build_blip(out_dir: str | os.PathLike, seed: int = 0, size: str = "tiny") -> Path:
    """``BlipForConditionalGeneration``: BLIP's [DEC] start token added to a BERT tokenizer."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    torch.manual_seed(seed)
    out = Path(out_dir)
    vision, text_size, positions, vocab = SIZES["blip"][size]
    tokenizer = bert_tokenizer(out / "_vocab")
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    text = BlipTextConfig(vocab_size=vocab or len(tokenizer), max_position_embeddings=positions,
                          encoder_hidden_size=vision["hidden_size"], bos_token_id=tokenizer.bos_token_id,
                          sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.sep_token_id, **text_size)
    config = BlipConfig(text_config=text.to_dict(), vision_config=BlipVisionConfig(**vision).to_dict())
    model = BlipForConditionalGeneration(config)
    side = vision["image_size"]
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": side, "width": side}),
                              tokenizer=tokenizer)
    return _save(out, model, processor)


def build_git(out_dir: str | os.PathLike, seed: int = 0, size: str = "tiny") -> Path:
    """``GitForCausalLM``: a CLIP image encoder and a BERT-style decoder ([CLS] starts, [SEP] ends)."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    torch.manual_seed(seed)
    out = Path(out_dir)
    vision, text_size, positions, vocab = SIZES["git"][size]
    tokenizer = bert_tokenizer(out / "_vocab")
    config = GitConfig(vision_config=vision, vocab_size=vocab or len(tokenizer), max_position_embeddings=positions,
                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                       pad_token_id=tokenizer.pad_token_id, **text_size)
    model = GitForCausalLM(config)
    side = vision["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return _save(out, model, GitProcessor(image_processor=image_processor, tokenizer=tokenizer))


def build_blip2(out_dir: str | os.PathLike, seed: int = 0, tokenizer_cache: str | None = None) -> Path:
    """``Blip2ForConditionalGeneration`` with an OPT language model, tiny: 4 query tokens that the LM reads
    as ``<image>`` tokens, GPT-2's BPE as OPT's tokenizer."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    torch.manual_seed(seed)
    tokenizer = load_gpt2_tokenizer(tokenizer_cache)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.pad_token = tokenizer.eos_token
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                     num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    config = Blip2Config(vision_config=dict(**TINY_VISION), text_config=text.to_dict(), num_query_tokens=4,
                         qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, encoder_hidden_size=32),
                         image_token_id=image_token)
    model = Blip2ForConditionalGeneration(config)
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": SIDE, "width": SIDE}),
                               tokenizer=tokenizer, num_query_tokens=4)
    return _save(Path(out_dir), model, processor)


BUILDERS = {"clip-gpt2": build_clip_gpt2, "vit-bert": build_vit_bert, "blip": build_blip, "git": build_git,
            "blip-2": build_blip2}
