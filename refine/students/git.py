"""GIT students (``GitForCausalLM``, e.g. ``microsoft/git-base``): decoder-only. The image encoder's tokens
come first in the sequence, then ``[CLS]`` and the caption, ended by ``[SEP]``. When scoring and
sampling, the image encoder runs once per distinct image, as in the other students."""

from __future__ import annotations

from typing import Any

import torch

from refine.students.base import SpecialTokens, Student, image_rows_per_caption, sample_rows


class GitStudent(Student):
    kind = "git"
    lora_targets = ("query", "key", "value", "dense")  # the BERT-style text layers: attention and MLP

    def special_tokens(self) -> SpecialTokens:
        cfg = self.model.config
        return SpecialTokens(cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)

    @property
    def positions(self) -> int | None:
        return self.model.config.max_position_embeddings

    def text_logits(self, model, pixel_values, captions, image_index):
        # GIT's forward takes pixels, and tiles the image tokens to the captions' batch (by 1, given these)
        with image_rows_per_caption(model.git.visual_projection, image_index):
            logits = model(input_ids=captions.decoder_input_ids, attention_mask=captions.mask,
                           pixel_values=pixel_values).logits
        return logits[:, -captions.decoder_input_ids.shape[1]:, :]  # the text positions, after the image's

    def generate_ids(self, pixels: torch.Tensor, n: int, sample: bool, kwargs: dict[str, Any]) -> torch.Tensor:
        if not sample:
            return super().generate_ids(pixels, n, sample, kwargs)
        rows = sample_rows(len(pixels), n, self.device)  # the image side once per image, its tokens per sample
        start = torch.full((len(rows), 1), self.special_tokens().start, dtype=torch.long, device=self.device)
        with image_rows_per_caption(self.model.git.visual_projection, rows):
            return self.model.generate(pixel_values=pixels, input_ids=start, **kwargs)


def load(name: str, model_kwargs: dict[str, Any]) -> GitStudent:
    from transformers import AutoProcessor, GitForCausalLM

    model = GitForCausalLM.from_pretrained(name, **model_kwargs)
    processor = AutoProcessor.from_pretrained(name)
    return GitStudent(model, processor.image_processor, processor.tokenizer, processor=processor)
