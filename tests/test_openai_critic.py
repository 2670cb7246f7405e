"""OpenAIVLMCritic through the real openai client against refine.offline.devserver on 127.0.0.1.

What the server received (data URLs, prompt text, response_format), how replies are parsed, faults
(429 with Retry-After, 500s until retries run out, malformed replies, a hang past the timeout), the
response_format fallback, real concurrency, and the pairwise judge. Cache behaviour: tests/test_cache.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import pytest
from PIL import Image

from critics.base import Critic, CritiqueRequest
from critics.openai_vlm import (
    CRITIQUE_SCHEMA,
    JudgeError,
    OpenAIVLMCritic,
    OutputParseError,
    parse_critique,
    parse_judgement,
)
from refine.images.records import record_from_image
from refine.infra.cache import DiskCache
from refine.infra.prompts import load_template
from refine.offline.devserver import FakeOpenAIServer, Fault, request_images, request_text
from refine.stages.regions import ObjectSummary, Regions, View

GOOD = {
    "score": 0.25,
    "feedback": "There is no dog; two people stand by a bus.",
    "hallucinated": ["dog"],
    "missing": ["person", "bus"],
    "count_errors": {"person": [1, 2]},
    "revision": "Two people stand next to a bus.",
}


def caption_of(body) -> str:
    """The caption line the critique template quotes, so replies can depend on it."""
    text = request_text(body)
    return text.split("Caption under review:\n", 1)[1].split("\n", 1)[0].strip('"')


@pytest.fixture
def make_critic(tmp_path):
    def make(server: FakeOpenAIServer, **kwargs) -> OpenAIVLMCritic:
        kwargs.setdefault("cache", DiskCache(tmp_path / "cache", namespace="critiques"))
        return OpenAIVLMCritic(model="fake-vlm", base_url=server.base_url, **kwargs)

    return make


def make_request(image_id: str, image: Image.Image, caption: str, regions=None, objects=None) -> CritiqueRequest:
    record = record_from_image(image_id, image)
    return CritiqueRequest(image_id, record.image, record.sha256, caption, regions, objects)


def bus_regions(image: Image.Image) -> Regions:
    w, h = image.size
    boxes = [(50.0, 400.0, 250.0, 900.0), (220.0, 410.0, 350.0, 860.0)]
    views = [View("full", (0, 0, w, h), image)]  # the critic sends request.image itself, not this
    views += [View("crop", b, image.crop(tuple(map(int, b))), label="person") for b in boxes]
    views.append(View("tile", (0, 0, w // 2, h // 2), image.crop((0, 0, w // 2, h // 2)), grid=2))
    return Regions("bus", w, h, objects=[ObjectSummary("person", 2, 0.81, boxes), ObjectSummary("bus", 1, 0.9, [])],
                   views=views)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_what_the_server_receives_and_how_the_reply_is_parsed(make_critic, photos):
    bus = photos["bus"]
    regions = bus_regions(bus)
    request = make_request("bus", bus, "a dog on a street", regions, objects={"person": 4, "bus": 1})
    with FakeOpenAIServer(reply=lambda body: json.dumps(GOOD)) as server:
        critic = make_critic(server, max_views=2)
        assert isinstance(critic, Critic)
        (critique,) = critic.critique_many([request])
    assert server.request_count == 1
    body = server.requests[0]
    assert body["model"] == "fake-vlm" and body["temperature"] == 0.0 and body["max_tokens"] == 500
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == CRITIQUE_SCHEMA
    # The full image, then max_views=2 of the non-full views in the regions stage's order.
    images = request_images(body)
    assert [mime for mime, _ in images] == ["image/jpeg"] * 3
    assert decode(images[0][1]).size == bus.size == (810, 1080)
    assert decode(images[1][1]).size == (200, 500) and decode(images[2][1]).size == (130, 450)
    text = request_text(body)
    assert '"a dog on a street"' in text
    assert regions.describe() in text and "2 person" in text and "1 bus" in text
    assert "Image 2: a crop around a detected person at box (50, 400, 250, 900)" in text
    assert "Image 4" not in text  # the tile was the third extra view: over max_views
    assert "(label: count): bus: 1, person: 4." in text
    assert server.request_headers[0]["authorization"] == "Bearer sk-test-not-a-real-key"

    assert critique.ok
    assert (critique.score, critique.feedback, critique.revision) == (0.25, GOOD["feedback"], GOOD["revision"])
    assert critique.hallucinated == ["dog"] and critique.missing == ["person", "bus"]
    assert critique.count_errors == {"person": (1, 2)}
    assert critique.raw == json.dumps(GOOD)
    sent = server.responses[0]["usage"]
    assert critique.usage == {"prompt_tokens": sent["prompt_tokens"], "completion_tokens": sent["completion_tokens"],
                              "requests": 1}
    assert sent["prompt_tokens"] == len(text.split()) + 85 * 3  # the fake's rule: the numbers came from it
    template = load_template("critique")
    assert critique.meta["template"] == "critique" and critique.meta["template_sha256"] == template.sha256
    assert critique.meta["prompt_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert critique.meta["cache_hit"] is False and critique.meta["response_format_used"] is True
    assert [v["kind"] for v in critique.meta["views"]] == ["crop", "crop"]


def test_large_images_are_shrunk_and_no_regions_is_said(make_critic, drawn_images):
    wide = drawn_images["both"].resize((3000, 1000))
    with FakeOpenAIServer() as server:
        (critique,) = make_critic(server, max_image_side=1500).critique_many([make_request("w", wide, "shapes")])
    assert critique.ok and critique.feedback == "received 1 images"
    (_, data), = request_images(server.requests[0])
    assert decode(data).size == (1500, 500)
    assert "no object detection was run for this image" in request_text(server.requests[0])


def test_parse_critique_is_tolerant_of_wrapping_and_strict_about_content():
    fenced = "Here is my assessment:\n```json\n" + json.dumps(GOOD) + "\n```\nHope this helps!"
    assert parse_critique(fenced).count_errors == {"person": (1, 2)}
    prose = 'I think {this} is it: {"score": 1, "feedback": "fine", "revision": ""} -- done'
    minimal = parse_critique(prose)
    assert (minimal.score, minimal.feedback, minimal.revision, minimal.hallucinated) == (1.0, "fine", None, [])
    listed = dict(GOOD, count_errors=[{"label": "car", "said": 3, "true": 1.0}])
    assert parse_critique(json.dumps(listed)).count_errors == {"car": (3, 1)}
    for bad, message in [
        ("Sure, the caption looks fine.", "no JSON object"),
        (json.dumps(dict(GOOD, score=7)), "outside"),
        (json.dumps(dict(GOOD, score="high")), "'score' must be a number"),
        (json.dumps({"score": 0.5}), "'feedback' must be a string"),
        (json.dumps(dict(GOOD, missing="bus")), "'missing' must be a list"),
        (json.dumps(dict(GOOD, count_errors={"person": [1]})), "count_errors"),
    ]:
        with pytest.raises(OutputParseError, match=message) as info:
            parse_critique(bad)
        assert info.value.raw == bad


def test_server_without_response_format_gets_asked_again_without_it(make_critic, drawn_images):
    reply = "Sure!\n```json\n" + json.dumps(GOOD) + "\n```"
    with FakeOpenAIServer(reply=lambda body: reply, reject_response_format=True) as server:
        critic = make_critic(server)
        first, = critic.critique_many([make_request("a", drawn_images["red-circle"], "a red circle")])
        second, = critic.critique_many([make_request("b", drawn_images["blue-square"], "a blue square")])
    assert first.ok and first.score == 0.25 and first.usage["requests"] == 2
    assert first.meta["response_format_used"] is False
    # Remembered: the second critique goes straight to the plain request.
    assert ["response_format" in body for body in server.requests] == [True, False, False]
    assert second.ok and second.usage["requests"] == 1


def test_rate_limit_honours_retry_after_then_succeeds(make_critic, drawn_images):
    with FakeOpenAIServer(faults=[None, Fault.rate_limit(retry_after=1)]) as server:
        critic = make_critic(server)
        critic.critique_many([make_request("warm", drawn_images["blue-square"], "warm-up")])  # imports, connection
        start = time.perf_counter()
        critique, = critic.critique_many([make_request("a", drawn_images["red-circle"], "a red circle")])
        elapsed = time.perf_counter() - start
    assert critique.ok and critique.usage["requests"] == 2
    assert server.request_count == 3
    assert server.request_headers[2]["x-stainless-retry-count"] == "1"
    # The header's 1 s, not the SDK's own first backoff (0.5 s, jittered down to 0.375 s).
    gap = server.request_times[2] - server.request_times[1]
    assert 1.0 <= gap < 1.4 and elapsed >= 1.0


def test_server_errors_until_retries_run_out_fail_one_image_only(make_critic, drawn_images):
    def reply(body):
        if caption_of(body) == "the bad one":
            return Fault.server_error(retry_after_ms=10)  # keep the test fast; the count is what matters
        return json.dumps(dict(GOOD, feedback=f"about {caption_of(body)}"))

    requests = [make_request(name, image, caption) for name, image, caption in [
        ("a", drawn_images["red-circle"], "first"),
        ("b", drawn_images["blue-square"], "the bad one"),
        ("c", drawn_images["both"], "third"),
    ]]
    with FakeOpenAIServer(reply=reply) as server:
        critiques = make_critic(server, max_retries=2).critique_many(requests)
    assert [c.ok for c in critiques] == [True, False, True]
    assert critiques[0].feedback == "about first" and critiques[2].feedback == "about third"
    bad = critiques[1]
    assert "InternalServerError 500" in bad.error and "after 3 requests" in bad.error
    assert bad.usage["requests"] == 3 and "server had an error" in bad.raw
    assert bad.meta["image_id"] == "b" and bad.meta["cache_hit"] is False
    assert sum(caption_of(body) == "the bad one" for body in server.requests) == 3


def test_malformed_content_is_a_recorded_failure_carrying_the_raw_reply(make_critic, drawn_images):
    prose = "The caption is decent but misses the square."
    with FakeOpenAIServer(faults=[Fault.malformed_content(prose)]) as server:
        critique, = make_critic(server).critique_many([make_request("a", drawn_images["both"], "a circle")])
    assert not critique.ok and "no JSON object" in critique.error
    assert critique.raw == prose and critique.usage["requests"] == 1
    assert critique.usage["completion_tokens"] == len(prose.split())


def test_malformed_body_is_a_recorded_failure(make_critic, drawn_images):
    with FakeOpenAIServer(faults=[Fault.malformed_body()]) as server:
        critique, = make_critic(server).critique_many([make_request("a", drawn_images["both"], "a circle")])
    assert not critique.ok and "malformed completion body" in critique.error
    assert critique.raw.startswith('{"id": "chatcmpl-broken"')


def test_a_hang_past_the_timeout_is_retried_then_recorded(make_critic, drawn_images):
    with FakeOpenAIServer(faults=[Fault.hang(5), Fault.hang(5)]) as server:
        critic = make_critic(server, timeout=0.4, max_retries=1)
        start = time.perf_counter()
        critique, = critic.critique_many([make_request("a", drawn_images["both"], "a circle")])
        elapsed = time.perf_counter() - start
    assert not critique.ok and "APITimeoutError" in critique.error and critique.usage["requests"] == 2
    assert server.request_count == 2
    assert elapsed < 3.0  # two 0.4 s timeouts and one backoff, not the 5 s hang


def test_one_unusable_request_does_not_kill_the_batch(make_critic, drawn_images):
    good = make_request("a", drawn_images["both"], "shapes")
    broken = CritiqueRequest("b", "not an image", "0" * 64, "shapes")
    with FakeOpenAIServer() as server:
        critiques = make_critic(server).critique_many([broken, good])
    assert not critiques[0].ok and "image must be a PIL image" in critiques[0].error
    assert critiques[1].ok and server.request_count == 1


def test_eight_critiques_run_concurrently(make_critic, drawn_images):
    latency = 0.3
    image = drawn_images["both"]
    with FakeOpenAIServer(latency=latency) as server:
        critic = make_critic(server, max_concurrency=8)
        critic.critique_many([make_request("warm", image, "warm-up")])  # lazy imports, connection set-up
        requests = [make_request(f"i{i}", image, f"caption {i}") for i in range(8)]
        start = time.perf_counter()
        critiques = critic.critique_many(requests)
        elapsed = time.perf_counter() - start
        assert all(c.ok for c in critiques) and server.request_count == 9
        serial = make_critic(server, max_concurrency=1)
        start = time.perf_counter()
        serial.critique_many([make_request(f"s{i}", image, f"serial {i}") for i in range(4)])
        serial_elapsed = time.perf_counter() - start
    assert elapsed < 3 * latency, f"8 critiques took {elapsed:.2f} s at {latency} s latency"
    assert serial_elapsed >= 4 * latency  # the same code with one worker is serial: the bound above means something
    print(f"8 concurrent critiques at {latency} s latency: {elapsed:.3f} s; 4 serial: {serial_elapsed:.3f} s")


def test_api_key_comes_from_the_named_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(ValueError, match=r"\$OPENAI_API_KEY is not set"):
        OpenAIVLMCritic()
    monkeypatch.setenv("MY_VLM_KEY", "sk-mine")
    with FakeOpenAIServer() as server:
        OpenAIVLMCritic(base_url=server.base_url, api_key_env="MY_VLM_KEY", cache=DiskCache(namespace="k")).critique_many(
            [make_request("a", Image.new("RGB", (8, 8)), "black")]
        )
        local = OpenAIVLMCritic(base_url=server.base_url, cache=DiskCache(namespace="k2"))  # no key: a local server
        local.critique_many([make_request("a", Image.new("RGB", (8, 8)), "black")])
    assert [h["authorization"] for h in server.request_headers] == ["Bearer sk-mine", "Bearer not-needed"]


def test_devserver_binds_loopback_only_and_answers_fast():
    """127.0.0.1 only; and no Nagle/delayed-ACK stall (~40 ms a request without TCP_NODELAY)."""
    import openai

    with FakeOpenAIServer() as server:
        assert server._httpd.socket.getsockname()[0] == "127.0.0.1"
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "warm"}])
        start = time.perf_counter()
        for i in range(20):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"hi {i}"}])
        per_request = (time.perf_counter() - start) / 20
        with pytest.raises(openai.NotFoundError):
            client.models.list()
    assert server.request_count == 21 and request_text(server.requests[-1]) == "hi 19"
    assert per_request < 0.025, f"{1000 * per_request:.1f} ms per request"


def test_parse_judgement():
    assert parse_judgement('{"winner": "A", "reason": "x"}') == 0
    assert parse_judgement('Verdict: {"winner": "b", "reason": "x"}') == 1
    assert parse_judgement('{"winner": "tie", "reason": "x"}') is None
    with pytest.raises(OutputParseError, match="'winner'") as info:
        parse_judgement('{"winner": "both"}')
    assert info.value.raw == '{"winner": "both"}'


def test_judge_pair_sends_both_captions_and_caches(make_critic, photos):
    def reply(body):
        text = request_text(body)
        return json.dumps({"winner": "B" if '"two people by a bus"' in text.split("Caption B:")[1] else "A",
                           "reason": "B names what is there"})

    image = photos["bus"]
    with FakeOpenAIServer(reply=reply) as server:
        critic = make_critic(server)
        winner, raw = critic.judge_pair(image, "a cat on a sofa", "two people by a bus")
        assert winner == 1 and json.loads(raw)["winner"] == "B"
        assert critic.judge_pair(image, "a cat on a sofa", "two people by a bus") == (winner, raw)
        assert server.request_count == 1  # the second was a cache hit
        assert critic.judge_pair(image, "two people by a bus", "a cat on a sofa")[0] == 0
        body = server.requests[0]
        assert body["response_format"]["json_schema"]["name"] == "judgement"
        assert len(request_images(body)) == 1 and decode(request_images(body)[0][1]).size == image.size
        server.reply = lambda body: "I prefer the second one."
        with pytest.raises(JudgeError, match="no JSON object") as info:
            critic.judge_pair(image, "a", "b")
        assert info.value.raw == "I prefer the second one."
        server.reply = lambda body: '{"winner": "tie", "reason": "same"}'
        assert critic.judge_pair(image, "a", "b")[0] is None  # the failure was not cached


def test_the_win_rate_judges_only_captions_that_changed(make_critic, photos):
    """An image whose caption did not change is counted as unchanged and costs no request (the judge was
    paid to compare a caption with itself, and its position bias reported as a win rate)."""
    from refine.score import win_rate

    records = [record_from_image(name, photos[name]) for name in ("bus", "zidane")]
    first = {"bus": "a bus", "zidane": "two men"}
    last = {"bus": "a bus ", "zidane": "two men in ties"}  # the bus caption is the same but for a space
    with FakeOpenAIServer(reply=lambda body: json.dumps({"winner": "B" if "in ties" in request_text(body).split(
            "Caption B:")[1] else "A", "reason": "names the ties"})) as server:
        result = win_rate(make_critic(server), records, first, last)
        assert server.request_count == 1
    assert result == {"winrate/last_vs_first": 1.0, "winrate/judged": 1, "winrate/failed": 0, "winrate/unchanged": 1}
