"""The loop against an OpenAI-compatible server on 127.0.0.1: critique + textgrad step, kill, resume.

The server counts requests, so "no repeated critic requests" is checked where it matters: no request
body reaches the server twice, across a SIGKILL and a --resume.
"""

import json
import os
import subprocess
import sys

from test_loop import _args, kill_when_exists, manifest  # noqa: F401  (fixture)

from refine.infra.atomic import read_jsonl
from refine.infra.runlog import RunLog
from refine.offline.devserver import FakeOpenAIServer, request_images, request_text


def reply(body):
    """Critique requests carry images; textgrad's step requests are text only."""
    if request_images(body):
        caption_words = len(request_text(body).split())
        return json.dumps({"score": round((caption_words % 7) / 7, 3), "feedback": "Name the bus and the people.",
                           "hallucinated": [], "missing": ["bus"], "count_errors": {}, "revision": None})
    return "<IMPROVED_VARIABLE>a bus and people on a street</IMPROVED_VARIABLE>"


def test_openai_critic_run_killed_and_resumed_repeats_no_request(manifest, tiny_student_dir, tmp_path):  # noqa: F811
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "REFINE_CACHE_DIR": str(tmp_path / "cache")}
    # 0.3 s per request: the kill lands while requests are in flight, as it would against a real API.
    with FakeOpenAIServer(reply=reply, latency=0.3) as server:
        args = _args(manifest, tiny_student_dir, runs_dir, "--critic.backend=openai",
                     f"--critic.base_url={server.base_url}", "--critic.model=fake-model", "--loop.use_regions=false")
        kill_when_exists(args, env, runs_dir / "e2e" / "rounds" / "001" / "captions.jsonl")
        before_kill = server.request_count
        in_flight = before_kill - len(server.responses)  # asked, never answered: the only ones that may repeat
        asked_before_kill = [json.dumps(b, sort_keys=True) for b in server.requests]
        resumed = subprocess.run([sys.executable, "-m", "refine.loop", "--resume", "e2e", f"--loop.runs_dir={runs_dir}"],
                                 env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        bodies = [json.dumps(b, sort_keys=True) for b in server.requests]

    assert before_kill > 0 and server.request_count > before_kill
    from collections import Counter

    repeated = [b for b, n in Counter(bodies).items() if n > 1]
    assert len(repeated) <= in_flight, "a request that had been answered reached the server again"
    assert set(repeated) <= set(asked_before_kill[len(asked_before_kill) - in_flight:])
    log = RunLog(runs_dir / "e2e")
    critique_requests = sum(1 for b in server.requests if request_images(b))
    step_requests = len(bodies) - critique_requests
    recorded = [read_jsonl(log.stage_path(k, "critiques")) for k in range(2)]
    # Each distinct (image, caption) was asked exactly once over the whole run, kill and resume included:
    # later rounds and the resumed stage got the rest from the disk cache.
    distinct = len({(r["image_id"], r["caption"]) for rows in recorded for r in rows})
    assert distinct <= critique_requests <= distinct + in_flight
    assert any(r["critique"]["meta"].get("cache_hit") for rows in recorded for r in rows)
    assert step_requests >= 1
    refined = read_jsonl(log.stage_path(0, "refined"))
    assert refined and all(r["refined"] == "a bus and people on a street" for r in refined)
    assert [e["event"] for e in log.events()].count("round_done") == 2
