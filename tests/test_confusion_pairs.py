"""Confusion pairs (``loop.pair_sources=...,confusion``): an accepted caption ≻ the same caption with one
object named as what the student was seen to mistake it for."""

from __future__ import annotations

from collections import Counter

import pytest

from critics.base import Critique
from refine.images import shapes
from refine.objects import coco_vocabulary, substitute
from refine.stages.critique import CritiqueRow
from refine.stages.pairs import build_pairs, confusion_pairs, confusions
from refine.stages.step import Refinement
from refine.stages.student import CaptionSet

VOCAB = shapes.vocabulary()


@pytest.mark.parametrize("caption, label, other, expected", [
    ("a red circle and two blue squares", "blue square", "blue circle", "a red circle and two blue circles"),
    ("A red circle, two blue squares and a green triangle.", "red circle", "red triangle",
     "A red triangle, two blue squares and a green triangle."),
    ("a red circle and a red triangle", "red circle", "red triangle", None),  # already named
    ("a red circle and a red circle", "red circle", "red square", None),  # named twice
    ("a green square", "blue circle", "blue square", None),  # not named
])
def test_substitute_names_one_object_as_another_in_its_place(caption, label, other, expected):
    assert substitute(caption, label, other, VOCAB) == expected


def test_substitute_in_free_form_captions():
    coco = coco_vocabulary()
    assert substitute("A dog sitting on a couch.", "dog", "elephant", coco) == "An elephant sitting on a couch."
    assert substitute("Two dogs and a cat.", "dog", "horse", coco) == "Two horses and a cat."
    assert substitute("Two dogs and the cat.", "cat", "horse", coco) is None  # no number to keep
    assert substitute("Some dogs on the grass.", "dog", "cat", coco) is None


def _row(image_id, caption, hallucinated=(), missing=(), score=None, error=None):
    full = not (hallucinated or missing)
    return CritiqueRow(image_id, caption, Critique(1.0 if full and score is None else (score or 0.5), "",
                                                   list(hallucinated), list(missing), error=error))


def test_confusions_pair_a_hallucinated_object_with_a_missing_one_it_resembles():
    rows = [_row("a", "a blue square", ["blue square"], ["blue circle"]),
            _row("b", "a blue square and a red square", ["blue square", "red square"], ["blue circle", "green triangle"]),
            _row("c", "a yellow circle", ["yellow circle"], ["green triangle"]),  # nothing in common: an addition
            _row("d", "a blue square", ["blue square"], ["blue circle"], error="timeout")]  # failed: not counted
    assert confusions(rows, VOCAB) == {("blue square", "blue circle"): 2}


def test_confusion_pairs_swap_a_seen_confusion_into_each_accepted_caption():
    captions = [CaptionSet("fixed", "a red circle and a blue square"),  # refined: the rewrite is accepted
                CaptionSet("approved", "a blue circle and a green triangle"),  # approved as it is
                CaptionSet("wrong", "a red square"),  # the critic disapproves and the step changed nothing
                CaptionSet("plain", "a yellow triangle")]  # accepted, but no confusion of yellow triangles seen
    critiques = [_row("fixed", "a red circle and a blue square", ["blue square"], ["blue circle"]),
                 _row("approved", "a blue circle and a green triangle"),
                 _row("wrong", "a red square", ["red square"], ["red circle"]),
                 _row("plain", "a yellow triangle")]
    refined = [Refinement("fixed", "a red circle and a blue square", "a red circle and a blue circle", votes=2, of=3),
               Refinement("approved", "a blue circle and a green triangle", "a blue circle and a green triangle"),
               Refinement("wrong", "a red square", "a red square", rejected="chatter")]
    pairs = confusion_pairs(captions, critiques, refined, None, VOCAB)
    # seen: a blue square for a blue circle, a red square for a red circle; "fixed" names both circles
    assert [(p.image_id, p.chosen, p.source) for p in pairs] == [
        ("fixed", "a red circle and a blue circle", "confusion"), ("approved", "a blue circle and a green triangle", "confusion")]
    assert pairs[0].rejected in ("a red square and a blue circle", "a red circle and a blue square")
    assert pairs[1].rejected == "a blue square and a green triangle"
    assert [p.weight for p in pairs] == [pytest.approx(2 / 3), 1.0]
    assert confusion_pairs(captions, critiques, refined, None, VOCAB) == pairs  # seeded by the image
    # a refinement verification did not confirm accepts nothing
    judged = {("fixed", "a red circle and a blue square"): "a red circle and a blue square"}
    assert [p.image_id for p in confusion_pairs(captions, critiques, refined, judged, VOCAB)] == ["approved"]
    # through build_pairs: beside the refined pair, and reversed by the control
    both = build_pairs(captions, critiques, refined, "refined,confusion", vocabulary=VOCAB)
    assert [p.source for p in both] == ["refined", "confusion", "confusion"]
    swapped = build_pairs(captions, critiques, refined, "refined,confusion", swap=True, vocabulary=VOCAB)
    assert [(p.chosen, p.rejected) for p in swapped] == [(p.rejected, p.chosen) for p in both]
    with pytest.raises(ValueError, match="vocabulary"):
        build_pairs(captions, critiques, refined, "confusion")


def test_confusion_pairs_push_each_label_down_about_as_often_as_up():
    """One confusion seen (a blue square said for a blue circle), on 400 approved captions of one blue
    circle or one blue square: both directions are used, so neither label is only ever rejected (which
    taught a student to call every blue square a circle)."""
    captions = [CaptionSet(f"i{k}", "a blue circle" if k % 2 else "a blue square") for k in range(400)]
    critiques = [_row(c.image_id, c.caption) for c in captions]
    critiques += [_row("seen", "a blue square", ["blue square"], ["blue circle"])]
    pairs = confusion_pairs(captions, critiques, [], None, VOCAB)
    rejected = Counter(p.rejected for p in pairs)
    assert len(pairs) == 400 and rejected.keys() == {"a blue circle", "a blue square"}
    assert rejected["a blue circle"] == rejected["a blue square"] == 200
