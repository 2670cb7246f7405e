"""The textual step: the critic's own revision, or one textgrad TGD step through our engine adapter
against refine.offline.devserver (real openai client, real textgrad, real HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from critics.base import Critique, CritiqueRequest
from critics.openai_vlm import OpenAIVLMCritic
from refine.images.records import record_from_image
from refine.infra.cache import DiskCache
from refine.infra.llm import ChatEngine
from refine.offline.devserver import FakeOpenAIServer, Fault, request_text
from refine.stages import replies, step

FIXED = "two people stand next to a red bus"


def variable_of(body) -> str:
    """The caption TGD shows the optimizer: ``<VARIABLE> ... </VARIABLE>``."""
    return request_text(body).split("<VARIABLE> ", 1)[1].split(" </VARIABLE>", 1)[0]


def tagged(text: str) -> str:
    return f"<IMPROVED_VARIABLE>{text}</IMPROVED_VARIABLE>"


@pytest.fixture
def make_engine(tmp_path):
    def make(server: FakeOpenAIServer, **kwargs) -> ChatEngine:
        kwargs.setdefault("cache", DiskCache(tmp_path / "cache", namespace="llm"))
        return ChatEngine(model="fake-llm", base_url=server.base_url, **kwargs)

    return make


def feedback_only(feedback="There is no dog; two people stand by a red bus.", **kwargs) -> Critique:
    return Critique(score=0.2, feedback=feedback, **kwargs)


# --- pure helpers ---


def test_the_caption_is_recovered_from_a_reply_without_tags():
    assert replies.caption_from_reply(f"Sure. {tagged(' a bus ')} Done.", 20)[:2] == ("a bus", True)
    assert replies.caption_from_reply('Improved caption: "A red bus on a street."', 20)[:2] == ("A red bus on a street.", False)
    assert replies.caption_from_reply("<IMPROVED_VARIABLE> a bus parked\nwith notes", 20)[:2] == ("a bus parked", False)
    assert replies.caption_from_reply("a bus by the curb</IMPROVED_VARIABLE>", 20)[:2] == ("a bus by the curb", False)
    assert replies.caption_from_reply("```\ncaption: two  dogs\n```", 20)[:2] == ("two dogs", False)
    assert replies.caption_from_reply("   ", 20)[:2] == ("", False)


def test_gradient_text_carries_the_structured_findings():
    critique = feedback_only("Wrong animal.", hallucinated=["dog"], missing=["bus"], count_errors={"person": (1, 2)})
    assert step.gradient_text(critique) == (
        "Wrong animal. Named but not in the image: dog. In the image but not named: bus. "
        "Wrong counts: person: said 1, actually 2."
    )


# --- no model needed ---


def test_the_critics_revision_is_the_step():
    critique = feedback_only(revision="  Two people by a bus. ")
    assert step.TextualStep().apply("a dog", critique).caption == "Two people by a bus."
    result = step.TextualStep().apply("a dog", critique)
    assert (result.source, result.usage["requests"], result.changed) == ("revision", 0, True)


def test_nothing_to_apply_leaves_the_caption():
    failed = step.TextualStep().apply("a dog", Critique.failure("timeout"))
    assert (failed.caption, failed.source) == ("a dog", "unchanged") and "timeout" in failed.meta["reason"]
    empty = step.TextualStep().apply("a dog", Critique(score=1.0, feedback=""))
    assert (empty.caption, empty.source) == ("a dog", "unchanged")


def test_a_caption_the_critic_approves_is_not_rewritten(make_engine):
    """A rewrite of a caption with nothing wrong ("a red circle, a red circle" -> "two red circles") would
    become a pair that teaches wording, not grounding: it is kept, unless ``revise_approved``."""
    approve = Critique(score=1.0, feedback="Keep them.", revision="two red circles")
    kept = step.TextualStep().apply("a red circle, a red circle", approve)
    assert (kept.caption, kept.changed, kept.meta["reason"]) == ("a red circle, a red circle", False,
                                                               "the critic approves the caption")
    assert step.TextualStep(revise_approved=True).apply("a red circle, a red circle", approve).caption == "two red circles"
    # anything named wrong, or a score below full, is not approval
    for critique in (Critique(score=1.0, feedback="", missing=["bus"], revision="x y"),
                     Critique(score=0.8, feedback="The dog is sitting.", revision="a dog sitting")):
        assert not critique.approves and step.TextualStep().apply("a dog", critique).changed
    # feedback on an approved caption does not need (or call) the step's model
    with FakeOpenAIServer(reply=lambda body: tagged("never")) as server:
        results = step.TextualStep(make_engine(server)).apply_many(["a dog"], [Critique(score=1.0, feedback="Fine.")])
        assert (results[0].caption, results[0].usage["requests"], len(server.requests)) == ("a dog", 0, 0)


def test_feedback_without_an_engine_is_a_clear_error():
    with pytest.raises(ValueError, match="engine=ChatEngine"):
        step.TextualStep().apply("a dog", feedback_only())
    with pytest.raises(ValueError, match="engine=ChatEngine"):
        step.TextualStep().apply_many(["a dog", "a cat"], [feedback_only(revision="x"), feedback_only()])


# --- textgrad against the local server ---


def test_textgrad_step_sends_feedback_and_constraints_and_returns_the_caption(make_engine):
    with FakeOpenAIServer(reply=lambda body: "Here it is:\n" + tagged(FIXED)) as server:
        result = step.TextualStep(make_engine(server), max_words=12).apply("a dog on a street", feedback_only(missing=["bus"]))
    assert (result.caption, result.source, result.tags_missing, result.error) == (FIXED, "textgrad", False, None)
    assert server.request_count == 1 and result.usage["requests"] == 1
    assert result.usage["completion_tokens"] == server.responses[0]["usage"]["completion_tokens"]
    body = server.requests[0]
    assert body["model"] == "fake-llm" and "response_format" not in body
    system, user = body["messages"]
    assert system["role"] == "system" and "<IMPROVED_VARIABLE>" in system["content"]
    assert variable_of(body) == "a dog on a street"
    text = user["content"]
    assert "<FEEDBACK>There is no dog; two people stand by a red bus. In the image but not named: bus.</FEEDBACK>" in text
    assert "Constraint 1: The caption must be a single sentence of at most 12 words." in text
    assert result.meta["constraints"] == step.default_constraints(12) and result.meta["cache_hit"] is False


def test_missing_tags_are_recovered_and_recorded(make_engine):
    with FakeOpenAIServer(reply=lambda body: f'Improved caption: "{FIXED}."') as server:
        result = step.TextualStep(make_engine(server)).apply("a dog", feedback_only())
    assert (result.caption, result.tags_missing, result.error) == (FIXED + ".", True, None)
    with FakeOpenAIServer(reply=lambda body: "   ") as server:
        nothing = step.TextualStep(make_engine(server)).apply("a cat", feedback_only())
    assert (nothing.caption, nothing.tags_missing, nothing.rejected) == ("a cat", True, "empty")
    assert "no caption" in nothing.meta["reason"] and nothing.error is None


# Replies that once became chosen captions (issue 10): each must be rejected, with its reason.
NOT_CAPTIONS = {
    "I'm sorry, but I can't help with that.": "refusal",
    "Sure! Here is the improved caption:\n\nTwo people stand next to a red bus.": "meta",
    "A better caption would mention the bus and both people.": "meta",
    "Here is the revised caption: two people by a bus.": "meta",
    "Two people stand by a bus. The sky is blue.": "sentences",
    tagged("Two people stand by a bus.\nThey are waiting."): "sentences",
    tagged("Sure, here you go:"): "meta",
    " ".join(["word"] * 23) + ".": "too_long",
    ("A bus " * 200_000).strip() + ".": "too_long",  # ~1 MB of text
}


@pytest.mark.parametrize("reply, reason", NOT_CAPTIONS.items(), ids=lambda v: v[:30] if isinstance(v, str) else v)
def test_a_reply_that_is_not_a_caption_is_no_refinement_and_is_not_cached(make_engine, reply, reason):
    with FakeOpenAIServer(reply=lambda body: reply) as server:
        first = step.TextualStep(make_engine(server), max_words=20).apply("a dog", feedback_only())
        again = step.TextualStep(make_engine(server), max_words=20).apply("a dog", feedback_only())
    assert (first.caption, first.changed, first.rejected, first.error) == ("a dog", False, reason, None)
    assert first.meta["reason"] and again.rejected == reason
    assert server.request_count == 2, "a rejected reply must not be served from the cache"


def test_the_word_limit_has_a_tolerance_of_ten_percent():
    assert replies.word_limit(20) == 22 and replies.word_limit(10) == 11
    assert replies.rejection(" ".join(["w"] * 22), 20) is None
    assert replies.rejection(" ".join(["w"] * 23), 20)[0] == "too_long"
    for caption in ("A man holds a cup of coffee.", "two dogs, a cat and a bird on a sofa", "A St. Bernard dog",
                    "Great Dane lying on a couch", "I-95 highway full of cars at dusk", "OK Corral sign in the desert",
                    "A sign that says sorry we are closed", "A man holding a sign with a caption"):
        assert replies.rejection(caption, 20) is None, caption


def test_a_critic_revision_that_is_not_a_caption_is_rejected():
    for revision, reason in [(" ".join(["word"] * 5000), "too_long"), (" ".join(["word"] * 23), "too_long"),
                             ("I cannot help with identifying people.", "refusal")]:
        result = step.TextualStep(max_words=20).apply("a dog", feedback_only(revision=revision))
        assert (result.caption, result.source, result.rejected) == ("a dog", "revision", reason)
    assert step.TextualStep(max_words=20).apply("a dog", feedback_only(revision=" ".join(["w"] * 22))).rejected is None


def test_a_failed_call_keeps_the_caption_and_the_batch_survives(make_engine):
    def reply(body):
        caption = variable_of(body)
        return Fault.server_error(retry_after_ms=10) if caption == "broken" else tagged(caption.upper())

    with FakeOpenAIServer(reply=reply) as server:
        results = step.TextualStep(make_engine(server, max_retries=1)).apply_many(["a dog", "broken", "a cat"], [feedback_only()] * 3)
    assert [r.caption for r in results] == ["A DOG", "broken", "A CAT"]
    assert results[1].error and "500" in results[1].error and results[1].usage["requests"] == 2
    assert server.request_count == 4


def test_a_repeated_step_is_served_from_our_cache(make_engine):
    with FakeOpenAIServer(reply=lambda body: tagged(FIXED)) as server:
        engine = make_engine(server)
        first = step.TextualStep(engine).apply("a dog", feedback_only())
        again = step.TextualStep(make_engine(server)).apply("a dog", feedback_only())  # a new engine, same store
        other = step.TextualStep(engine).apply("a dog", feedback_only("Say bus."))  # another gradient: another key
    assert first.caption == again.caption == other.caption == FIXED
    assert server.request_count == 2
    assert again.meta["cache_hit"] is True and again.usage["requests"] == 0
    assert again.meta["prompt_sha256"] == first.meta["prompt_sha256"] != other.meta["prompt_sha256"]


def test_apply_many_is_concurrent(make_engine):
    latency = 0.3
    with FakeOpenAIServer(reply=lambda body: tagged(variable_of(body) + " fixed"), latency=latency) as server:
        engine = make_engine(server)
        step.TextualStep(engine).apply("warm-up", feedback_only())
        captions = [f"a dog number {i}" for i in range(8)]
        start = time.perf_counter()
        results = step.TextualStep(engine, max_concurrency=8).apply_many(captions, [feedback_only()] * 8)
        elapsed = time.perf_counter() - start
    assert [r.caption for r in results] == [c + " fixed" for c in captions]
    assert elapsed < 3 * latency, f"8 steps took {elapsed:.2f} s at {latency} s latency"
    print(f"8 concurrent textgrad steps at {latency} s latency: {elapsed:.3f} s")


def test_critique_plus_step_is_at_most_two_requests_per_image(tmp_path, make_engine, drawn_images):
    """A critic that gives feedback without a revision, then the textgrad step: 2 requests per image."""

    def reply(body):
        text = request_text(body)
        if "Caption under review" in text:
            return json.dumps({"score": 0.3, "feedback": "Name the shape's colour.", "hallucinated": [], "missing": [],
                               "count_errors": {}, "revision": None})
        return tagged("a " + variable_of(body) + " in colour")

    images = {k: v for k, v in drawn_images.items() if k != "gray"}
    requests = []
    for name, image in images.items():
        record = record_from_image(name, image)
        requests.append(CritiqueRequest(name, record.image, record.sha256, f"{name} shape"))
    with FakeOpenAIServer(reply=reply) as server:
        critic = OpenAIVLMCritic(model="fake-vlm", base_url=server.base_url, cache=DiskCache(tmp_path / "c"))
        critiques = critic.critique_many(requests)
        results = step.TextualStep(make_engine(server)).apply_many([r.caption for r in requests], critiques)
    assert [r.caption for r in results] == [f"a {name} shape in colour" for name in images]
    assert server.request_count == 2 * len(images)


def test_textgrad_is_imported_lazily_and_writes_no_logs_in_the_cwd(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TEXTGRAD_LOG_DIR", "LITELLM_LOCAL_MODEL_COST_MAP")}
    env["REFINE_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    code = (
        "import sys, os\n"
        "import refine.stages.step, refine.infra.llm, critics.openai_vlm\n"
        "assert 'textgrad' not in sys.modules and 'openai' not in sys.modules, 'imported at module import'\n"
        "engine = refine.infra.llm.ChatEngine(base_url='http://127.0.0.1:9/v1')\n"
        "assert 'openai' not in sys.modules, 'client made at construction'\n"
        "refine.stages.step.import_textgrad()\n"
        "print(os.environ['LITELLM_LOCAL_MODEL_COST_MAP'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    assert not (tmp_path / "logs").exists()
    assert list((tmp_path / "cache" / "textgrad-logs").glob("*.jsonl"))


def test_engine_adapter_is_a_textgrad_engine(make_engine):
    tg = step.import_textgrad()
    with FakeOpenAIServer(reply=lambda body: "pong") as server:
        adapter = step.load_textgrad_engine(make_engine(server))
        assert isinstance(adapter, tg.EngineLM)
        assert adapter("ping", system_prompt="be brief") == adapter.generate("ping", system_prompt="be brief") == "pong"
    assert server.request_count == 1  # the second call hit our cache
    assert server.requests[0]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ping"}]
    with pytest.raises(TypeError, match="text prompts only"):
        adapter.generate(["ping", b"\x89PNG"])



def test_a_revision_that_is_no_caption_falls_back_to_the_feedback(make_engine):
    """A critic whose revision is a refusal still gave usable feedback: with a model, the step applies it."""
    with FakeOpenAIServer(reply=lambda body: tagged(FIXED)) as server:
        result = step.TextualStep(make_engine(server)).apply(
            "a dog", feedback_only(revision="I'm sorry, but I can't help with that."))
    assert (result.caption, result.source, result.rejected) == (FIXED, "textgrad", None)
    assert result.meta["revision_rejected"] == "refusal" and server.request_count == 1
