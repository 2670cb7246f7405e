"""Text scores of captions against references: CIDEr-D, BLEU-4, and the diversity of a caption set.

Text is tokenised as coco-caption does it (``refine.metrics.ptb.ptb_words``: Stanford's PTB tokenizer
rules without Java, then coco-caption's punctuation removal), so CIDEr-D and BLEU match pycocoevalcap's
(tests/test_ptb.py checks both against it).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from refine.metrics.ptb import ptb_words

CIDER_SIGMA = 6.0  # Vedantam et al. 2015 / coco-caption CIDEr-D: Gaussian length penalty width, in words
CIDER_MAX_N = 4


def check_texts(name: str, texts: Sequence[str]) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] is a {type(text).__name__}, not a str")


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of ``words`` in order, as tuples."""
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def ngram_counts(words: Sequence[str], max_n: int) -> Counter:
    """Counts of every 1..max_n-gram of ``words``, keyed by tuples."""
    return Counter(g for n in range(1, max_n + 1) for g in ngrams(words, n))


def _check_references(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"candidates ({len(candidates)}) and references ({len(references)}) must pair up")
    check_texts("candidates", candidates)
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(
                f"references[{i}] must be a non-empty list of strings; score only the images that have references"
            )
        check_texts(f"references[{i}]", refs)


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
    check_texts("captions", captions)
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
    check_texts("captions", captions)
    words = [ptb_words(c) for c in captions]
    return Diversity(
        distinct_1=distinct_n(captions, 1),
        distinct_2=distinct_n(captions, 2),
        vocabulary_size=len({w for ws in words for w in ws}),
        mean_length=sum(map(len, words)) / len(words),
    )
