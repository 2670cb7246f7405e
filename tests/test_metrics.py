"""Caption metrics: hand-computed values for the pure functions, tiny random CLIP models end to end.

The tiny CLIP models are real ``CLIPModel``s built from configs and saved with ``save_pretrained``,
then loaded through ``load_clip_scorer`` / ``load_pick_scorer``. Their tokenizer is the real
``CLIPTokenizer`` class (byte-level BPE with CLIP's ``</w>`` end-of-word marker, lowercasing and
``<|startoftext|>`` / ``<|endoftext|>``) over a vocabulary laid out like CLIP's own first 512
entries: the 256 byte symbols, then the same with ``</w>``. With no merges every word is spelled
out by bytes, which is all a random model needs, and nothing has to be downloaded. (GPT-2's vocab,
which refine.offline can rebuild, does not fit: CLIP's BPE marks word *ends* with ``</w>`` where
GPT-2 marks word starts with ``Ġ``.)
"""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
from PIL import Image, ImageDraw, ImageFile

from refine.metrics.clip import (
    CLIPSCORE_PREFIX,
    ClipScorer,
    clip_score,
    load_clip_scorer,
    load_pick_scorer,
    pick_score,
    ref_clip_score,
)
from refine.metrics.ptb import ptb_words
from refine.metrics.text import cider_d, corpus_bleu, distinct_n, diversity

PICK_LOGIT_SCALE = math.log(37.0)  # a scale no default config has, so the test sees it was loaded


