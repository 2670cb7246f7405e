"""BLIP-2 students (``Blip2ForConditionalGeneration``, e.g. ``Salesforce/blip2-opt-2.7b``): a frozen-style ViT,
a Q-Former that turns it into ``num_query_tokens`` embeddings, and a decoder-only language model (OPT)
that reads them as image tokens before the caption. Meant to be trained with LoRA
(``--update.lora_r``); served in 8 or 4 bits on a GPU if need be (``python -m refine.serve --quantize``)."""

from __future__ import annotations

from typing import Any

import torch

from refine.students.base import SpecialTokens, Student, image_rows_per_caption, sample_rows


class Blip2Student(Student):
    kind = "blip-2"
    lora_targets = ("q_proj", "v_proj")  # the language model's attention

    def special_tokens(self) -> SpecialTokens:
        text = self.model.config.text_config
        bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else text.bos_token_id
        return SpecialTokens(bos, self.tokenizer.eos_token_id or text.eos_token_id, self.tokenizer.pad_token_id)

    @property
    def positions(self) -> int | None:
        return getattr(self.model.config.text_config, "max_position_embeddings", None)

    def text_prefix(self) -> int:
        return self.model.config.num_query_tokens

    def _image_tokens(self, batch: int) -> torch.Tensor:
        cfg = self.model.config
        return torch.full((batch, cfg.num_query_tokens), cfg.image_token_id, dtype=torch.long, device=self.device)

    def text_logits(self, model, pixel_values, captions, image_index):
        ids = captions.decoder_input_ids
        prefix = self._image_tokens(ids.shape[0])
        with image_rows_per_caption(model.language_projection, image_index):  # the Q-Former's tokens, per caption
            logits = model(input_ids=torch.cat([prefix, ids], 1),
                           attention_mask=torch.cat([torch.ones_like(prefix), captions.mask], 1),
                           pixel_values=pixel_values).logits
        return logits[:, -ids.shape[1]:, :]

    def generate_ids(self, pixels: torch.Tensor, n: int, sample: bool, kwargs: dict[str, Any]) -> torch.Tensor:
        rows = sample_rows(len(pixels), n if sample else 1, self.device)  # the image side once per image
        start = torch.full((len(rows), 1), self.special_tokens().start, dtype=torch.long, device=self.device)
        ids = torch.cat([self._image_tokens(len(rows)), start], 1)
        with image_rows_per_caption(self.model.language_projection, rows):
            out = self.model.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return out[:, ids.shape[1]:] if out.shape[1] > ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids) else out


def load(name: str, model_kwargs: dict[str, Any]) -> Blip2Student:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(name, **model_kwargs)
    processor = Blip2Processor.from_pretrained(name)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return Blip2Student(model, processor.image_processor, processor.tokenizer, processor=processor)
