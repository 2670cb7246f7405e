"""The grounded critic: objects from annotations or detections, scores checked by hand."""

from __future__ import annotations

import pytest
from PIL import Image

from critics.base import Critic, Critique, CritiqueRequest
from critics.grounded import COUNT_PENALTY, GroundedCritic, agreement_score, feedback_text
from refine.objects import coco_vocabulary, compare, vocabulary_for
from refine.stages.regions import ObjectSummary, Regions

IMAGE = Image.new("RGB", (8, 8), "white")
TRUTH = {"person": 1, "dog": 1, "cat": 2}


def request(caption, objects=None, regions=None, image_id="img"):
    return CritiqueRequest(image_id=image_id, image=IMAGE, image_sha256="0" * 64, caption=caption,
                           regions=regions, objects=objects)


def score(caption, truth=TRUTH):
    return GroundedCritic().critique_many([request(caption, objects=truth)])[0].score


def test_is_a_critic():
    assert isinstance(GroundedCritic(), Critic)
    assert GroundedCritic().id == "grounded"


def test_perfect_caption_scores_one_and_keeps_the_caption():
    [c] = GroundedCritic().critique_many([request("a man, a dog and two cats", objects=TRUTH)])
    assert c.ok and c.score == 1.0
    assert (c.hallucinated, c.missing, c.count_errors) == ([], [], {})
    assert c.revision == "a man, a dog and two cats"
    assert "Keep" in c.feedback
    assert c.meta == {"critic": "grounded", "truth_source": "annotations"}
    assert Critique.from_json(c.to_json()) == c


def test_each_kind_of_error_lowers_the_score():
    # Dice over types with count credit: 2 * sum(credit) / (|said| + |true|); |true| = 3.
    perfect = score("a man, a dog and two cats")
    hallucinated = score("a man, a dog, two cats and a horse")  # 2 * 3 / (4 + 3)
    missing = score("a dog and two cats")  # 2 * 2 / (2 + 3)
    miscounted = score("a man, a dog and three cats")  # cat credit 1 - 0.5 * 1/2 = 0.75: 2 * 2.75 / 6
    way_off = score("a man, a dog and six cats")  # cat credit 1 - 0.5 * min(1, 4/2) = 0.5: 2 * 2.5 / 6
    all_three = score("a dog, six cats and a horse")  # credits 1 + 0.5, said 3: 2 * 1.5 / (3 + 3)
    assert COUNT_PENALTY == 0.5
    assert perfect == 1.0
    assert hallucinated == pytest.approx(6 / 7)
    assert missing == pytest.approx(4 / 5)
    assert miscounted == pytest.approx(5.5 / 6)
    assert way_off == pytest.approx(5 / 6)
    assert all_three == pytest.approx(3 / 6)
    assert perfect > miscounted > way_off and perfect > hallucinated and perfect > missing
    assert all_three < min(hallucinated, missing, way_off)
    assert score("a horse") == 0.0
    assert score("a sunny beach", truth={}) == 1.0  # nothing there and nothing said


def test_agreement_score_from_a_diff():
    diff = compare("a dog and two cats", {"cat": 1, "person": 1}, coco_vocabulary())
    # said {dog, cat}, true {cat, person}; cat credit 1 - 0.5 * min(1, 1/1) = 0.5 -> 2 * 0.5 / 4
    assert agreement_score(diff) == pytest.approx(0.25)


def test_feedback_is_instructions():
    diff = compare("a dog and two cats", {"cat": 1, "person": 1}, coco_vocabulary())
    assert feedback_text(diff).splitlines() == [
        "Remove dogs: there are none in the image.",
        "Mention a person: the image shows it but the caption leaves it out.",
        "Fix the number of cats: the caption says two, the image shows one.",
    ]


def test_brief_example_end_to_end():
    [c] = GroundedCritic().critique_many([request("a dog and two cats", objects={"cat": 1, "person": 1})])
    assert c.hallucinated == ["dog"] and c.missing == ["person"] and c.count_errors == {"cat": (2, 1)}
    assert c.revision == "a cat and a person"


def test_truth_sources_and_failures():
    regions = Regions("img", 8, 8, objects=[ObjectSummary("dog", 2, 0.9, [(0, 0, 4, 4), (4, 4, 8, 8)])])
    critic = GroundedCritic()
    out = critic.critique_many([
        request("two dogs", regions=regions),  # detector only
        request("two dogs", objects={"dog": 1}, regions=regions),  # annotations win over the detector
        request("two dogs", image_id="bare"),  # neither
        request(None, objects={"dog": 1}),  # not a caption
        request("a dog", objects={"dog": -2}),  # bad annotations
    ])
    assert len(out) == 5
    assert out[0].ok and out[0].score == 1.0 and out[0].meta["truth_source"] == "detector"
    assert out[1].ok and out[1].count_errors == {"dog": (2, 1)} and out[1].meta["truth_source"] == "annotations"
    assert out[1].revision == "a dog"
    assert not out[2].ok and "'bare'" in out[2].error and "neither" in out[2].error
    assert out[2].score != out[2].score  # NaN, as Critique.failure records it
    assert not out[3].ok and "not a string" in out[3].error
    assert not out[4].ok and "truth['dog']" in out[4].error


def test_vocabulary_default_grows_with_the_truth_and_can_be_given():
    # COCO does not know "red circle"; the truth's labels are added for the request
    [c] = GroundedCritic().critique_many([request("two red circles and a dog", objects={"red circle": 1})])
    assert c.hallucinated == ["dog"] and c.count_errors == {"red circle": (2, 1)}
    assert c.revision == "a red circle"
    shapes = vocabulary_for(["red circle", "blue square"])
    [c] = GroundedCritic(vocabulary=shapes).critique_many([request("a blue square and a dog",
                                                                   objects={"red circle": 1})])
    assert c.hallucinated == ["blue square"]  # "dog" is not in this vocabulary, so it is left as it is
    assert c.revision == "a red circle and a dog"


def test_nothing_left_to_say_gives_no_revision():
    [c] = GroundedCritic().critique_many([request("a dog", objects={})])
    assert c.ok and c.hallucinated == ["dog"] and c.revision is None and c.score == 0.0


def test_make_critic_knows_the_label_space_of_the_image_set():
    """One image's truth does not name what is absent from it: the set's labels must be known."""
    from PIL import Image

    from critics import make_critic
    from critics.base import CritiqueRequest
    from refine.config import CriticConfig
    from refine.images import object_vocabulary

    request = CritiqueRequest("x", Image.new("RGB", (8, 8)), "0", "a red circle and a blue square", None,
                              {"red circle": 1})
    blind = make_critic(CriticConfig()).critique_many([request])[0]
    assert blind.hallucinated == []  # "blue square" is not a COCO word and not in this image's truth
    critic = make_critic(CriticConfig(), vocabulary=object_vocabulary(None, ["red circle", "blue square"]))
    [critique] = critic.critique_many([request])
    assert critique.hallucinated == ["blue square"] and critique.revision == "a red circle"
