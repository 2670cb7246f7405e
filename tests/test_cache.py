"""refine.cache, and every critique and LLM call going through it: hits make zero requests, each key
part matters, an edited template re-asks, failures are never stored."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from critics.base import CritiqueRequest
from critics.openai_vlm import OpenAIVLMCritic
from refine.images.records import record_from_image
from refine.infra.cache import DiskCache, cache_key
from refine.infra.llm import ChatEngine
from refine.infra.prompts import PROMPTS_DIR_ENV
from refine.offline.devserver import FakeOpenAIServer, Fault, request_text
from refine.stages.regions import ObjectSummary, Regions, View
from refine.stages.step import TextualStep

REPO_PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
REPLY = {"score": 0.6, "feedback": "Mostly right.", "hallucinated": [], "missing": ["square"], "count_errors": {},
         "revision": "A red circle and a blue square."}


# --- the store itself ---


def test_cache_key_is_a_length_prefixed_sha256():
    by_hand = hashlib.sha256((2).to_bytes(8, "little") + b"ab" + (1).to_bytes(8, "little") + b"c").hexdigest()
    assert cache_key("ab", "c") == by_hand
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert cache_key({"t": 0.0, "m": 5}) == cache_key({"m": 5, "t": 0.0})  # canonical JSON
    assert cache_key(b"\x00\x01") == hashlib.sha256((2).to_bytes(8, "little") + b"\x00\x01").hexdigest()


def test_disk_cache_stores_only_cacheable_values_and_persists(tmp_path):
    cache = DiskCache(tmp_path, namespace="t")
    calls = []

    def compute(value):
        calls.append(value)
        return value

    assert cache.get_or_compute("k", lambda: compute({"error": "boom"}), cacheable=lambda v: v["error"] is None) == (
        {"error": "boom"}, False)
    assert cache.get_or_compute("k", lambda: compute({"error": None}), cacheable=lambda v: v["error"] is None) == (
        {"error": None}, False)
    assert cache.get_or_compute("k", lambda: compute("never"))[1] is True
    assert calls == [{"error": "boom"}, {"error": None}]
    assert cache.stats() == {"hits": 1, "misses": 2}
    cache.close()
    assert DiskCache(tmp_path, namespace="t").store.get("k") == {"error": None}  # another instance, same files


# --- critiques through the cache ---


@pytest.fixture
def requests(drawn_images):
    out = []
    for name in ("red-circle", "both"):
        record = record_from_image(name, drawn_images[name])
        out.append(CritiqueRequest(name, record.image, record.sha256, f"a picture of {name}"))
    return out


def critic_for(server, cache_dir, **kwargs) -> OpenAIVLMCritic:
    return OpenAIVLMCritic(model="fake-vlm", base_url=server.base_url, cache=DiskCache(cache_dir, "critiques"), **kwargs)


def test_an_identical_critique_makes_zero_requests(tmp_path, requests):
    with FakeOpenAIServer(reply=lambda body: json.dumps(REPLY)) as server:
        first = critic_for(server, tmp_path).critique_many(requests)
        again = critic_for(server, tmp_path).critique_many(requests)  # a new critic and client, same store
    assert server.request_count == 2
    for before, after in zip(first, again, strict=True):
        assert (after.score, after.feedback, after.revision, after.missing) == (0.6, "Mostly right.", REPLY["revision"],
                                                                               ["square"])
        assert after.meta["cache_hit"] is True and before.meta["cache_hit"] is False
        assert after.meta["cache_key"] == before.meta["cache_key"]
        assert after.usage["requests"] == 0 and after.meta["cached_usage"] == before.usage
        assert before.usage["requests"] == 1


def test_every_key_part_counts(tmp_path, requests, drawn_images):
    image = drawn_images["both"]
    record = record_from_image("both", image)

    def with_views(*boxes):
        views = [View("crop", b, image.crop(b), label="circle") for b in boxes]
        regions = Regions("both", *image.size, objects=[ObjectSummary("circle", 1, 0.7, list(boxes))], views=views)
        return CritiqueRequest("both", record.image, record.sha256, "shapes", regions)

    with FakeOpenAIServer() as server:
        critic = critic_for(server, tmp_path)
        keys = set()
        for critic_, request in [
            (critic, with_views((5, 5, 30, 30))),
            (critic, with_views((5, 5, 30, 30))),  # the same: a hit
            (critic, with_views((6, 5, 30, 30))),  # one box moved a pixel
            (critic, CritiqueRequest("both", record.image, record.sha256, "shapes!", with_views((5, 5, 30, 30)).regions)),
            (critic_for(server, tmp_path, temperature=0.7), with_views((5, 5, 30, 30))),
            (critic_for(server, tmp_path, max_tokens=100), with_views((5, 5, 30, 30))),
            (critic, CritiqueRequest("both", record.image, "f" * 64, "shapes", with_views((5, 5, 30, 30)).regions)),
        ]:
            (critique,) = critic_.critique_many([request])
            keys.add(critique.meta["cache_key"])
        model_b = OpenAIVLMCritic(model="other-vlm", base_url=server.base_url, cache=DiskCache(tmp_path, "critiques"))
        keys.add(model_b.critique_many([with_views((5, 5, 30, 30))])[0].meta["cache_key"])
    assert server.request_count == 7 and len(keys) == 7
    assert server.requests[3]["temperature"] == 0.7 and server.requests[4]["max_tokens"] == 100
    assert server.requests[-1]["model"] == "other-vlm"


def test_an_edited_template_changes_the_key_and_asks_again(tmp_path, requests, monkeypatch):
    edited = tmp_path / "prompts"
    shutil.copytree(REPO_PROMPTS, edited)
    path = edited / "critique.txt"
    path.write_text(path.read_text().replace("salient objects in the image", "important objects in the image"))
    monkeypatch.delenv(PROMPTS_DIR_ENV, raising=False)
    with FakeOpenAIServer() as server:
        original = critic_for(server, tmp_path / "c").critique_many(requests[:1])[0]
        monkeypatch.setenv(PROMPTS_DIR_ENV, str(edited))
        changed = critic_for(server, tmp_path / "c").critique_many(requests[:1])[0]
        assert server.request_count == 2
        assert "important objects in the image" in request_text(server.requests[1])
        assert "important objects" not in request_text(server.requests[0])
        monkeypatch.delenv(PROMPTS_DIR_ENV)
        back = critic_for(server, tmp_path / "c").critique_many(requests[:1])[0]
        assert server.request_count == 2  # the original template's answer is still there
    assert changed.meta["template_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert changed.meta["template_sha256"] != original.meta["template_sha256"]
    assert changed.meta["cache_key"] != original.meta["cache_key"] == back.meta["cache_key"]
    assert changed.meta["cache_hit"] is False and back.meta["cache_hit"] is True


@pytest.mark.parametrize("fault", [Fault.malformed_content("Looks fine to me."), Fault.server_error(), Fault.hang(3)],
                         ids=["unparseable", "http-500", "timeout"])
def test_a_failed_critique_is_not_cached(tmp_path, requests, fault):
    with FakeOpenAIServer(faults=[fault]) as server:
        critic = critic_for(server, tmp_path, max_retries=0, timeout=0.5)
        failed = critic.critique_many(requests[:1])[0]
        retried = critic.critique_many(requests[:1])[0]
        hit = critic.critique_many(requests[:1])[0]
    assert not failed.ok and failed.meta["cache_hit"] is False
    assert retried.ok and retried.meta["cache_hit"] is False
    assert hit.ok and hit.meta["cache_hit"] is True
    assert server.request_count == 2


def test_a_failed_llm_step_call_is_not_cached(tmp_path):
    from critics.base import Critique

    critique = Critique(0.2, "Not a dog.")
    tagged = "<IMPROVED_VARIABLE>a cat</IMPROVED_VARIABLE>"
    with FakeOpenAIServer(reply=lambda body: tagged, faults=[Fault.server_error()]) as server:
        engine = ChatEngine(model="fake-llm", base_url=server.base_url, max_retries=0, cache=DiskCache(tmp_path, "llm"))
        failed = TextualStep(engine).apply("a dog", critique)
        retried = TextualStep(engine).apply("a dog", critique)
        hit = TextualStep(engine).apply("a dog", critique)
    assert (failed.caption, retried.caption, hit.caption) == ("a dog", "a cat", "a cat")
    assert failed.error and retried.meta["cache_hit"] is False and hit.meta["cache_hit"] is True
    assert server.request_count == 2


def test_judge_answers_are_cached_apart_from_critiques(tmp_path):
    image = Image.new("RGB", (16, 16), "red")
    with FakeOpenAIServer(reply=lambda body: '{"winner": "A", "reason": "red"}') as server:
        critic = critic_for(server, tmp_path)
        assert critic.judge_pair(image, "red", "blue")[0] == 0
        assert critic_for(server, tmp_path).judge_pair(image, "red", "blue")[0] == 0
        assert critic.judge_pair(Image.new("RGB", (16, 16), "blue"), "red", "blue")[0] == 0  # another image
    assert server.request_count == 2


# --- two processes, one cache ---

TWO_RUNS_SCRIPT = """
import sys
from critics.base import CritiqueRequest
from critics.openai_vlm import OpenAIVLMCritic
from refine.infra.cache import DiskCache
from refine.images.records import record_from_image
from PIL import Image

