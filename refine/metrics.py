"""Caption metrics: CLIPScore / RefCLIPScore, PickScore, CIDEr-D, BLEU-4 and diversity.

Each score is a small pure function (of embeddings, or of tokenised captions) plus, for the
model-based ones, a scorer built by a ``load_*`` function. ``python -m refine.score`` uses them to
compare captions before and after each round. CHAIR lives in ``refine.objects``.

Model-based scores mark an image that could not be processed with NaN in its row (and log why), so
one bad image never sinks a batch: summarise them with ``torch.nanmean`` and report the NaN count.

Text is tokenised as coco-caption does it (``refine.ptb.ptb_words``: Stanford's PTB tokenizer rules
without Java, then coco-caption's punctuation removal), so CIDEr-D and BLEU match pycocoevalcap's
(tests/test_ptb.py checks both against it).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from refine.ptb import ptb_words

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"  # the model Hessel et al. report CLIP-S with
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore_v1 ships no processor
# Hessel et al. 2021, Sec. 3: "we prefix each candidate with 'A photo depicts'", and w = 2.5 rescales
# CLIP-S to roughly [0, 1] on MS-COCO (their cosines rarely exceed 0.4).
CLIPSCORE_PREFIX = "A photo depicts "
CLIPSCORE_W = 2.5
CIDER_SIGMA = 6.0  # Vedantam et al. 2015 / coco-caption CIDEr-D: Gaussian length penalty width, in words
CIDER_MAX_N = 4


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
    _check_texts("captions", captions)


def _check_texts(name: str, texts: Sequence[str]) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] is a {type(text).__name__}, not a str")


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
        _check_texts("texts", texts)
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
        _check_texts("references (flattened)", flat)
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

    from refine.student import pick_device

    device = pick_device(str(device) if device is not None else None)
    processor_id = processor_id or model_id
    try:
        processor = AutoProcessor.from_pretrained(processor_id)
        model = CLIPModel.from_pretrained(model_id, dtype=dtype)
    except OSError as e:
        raise OSError(
            f"could not load CLIP model {model_id!r} / processor {processor_id!r}: {e}. Hub ids are fetched "
            "on first use; run once with network access or pass local directories."
        ) from e
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


# --------------------------------------------------------------------------------------------
# Text: tokenisation, CIDEr-D, BLEU-4, diversity
# --------------------------------------------------------------------------------------------

def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of ``words`` in order, as tuples."""
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def ngram_counts(words: Sequence[str], max_n: int) -> Counter:
    """Counts of every 1..max_n-gram of ``words``, keyed by tuples."""
    return Counter(g for n in range(1, max_n + 1) for g in ngrams(words, n))


def _check_references(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"candidates ({len(candidates)}) and references ({len(references)}) must pair up")
    _check_texts("candidates", candidates)
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                f"references[{i}] must be a non-empty list of strings; score only the images that have references"
            )
        _check_texts(f"references[{i}]", refs)


