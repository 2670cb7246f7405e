"""Sections 1 and 2: refine's critic stage (critique + textual step) against textgrad's own pipeline.

Both sides talk to the same local OpenAI-compatible server (``bench.devserver``, its own process, a
fixed latency per request) about the same images and captions, and requests are counted *at the
server*, by kind, so neither side's own bookkeeping (or textgrad's prompt cache) can hide a request.

- refine: ``OpenAIVLMCritic.critique_many`` then ``TextualStep.apply_many`` with a ``ChatEngine``, at
  their default concurrency, with a fresh cache directory per repetition.
- textgrad: for one image after another, ``MultimodalLLMCall`` (the critique, which is the loss) →
  ``loss.backward()`` → ``TGD.step()``, with ``ChatExternalClient`` pointed at the server.

textgrad workarounds, both documented in bench/README.md:

- ``MultimodalLLMCall`` and the multimodal backward pass accept only engines whose ``model_string``
  is in ``textgrad.engine.__MULTIMODAL_ENGINES__``, whatever the endpoint. ``ChatExternalClient`` (the
  one engine that takes a custom ``base_url``, through its client) is therefore given
  ``model_string="gpt-4o"`` and ``is_multimodal=True``; that name is what it sends, and our server
  answers any model name.
- Its prompt cache (a diskcache keyed on the prompt text) is pointed at a fresh directory every
  repetition, so a repetition never replays an earlier one's answers.

Section 2 runs refine's round again over the same cache directory: every answer should come from the
cache, with no request reaching the server.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.data import bench_records
from bench.data import captions as bench_captions
from bench.devserver import ServerProcess
from bench.measure import Row, Target, ratios, timed
from refine.config import DEFAULT_MAX_CONCURRENCY

MODEL = "gpt-4o"  # sent by both sides; it must be a textgrad multimodal whitelist name (see module docstring)
API_KEY_ENV = "REFINE_BENCH_API_KEY"  # unset on purpose: a local base_url gets a placeholder key


def critique_prompt(image_size: tuple[int, int], caption: str) -> str:
    """The critique text refine sends for an image with no regions (so textgrad is asked the same)."""
    from critics.context import describe_views, format_annotations, format_objects
    from refine.infra.prompts import load_template
    from refine.stages.step import DEFAULT_MAX_WORDS

    return load_template("critique").render(
        caption=caption, views=describe_views(image_size, []), objects=format_objects(None),
        annotations=format_annotations(None), max_words=DEFAULT_MAX_WORDS,
    )


class RefineSide:
    """refine's critic and textual-step engine, built once (as the loop builds them once per run).

    ``round`` points both at a cache directory, then critiques every image and applies the textual
    step, as the loop's critique and step stages do.
    """

    def __init__(self, base_url: str):
        from critics.openai_vlm import OpenAIVLMCritic
        from refine.infra.llm import ChatEngine

        self.critic = OpenAIVLMCritic(model=MODEL, base_url=base_url, api_key_env=API_KEY_ENV)
        self.engine = ChatEngine(MODEL, base_url, API_KEY_ENV)

    def round(self, records, captions, cache_dir: Path) -> dict[str, Any]:
        from critics.base import CritiqueRequest
        from refine.infra.cache import DiskCache
        from refine.stages.step import TextualStep

        self.critic.cache = DiskCache(cache_dir, "critiques")
        self.engine.cache = DiskCache(cache_dir, "llm")
        start = time.perf_counter()
        requests = [CritiqueRequest(r.id, r.image, r.sha256, c) for r, c in zip(records, captions)]
        critiques = self.critic.critique_many(requests)
        middle = time.perf_counter()
        steps = TextualStep(self.engine).apply_many(list(captions), critiques)
        end = time.perf_counter()
        self.critic.cache.close()
        self.engine.cache.close()
        failures = [c.error for c in critiques if not c.ok] + [
            s.error or f"step source {s.source!r}, expected 'textgrad'" for s in steps
            if s.error is not None or s.source != "textgrad"]
        return {"failures": failures, "critique_s": middle - start, "step_s": end - middle,
                "cache_hits": sum(bool(c.meta.get("cache_hit")) for c in critiques), "refined": [s.caption for s in steps]}


def jpeg_bytes(image) -> bytes:
    from critics.openai_vlm import JPEG_QUALITY

    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class TextgradSide:
    """textgrad's own sequential pipeline: critique (the loss) → backward → TGD step, image by image."""

    def __init__(self, base_url: str):
        from openai import OpenAI

        from refine.stages.step import default_constraints, import_textgrad

        self.tg = import_textgrad()
        from textgrad.engine.local_model_openai_api import ChatExternalClient

        self.engine = ChatExternalClient(client=OpenAI(base_url=base_url, api_key="not-needed"), model_string=MODEL,
                                         is_multimodal=True)
        self.constraints = default_constraints()

    def round(self, records, captions, cache_dir: Path) -> dict[str, Any]:
        import diskcache
        from textgrad.autograd import MultimodalLLMCall

        from refine.stages.step import CAPTION_ROLE

        tg = self.tg
        self.engine.cache.close()
        self.engine.cache = diskcache.Cache(str(cache_dir))  # textgrad's prompt cache, empty for this round
        refined, failures = [], []
        for record, caption in zip(records, captions):
            try:
                image = tg.Variable(jpeg_bytes(record.image), role_description="the image the caption describes",
                                    requires_grad=False)
                caption_var = tg.Variable(caption, role_description=CAPTION_ROLE, requires_grad=True)
                instructions = tg.Variable(critique_prompt(record.image.size, caption),
                                           role_description="instructions to the critic", requires_grad=False)
                loss = MultimodalLLMCall(self.engine)([image, caption_var, instructions],
                                                      response_role_description="critique of the caption")
                loss.backward(self.engine)
                tg.TGD(parameters=[caption_var], engine=self.engine, constraints=self.constraints).step()
                refined.append(caption_var.value)
            except Exception as e:  # record and go on: one failed image must not end the benchmark
                failures.append(f"{record.id}: {type(e).__name__}: {e}")
        self.engine.cache.close()
        return {"failures": failures, "refined": refined}


