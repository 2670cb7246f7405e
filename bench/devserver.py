"""``python -m bench.devserver``: ``refine.offline.devserver.FakeOpenAIServer`` in a process of its own.

The benchmark's clients (our thread pool, textgrad's sequential loop) would otherwise share a GIL with
the server's handler threads, and the server's JSON work would be billed to whichever side is being
timed. Here the server runs in its own process, with the benchmark's reply function, and takes
commands on stdin, one per line, answering each with one JSON line on stdout:

- ``stats``: ``{"requests": N, "answered": N, "kinds": {"critique": N, "backward": N, "step": N},
  "repeated": N}`` (repeated: requests whose body the server had received before);
- ``reset``: forget recorded requests (``{"ok": true}``);
- ``stop`` (or end of input): shut down.

The first line it prints is ``{"base_url": "http://127.0.0.1:PORT/v1"}``. ``ServerProcess`` is the
client side of that protocol.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from refine.offline.devserver import FakeOpenAIServer, request_text

IMPROVED_START, IMPROVED_END = "<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>"  # textgrad's TGD tags
# A phrase of textgrad's BACKWARD_SYSTEM_PROMPT (textgrad/autograd/llm_backward_prompts.py); matched as
# text so this process need not import textgrad (and litellm).
BACKWARD_MARK = "You are the gradient (feedback) engine"


def classify(body: dict[str, Any]) -> str:
    """Which kind of request a chat body is: ``"step"`` (a TGD update: its system prompt names the
    ``<IMPROVED_VARIABLE>`` tags), ``"backward"`` (textgrad's gradient call) or ``"critique"``."""
    text = request_text(body)
    if IMPROVED_START in text:
        return "step"
    if BACKWARD_MARK in text:
        return "backward"
    return "critique"


def bench_reply(body: dict[str, Any]) -> str:
    """A deterministic answer of the right shape for each kind of request.

    Critiques are JSON in refine's schema with ``revision: null``, so refine's textual step has to run
    (it would otherwise take the critic's own revision for free). Steps answer between textgrad's tags.
    Every answer carries a digest of the request, so different images get different feedback and
    different refined captions, and no later prompt repeats an earlier one.
    """
    digest = hashlib.sha256(request_text(body).encode()).hexdigest()[:8]
    kind = classify(body)
    if kind == "step":
        return f"{IMPROVED_START}a street scene with a bus and people, version {digest}{IMPROVED_END}"
    if kind == "backward":
        return f"The caption misses the bus and the people in the image; name them ({digest})."
    return json.dumps({
        "score": 0.4,
        "feedback": f"The caption misses the main objects; name the bus and the people ({digest}).",
        "hallucinated": [],
        "missing": ["bus", "person"],
        "count_errors": {},
        "revision": None,
    })


def stats(server: FakeOpenAIServer) -> dict[str, Any]:
    with server._lock:  # the handler threads append under this lock
        bodies = list(server.requests)
        answered = len(server.responses)
    seen = Counter(json.dumps(b, sort_keys=True) for b in bodies)
    return {"requests": len(bodies), "answered": answered, "kinds": dict(Counter(classify(b) for b in bodies)),
            "repeated": sum(n - 1 for n in seen.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.devserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.3, help="seconds added to every request (default 0.3)")
    args = parser.parse_args(argv)
    server = FakeOpenAIServer(reply=bench_reply, latency=args.latency)
    server.start()
    try:
        print(json.dumps({"base_url": server.base_url}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                print(json.dumps(stats(server)), flush=True)
            elif command == "reset":
                server.reset()
                print(json.dumps({"ok": True}), flush=True)
            elif command in ("stop", ""):
                break
            else:
                print(json.dumps({"error": f"unknown command {command!r}; use stats, reset or stop"}), flush=True)
    finally:
        server.stop()
    return 0


class ServerProcess:
    """Start ``python -m bench.devserver`` and talk to it: ``base_url``, ``stats()``, ``reset()``."""

    def __init__(self, latency: float = 0.3):
        self.latency = latency
        self.base_url = ""
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        root = Path(__file__).resolve().parents[1]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.devserver", "--latency", str(self.latency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root,
        )
        self.base_url = self._read()["base_url"]
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        try:
            self._proc.stdin.write("stop\n")
            self._proc.stdin.close()
            self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def _read(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.devserver exited (code {self._proc.poll()}) without answering")
        return json.loads(line)

    def _ask(self, command: str) -> dict[str, Any]:
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._read()

    def stats(self) -> dict[str, Any]:
        return self._ask("stats")

    def reset(self) -> None:
        self._ask("reset")


if __name__ == "__main__":
    sys.exit(main())
