"""The Florence-2 critic on a tiny random Florence-2 of the real classes (its text is noise: we check the
structure of the critique end to end, and the object bookkeeping exactly on hand-written answers)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from critics.base import Critic, CritiqueRequest
from critics.florence2 import (
    CAPTION_TASK,
    DEFAULT_FLORENCE2,
    OD_TASK,
    Florence2Critic,
    _Job,
    florence_objects,
    load_florence2,
)
from refine.images.records import record_from_image
from refine.infra.cache import DiskCache
from refine.objects import coco_vocabulary, compare
from refine.stages.regions import ObjectSummary, Regions, View

# Florence-2's extra tokens that matter to parsing (the real tokenizer has a few more task tags).
FLORENCE_TOKENS = ["<od>", "</od>", "<ocr>", "</ocr>", "<poly>", "</poly>", "<sep>"] + [f"<loc_{i}>" for i in range(1000)]
# Florence2PostProcessor only parses task types named in its config (as in transformers' own test).
POST_PROCESSOR_CONFIG = {
    "ocr": {}, "phrase_grounding": {"banned_grounding_tokens": []}, "pure_text": {}, "description_with_bboxes": {},
    "description_with_polygons": {}, "polygons": {}, "bboxes": {}, "description_with_bboxes_or_polygons": {},
}
SIDE, STRIDE = 32, 4  # one vision stage with stride 4: (32 / 4)^2 = 64 patch tokens + 1 pooled token


def build_tiny_florence2(out_dir: Path, gpt2_tokenizer_dir: Path) -> Path:
    """Save a random Florence-2 (DaViT + BART, sizes after transformers' test) with a BART tokenizer.

    BART's tokenizer is GPT-2's byte-level BPE plus <s> <pad> </s> <unk> <mask>, so it is rebuilt from the
    GPT-2 files; Florence-2 adds <image> and the location and task tokens.
    """
    from transformers import (
        AddedToken,
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    tokenizer = BartTokenizer.from_pretrained(str(gpt2_tokenizer_dir), extra_special_tokens={"image_token": "<image>"})
    # add_tokens, not add_special_tokens: the same added tokens, but 0.4 s instead of 7 s for 1,007 of them
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in FLORENCE_TOKENS], special_tokens=True)
    image_processor = CLIPImageProcessor(size={"height": SIDE, "width": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                                         do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor.image_seq_length = (SIDE // STRIDE) ** 2 + 1
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   post_processor_config=POST_PROCESSOR_CONFIG)
    config = Florence2Config(
        text_config=dict(
            model_type="bart", vocab_size=len(tokenizer), max_position_embeddings=128, d_model=16,
            encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
            decoder_attention_heads=2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            depths=[1], patch_size=[7], patch_stride=[STRIDE], patch_padding=[3], patch_prenorm=[False],
            embed_dim=[16], num_heads=[1], num_groups=[1], window_size=4, drop_path_rate=0.0, projection_dim=16,
        ),
        image_token_id=tokenizer.image_token_id,
    )
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny_florence2_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    return build_tiny_florence2(tmp_path_factory.mktemp("tiny-florence2"), gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def florence(tiny_florence2_dir):
    return load_florence2(str(tiny_florence2_dir), device="cpu")


def make_request(image_id, image, caption, regions=None, sha=None):
    sha = sha or record_from_image(image_id, image).sha256
    return CritiqueRequest(image_id=image_id, image=image, image_sha256=sha, caption=caption, regions=regions)


def truncated_png() -> Image.Image:
    """An image whose header reads but whose pixels do not: it fails on load, as a bad file would."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()[:60]))


def test_load_florence2(florence, tiny_florence2_dir):
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    assert DEFAULT_FLORENCE2 == "florence-community/Florence-2-base"
    model, processor = florence
    assert isinstance(model, Florence2ForConditionalGeneration) and not model.training
    assert isinstance(processor, Florence2Processor)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert processor.num_image_tokens == 65
    assert Florence2Critic(*florence).model_id == str(tiny_florence2_dir)  # named after where it came from
    with pytest.raises(ValueError, match="dtype='fp8'"):
        load_florence2(str(tiny_florence2_dir), device="cpu", dtype="fp8")


def test_od_answers_parse_into_objects(florence):
    # What a real Florence-2 writes for <OD>, parsed by the processor we saved (our location tokens).
    text = "</s><s>dog<loc_100><loc_200><loc_500><loc_600>dog<loc_0><loc_0><loc_99><loc_99>man<loc_1><loc_2><loc_3><loc_4>" \
           "wheel<loc_5><loc_6><loc_7><loc_8></s>"
    od = florence.processor.post_process_generation(text, task=OD_TASK, image_size=(1000, 1000))[OD_TASK]
    assert od["labels"] == ["dog", "dog", "man", "wheel"]
    assert od["bboxes"][0] == [100, 200, 500, 600]
    caption = "The image shows two people and a cat on a sofa. The cat is asleep."
    objects = florence_objects(od, [caption], coco_vocabulary(), region_captions=["a red frisbee", "a dog"])
    # boxes: dog 2, person 1 ("wheel" is no COCO object); caption: person 2 (the larger count wins), cat 1
    # ("The cat" refers back), couch 1; regions: frisbee, present with no count; dog already known
    assert objects == {"dog": 2, "person": 2, "cat": 1, "couch": 1, "frisbee": None}
    assert florence_objects(None, ["some people"], coco_vocabulary()) == {"person": None}


def test_critic_end_to_end_with_cache(florence, tmp_path):
    scene = Image.new("RGB", (64, 48), "white")
    other = Image.new("RGB", (40, 40), "blue")
    regions = Regions("scene", 64, 48, objects=[ObjectSummary("dog", 1, 0.9, [(4, 4, 30, 30)])], views=[
        View("tile", (0, 0, 32, 48), scene.crop((0, 0, 32, 48))),
        View("crop", (4, 4, 30, 30), scene.crop((4, 4, 30, 30)), label="dog"),
    ])
    requests = [
        make_request("scene", scene, "a dog and two cats", regions=regions),
        make_request("other", other, "a red circle"),
        make_request("broken", truncated_png(), "a dog", sha="1" * 64),
        make_request("missing", None, "a dog", sha="2" * 64),
    ]
    cache_dir = tmp_path / "cache"
    critic = Florence2Critic(*florence, cache=DiskCache(cache_dir, namespace="florence2"), max_new_tokens=6,
                             num_beams=1, max_regions=2, batch_size=2)
    assert isinstance(critic, Critic) and critic.id == f"florence2:{florence.model.name_or_path}"
    out = critic.critique_many(requests)
    assert len(out) == 4
    assert out[0].ok and out[1].ok
    assert not out[2].ok and "'broken'" in out[2].error
    assert not out[3].ok and "'missing'" in out[3].error and "not a PIL image" in out[3].error
    vocab = coco_vocabulary()
    for request, c, n_regions in [(requests[0], out[0], 2), (requests[1], out[1], 0)]:
        seen = c.meta["florence"]
        assert c.meta["critic"] == critic.id and c.meta["truth_source"] == "florence2"
        assert isinstance(seen["caption"], str) and isinstance(seen["od_labels"], list)
        assert len(seen["regions"]) == n_regions
        assert c.meta["generate_calls"] == 2 + n_regions and c.usage == {}  # local: no paid requests
        assert seen["objects"] == florence_objects({"labels": seen["od_labels"]}, [seen["caption"]], vocab,
                                                   seen["regions"])
        diff = compare(request.caption, seen["objects"], vocab)  # the critique is the comparison with them
        assert (c.hallucinated, c.missing, c.count_errors) == (diff.hallucinated, diff.missing, diff.count_errors)
        assert 0.0 <= c.score <= 1.0 and c.feedback
        assert c.revision is None or isinstance(c.revision, str)
        assert json.loads(c.raw)["florence"]["caption"] == seen["caption"]
        assert c.meta["cache_hits"] == 0 and c.meta["cache_hit"] is False
    assert critic.cache.stats() == {"hits": 0, "misses": 6}  # 2 tasks x 2 images + 2 regions

    # A new critic on the same cache: every Florence-2 answer is a hit, and the critiques are the same.
    again = Florence2Critic(*florence, cache=DiskCache(cache_dir, namespace="florence2"), max_new_tokens=6,
                            num_beams=1, max_regions=2, batch_size=2).critique_many(requests[:2])
    assert [c.meta.pop("cache_hits") for c in again] == [4, 2]
    assert [c.meta.pop("cache_hit") for c in again] == [True, True]
    assert [c.to_json() for c in again] == [{**c.to_json(), "meta": {k: v for k, v in c.meta.items()
                                                                      if k not in ("cache_hits", "cache_hit")}}
                                            for c in out[:2]]
    # Other generation settings are other keys; two captions of one image share its Florence-2 answers.
    fresh = Florence2Critic(*florence, cache=DiskCache(cache_dir, namespace="florence2"), max_new_tokens=7,
                            num_beams=1, max_regions=0)
    two = fresh.critique_many([requests[1], make_request("other", other, "two red circles")])
    assert fresh.cache.stats() == {"hits": 0, "misses": 2}
    assert two[0].meta["florence"] == two[1].meta["florence"]
    assert two[0].meta["generate_calls"] == two[1].meta["generate_calls"] == 2


def test_one_failing_generation_is_isolated(florence, tmp_path):
    critic = Florence2Critic(*florence, cache=DiskCache(tmp_path, namespace="florence2"), max_new_tokens=4, num_beams=1)
    good = _Job(0, CAPTION_TASK, CAPTION_TASK, Image.new("RGB", (20, 20), "red"), key="good")
    bad = _Job(1, CAPTION_TASK, CAPTION_TASK, "not an image", key="bad")  # fails inside the processor
    answers, hits = critic._run([good, bad])
    assert isinstance(answers[0], str) and isinstance(answers[1], Exception)
    assert hits == [False, False]
    assert critic.cache.store.get("good") == answers[0] and critic.cache.store.get("bad") is None  # failures not cached
