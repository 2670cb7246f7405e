"""Image-text scores with CLIP-style models: CLIPScore / RefCLIPScore (Hessel et al. 2021) and PickScore.

Each score is a small pure function of embeddings plus a scorer built by a ``load_*`` function.
``python -m refine.score`` uses them to compare captions before and after each round.

Model-based scores mark an image that could not be processed with NaN in its row (and log why), so
one bad image never sinks a batch: summarise them skipping NaN, and report the NaN count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from refine.infra.hub import load_failure
from refine.metrics.text import check_texts

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # the model Hessel et al. report CLIP-S with
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore_v1 ships no processor
# Hessel et al. 2021, Sec. 3: "we prefix each candidate with 'A photo depicts'", and w = 2.5 rescales
# CLIP-S to roughly [0, 1] on MS-COCO (their cosines rarely exceed 0.4).
CLIPSCORE_PREFIX = "A photo depicts "
CLIPSCORE_W = 2.5


# --------------------------------------------------------------------------------------------
# Pure maths on embeddings
# --------------------------------------------------------------------------------------------


def _check_embeds(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must both be [N, D] with the same shape "
            "(one row per image-caption pair)"
        )


def pair_cosines(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity. ``[N, D], [N, D] -> [N]`` in float32; inputs need not be normalised."""
    _check_embeds("image_embeds", image_embeds, "text_embeds", text_embeds)
    return (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor, w: float = CLIPSCORE_W) -> torch.Tensor:
    """CLIP-S (Hessel et al. 2021, eq. 1): ``w * max(cos(E_img, E_txt), 0)`` for each pair.

    Args:
        image_embeds: ``[N, D]`` image embeddings (any norm).
        text_embeds: ``[N, D]`` embeddings of ``"A photo depicts " + caption`` (any norm).
        w: 2.5 in the paper.
    Returns:
        ``[N]``. The clamp is per sample, *before* averaging: torchmetrics' ``CLIPScore`` instead
        reports ``100 * cos`` averaged, then clamped, with no prefix, which is a different number.
    """
    return w * pair_cosines(image_embeds, text_embeds).clamp(min=0)


def ref_clip_score(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    reference_embeds: torch.Tensor,
    reference_index: torch.Tensor,
    w: float = CLIPSCORE_W,
) -> torch.Tensor:
    """RefCLIP-S (Hessel et al. 2021, eq. 2): ``H-Mean(CLIP-S(c, v), max(max_r cos(c, r), 0))``.

    Args:
        image_embeds, text_embeds: ``[N, D]`` as for :func:`clip_score` (candidates with the prefix).
        reference_embeds: ``[M, D]`` embeddings of the references, prefixed like the candidates (the
            reference code embeds every text through the same prefixed dataset).
        reference_index: ``[M]`` long, the candidate row each reference belongs to.
    Returns:
        ``[N]``; NaN for a candidate without references; 0 where both terms are 0. We clamp the
        reference cosine at 0 as the paper's equation does (the released code does not clamp it).
    """
    _check_embeds("image_embeds", image_embeds, "text_embeds", text_embeds)
    if reference_embeds.ndim != 2 or reference_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(f"reference_embeds {tuple(reference_embeds.shape)} must be [M, {text_embeds.shape[1]}]")
    if reference_index.shape != (reference_embeds.shape[0],):
        raise ValueError(f"reference_index {tuple(reference_index.shape)} must be [M={reference_embeds.shape[0]}]")
    clip_s = clip_score(image_embeds, text_embeds, w)
    candidates = F.normalize(text_embeds.float(), dim=-1)
    references = F.normalize(reference_embeds.float(), dim=-1)
    ref_cos = (candidates[reference_index] * references).sum(-1)  # [M]
    best = torch.full_like(clip_s, float("nan")).scatter_reduce(
        0, reference_index, ref_cos, reduce="amax", include_self=False
    )
    best = best.clamp(min=0)  # clamp keeps NaN, so candidates with no reference stay NaN
    total = clip_s + best
    return torch.where(total == 0, torch.zeros_like(total), 2 * clip_s * best / total)


def pick_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """PickScore (Kirstain et al. 2023, the PickScore_v1 reference snippet): ``exp(logit_scale) * cos``.

    Args:
        image_embeds, text_embeds: ``[N, D]``, L2-normalised here.
        logit_scale: the model's ``logit_scale`` parameter, i.e. the *log* of the multiplier
            (``exp`` is applied here, as in ``model.logit_scale.exp()``).
    Returns:
        ``[N]``, unclamped: PickScore compares candidates, so negative values are kept.
    """
    scale = torch.as_tensor(logit_scale, dtype=torch.float32).detach().cpu().exp()
    return scale * pair_cosines(image_embeds, text_embeds)


# --------------------------------------------------------------------------------------------
# CLIP-style models: batched embeddings, CLIPScore and PickScore scorers
# --------------------------------------------------------------------------------------------