def _tfidf(counts: Counter, document_frequency: Counter, log_documents: float, max_n: int):
    """CIDEr's per-order tf-idf vectors and norms of one caption (coco-caption ``counts2vec``)."""
    vectors: list[dict[tuple, float]] = [{} for _ in range(max_n)]
    for ngram, tf in counts.items():
        # n-grams absent from every reference get df 1, i.e. the largest idf (as coco-caption does)
        vectors[len(ngram) - 1][ngram] = tf * (log_documents - math.log(max(1.0, document_frequency[ngram])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    return vectors, norms


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    idf_references: Sequence[Sequence[str]] | None = None,
    max_n: int = CIDER_MAX_N,
    sigma: float = CIDER_SIGMA,
) -> torch.Tensor:
    """CIDEr-D of each candidate against its references (Vedantam et al. 2015; coco-caption's ``Cider``).

    For each n in 1..4: tf-idf vectors of n-grams, with idf = log(#images) - log(df) and df the number
    of *images* whose reference set contains the n-gram; the candidate's weights are clipped by the
    reference's (CIDEr-D's "no gaming by repetition"); cosine with each reference, times the Gaussian
    length penalty ``exp(-(len_c - len_r)^2 / (2 sigma^2))``. The mean over n and over references,
    times 10, is the image's score; the corpus CIDEr-D is the mean over images.

    coco-caption measures length in bigrams (len - 1), which gives the same difference except for an
    empty caption, where the score is 0 either way; we use words.

    Args:
        candidates: ``N`` captions.
        references: ``N`` non-empty lists of reference captions.
        idf_references: the reference sets the document frequencies come from (default:
            ``references``); pass the full set to score a subset on the same idf.
    Returns:
        ``[N]`` float64.
    """
    _check_references(candidates, references)
    idf_sets = references if idf_references is None else idf_references
    if len(idf_sets) < 2:
        raise ValueError(
            "CIDEr-D needs reference sets for at least 2 images: with one, every idf is log(1) = 0 and so is "
            "every score. Score more images or pass idf_references."
        )
    document_frequency: Counter = Counter()
    for refs in idf_sets:
        document_frequency.update(set().union(*(ngram_counts(ptb_words(r), max_n) for r in refs)))
    log_documents = math.log(len(idf_sets))

    scores = []
    for candidate, refs in zip(candidates, references, strict=True):
        words = ptb_words(candidate)
        vec, norm = _tfidf(ngram_counts(words, max_n), document_frequency, log_documents, max_n)
        total = 0.0
        for ref in refs:
            ref_words = ptb_words(ref)
            ref_vec, ref_norm = _tfidf(ngram_counts(ref_words, max_n), document_frequency, log_documents, max_n)
            penalty = math.exp(-((len(words) - len(ref_words)) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                if norm[n] == 0 or ref_norm[n] == 0:
                    continue
                dot = sum(min(v, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, v in vec[n].items())
                total += dot / (norm[n] * ref_norm[n]) * penalty
        scores.append(10.0 * total / max_n / len(refs))
    return torch.tensor(scores, dtype=torch.float64)


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> float:
    """Corpus BLEU-n (Papineni et al. 2002) as coco-caption's ``Bleu`` reports it, via torchmetrics.

    Clipped n-gram counts and lengths are summed over the corpus; uniform weights; brevity penalty
    against the *closest* reference length. We feed torchmetrics our tokenisation (its own only
    splits on spaces, so "grass." and "Grass" would not match "grass") and sort each reference set
    by length, because torchmetrics breaks closest-length ties by list order while coco-caption
    takes the shorter reference. With that, the two agree to float32 precision whenever every order
    has a match. When some order has none, torchmetrics returns 0 while coco-caption's smoothing
    (``(0 + 1e-15) / (guesses + 1e-9)``) leaves a small positive number: about 1e-4 when there were
    4-grams but none matched, up to 0.03 (``(1e-6) ** (1/4)``) when no candidate has four words.
    """
    from torchmetrics.functional.text import bleu_score

    _check_references(candidates, references)
    preds = [" ".join(ptb_words(c)) for c in candidates]
    target = [sorted((" ".join(ptb_words(r)) for r in refs), key=lambda s: len(s.split())) for refs in references]
    return float(bleu_score(preds, target, n_gram=n))


def distinct_n(captions: Sequence[str], n: int) -> float:
    """distinct-n (Li et al. 2016): unique n-grams / total n-grams over the whole caption set; 0 if none."""
    _check_texts("captions", captions)
    grams = [g for c in captions for g in ngrams(ptb_words(c), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class Diversity:
    distinct_1: float
    distinct_2: float
    vocabulary_size: int  # distinct words over the set
    mean_length: float  # words per caption

    def to_json(self) -> dict[str, float]:
        return {"distinct_1": self.distinct_1, "distinct_2": self.distinct_2,
                "vocabulary_size": self.vocabulary_size, "mean_length": self.mean_length}


def diversity(captions: Sequence[str]) -> Diversity:
    """distinct-1, distinct-2, vocabulary size and mean length of a caption set (coco-caption's tokenisation)."""
    if len(captions) == 0:
        raise ValueError("captions is empty: diversity needs at least one caption")
    _check_texts("captions", captions)
    words = [ptb_words(c) for c in captions]
    return Diversity(
        distinct_1=distinct_n(captions, 1),
        distinct_2=distinct_n(captions, 2),
        vocabulary_size=len({w for ws in words for w in ws}),
        mean_length=sum(map(len, words)) / len(words),
    )