base_url, cache_dir = sys.argv[1], sys.argv[2]
records = [record_from_image(f"img{i}", Image.new("RGB", (16, 16), (20 * i, 0, 0))) for i in range(6)]
requests = [CritiqueRequest(r.id, r.image, r.sha256, caption, None, None)
            for r in records for caption in ("a red square", "a dark square")]
critic = OpenAIVLMCritic(model="fake", base_url=base_url, max_concurrency=4, cache=DiskCache(cache_dir, namespace="c"))
results = critic.critique_many(requests)
assert all(c.ok for c in results), [c.error for c in results]
print(sum(1 for c in results if not c.meta["cache_hit"]))
"""


def test_two_processes_sharing_a_cache_ask_each_request_once(tmp_path):
    """The second run waits for the first run's requests in flight instead of sending them again."""
    import os
    import subprocess
    import sys

    with FakeOpenAIServer(reply=lambda body: json.dumps(REPLY), latency=0.5) as server:
        procs = [subprocess.Popen([sys.executable, "-c", TWO_RUNS_SCRIPT, server.base_url, str(tmp_path / "cache")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
                 for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert server.request_count == 12, "12 distinct critiques, asked once between the two runs"
    assert sum(int(out.strip().splitlines()[-1]) for out, _ in outs) == 12  # every answer paid for once


def test_a_lock_left_by_a_killed_process_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    cache = DiskCache(tmp_path, namespace="t")
    cache.store.set("lock:k", [socket.gethostname(), int(dead.stdout), "x"])  # as if killed while computing
    start = time.perf_counter()
    assert cache.get_or_compute("k", lambda: "fresh") == ("fresh", False)
    assert time.perf_counter() - start < 1.0 and cache.store.get("lock:k") is None


def test_a_full_cache_keeps_every_answer(tmp_path):
    """diskcache evicts past its size limit (1 GiB by default: about 900,000 critiques, less than one round
    of a million images), and an evicted answer is paid for again. The limit is lowered here to 20 kB, as
    a big run would reach it; every one of 100 answers of 1 kB must still be there."""
    cache = DiskCache(tmp_path, "critiques")
    cache.store.reset("size_limit", 20_000)
    for i in range(100):
        cache.get_or_compute(f"k{i}", lambda: "x" * 1000)
    assert sum(cache.store.get(f"k{i}") is not None for i in range(100)) == 100
    cache.close()
    reopened = DiskCache(tmp_path, "critiques")  # a store made before the fix is mended when it is opened
    reopened.store.reset("eviction_policy", "least-recently-stored")
    reopened.close()
    assert DiskCache(tmp_path, "critiques").store.eviction_policy == "none"