def _projected(output: Any) -> torch.Tensor:
    """transformers < 5 returned the projected embeddings from ``get_*_features``; 5.x returns a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds them (what breaks torchmetrics 1.9)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _check_pairs(images: Sequence[Image.Image], captions: Sequence[str]) -> None:
    if len(images) != len(captions):
        raise ValueError(f"images ({len(images)}) and captions ({len(captions)}) must pair up one to one")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"images[{i}] is a {type(image).__name__}; pass PIL images (ImageRecord.image)")
    check_texts("captions", captions)


@dataclass
class ClipEmbedder:
    """A CLIP-style dual encoder (``CLIPModel`` + ``CLIPProcessor``) run in batches, without gradients.

    Returns raw projected embeddings as float32 on the CPU; the score functions normalise them.
    """

    model: Any
    processor: Any
    device: torch.device
    batch_size: int = 32

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    @torch.inference_mode()
    def _image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(self.device, self.model.dtype)
        return _projected(self.model.get_image_features(pixel_values=pixel_values)).float().cpu()

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[N, D]``; the row of an image that fails to decode or process is NaN (and logged)."""
        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            try:
                rows.append(self._image_batch(batch))
            except Exception:  # find the bad image(s) one by one so the rest still count
                for i, image in enumerate(batch, start):
                    try:
                        rows.append(self._image_batch([image]))
                    except Exception as e:
                        log.warning("image %d could not be embedded, its score is NaN: %s: %s", i, type(e).__name__, e)
                        rows.append(torch.full((1, self.dim), float("nan")))
        return torch.cat(rows) if rows else torch.empty(0, self.dim)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``[N, D]``. Texts longer than the model's context (77 tokens for CLIP) are truncated, as
        Hessel's ``clip.tokenize(..., truncate=True)`` and the PickScore snippet do."""
        check_texts("texts", texts)
        max_length = self.model.config.text_config.max_position_embeddings
        rows = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True, truncation=True, max_length=max_length, return_tensors="pt",
            ).to(self.device)
            rows.append(_projected(self.model.get_text_features(**tokens)).float().cpu())
        return torch.cat(rows) if rows else torch.empty(0, self.dim)


@dataclass
class ClipScorer:
    """CLIPScore and RefCLIPScore exactly as Hessel et al. 2021 define them (see :func:`clip_score`)."""

    embedder: ClipEmbedder
    prefix: str = CLIPSCORE_PREFIX
    w: float = CLIPSCORE_W

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        """CLIP-S for each ``(image, caption)`` pair: ``[N]``, NaN where the image failed."""
        _check_pairs(images, captions)
        image_embeds = self.embedder.embed_images(images)
        text_embeds = self.embedder.embed_texts([self.prefix + c for c in captions])
        return clip_score(image_embeds, text_embeds, self.w)

    def ref_score(
        self, images: Sequence[Image.Image], captions: Sequence[str], references: Sequence[Sequence[str]]
    ) -> torch.Tensor:
        """RefCLIP-S for each pair given its reference captions: ``[N]``; NaN where an image failed
        or a caption has no references."""
        _check_pairs(images, captions)
        if len(references) != len(captions):
            raise ValueError(f"references ({len(references)}) must give one list per caption ({len(captions)})")
        flat = [ref for refs in references for ref in refs]
        check_texts("references (flattened)", flat)
        index = torch.tensor([i for i, refs in enumerate(references) for _ in refs], dtype=torch.long)
        image_embeds = self.embedder.embed_images(images)
        text_embeds = self.embedder.embed_texts([self.prefix + c for c in captions])
        reference_embeds = self.embedder.embed_texts([self.prefix + r for r in flat])
        return ref_clip_score(image_embeds, text_embeds, reference_embeds, index, self.w)


@dataclass
class PickScorer:
    """PickScore_v1: ``exp(logit_scale) * cos`` of the raw caption and the image (no prefix)."""

    embedder: ClipEmbedder

    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        """``[N]``, NaN where the image failed."""
        _check_pairs(images, captions)
        image_embeds = self.embedder.embed_images(images)
        text_embeds = self.embedder.embed_texts(list(captions))
        return pick_score(image_embeds, text_embeds, self.embedder.model.logit_scale)


def load_clip_embedder(
    model_id: str,
    processor_id: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
) -> ClipEmbedder:
    """A ``CLIPModel`` and its processor from a hub id or a local directory, in eval mode on ``device``."""
    from transformers import AutoProcessor, CLIPModel

    from refine.infra.devices import pick_device

    device = pick_device(str(device) if device is not None else None)
    processor_id = processor_id or model_id
    try:
        processor = AutoProcessor.from_pretrained(processor_id)
        model = CLIPModel.from_pretrained(model_id, dtype=dtype)
    except Exception as e:  # missing (OSError), or not a CLIP checkpoint (a ValueError, a config validation error)
        raise load_failure("CLIP-style model", model_id if processor_id == model_id else f"{model_id}, {processor_id}",
                           e, "--clip-model / --pick-model / --pick-processor") from e
    return ClipEmbedder(model.to(device).eval(), processor, device, batch_size)


def load_clip_scorer(
    model_id: str = DEFAULT_CLIP_MODEL, device: str | torch.device | None = None, batch_size: int = 32
) -> ClipScorer:
    """CLIPScore with ``model_id`` (Hessel et al. used ViT-B/32, the default)."""
    return ClipScorer(load_clip_embedder(model_id, device=device, batch_size=batch_size))


def load_pick_scorer(
    model_id: str = DEFAULT_PICKSCORE_MODEL,
    processor_id: str = DEFAULT_PICKSCORE_PROCESSOR,
    device: str | torch.device | None = None,
    batch_size: int = 32,
) -> PickScorer:
    """PickScore: the model from ``model_id``, the processor from ``processor_id``, as in the reference snippet."""
    return PickScorer(load_clip_embedder(model_id, processor_id, device, batch_size))
