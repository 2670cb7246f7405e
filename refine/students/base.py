"""The student interface every architecture implements, and what they share.

A student captions images (greedy, beam search, ``n`` samples), gives the summed log-probability of
given captions (differentiable, for DPO and SFT), and saves itself so that ``from_pretrained`` loads
it. :func:`refine.students.load_student` reads the architecture from the checkpoint's config and
returns the matching subclass; the update, the loop and the run directory are the same for all.

Token layout used for scoring a caption ``c`` (the same for every architecture; what "start" and
"end" are comes from the model's and tokenizer's configs, see :meth:`Student.special_tokens`)::

    decoder input : [start] c_1 c_2 ... c_n
    targets       :  c_1    c_2 ... c_n  [end]

A caption's log-probability is the sum over its ``n + 1`` targets. The end token is included because
"stop here" is part of what a caption says: without it, "a dog" would score at least as well as "a dog
and a cat" whenever the model wanted to continue. Padding is masked by length, never by token id,
since GPT-2 pads with the EOS id. Architectures differ only in how the image reaches the text model
(:meth:`Student.text_logits`) and how generation is called (:meth:`Student.generate_ids`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from refine.infra.devices import autocast

# transformers warns, once per process, that a batch without an attention mask "may" be padded wrongly
# whenever the pad token is the end token (every GPT-2 decoder). A caption is generated from the image
# alone: every row starts from the same start token, with no text prompt to pad or mask, so the warning
# is never true here and only alarms (BLIP-2, which has a prompt, passes its mask).
_NO_PROMPT_MASK_WARNINGS = ("The attention mask is not set with a batched input",
                            "The attention mask and the pad token id were not set")


def _not_a_prompt_mask_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_NO_PROMPT_MASK_WARNINGS)


@contextlib.contextmanager
def _without_prompt_mask_warnings():
    """Drop only those two warnings of ``transformers.generation.utils`` while captioning."""
    logger = logging.getLogger("transformers.generation.utils")
    logger.addFilter(_not_a_prompt_mask_warning)
    try:
        yield
    finally:
        logger.removeFilter(_not_a_prompt_mask_warning)


class FastSampling:
    """A logits processor that makes greedy decoding draw one token per sequence from ``softmax(logits / T)``
    (after a ``top_p`` nucleus, as transformers builds it), exactly, without ``torch.multinomial`` over
    the whole vocabulary (74% of a small student's captioning time on CPU).

    Each draw inverts the distribution's CDF at one uniform number ``u``, with the ``k`` likeliest tokens
    ordered first: with ``m`` their probability mass, ``u < m`` picks among them (a cumulative sum over
    ``k`` entries), else ``u - m`` picks from the rest of the vocabulary (rare; a full cumulative sum
    over the rows that need it). The whole-vocabulary work per step is one ``logsumexp`` and one ``topk``.
    The processor returns scores that are 0 at the drawn token and -inf elsewhere, so greedy picks it.

    ``uniforms`` (``[B, steps]``) fixes each sequence's numbers in advance, from its own seed: a
    sequence's sample then depends on its seed alone, not on which other sequences share its batch, the
    batch size, the chunk or the process (see :func:`image_uniforms`). Without it, the numbers come
    from torch's global generator.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, k: int = 64,
                 uniforms: torch.Tensor | None = None):
        if temperature <= 0 or not 0 < top_p <= 1 or k < 1:
            raise ValueError(f"temperature={temperature} must be > 0, top_p={top_p} in (0, 1], k={k} >= 1")
        self.temperature, self.top_p, self.k = temperature, top_p, k
        self.uniforms, self.step = uniforms, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            beyond = probs.cumsum(-1) - probs >= self.top_p  # the tokens ranked after the nucleus is full
            scores = scores.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))
        if self.uniforms is None:
            u = torch.rand(scores.shape[0], device=scores.device)
        else:
            if self.step >= self.uniforms.shape[1]:
                raise ValueError(f"FastSampling was given uniforms for {self.uniforms.shape[1]} steps; step {self.step + 1} needs more")
            u = self.uniforms[:, self.step].contiguous().to(scores.device)
        self.step += 1
        log_total = scores.logsumexp(-1, keepdim=True)
        top_scores, top_tokens = scores.topk(min(self.k, scores.shape[-1]), dim=-1)
        top_cdf = (top_scores - log_total).exp().cumsum(-1)  # [B, k]
        mass = top_cdf[:, -1]
        pick = torch.searchsorted(top_cdf, u.unsqueeze(-1).contiguous(), right=True).clamp(max=top_cdf.shape[-1] - 1)
        drawn = top_tokens.gather(-1, pick).squeeze(-1)
        tail = (u >= mass).nonzero().squeeze(-1)
        if len(tail):
            rest = (scores[tail] - log_total[tail]).exp().scatter(-1, top_tokens[tail], 0.0)
            rest_cdf = rest.cumsum(-1)
            # Rounding can leave u - m at or past the rest's total; the last token with mass takes it.
            target = torch.minimum((u[tail] - mass[tail]).unsqueeze(-1), rest_cdf[:, -1:] * (1 - 1e-6))
            has_rest = rest_cdf[:, -1] > 0  # else all the mass was in the top k: keep that draw
            index = torch.searchsorted(rest_cdf, target, right=True).squeeze(-1).clamp(max=rest.shape[-1] - 1)
            drawn[tail[has_rest]] = index[has_rest]
        return torch.full_like(scores, float("-inf")).scatter(-1, drawn.unsqueeze(-1), 0.0)


