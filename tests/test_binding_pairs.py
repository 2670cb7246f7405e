"""Binding pairs (``loop.pair_sources=...,binding``): the caption the critic accepts ≻ the same words bound
otherwise, two of its objects' nouns exchanged (``refine.objects.exchange``)."""

from __future__ import annotations

from collections import Counter

import pytest

from critics.base import Critique
from refine.images import shapes
from refine.objects import coco_vocabulary, exchange, mentions, singularize
from refine.stages.critique import CritiqueRow
from refine.stages.pairs import binding_pairs, build_pairs
from refine.stages.step import Refinement
from refine.stages.student import CaptionSet

VOCAB = shapes.vocabulary()


def words(caption: str) -> Counter[str]:
    return Counter(singularize(w) for w in caption.lower().replace(",", " ").replace(".", " ").split())


@pytest.mark.parametrize("caption, a, b, expected", [
    ("a red circle and two blue squares", "red circle", "blue square", "a red square and two blue circles"),
    ("A red circle, two blue squares and a green triangle.", "green triangle", "red circle",
     "A red triangle, two blue squares and a green circle."),
    ("two yellow triangles and a yellow square", "yellow triangle", "yellow square",  # the counts change hands
     "two yellow squares and a yellow triangle"),
    ("a red circle and a red square", "red circle", "red square", None),  # the same objects, reordered
    ("a red circle and a blue circle", "red circle", "blue circle", None),  # the same noun
    ("a red circle, a blue square and a red square", "red circle", "blue square", None),  # "red square" named already
    ("a red circle, a red circle and a blue square", "red circle", "blue square", None),  # named twice
    ("a green square", "green square", "blue circle", None),  # one of them not named
])
def test_exchange_swaps_two_objects_nouns_leaving_counts_and_modifiers_in_place(caption, a, b, expected):
    assert exchange(caption, a, b, VOCAB) == expected
    if expected:  # other objects, in the same words
        assert mentions(expected, VOCAB) != mentions(caption, VOCAB)
        assert words(expected) == words(caption)


def test_exchange_in_free_form_captions():
    coco = coco_vocabulary()
    assert exchange("Two dogs and a cat on a couch.", "dog", "cat", coco) == "Two cats and a dog on a couch."
    assert exchange("A dog and a cat.", "dog", "cat", coco) is None  # nothing said would change
    assert exchange("A man riding a horse.", "person", "horse", coco) is None
    assert exchange("Two dogs and the cat.", "dog", "cat", coco) is None  # no number to keep


def _critique(image_id, caption, hallucinated=(), missing=(), error=None):
    score = 1.0 if not (hallucinated or missing) else 0.5
    return CritiqueRow(image_id, caption, Critique(score, "", list(hallucinated), list(missing), error=error))


CAPTIONS = [CaptionSet("fixed", "a red circle and a blue square"),  # refined: the rewrite is accepted
            CaptionSet("approved", "a blue circle and two green triangles"),  # approved as it is
            CaptionSet("wrong", "a red square and a blue circle"),  # disapproved, and the step changed nothing
            CaptionSet("failed", "a red square and a green circle"),  # its critique failed
            CaptionSet("single", "a yellow triangle")]  # accepted, but one object has nothing to exchange with
CRITIQUES = [_critique("fixed", "a red circle and a blue square", ["blue square"], ["blue circle", "green square"]),
             _critique("approved", "a blue circle and two green triangles"),
             _critique("wrong", "a red square and a blue circle", ["red square"], ["red circle"]),
             _critique("failed", "a red square and a green circle", error="timeout"),
             _critique("single", "a yellow triangle")]
REFINED = [Refinement("fixed", "a red circle and a blue square", "a red circle, a blue circle and a green square",
                      votes=2, of=3),
           Refinement("approved", "a blue circle and two green triangles", "a blue circle and two green triangles"),
           Refinement("wrong", "a red square and a blue circle", "a red square and a blue circle", rejected="chatter")]


def test_binding_pairs_exchange_two_objects_of_each_accepted_caption():
    pairs = binding_pairs(CAPTIONS, CRITIQUES, REFINED, {}, VOCAB)
    assert [(p.image_id, p.chosen, p.source) for p in pairs] == [
        ("fixed", "a red circle, a blue circle and a green square", "binding"),
        ("approved", "a blue circle and two green triangles", "binding")]
    # "fixed" has two exchanges that change something (red/green, blue/green; red/blue share the noun)
    assert pairs[0].rejected in ("a red square, a blue circle and a green circle", "a red circle, a blue square and a green circle")
    assert pairs[1].rejected == "a blue triangle and two green circles"
    assert [p.weight for p in pairs] == [pytest.approx(2 / 3), 1.0]  # the refinement's agreement carries over
    assert binding_pairs(CAPTIONS, CRITIQUES, REFINED, {}, VOCAB) == pairs  # seeded by the image
    # a refinement verification did not confirm accepts nothing; a repaired one is what is accepted
    unconfirmed = {("fixed", "a red circle and a blue square"): "a red circle and a blue square"}
    assert [p.image_id for p in binding_pairs(CAPTIONS, CRITIQUES, REFINED, unconfirmed, VOCAB)] == ["approved"]
    repaired = {("fixed", "a red circle and a blue square"): "a red circle and a green square"}
    assert [(p.chosen, p.rejected) for p in binding_pairs(CAPTIONS, CRITIQUES, REFINED, repaired, VOCAB)][0] == (
        "a red circle and a green square", "a red square and a green circle")


def test_binding_pairs_through_build_pairs_beside_the_refined_ones_and_reversed_by_the_control():
    both = build_pairs(CAPTIONS, CRITIQUES, REFINED, "refined,binding", vocabulary=VOCAB)
    assert [p.source for p in both] == ["refined", "binding", "binding"]
    swapped = build_pairs(CAPTIONS, CRITIQUES, REFINED, "refined,binding", swap=True, vocabulary=VOCAB)
    assert [(p.chosen, p.rejected) for p in swapped] == [(p.rejected, p.chosen) for p in both]
    with pytest.raises(ValueError, match="vocabulary"):
        build_pairs(CAPTIONS, CRITIQUES, REFINED, "binding")


def test_each_possible_exchange_is_picked_about_equally_often():
    """Per image one exchange among those that change something, at random by the image: over 300 images
    of one caption with three exchangeable pairs of objects, each is used."""
    caption = "a red circle, a blue square and a green triangle"
    captions = [CaptionSet(f"i{k}", caption) for k in range(300)]
    picked = Counter(p.rejected for p in binding_pairs(captions, [_critique(c.image_id, caption) for c in captions],
                                                       [], {}, VOCAB))
    assert len(picked) == 3 and min(picked.values()) > 70, picked
