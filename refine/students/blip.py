"""BLIP students (``BlipForConditionalGeneration``, e.g. ``Salesforce/blip-image-captioning-base``): a ViT
whose patch embeddings a BERT-style text decoder reads over cross-attention. Captions start with BLIP's
``[DEC]`` token and end with ``[SEP]``; the vision model runs once per image when scoring and
sampling."""

from __future__ import annotations

from typing import Any

import torch

from refine.students.base import SpecialTokens, Student


class BlipStudent(Student):
    kind = "blip"
    lora_targets = ("query", "key", "value", "dense")  # the BERT-style text decoder: attention and MLP

    def special_tokens(self) -> SpecialTokens:
        text = self.model.config.text_config
        return SpecialTokens(text.bos_token_id, text.sep_token_id, text.pad_token_id)

    @property
    def positions(self) -> int | None:
        return self.model.config.text_config.max_position_embeddings

    def text_logits(self, model, pixel_values, captions, image_index):
        image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state.index_select(0, image_index)
        return model.text_decoder(input_ids=captions.decoder_input_ids, attention_mask=captions.mask,
                                  encoder_hidden_states=image_embeds).logits

    def generate_ids(self, pixels: torch.Tensor, n: int, sample: bool, kwargs: dict[str, Any]) -> torch.Tensor:
        if not sample:
            return super().generate_ids(pixels, n, sample, kwargs)
        # BlipForConditionalGeneration.generate's steps, with the vision model once per image and its states
        # repeated for the n samples
        text = self.model.config.text_config
        states = self.model.vision_model(pixel_values=pixels).last_hidden_state.repeat_interleave(n, dim=0)
        start = torch.full((len(states), 1), text.bos_token_id, dtype=torch.long, device=self.device)
        return self.model.text_decoder.generate(
            input_ids=start, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id,
            encoder_hidden_states=states, encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long,
                                                                              device=self.device), **kwargs)


def load(name: str, model_kwargs: dict[str, Any]) -> BlipStudent:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(name, **model_kwargs)
    processor = BlipProcessor.from_pretrained(name)
    return BlipStudent(model, processor.image_processor, processor.tokenizer, processor=processor)