def image_uniforms(seeds: Sequence[int], n: int, steps: int) -> torch.Tensor:
    """``[len(seeds) * n, steps]`` uniform numbers for ``n`` samples of each image, image ``i``'s rows from
    its own generator seeded with ``seeds[i]``."""
    return torch.cat([torch.rand(n, steps, generator=torch.Generator().manual_seed(s)) for s in seeds])


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit seed for one image's samples: the stage's seed and the image's id."""
    digest = hashlib.blake2b(f"{seed}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class TokenizedCaptions:
    """Captions ready for teacher forcing. Shapes: ``[B, T]``; ``lengths[B]`` counts targets incl. the end."""

    decoder_input_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


@dataclass(frozen=True)
class SpecialTokens:
    start: int  # what the text model reads first
    end: int  # what ends a caption (GPT-2's EOS, BERT's [SEP])
    pad: int


@dataclass
class Student:
    """A captioner plus the processor and tokenizer it needs. Construct with :func:`refine.students.load_student`.

    Subclasses set ``kind`` and implement :meth:`text_logits` and :meth:`generate_ids`; they may
    override :meth:`special_tokens`, :meth:`save` and :meth:`positions`.
    """

    model: nn.Module
    image_processor: Any
    tokenizer: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    # Decode with a static KV cache. On CUDA, transformers then compiles the decoder step
    # (torch.compile, CUDA graphs): per-token kernel-launch overhead, which dominates ViT-GPT2 at small
    # batches, goes away. Each new batch shape compiles once (tens of seconds), so it pays off for
    # latency-bound or long runs; see bench/README.md for the measured latencies.
    static_cache: bool = False
    processor: Any = None  # the architecture's own processor, saved with the model
    # The LoRA adapter of the last update, relative to the student it started from (refine.stages.dpo):
    # (peft LoraConfig, its state dict). Saved to adapter/ beside the merged weights.
    adapter: Any = None

    kind = "student"
    # LoRA's default target modules for this architecture (update.lora_targets overrides them); a class
    # attribute, not a field
    lora_targets = ()

    # -- what every architecture provides --------------------------------------------------------
    def special_tokens(self) -> SpecialTokens:
        raise NotImplementedError

    def text_logits(self, model: nn.Module, pixel_values: torch.Tensor, captions: TokenizedCaptions,
                    image_index: torch.Tensor) -> torch.Tensor:
        """``[B, T, V]`` logits at the caption positions of ``captions.decoder_input_ids``, with the images
        ``pixel_values[image_index]``. ``model`` is passed so that a wrapped one (DDP, peft) can be used."""
        raise NotImplementedError

    def generate_ids(self, pixels: torch.Tensor, n: int, sample: bool, kwargs: dict[str, Any]) -> torch.Tensor:
        """Token ids of ``n`` captions per image (``n`` consecutive rows per image); only new tokens
        matter (special ones are dropped when decoding). Beam search returns ``n`` sequences itself; to
        sample, this default repeats each image ``n`` times, so its image side runs ``n`` times (each
        built-in student overrides it to run once per image)."""
        if sample:
            pixels = pixels.repeat_interleave(n, dim=0)
        return self.model.generate(pixel_values=pixels, **kwargs)

    @property
    def positions(self) -> int | None:
        """How many tokens the text model can hold, the start token included (None: no limit known)."""
        return None

    def text_prefix(self) -> int:
        """Positions the text model spends before the caption (image tokens of a decoder-only model)."""
        return 0

    @property
    def caption_limit(self) -> int | None:
        """The most caption tokens the text model holds after its start token and image tokens (None: no
        limit known): the largest ``max_new_tokens`` that cannot index past its position embeddings."""
        return self.positions - 1 - self.text_prefix() if self.positions else None

    # -- inputs --------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt").pixel_values
        return pixels.to(self.device)

    def tokenize(self, captions: Sequence[str], max_tokens: int = 64) -> TokenizedCaptions:
        """Tokenize for teacher forcing (see the module docstring for the layout).

        A caption is cut to ``max_tokens``, and to what fits the text model's positions (the start
        token and any image tokens take some), so a long critic rewrite cannot index past the position
        embeddings. A cut caption gets no end target: it did not end there, and training must not
        teach it to.
        """
        tokens = self.special_tokens()
        if self.caption_limit is not None:
            max_tokens = min(max_tokens, self.caption_limit)
        full = [self.tokenizer(c.strip(), add_special_tokens=False).input_ids for c in captions]
        ids = [x[:max_tokens] for x in full]
        T = max(len(x) for x in ids) + 1
        B = len(ids)
        dec = torch.full((B, T), tokens.pad, dtype=torch.long)
        labels = torch.full((B, T), tokens.pad, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, (x, whole) in enumerate(zip(ids, full)):
            n = len(x)
            dec[i, : n + 1] = torch.tensor([tokens.start, *x])
            labels[i, : n + 1] = torch.tensor([*x, tokens.end])
            mask[i, : n + 1 if len(whole) == n else n] = 1  # a cut caption: no end target
        return TokenizedCaptions(dec.to(self.device), labels.to(self.device), mask.to(self.device), mask.sum(1).to(self.device))

    # -- scoring -------------------------------------------------------------------------------
    def sequence_logps(self, model: nn.Module, pixel_values: torch.Tensor, captions: TokenizedCaptions,
                       image_index: torch.Tensor) -> torch.Tensor:
        """Summed log p(caption | image) for each caption.

        Args:
            pixel_values: ``[N, 3, H, W]``, one row per distinct image.
            captions: ``B`` tokenized captions.
            image_index: ``[B]`` long, the row of ``pixel_values`` each caption describes.

        Returns: ``[B]`` float32 summed log-probabilities over the targets (the end included, padding masked).
        """
        logits = self.text_logits(model, pixel_values, captions, image_index)
        logps = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
        token_logps = logps.gather(-1, captions.labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
        return (token_logps * captions.mask).sum(-1)

    def logps(self, images: Sequence[Image.Image], captions: Sequence[str],
              image_index: Sequence[int] | None = None) -> torch.Tensor:
        """Summed log p(caption_b | images[image_index[b]]), shape ``[B]``; differentiable.

        ``image_index`` defaults to ``range(len(captions))`` (one caption per image).
        """
        index = torch.arange(len(captions)) if image_index is None else torch.as_tensor(list(image_index))
        tokens = self.tokenize(captions)
        with autocast(self.device, self.precision):
            return self.sequence_logps(self.model, self.pixel_values(images), tokens, index.to(self.device))

    # -- captioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def caption(
        self,
        images: Sequence[Image.Image],
        n: int = 1,
        sample: bool = False,
        num_beams: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 20,
        min_new_tokens: int = 0,
        batch_size: int = 16,
        seeds: Sequence[int] | None = None,
    ) -> list[list[str]]:
        """Caption each image ``n`` times: greedy (``n=1``), beam search, or ``n`` samples.

        ``seeds`` (one per image) makes each image's samples a function of its seed alone, whatever
        the batch; without it, sampling uses torch's global generator.
        Returns one list of ``n`` captions per image, in input order.
        """
        from transformers import LogitsProcessorList

        if seeds is not None and len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        if n > 1 and not sample and num_beams < n:
            raise ValueError(f"n={n} distinct captions need sample=True or num_beams >= n (got num_beams={num_beams})")
        self.model.eval()
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False)
        # Set both ways: a checkpoint's generation_config may ask for beams (nlpconnect/vit-gpt2's has 4),
        # which would turn sampling into beam search over the n copies.
        if sample:  # the n copies are made before generate (generate_ids)
            kwargs.update(num_beams=1, num_return_sequences=1)
        else:
            kwargs.update(num_beams=num_beams, num_return_sequences=n)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        out: list[list[str]] = []
        for i in range(0, len(images), batch_size):
            pixels = self.pixel_values(images[i : i + batch_size])
            if sample:  # greedy over a token drawn per sequence and step (see FastSampling)
                uniforms = None if seeds is None else image_uniforms(seeds[i : i + batch_size], n, max_new_tokens)
                kwargs["logits_processor"] = LogitsProcessorList([FastSampling(temperature, top_p, uniforms=uniforms)])
            with autocast(self.device, self.precision), _without_prompt_mask_warnings():
                ids = self.generate_ids(pixels, n, sample, kwargs)
            text = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            out.extend(text[j : j + n] for j in range(0, len(text), n))
        return out

    # -- state ---------------------------------------------------------------------------------
    def copy(self) -> Student:
        """A deep copy of the model sharing the (stateless) processor and tokenizer."""
        twin = copy.copy(self)
        twin.model = copy.deepcopy(self.model)
        twin.adapter = None
        return twin

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write a dir that the architecture's ``from_pretrained`` (and ``load_student``) loads, with the
        last update's LoRA adapter in ``adapter/`` when there is one."""
        self.model.save_pretrained(out_dir)
        self.processor.save_pretrained(out_dir)
        if self.adapter is not None:
            from safetensors.torch import save_file

            config, state = self.adapter
            config.save_pretrained(os.path.join(out_dir, "adapter"))
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def sample_rows(images: int, n: int, device: torch.device) -> torch.Tensor:
    """``[images * n]``: the image of each of ``n`` consecutive samples per image."""
    return torch.arange(images, device=device).repeat_interleave(n)


@contextlib.contextmanager
def image_rows_per_caption(module: nn.Module, image_index: torch.Tensor):
    """While active, ``module``'s output, one row per distinct image, is handed on as one row per caption
    (``image_index[b]`` is caption ``b``'s image). For models whose forward takes pixels and not image
    features (GIT, BLIP-2): given the distinct images, the image side runs once per image, not once per
    caption, and gradients sum back per image as ``index_select``'s do."""
    handle = module.register_forward_hook(lambda _module, _inputs, out: out.index_select(0, image_index))
    try:
        yield
    finally:
        handle.remove()


def vision_encoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """The image side of a student's model: ViT/CLIP in a vision encoder-decoder, BLIP's and BLIP-2's
    vision model, GIT's image encoder (None when it has none of these)."""
    if hasattr(model, "get_encoder") and hasattr(model, "encoder"):
        return model.encoder
    return getattr(model, "vision_model", None) or getattr(getattr(model, "git", None), "image_encoder", None)


class CaptionScorer(nn.Module):
    """``Student.sequence_logps`` as a module, so DDP / accelerate can wrap the whole scoring forward."""

    def __init__(self, student: Student, model: nn.Module | None = None):
        super().__init__()
        self.model = model if model is not None else student.model
        self._student = [student]  # not a submodule: the student holds the same model

    def forward(self, pixel_values, captions: TokenizedCaptions, image_index):
        return self._student[0].sequence_logps(self.model, pixel_values, captions, image_index)
