"""CHAIR: object hallucination in captions, over a set (Rohrbach et al. 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from refine.objects import Vocabulary, canonical_truth, compare, find_mentions, tokenize


def chair(captions: Sequence[str], truths: Sequence[Mapping[str, int | None]], vocab: Vocabulary) -> dict:
    """CHAIR hallucination metrics (Rohrbach et al. 2018, "Object Hallucination in Image Captioning").

    Definitions, over the whole set, as in the reference implementation (utils/chair.py):

    - ``chair_i`` = hallucinated object mentions / all object mentions. A mention is each place a
      caption names an object (``find_mentions``): repeats count each time, as the reference counts
      every object word ("a dog chasing the dog" is two dog mentions), and "two dogs" is one mention.
    - ``chair_s`` = captions with at least one hallucinated mention / captions.
    - ``recall`` = sum over captions of |true object types mentioned| / sum of |true object types|.
    - ``exact`` = captions whose objects match the truth exactly / captions: the same set of labels,
      and every definite count said equals the true count (counts said vaguely, "some dogs", and true
      counts given as None are not checked); this is ``ObjectDiff.exact``. Not part of CHAIR.
    - ``mean_len`` = mean number of word tokens per caption.
    - ``substitutions``, ``additions``, ``omissions``: the object errors by mechanism
      (``ObjectDiff.substitutions``: a present object named as another that shares a word with it, a
      blue square for a blue circle; additions: other hallucinated objects; omissions: other missing
      ones), summed over captions; ``subst_rate`` = substitutions per caption. Not part of CHAIR.

    Truths are label -> count (the reference builds its truth from segmentation labels plus objects
    named in the reference captions; union those in beforehand to reproduce it). Ratios with an empty
    denominator are 0.0, as in the reference. The raw counts are returned too.
    """
    if len(captions) != len(truths):
        raise ValueError(f"chair: {len(captions)} captions but {len(truths)} truths; pass one truth per "
                         "caption")
    n_mentions = n_hall_mentions = n_hall_caps = n_true = n_true_said = n_exact = n_words = 0
    n_subst = n_add = n_omit = 0
    for caption, truth in zip(captions, truths, strict=True):
        true = canonical_truth(truth, vocab)
        found = find_mentions(caption, vocab)
        hall = sum(m.label not in true for m in found)
        n_mentions += len(found)
        n_hall_mentions += hall
        n_hall_caps += hall > 0
        n_true += len(true)
        n_true_said += len({m.label for m in found} & set(true))
        diff = compare(caption, truth, vocab)
        n_exact += diff.exact
        n_subst += len(diff.substitutions)
        n_add += len(diff.additions)
        n_omit += len(diff.omissions)
        n_words += sum(t.is_word for t in tokenize(caption))
    n = len(captions)

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {
        "chair_i": ratio(n_hall_mentions, n_mentions),
        "chair_s": ratio(n_hall_caps, n),
        "recall": ratio(n_true_said, n_true),
        "exact": ratio(n_exact, n),
        "mean_len": ratio(n_words, n),
        "subst_rate": ratio(n_subst, n),
        "substitutions": n_subst,
        "additions": n_add,
        "omissions": n_omit,
        "captions": n,
        "hallucinated_captions": n_hall_caps,
        "object_mentions": n_mentions,
        "hallucinated_mentions": n_hall_mentions,
        "true_objects": n_true,
        "true_objects_mentioned": n_true_said,
        "exact_captions": n_exact,
        "words": n_words,
    }