def _save_tiny_clip(out, logit_scale: float, processor_dir=None, seed: int = 0):
    """Save a random tiny ``CLIPModel`` to ``out`` and its ``CLIPProcessor`` to ``processor_dir``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from refine.offline.tokenizer import _bytes_to_unicode

    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)} | {s + "</w>": 256 + i for i, s in enumerate(symbols)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
        ),
        projection_dim=16,
        logit_scale_init_value=logit_scale,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # A random CLIP puts every embedding of a tower near one common direction, so cos(image, text) has
    # nearly the same sign for all pairs. When that sign is negative CLIP-S clamps every pair to 0 and
    # the end-to-end checks could not see anything; flipping the text projection makes it positive.
    with torch.no_grad():
        probe_image = model.get_image_features(**image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt"))
        probe_text = model.get_text_features(**tokenizer(["a photo"], return_tensors="pt"))
        if _cos(probe_image.pooler_output, probe_text.pooler_output).item() < 0:
            model.text_projection.weight.neg_()
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(processor_dir or out)
    return out


@pytest.fixture(scope="module")
def clip_scorer(tmp_path_factory):
    return load_clip_scorer(str(_save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), logit_scale=2.0)), device="cpu")


@pytest.fixture(scope="module")
def pick_dirs(tmp_path_factory):
    """Model and processor in separate dirs, like PickScore_v1 (model) and the LAION repo (processor)."""
    model_dir, processor_dir = tmp_path_factory.mktemp("tiny-pick"), tmp_path_factory.mktemp("tiny-pick-proc")
    _save_tiny_clip(model_dir, PICK_LOGIT_SCALE, processor_dir=processor_dir, seed=1)
    return model_dir, processor_dir


@pytest.fixture(scope="module")
def pairs():
    """Four (image, caption) pairs of different caption lengths, one image not RGB."""
    images = [Image.new("RGB", (96, 64), "white") for _ in range(3)] + [Image.new("L", (40, 40), 128)]
    ImageDraw.Draw(images[0]).ellipse((10, 10, 40, 40), fill="red")
    ImageDraw.Draw(images[1]).rectangle((50, 20, 80, 50), fill="blue")
    ImageDraw.Draw(images[2]).ellipse((5, 5, 30, 30), fill="green")
    ImageDraw.Draw(images[2]).rectangle((50, 20, 80, 50), fill="black")
    captions = ["a red circle", "two blue squares on a table", "shapes", "a grey picture with nothing in it at all"]
    return images, captions


def _direct_image_embeds(embedder, images):
    """Image embeddings straight from the model, one call, no batching: the reference for the scorer."""
    pixels = embedder.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    with torch.no_grad():
        return embedder.model.get_image_features(**pixels).pooler_output


def _direct_text_embeds(embedder, texts):
    tokens = embedder.processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return embedder.model.get_text_features(**tokens).pooler_output


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


# ---------------------------------------------------------------- CLIP-S, RefCLIP-S, PickScore by hand


def test_clip_score_by_hand_clamps_each_sample():
    # pair 0: (1, 0) vs (3, 4): cos = 3/5 = 0.6 -> 2.5 * 0.6 = 1.5 (the text vector is not unit norm on purpose)
    # pair 1: (1, 0) vs (-0.8, 0.6): cos = -0.8 -> clamped to 0
    # pair 2: (0, 2) vs (0, 1): cos = 1 -> 2.5
    image_embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    text_embeds = torch.tensor([[3.0, 4.0], [-0.8, 0.6], [0.0, 1.0]])
    assert clip_score(image_embeds, text_embeds).tolist() == pytest.approx([1.5, 0.0, 2.5])
    assert clip_score(image_embeds, text_embeds, w=1.0).tolist() == pytest.approx([0.6, 0.0, 1.0])


def test_clip_score_mean_of_clamped_is_not_clamp_of_mean():
    # cos = [0.6, -0.8]. Hessel: mean(2.5 * max(cos, 0)) = mean(1.5, 0) = 0.75.
    # Clamping the mean instead: 2.5 * max(mean(cos), 0) = 2.5 * max(-0.1, 0) = 0.
    image_embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text_embeds = torch.tensor([[0.6, 0.8], [-0.8, 0.6]])
    assert clip_score(image_embeds, text_embeds).mean().item() == pytest.approx(0.75)


def test_clip_score_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="image_embeds"):
        clip_score(torch.ones(3, 4), torch.ones(2, 4))


def test_ref_clip_score_by_hand():
    # candidate 0: CLIP-S 1.5 (cos 0.6); references at cos 0.2 and 0.5 -> max 0.5
    #   H-mean = 2 * 1.5 * 0.5 / (1.5 + 0.5) = 0.75
    # candidate 1: CLIP-S 2.5 (cos 1); its only reference is at cos -0.6 -> clamped to 0 -> H-mean 0
    # candidate 2: CLIP-S 1.5, no references -> NaN
    image_embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    text_embeds = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.6, 0.8]])
    c = torch.tensor([0.6, 0.8])
    perp = torch.tensor([-0.8, 0.6])  # unit, orthogonal to c
    ref_02 = 0.2 * c + math.sqrt(1 - 0.04) * perp  # cos with c = 0.2
    ref_05 = 0.5 * c + math.sqrt(1 - 0.25) * perp  # cos with c = 0.5
    ref_neg = torch.tensor([-0.6, 0.8])  # cos with (1, 0) = -0.6
    refs = torch.stack([ref_02, ref_05, ref_neg])
    index = torch.tensor([0, 0, 1])
    out = ref_clip_score(image_embeds, text_embeds, refs, index)
    assert out[:2].tolist() == pytest.approx([0.75, 0.0], abs=1e-6)
    assert math.isnan(out[2].item())


def test_pick_score_by_hand():
    # exp(ln 50) = 50; cos 0.6 -> 30; cos -0.8 -> -40 (PickScore does not clamp)
    image_embeds = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    text_embeds = torch.tensor([[3.0, 4.0], [-0.8, 0.6]])
    assert pick_score(image_embeds, text_embeds, torch.tensor(math.log(50.0))).tolist() == pytest.approx([30.0, -40.0], rel=1e-5)


# ---------------------------------------------------------------- scorers on tiny CLIP models


def test_clip_scorer_feeds_the_prefix_and_matches_the_model(clip_scorer, pairs):
    images, captions = pairs
    embedder = clip_scorer.embedder
    image_embeds = _direct_image_embeds(embedder, images)
    cos_prefixed = _cos(image_embeds, _direct_text_embeds(embedder, ["A photo depicts " + c for c in captions]))
    cos_plain = _cos(image_embeds, _direct_text_embeds(embedder, captions))
    expected = 2.5 * cos_prefixed.clamp(min=0)
    without_prefix = 2.5 * cos_plain.clamp(min=0)
    # Precondition, so the comparison below can tell the two apart on this random model.
    assert (expected - without_prefix).abs().max() > 1e-3 and (cos_prefixed > 0).any()

    scores = clip_scorer.score(images, captions)
    assert scores.shape == (4,)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert CLIPSCORE_PREFIX == "A photo depicts "


def test_clip_scorer_is_independent_of_batching(clip_scorer, pairs):
    images, captions = pairs
    one_at_a_time = ClipScorer(dataclasses.replace(clip_scorer.embedder, batch_size=1))
    torch.testing.assert_close(one_at_a_time.score(images, captions), clip_scorer.score(images, captions), atol=1e-5, rtol=1e-5)


def test_ref_clip_scorer_matches_the_model(clip_scorer, pairs):
    images, captions = pairs
    images, captions = images[:2], captions[:2]
    references = [["a circle", "red round thing"], ["squares"]]
    embedder = clip_scorer.embedder
    prefixed = [CLIPSCORE_PREFIX + c for c in captions]
    text_embeds = _direct_text_embeds(embedder, prefixed)
    clip_s = 2.5 * _cos(_direct_image_embeds(embedder, images), text_embeds).clamp(min=0)
    expected = []
    for i, refs in enumerate(references):
        ref_embeds = _direct_text_embeds(embedder, [CLIPSCORE_PREFIX + r for r in refs])
        best = max(_cos(text_embeds[i : i + 1], ref_embeds).max().item(), 0.0)
        a = clip_s[i].item()
        expected.append(0.0 if a + best == 0 else 2 * a * best / (a + best))
    assert any(e > 0 for e in expected)  # precondition: not all zero
    assert clip_scorer.ref_score(images, captions, references).tolist() == pytest.approx(expected, abs=1e-5)


def test_a_bad_image_gives_nan_and_spares_the_rest(clip_scorer, pairs, bus_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)  # another import may have relaxed it
    data = bus_path.read_bytes()
    truncated = Image.open(io.BytesIO(data[: len(data) // 3]))  # opens lazily; decoding fails later
    images, captions = pairs
    scores = clip_scorer.score([images[0], truncated, images[1], Image.new("RGB", (0, 0))], [captions[0], "a bus", captions[1], "x"])
    assert math.isnan(scores[1].item()) and math.isnan(scores[3].item())
    torch.testing.assert_close(scores[[0, 2]], clip_scorer.score(images[:2], captions[:2]), atol=1e-5, rtol=1e-5)


def test_scorers_reject_bad_input(clip_scorer, pairs):
    images, captions = pairs
    with pytest.raises(ValueError, match="captions"):
        clip_scorer.score(images, captions[:2])
    with pytest.raises(TypeError, match=r"captions\[1\]"):
        clip_scorer.score(images[:2], ["ok", None])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        clip_scorer.score(["not an image"], ["ok"])


def test_pick_scorer_uses_saved_logit_scale_and_no_prefix(pick_dirs, pairs):
    model_dir, processor_dir = pick_dirs  # model_dir has no processor: loading works only via processor_id
    scorer = load_pick_scorer(str(model_dir), str(processor_dir), device="cpu")
    assert scorer.embedder.model.logit_scale.exp().item() == pytest.approx(37.0, rel=1e-5)
    images, captions = pairs
    image_embeds = _direct_image_embeds(scorer.embedder, images)
    expected = 37.0 * _cos(image_embeds, _direct_text_embeds(scorer.embedder, captions))
    prefixed = 37.0 * _cos(image_embeds, _direct_text_embeds(scorer.embedder, [CLIPSCORE_PREFIX + c for c in captions]))
    assert (expected - prefixed).abs().max() > 1e-3  # precondition: a prefix would be visible
    torch.testing.assert_close(scorer.score(images, captions), expected, atol=1e-4, rtol=1e-5)


def test_load_names_the_missing_model(tmp_path):
    with pytest.raises(OSError, match="could not load the CLIP-style model .*nowhere"):
        load_clip_scorer(str(tmp_path / "nowhere"), device="cpu")


# ---------------------------------------------------------------- text metrics


def test_ptb_words():
    assert ptb_words("A man's T-shirt, isn't it?  3.5 Dogs.") == ["a", "man", "'s", "t-shirt", "is", "n't", "it", "3.5", "dogs"]


# A two-image corpus: image 0's references are "a dog runs", image 1's "a cat sleeps". With N = 2 images,
# idf = log 2 - log df: "a" is in both (idf 0); every other n-gram is in one (idf log 2 = L).
CORPUS = [["a dog runs"], ["a cat sleeps"]]


def test_cider_d_identical_caption():
    # Candidate == reference: the cosine is 1 for n = 1, 2, 3 and there are no 4-grams (0),
    # no length penalty: 10 * (1 + 1 + 1 + 0) / 4 = 7.5. Case and punctuation are ignored.
    assert cider_d(["A dog runs.", "a cat sleeps"], CORPUS).tolist() == pytest.approx([7.5, 7.5])


def test_cider_d_partial_match_and_length_penalty():
    # "a cat" vs "a cat sleeps": unigram vectors (a: 0, cat: L) and (a: 0, cat: L, sleeps: L),
    # cos = L^2 / (L * sqrt(2) L) = 1/sqrt(2); bigrams (a cat) vs (a cat, cat sleeps): 1/sqrt(2); n = 3, 4: 0.
    # Length 2 vs 3: penalty exp(-1 / (2 * 6^2)) = exp(-1/72). Score = 10 * (2 / sqrt 2) / 4 * exp(-1/72).
    expected = 10 * math.sqrt(2) / 4 * math.exp(-1 / 72)  # 3.4868
    assert cider_d(["a dog runs", "a cat"], CORPUS)[1].item() == pytest.approx(expected, rel=1e-12)


def test_cider_d_clips_repeated_words():
    # "dog dog dog dog" vs "a dog runs": candidate unigram weight 4L is clipped to the reference's L:
    # cos_1 = min(4L, L) * L / (4L * sqrt(2) L) = 1 / (4 sqrt 2); no shared 2-, 3-, 4-grams.
    # Length 4 vs 3 -> exp(-1/72). Score = 10 / (16 sqrt 2) * exp(-1/72) = 0.4358 (unclipped: 4x that).
    expected = 10 / (16 * math.sqrt(2)) * math.exp(-1 / 72)
    assert cider_d(["dog dog dog dog", "a cat sleeps"], CORPUS)[0].item() == pytest.approx(expected, rel=1e-12)


def test_cider_d_no_shared_ngrams_is_zero():
    assert cider_d(["the bird flies", "a cat sleeps"], CORPUS)[0].item() == 0.0


def test_cider_d_document_frequency_counts_images_and_averages_references():
    # Image 0 has the same reference twice. df counts *images*, so "dog" still has df 1 (idf log 2),
    # and each of the two references gives 7.5, so their mean is 7.5. (Counting references would make
    # df("dog") = 2, idf 0, and the score 0.)
    assert cider_d(["a dog runs", "a cat"], [["a dog runs", "a dog runs"], ["a cat sleeps"]])[0].item() == pytest.approx(7.5)
    # Against "a dog runs" and an unrelated reference: (7.5 + 0) / 2.
    corpus = [["a dog runs", "the bird flies"], ["a cat sleeps"]]
    assert cider_d(["a dog runs", "a cat"], corpus)[0].item() == pytest.approx(3.75)
    # Scoring a subset on the full corpus' idf gives the same number.
    assert cider_d(["a dog runs"], corpus[:1], idf_references=corpus)[0].item() == pytest.approx(3.75)


def test_cider_d_rejects_what_it_cannot_score():
    with pytest.raises(ValueError, match="at least 2 images"):
        cider_d(["a dog"], [["a dog"]])
    with pytest.raises(ValueError, match=r"references\[1\]"):
        cider_d(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(ValueError, match="pair up"):
        cider_d(["a dog"], CORPUS)


def test_bleu4_by_hand():
    # Candidate "a dog runs on grass" (5 words); references "a dog runs on the grass" (6) and
    # "a brown dog is running on the grass" (8).
    #   1-grams: a, dog, runs, on, grass all in ref 1             -> 5/5
    #   2-grams: a dog, dog runs, runs on match; on grass doesn't -> 3/4
    #   3-grams: a dog runs, dog runs on match; runs on grass no  -> 2/3
    #   4-grams: a dog runs on matches; dog runs on grass no      -> 1/2
    # Closest reference length 6 > 5: BP = exp(1 - 6/5) = exp(-0.2).
    # BLEU-4 = exp(-0.2) * (1 * 3/4 * 2/3 * 1/2) ** (1/4) = exp(-0.2) / sqrt(2) = 0.578929
    refs = [["a dog runs on the grass", "A brown dog is running on the grass."]]
    assert corpus_bleu(["A dog runs on grass."], refs) == pytest.approx(math.exp(-0.2) / math.sqrt(2), rel=1e-6)


def test_bleu4_is_corpus_level():
    # Adding "two cats sleep" with reference "two cats sleep" sums counts over the corpus:
    # p1 = 8/8, p2 = (3+2)/(4+2) = 5/6, p3 = (2+1)/(3+1) = 3/4, p4 = 1/2 (the short pair has no 4-gram);
    # c = 8, r = 6 + 3 = 9 -> BP = exp(1 - 9/8). BLEU-4 = exp(-1/8) * (5/16) ** (1/4) = 0.659820
    candidates = ["a dog runs on grass", "two cats sleep"]
    refs = [["a dog runs on the grass", "a brown dog is running on the grass"], ["Two cats sleep"]]
    assert corpus_bleu(candidates, refs) == pytest.approx(math.exp(-1 / 8) * (5 / 16) ** 0.25, rel=1e-6)


def test_bleu4_breaks_length_ties_toward_the_shorter_reference():
    # Candidate of 5 words, references of 4 and 6 words (both 1 away). coco-caption takes 4, so
    # c = 5 > r = 4 and BP = 1; taking 6 would give BP = exp(1 - 6/5). Reference order must not matter.
    # n-gram matches: "a dog runs on" is in the 6-word reference; all four orders match once or more:
    # 1-grams 4/5 (grass missing), 2-grams 3/4, 3-grams 2/3, 4-grams 1/2 -> (4/5 * 1/4) ** (1/4) = 0.2 ** 0.25
    candidate = ["a dog runs on grass"]
    short, long = "the dog is here", "a dog runs on a hill"
    expected = 0.2**0.25
    assert corpus_bleu(candidate, [[long, short]]) == pytest.approx(expected, rel=1e-6)
    assert corpus_bleu(candidate, [[short, long]]) == pytest.approx(expected, rel=1e-6)


def test_distinct_n_and_diversity_by_hand():
    # words: [a dog runs] [a dog sits] [a cat] [a cat and a cat] -> 3 + 3 + 2 + 5 = 13 unigrams,
    #   6 unique {a, dog, runs, sits, cat, and}
    # bigrams: a-dog dog-runs | a-dog dog-sits | a-cat | a-cat cat-and and-a a-cat -> 9, 6 unique
    # (repeats inside one caption count too: de-duplicating per caption would give 6/11 and 6/8)
    captions = ["a dog runs", "A dog sits!", "a cat.", "a cat and a cat"]
    assert distinct_n(captions, 1) == pytest.approx(6 / 13)
    assert distinct_n(captions, 2) == pytest.approx(6 / 9)
    d = diversity(captions)
    assert (d.distinct_1, d.distinct_2, d.vocabulary_size, d.mean_length) == pytest.approx((6 / 13, 6 / 9, 6, 13 / 4))
    assert distinct_n(["one", "two"], 2) == 0.0  # no bigrams at all
    with pytest.raises(ValueError, match="empty"):
        diversity([])


def test_object_errors_split_into_substitutions_additions_and_omissions():
    from refine.images.shapes import vocabulary as shapes_vocabulary
    from refine.metrics.chair import chair
    from refine.objects import compare

    vocab = shapes_vocabulary()
    truth = {"green triangle": 1, "blue circle": 1, "red square": 1}
    diff = compare("a green triangle, a blue square and a yellow circle", truth, vocab)
    # blue square for the blue circle (same colour); the yellow circle shares no word with the red square
    assert diff.substitutions == [("blue square", "blue circle")]
    assert diff.additions == ["yellow circle"] and diff.omissions == ["red square"]
    scores = chair(["a green triangle, a blue square and a yellow circle", "a red square"],
                   [truth, {"red square": 1}], vocab)
    assert (scores["substitutions"], scores["additions"], scores["omissions"]) == (1, 1, 1)
    assert scores["subst_rate"] == 0.5 and scores["hallucinated_mentions"] == 2
