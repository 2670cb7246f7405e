"""The grounded critic: offline, deterministic, no model. It checks a caption against known objects.

The objects come from the request's annotations (``request.objects``) when present, else from the
detector (``request.regions.counts()``). The critique compares them with what the caption says
(``refine.objects.compare``), scores the agreement, turns the differences into instructions (the textual
gradient) and proposes ``refine.objects.rewrite`` as the revision.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

from critics.base import Critique, CritiqueRequest
from refine.objects import (
    ObjectDiff,
    Vocabulary,
    canonical_truth,
    coco_vocabulary,
    compare,
    confusable,
    mentions,
    noun_phrase,
    rewrite,
)
from refine.objects.words import number_word, pluralize_phrase

# A miscounted object earns half the credit of a correctly counted one when the count is off by 100 %
# or more of the true count (our choice: naming the right object matters more than its number).
COUNT_PENALTY = 0.5


def agreement_score(diff: ObjectDiff) -> float:
    """Soft F1 (the Dice coefficient) between the object types said and the types present, in [0, 1].

    ``score = 2 * sum(credit(l) for l in said & true) / (|said| + |true|)`` with
    ``credit(l) = 1 - COUNT_PENALTY * min(1, |said_l - true_l| / true_l)`` for a definite count error
    and 1 otherwise. 1.0 only for no hallucinated, missing or miscounted object (and for nothing said
    about an empty scene). Every error lowers the score: a hallucinated type adds 1 to the denominator;
    leaving a true type unsaid takes up to 2 from the numerator but only 1 from the denominator; a worse
    count lowers a credit.
    """
    n_said, n_true = len(diff.said), len(diff.truth)
    if n_said + n_true == 0:
        return 1.0
    credit = 0.0
    for label in diff.correct:
        if label in diff.count_errors:
            said, true = diff.count_errors[label]
            credit += 1.0 - COUNT_PENALTY * min(1.0, abs(said - true) / true)
        else:
            credit += 1.0
    return 2.0 * credit / (n_said + n_true)


def feedback_text(diff: ObjectDiff) -> str:
    """The differences as instructions, one per line: what to remove, what to add, which count to fix."""
    lines = [f"Remove {pluralize_phrase(label)}: there are none in the image." for label in diff.hallucinated]
    for label in diff.missing:
        it = "it" if diff.truth[label] == 1 else "them"
        lines.append(f"Mention {noun_phrase(label, diff.truth[label])}: the image shows {it} but the caption "
                     f"leaves {it} out.")
    lines += [f"Fix the number of {pluralize_phrase(label)}: the caption says {number_word(said)}, the image "
              f"shows {number_word(true)}." for label, (said, true) in diff.count_errors.items()]
    if not lines:
        return "The caption names exactly the objects in the image, with the right counts. Keep them."
    return "\n".join(lines)


def critique_from_truth(caption: str, truth: Mapping[str, int | None], vocab: Vocabulary,
                        meta: dict | None = None) -> Critique:
    """The full critique of ``caption`` against ``truth`` (label -> count, None for an unknown count)."""
    diff = compare(caption, truth, vocab)
    revision = rewrite(caption, truth, vocab)
    raw = {"said": diff.said, "truth": diff.truth, "hallucinated": diff.hallucinated, "missing": diff.missing,
           "count_errors": {k: list(v) for k, v in diff.count_errors.items()}}
    return Critique(
        score=agreement_score(diff),
        feedback=feedback_text(diff),
        hallucinated=list(diff.hallucinated),
        missing=list(diff.missing),
        count_errors=dict(diff.count_errors),
        revision=revision or None,
        raw=json.dumps(raw, sort_keys=True),
        meta=dict(meta or {}),
    )


NOISE_KINDS = ("missed_hallucination", "false_alarm", "dropped", "miscount", "swapped")


def believe(caption: str, truth: Mapping[str, int | None], vocab: Vocabulary, noise: float,
            rng: random.Random) -> tuple[dict[str, int | None], list[dict[str, Any]]]:
    """What a critic that errs with probability ``noise`` per object believes the image holds.

    Each hallucinated object is missed (believed present) with probability ``noise``; each present
    object, with probability ``noise``, is believed absent (a false alarm if the caption names it,
    else the revision drops it), miscounted by one, or swapped for an absent label that shares a word
    with it (the revision names the wrong object). Returns ``(belief, injected errors)``; the critique
    and revision made from the belief carry those errors, as a real critic's would.
    """
    said, true = mentions(caption, vocab), canonical_truth(truth, vocab)
    belief, errors = dict(true), []
    for label, count in said.items():
        if label not in true and rng.random() < noise:
            belief[label] = count or 1
            errors.append({"kind": "missed_hallucination", "label": label})
    for label, count in true.items():
        if rng.random() >= noise:
            continue
        kind = rng.choice(["removed", "miscount", "swapped"])
        if kind == "miscount" and count is not None:
            belief[label] = count + 1 if count == 1 or rng.random() < 0.5 else count - 1
            errors.append({"kind": "miscount", "label": label, "as": belief[label]})
            continue
        absent = sorted(other for other in vocab.labels if other not in true and other not in belief)
        alike = [other for other in absent if confusable(other, label)]
        if kind == "swapped" and (alike or absent):
            instead = rng.choice(alike or absent)
            belief[instead] = belief.pop(label)
            errors.append({"kind": "swapped", "label": label, "as": instead})
            continue
        belief.pop(label)
        errors.append({"kind": "false_alarm" if label in said else "dropped", "label": label})
    return belief, errors


class GroundedCritic:
    """``Critic`` backed by annotations or detections. Never raises for one item. Free and fast: the
    critique stage hands it ``batch_size`` requests at a time.

    Args:
        vocabulary: the objects the caption is read for; default COCO's 80 with CHAIR's synonyms. Labels in
            a request's truth that the vocabulary does not name are added for that request.
        noise: the probability, per object and critique, of an error (:func:`believe`): 0 is a perfect
            critic. Deterministic per (``seed``, image, caption, sample), so runs stay reproducible; the
            injected errors are recorded in the critique's ``meta["noise"]``.
    """

    def __init__(self, vocabulary: Vocabulary | None = None, id: str = "grounded", noise: float = 0.0, seed: int = 0):
        if not 0 <= noise < 1:
            raise ValueError(f"noise={noise!r}: must be in [0, 1)")
        self.id = id if not noise else f"{id}:noise={noise}:seed={seed}"
        self.vocabulary = vocabulary
        self.noise = noise
        self.seed = seed

    free = True
    batch_size = 64
    pixels = False  # it reads annotations or detections: a request's image is never decoded for it

    def truth_for(self, request: CritiqueRequest) -> tuple[dict[str, int], str] | None:
        """``(label -> count, source)`` with source "annotations" or "detector", or None."""
        if request.objects is not None:
            return dict(request.objects), "annotations"
        if request.regions is not None:
            return dict(request.regions.counts()), "detector"
        return None

    def critique(self, request: CritiqueRequest) -> Critique:
        found = self.truth_for(request)
        if found is None:
            return Critique.failure(
                f"grounded critic: image {request.image_id!r} has neither annotations (request.objects) nor "
                "detections (request.regions); run the regions stage or use an annotated image set")
        truth, source = found
        if not isinstance(request.caption, str):
            return Critique.failure(f"grounded critic: caption for image {request.image_id!r} is "
                                    f"{type(request.caption).__name__}, not a string")
        if self.vocabulary is None:
            self.vocabulary = coco_vocabulary()
        vocab = self.vocabulary.extended(truth)
        meta: dict[str, Any] = {"critic": self.id, "truth_source": source}
        if self.noise:
            rng = random.Random(f"grounded-noise/{self.seed}/{request.image_id}/{request.sample}/{request.caption}")
            truth, meta["noise"] = believe(request.caption, truth, vocab, self.noise, rng)
        return critique_from_truth(request.caption, truth, vocab, meta=meta)

    def critique_many(self, requests: Sequence[CritiqueRequest]) -> list[Critique]:
        out = []
        for request in requests:
            try:
                out.append(self.critique(request))
            except Exception as e:  # one bad item becomes a recorded failure, never a dead batch
                out.append(Critique.failure(f"grounded critic: image {getattr(request, 'image_id', '?')!r}: "
                                            f"{type(e).__name__}: {e}"))
        return out
