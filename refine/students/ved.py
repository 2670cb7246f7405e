"""``VisionEncoderDecoderModel`` students: a ViT or CLIP vision encoder with a GPT-2 or BERT-style decoder
over cross-attention (ViT-GPT2, ``nlpconnect/vit-gpt2-image-captioning``; CLIP ViT-B/32 + GPT-2 built
with ``from_encoder_decoder_pretrained``). The encoder runs once per image, for scoring and sampling."""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from refine.students.base import SpecialTokens, Student


class VisionEncoderDecoderStudent(Student):
    kind = "vision-encoder-decoder"
    # GPT-2's attention and MLP (c_attn / q_attn / c_proj / c_fc; BERT decoders: query / value), and
    # the ViT or CLIP encoder's query and value projections
    lora_targets = ("c_attn", "q_attn", "c_proj", "c_fc", "query", "value", "q_proj", "v_proj")

    def special_tokens(self) -> SpecialTokens:
        cfg = self.model.config
        return SpecialTokens(cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id)

    @property
    def positions(self) -> int | None:
        decoder = self.model.config.decoder
        return getattr(decoder, "n_positions", None) or getattr(decoder, "max_position_embeddings", None)

    def text_logits(self, model, pixel_values, captions, image_index):
        encoder = model.get_encoder() if hasattr(model, "get_encoder") else model.encoder
        encoder_states = encoder(pixel_values=pixel_values).last_hidden_state  # [N, S, C]
        encoder_states = encoder_states.index_select(0, image_index)  # [B, S, C]; grads sum back per image
        return model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
            decoder_input_ids=captions.decoder_input_ids,
            decoder_attention_mask=captions.mask,
        ).logits

    def generate_ids(self, pixels: torch.Tensor, n: int, sample: bool, kwargs: dict[str, Any]) -> torch.Tensor:
        if sample:  # the encoder runs once per image; its states are repeated for the n samples
            states = self.model.encoder(pixel_values=pixels).last_hidden_state.repeat_interleave(n, dim=0)
            return self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), **kwargs)
        return self.model.generate(pixel_values=pixels, **kwargs)


def fix_special_tokens(model, tokenizer, name: str = "the student") -> None:
    """Read a decoder's start, end and pad tokens from the model's and tokenizer's configs, with fallbacks:
    GPT-2 has no pad and no start token (EOS serves for both, as ViT-GPT2 does); BERT-style tokenizers
    have no EOS (``[SEP]`` ends a caption, ``[CLS]`` starts one). A tokenizer with neither an EOS nor a
    SEP token is refused with a message naming what to set."""
    cfg = model.config
    end = getattr(cfg, "eos_token_id", None)
    if end is None:
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise ValueError(f"{name}: its tokenizer has neither an EOS nor a SEP token, so a caption cannot end; "
                         "set eos_token_id in the model's config (and the tokenizer's eos_token)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(end)
    start = getattr(cfg, "decoder_start_token_id", None)
    if start is None:
        start = next(t for t in (tokenizer.bos_token_id, tokenizer.cls_token_id, end) if t is not None)
    cfg.decoder_start_token_id, cfg.eos_token_id = start, end
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.decoder_start_token_id = start
    gen.pad_token_id = cfg.pad_token_id
    gen.eos_token_id = end
    gen.bos_token_id = start


def load(name: str, model_kwargs: dict[str, Any]) -> VisionEncoderDecoderStudent:
    """transformers 5 removed the ``image-to-text`` pipeline; the name now maps to ``image-text-to-text``,
    which needs a ``ProcessorMixin`` returning ``pixel_values`` and ``input_ids``. ``GitProcessor`` is
    exactly "an image processor plus a tokenizer", so that is what a saved student carries. The pipeline
    then wants a text prompt: the decoder-start token, e.g. ``pipe(image, text=tokenizer.bos_token,
    return_full_text=False)``."""
    from transformers import AutoImageProcessor, AutoTokenizer, GitProcessor, VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(name, **model_kwargs)
    image_processor = AutoImageProcessor.from_pretrained(name)
    tokenizer = AutoTokenizer.from_pretrained(name)
    fix_special_tokens(model, tokenizer, f"student.model={name}")
    return VisionEncoderDecoderStudent(model, image_processor, tokenizer,
                                       processor=GitProcessor(image_processor=image_processor, tokenizer=tokenizer))