def run(reps: int, quick: bool, workdir: Path) -> list[Row]:
    n_images = 4 if quick else 10
    latency = 0.05 if quick else 0.3
    records = bench_records(n_images + 1)
    captions = bench_captions(n_images + 1)
    # One image and caption used by no measured round: the warm-up round that pays first-call costs
    # (HTTP clients, templates, textgrad's lazy imports) before anything is timed, on both sides.
    warm_records, warm_captions = records[-1:], ["a warm-up caption that no measured round uses"]
    records, captions = records[:n_images], captions[:n_images]

    tg_s, tg_req, cold_s, cold_req, warm_s, warm_req = [], [], [], [], [], []
    split = {"critique_s": [], "step_s": []}
    kinds: dict[str, dict[str, int]] = {}
    failures: dict[str, list[str]] = {"textgrad": [], "refine": [], "warm": []}
    with ServerProcess(latency=latency) as server:
        textgrad, refine = TextgradSide(server.base_url), RefineSide(server.base_url)
        scratch = Path(tempfile.mkdtemp(prefix="critic-warmup-", dir=workdir))
        for name, side in (("textgrad", textgrad), ("refine", refine)):
            side.round(warm_records, warm_captions, scratch / name)
        for rep in range(reps):
            root = Path(tempfile.mkdtemp(prefix=f"critic-rep{rep}-", dir=workdir))
            server.reset()
            seconds, out = timed(lambda: textgrad.round(records, captions, root / "textgrad-cache"))
            stats = server.stats()
            tg_s.append(seconds), tg_req.append(stats["requests"] / n_images), failures["textgrad"].extend(out["failures"])
            kinds["textgrad"] = stats["kinds"]

            server.reset()
            seconds, out = timed(lambda: refine.round(records, captions, root / "refine-cache"))
            stats = server.stats()
            cold_s.append(seconds), cold_req.append(stats["requests"] / n_images), failures["refine"].extend(out["failures"])
            kinds["refine"] = stats["kinds"]
            for key in split:
                split[key].append(out[key])

            server.reset()  # section 2: the same round again, over the same cache directory
            seconds, out = timed(lambda: refine.round(records, captions, root / "refine-cache"))
            warm_s.append(seconds), warm_req.append(server.stats()["requests"]), failures["warm"].extend(out["failures"])

    def problems(side: str) -> str | None:
        found = failures[side]
        return f"{len(found)} failed items, e.g. {found[0][:200]}" if found else None

    s1, s2 = "1 critic stage", "2 warm cache"
    setup = f"{n_images} images, {latency * 1000:.0f} ms per request, server in its own process, after a warm-up round"
    kinds_text = "; ".join(f"{side}: {k}" for side, k in kinds.items())
    median = statistics.median
    waves = -(-n_images // DEFAULT_MAX_CONCURRENCY)
    split_text = (f"median critique stage {median(split['critique_s']):.2f} s + step stage "
                  f"{median(split['step_s']):.2f} s; {waves} wave(s) of requests per stage at {DEFAULT_MAX_CONCURRENCY} "
                  f"threads, i.e. ≥ {2 * waves * latency:.1f} s of latency alone")
    return [
        Row(s1, "textgrad: critique → backward → TGD step, sequential", "s", tg_s,
            earlier="earlier: 9.25 s for 10 images", note=setup, error=problems("textgrad")),
        Row(s1, "textgrad: requests per image (counted at the server)", "req", tg_req, earlier="earlier: 3"),
        Row(s1, f"refine: critique_many + TextualStep.apply_many, default concurrency ({DEFAULT_MAX_CONCURRENCY})", "s", cold_s,
            earlier="earlier: the same requests 10 at a time took 0.99 s", note="fresh cache dir per rep; " + split_text,
            error=problems("refine")),
        Row(s1, "refine: requests per image (counted at the server)", "req", cold_req, Target("<=", 2, on="all"),
            note="requests by kind, last rep: " + kinds_text),
        Row(s1, "speed-up over textgrad (same-rep ratio)", "×", ratios(tg_s, cold_s), Target(">=", 12)),
        Row(s2, "warm cache: requests reaching the server", "req", warm_req, Target("==", 0, on="all"),
            error=problems("warm")),
        Row(s2, "warm cache: refine round wall time", "s", warm_s),
        Row(s2, "warm cache: faster than cold (same-rep ratio)", "×", ratios(cold_s, warm_s)),
    ]
