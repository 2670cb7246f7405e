"""The textual step: turn a caption and its critique into a refined caption.

If the critic wrote its own corrected caption (``Critique.revision``: the grounded and Florence-2 critics
do, and GPT-4o is asked to), that is the step, at no extra cost. Otherwise the critique's feedback is
applied as a textual gradient with TextGrad (Yuksekgonul et al. 2024, "TextGrad: Automatic
'Differentiation' via Text"): the caption is a ``textgrad.Variable``, the feedback is set as its
gradient directly (the critic already did the backward pass, so no extra LLM call is spent on one),
and one ``textgrad.TGD`` step with our constraints (``prompts/step.txt``) rewrites it. That makes
critique + step at most 2 requests per image.

TextGrad is used behind an adapter of ours (``load_textgrad_engine``): a subclass of its ``EngineLM``
whose ``generate`` calls ``ChatEngine``, i.e. our OpenAI client and our ``DiskCache`` (TextGrad's own
caches key on raw base64 or on Python's salted ``hash()``). TextGrad is sequential; ``TextualStep.apply_many`` runs
steps in a thread pool. It is imported lazily, with its import-time side effects pointed away from the
working directory (``TEXTGRAD_LOG_DIR``, ``LITELLM_LOCAL_MODEL_COST_MAP``).

When the model omits the ``<IMPROVED_VARIABLE>`` tags, ``TGD.step`` raises ``IndexError``
(textgrad/optimizer/optimizer.py); we recover the caption from the raw reply
(``caption_from_reply``) and record ``tags_missing=True``.

Whatever its source, a refined caption becomes a training target, so it must *be* a caption
(:func:`refine.stages.replies.rejection`): one sentence within the word limit, not a refusal ("I'm sorry, but I can't help
with that."), not chatter about the task ("Sure! Here is the improved caption:"). Anything else is no
refinement: the result keeps the original caption and records why (``StepResult.rejected``), and the
reply is not stored in the cache as a good answer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from critics.base import Critique
from refine.config import DEFAULT_MAX_CONCURRENCY
from refine.infra.cache import default_cache_dir
from refine.infra.concurrency import map_concurrently
from refine.infra.llm import ChatCallError, ChatResult, usage
from refine.infra.prompts import constraint_lines, load_template
from refine.metrics.summary import samples_by_caption
from refine.stages.critique import CritiqueRow, Spend, run_requests
from refine.stages.replies import DEFAULT_MAX_WORDS, caption_from_reply, rejection
from refine.stages.student import CaptionSet

log = logging.getLogger(__name__)

CAPTION_ROLE = "a one-sentence caption of an image, used as the training target for a small image captioning model"


# --- textgrad, lazily --------------------------------------------------------------------------------


def import_textgrad():
    """``import textgrad`` with its import-time side effects contained (logs dir, litellm cost-map fetch)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("TEXTGRAD_LOG_DIR", str(default_cache_dir() / "textgrad-logs"))
    import textgrad

    return textgrad


@functools.cache
def _adapter_class() -> type:
    from textgrad.engine import EngineLM

    class TextGradEngine(EngineLM):
        """textgrad's ``EngineLM`` over a ``ChatEngine`` (or any object with ``generate``), recording
        every call so a step can report usage and recover from a reply without the tags."""

        def __init__(self, backend: Any, cacheable: Callable[[str], bool] | None = None):
            self.backend = backend
            self.cacheable = cacheable  # replies it rejects are not cached (see ChatEngine.complete)
            self.model_string = getattr(backend, "model", getattr(backend, "model_string", "unknown"))
            self.calls: list[tuple[str, ChatResult]] = []  # (system prompt + prompt, result)
            self._lock = threading.Lock()

        def generate(self, prompt, system_prompt=None, **kwargs):
            if not isinstance(prompt, str):
                raise TypeError("refine's textgrad adapter takes text prompts only (no multimodal content)")
            if hasattr(self.backend, "complete"):
                result = self.backend.complete(prompt, system_prompt=system_prompt, cacheable=self.cacheable)
            else:
                text = self.backend.generate(prompt, system_prompt=system_prompt, **kwargs)
                result = ChatResult(text, usage(requests=1))
            with self._lock:
                self.calls.append(((system_prompt or "") + "\n" + prompt, result))
            return result.content

        def __call__(self, prompt, **kwargs):  # EngineLM.__call__ is a no-op `pass`
            return self.generate(prompt, **kwargs)

    return TextGradEngine


def load_textgrad_engine(backend: Any, cacheable: Callable[[str], bool] | None = None):
    """A textgrad ``EngineLM`` that calls ``backend`` (a ``ChatEngine``, or anything with ``generate``)."""
    import_textgrad()
    return _adapter_class()(backend, cacheable)


# --- pure helpers ------------------------------------------------------------------------------------


def gradient_text(critique: Critique) -> str:
    """The critique as one textual gradient: the feedback plus its structured findings."""
    parts = [critique.feedback.strip()] if critique.feedback and critique.feedback.strip() else []
    if critique.hallucinated:
        parts.append("Named but not in the image: " + ", ".join(critique.hallucinated) + ".")
    if critique.missing:
        parts.append("In the image but not named: " + ", ".join(critique.missing) + ".")
    if critique.count_errors:
        wrong = "; ".join(f"{label}: said {said}, actually {true}" for label, (said, true) in critique.count_errors.items())
        parts.append(f"Wrong counts: {wrong}.")
    return " ".join(parts)


# --- the step ------------------------------------------------------------------------------------


@dataclass
class StepResult:
    caption: str  # the refined caption; the original when nothing was applied
    original: str
    source: str  # "revision" | "textgrad" | "unchanged"
    tags_missing: bool = False  # the optimizer reply had no <IMPROVED_VARIABLE> tags; caption recovered
    error: str | None = None  # the step failed (a call error); caption is the original
    rejected: str | None = None  # the refinement was not a caption (``rejection``'s reason); caption is the original
    usage: dict[str, int] = field(default_factory=usage)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.caption != self.original


def default_constraints(max_words: int = DEFAULT_MAX_WORDS) -> list[str]:
    """The TGD constraints from ``prompts/step.txt``, one per non-empty line."""
    return constraint_lines(load_template("step").render(max_words=max_words))


@dataclass
class Refinement:
    """The step stage's row: a caption, what the step made of it, and why (``rounds/<k>/refined.jsonl``).

    ``refined`` is the original when nothing was applied; ``rejected`` and ``reason`` say why a reply was
    not a caption, ``error`` why a call failed. Runs written before these fields existed load with them
    empty.
    """

    image_id: str
    original: str
    refined: str
    source: str = ""
    rejected: str | None = None
    reason: str | None = None
    error: str | None = None
    votes: int = 1  # critiques whose step gave this refinement (agreement, ``critic.samples`` > 1)
    of: int = 1  # critiques of the caption that succeeded
    usage: dict[str, int] = field(default_factory=dict)  # the step's requests and tokens (textgrad), summed


REPLY_REJECTIONS = ("empty", "refusal", "meta", "sentences", "too_long")  # replies.rejection's reasons


def _failed(r: Refinement) -> str | None:
    """Why a step counts as failed toward ``loop.max_failure_share``: its call failed, or its paid reply
    was no caption (a refusal, prose). A model that never answers with a caption stops the run instead
    of paying for every round of no pairs. A rejected reply's row is still recorded (not asked again)."""
    if r.error or r.source != "textgrad" or r.rejected not in REPLY_REJECTIONS:
        return r.error
    return f"the reply is no caption ({r.rejected}): {r.reason}"


@dataclass
class TextualStep:
    """The textual step: a caption and its critique in, a refined caption (with its record) out.

    The critic's own revision is the step when there is one. Otherwise the feedback is applied with one
    textgrad TGD step through ``engine`` (a ``ChatEngine``, or any object with textgrad's ``generate``).
    Without an engine, feedback alone is an error, unless ``revisions_only`` (local critics: a critique
    without a revision then leaves the caption as it is).
    """

    engine: Any = None
    max_words: int = DEFAULT_MAX_WORDS
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    constraints: Sequence[str] | None = None  # default: prompts/step.txt rendered with max_words
    revisions_only: bool = False
    role_description: str = CAPTION_ROLE
    # The image set's object vocabulary: with several critiques per caption, refinements that name the same
    # objects with the same counts agree (without one, only identical strings do); the gate needs it too.
    vocabulary: Any = None
    gate: bool = False  # reject refinements that name no object of the vocabulary or are far shorter
    min_agreement: float = 0.5  # with several critiques per caption: the share of votes a refinement needs
    # What the critiques vote on: "caption" (a whole refinement needs the share) or "object" (each object's
    # count does, and the original is rewritten to the decided ones; :func:`vote_objects`).
    agree_by: str = "caption"
    revise_approved: bool = False  # also rewrite captions the critic approves (``Critique.approves``)

    def __post_init__(self):
        if self.gate and self.vocabulary is None:
            raise ValueError("TextualStep(gate=True) needs the vocabulary whose objects a refinement must name")
        if self.agree_by == "object" and self.vocabulary is None:
            raise ValueError("TextualStep(agree_by='object') needs the vocabulary whose objects the critiques vote on")
        if self.constraints is None:
            self.constraints = default_constraints(self.max_words)  # a broken step.txt fails here, at setup

    def apply(self, caption: str, critique: Critique) -> StepResult:
        """One step with its record. Raises only for a setup error (feedback, no revision, no engine); a
        failed call comes back as ``StepResult(error=...)`` with the original caption."""
        if not critique.ok:
            return StepResult(caption, caption, "unchanged", meta={"reason": f"critique failed: {critique.error}"})
        if critique.approves and not self.revise_approved:
            return StepResult(caption, caption, "unchanged", meta={"reason": "the critic approves the caption"})
        gradient = gradient_text(critique)
        if critique.revision and critique.revision.strip():
            revision = critique.revision.strip()
            if (why := rejection(revision, self.max_words)) is None:
                return StepResult(revision, caption, "revision")
            if self.engine is None or not gradient:
                return StepResult(caption, caption, "revision", rejected=why[0], meta={"reason": why[1]})
            # The critic's revision is no caption, but its feedback is usable: apply that instead.
            result = self._textgrad(caption, gradient)
            result.meta["revision_rejected"] = why[0]
            return result
        if not gradient:
            return StepResult(caption, caption, "unchanged", meta={"reason": "the critique has no feedback"})
        if self.engine is None:
            if self.revisions_only:
                return StepResult(caption, caption, "unchanged", meta={"reason": "the critique has no revision"})
            raise ValueError("a critique has feedback but no revision, so the step needs a model: pass "
                             "engine=ChatEngine(model=..., base_url=...) (or any textgrad EngineLM)")
        return self._textgrad(caption, gradient)

    def _textgrad(self, caption: str, gradient: str) -> StepResult:
        tg = import_textgrad()
        max_words = self.max_words
        adapter = load_textgrad_engine(self.engine, cacheable=lambda reply: caption_from_reply(reply, max_words)[2] is None)
        variable = tg.Variable(caption, requires_grad=True, role_description=self.role_description)
        feedback = tg.Variable(gradient, requires_grad=False, role_description=f"feedback on {self.role_description}")
        variable.gradients.add(feedback)
        # With a context, TGD wraps the gradient in <FEEDBACK> tags, which its update prompt refers to.
        variable.gradients_context[feedback] = {
            "context": f"A vision-language critic compared the caption with the image. Caption: {caption}",
            "response_desc": "a training target for a small image captioning model",
            "variable_desc": "the caption",
        }
        optimizer = tg.TGD(parameters=[variable], engine=adapter, constraints=list(self.constraints))
        result = StepResult(caption, caption, "textgrad", meta={"constraints": list(self.constraints)})
        try:
            optimizer.step()
        except IndexError:  # the reply lacked the tags; caption_from_reply reads what it can
            pass
        except ChatCallError as e:
            result.error = str(e)
            result.usage["requests"] = e.requests
            return result
        _record_calls(result, adapter.calls)
        new_caption, tags_found, why = caption_from_reply(adapter.calls[-1][1].content, max_words,
                                                          optimizer.new_variable_tags)
        result.tags_missing = not tags_found
        if why is not None:
            result.rejected, result.meta["reason"] = why
        else:
            result.caption = new_caption
        return result

    def _needs_engine(self, critique: Critique) -> bool:
        return (critique.ok and not (critique.approves and not self.revise_approved)
                and not (critique.revision and critique.revision.strip()) and bool(gradient_text(critique)))

    def apply_many(self, captions: Sequence[str], critiques: Sequence[Critique]) -> list[StepResult]:
        """:meth:`apply` over pairs, ``max_concurrency`` at a time; a failing item is recorded, not raised.
        Identical (caption, feedback) items make identical prompts, so each is asked once."""
        if len(captions) != len(critiques):
            raise ValueError(f"{len(captions)} captions but {len(critiques)} critiques: pass one critique per caption")
        if any(self._needs_engine(c) for c in critiques):
            if self.engine is None and not self.revisions_only:
                self.apply(captions[0], next(c for c in critiques if self._needs_engine(c)))  # raises the setup error
            import_textgrad()  # once, before the threads

        def one(pair: tuple[str, Critique]) -> StepResult:
            return self._apply_safely(*pair)

        keys = [(c, k.ok, k.revision, gradient_text(k)) for c, k in zip(captions, critiques)]
        first: dict[tuple, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        unique = list(first.values())
        results = dict(zip(unique, map_concurrently(one, [(captions[i], critiques[i]) for i in unique],
                                                    self.max_concurrency)))
        # A repeat shares its twin's answer but paid nothing itself.
        return [results[i] if first[key] == i else replace(results[first[key]], usage=usage())
                for i, key in enumerate(keys)]

    def refine(self, captions: Sequence[CaptionSet], critiques: Sequence[CritiqueRow], samples_too: bool,
               max_failure_share: float = 1.0, spend: Spend | None = None, done: Sequence[Refinement] = (),
               sink: Callable[[list[Refinement]], None] = lambda rows: None,
               progress: Callable[[int], None] = lambda n: None) -> list[Refinement]:
        """The step stage: each main caption (and each sample, if ``samples_too``) whose critique succeeded,
        ``max_concurrency`` captions in flight with no barrier (``run_requests``).

        With several critiques per caption, each is applied, and the refinement most of them agree on is
        kept only if more than ``min_agreement`` of them do (:meth:`_consensus`). With the ``gate``, a
        refinement that names no object of the vocabulary, or has under a third of the original's words,
        is rejected. ``done``:
        refinements an earlier session recorded; each finished one without an error goes to ``sink``.
        Raises ``TooManyFailures`` as soon as more than ``max_failure_share`` of the steps have failed,
        and ``BudgetExhausted`` when ``spend`` has no calls left (steps that reach the API are paid calls).
        """
        table = samples_by_caption(critiques)
        keys = list(dict.fromkeys((row.image_id, text) for row in captions
                                  for text in (row.texts() if samples_too else [row.caption])
                                  if any(c.ok for c in table[(row.image_id, text)])))
        have = {(r.image_id, r.original): r for r in done}
        todo = [key for key in keys if key not in have]
        progress(len(keys) - len(todo))
        setup = next((c for key in todo for c in table[key] if self._needs_engine(c)), None)
        if setup is not None:
            if self.engine is None and not self.revisions_only:
                self.apply("", setup)  # raises the setup error before any thread starts
            import_textgrad()  # once, before the threads

        def ask(batch: list[tuple[str, str]]) -> list[Refinement]:
            return [self._consensus(image_id, text, [self._apply_safely(text, c) for c in table[(image_id, text)] if c.ok])
                    for image_id, text in batch]

        new = run_requests("textual steps", todo, ask, lambda r: r.usage.get("requests", 0), _failed,
                           len(todo), spend if self.engine is not None else None, max_failure_share, 1,
                           self.max_concurrency,
                           lambda rows: sink([r for r in rows if not r.error]), progress,
                           cost=lambda key: sum(self._needs_engine(c) for c in table[key] if c.ok))
        have.update(((r.image_id, r.original), r) for r in new)
        return [have[key] for key in keys]

    def _apply_safely(self, caption: str, critique: Critique) -> StepResult:
        try:
            return self.apply(caption, critique)
        except Exception as e:  # one bad item must not kill the stage
            log.exception("textual step failed for %r", caption)
            return StepResult(caption, caption, "unchanged", error=f"{type(e).__name__}: {e}")

    def _consensus(self, image_id: str, original: str, results: list[StepResult]) -> Refinement:
        """One refinement from the step results of a caption's critiques: the one they agree on, gated.

        Refinements agree when they name the same objects with the same counts (``refine.objects.mentions``
        under ``vocabulary``), whatever their wording: three noisy rewrites of one caption rarely match
        word for word, but a wrong one rarely names the same wrong objects as another. The winner is the
        commonest wording among the agreeing ones; without a vocabulary, wordings must match exactly.
        """
        spent = {k: sum(r.usage.get(k, 0) for r in results) for k in usage()}
        if len(results) == 1:
            r = results[0]
            out = Refinement(image_id, original, r.caption, r.source, r.rejected, r.meta.get("reason"), r.error,
                             usage=spent)
        elif self.agree_by == "object":
            usable = [r for r in results if not (r.error or r.rejected)]
            refined, votes = vote_objects(original, [r.caption for r in usable], len(results), self.min_agreement,
                                          self.vocabulary)
            first = usable[0] if usable else results[0]
            out = Refinement(image_id, original, refined or original, first.source, votes=votes, of=len(results),
                             usage=spent)
            if not refined:
                out.rejected, out.reason = "no_object", "the objects the critiques agree on leave nothing to say"
        else:
            usable = [(self._content(r.caption), r.caption) for r in results if not (r.error or r.rejected)]
            contents = Counter(content for content, _ in usable)
            content, n = contents.most_common(1)[0] if contents else (None, 0)
            wordings = Counter(text for c, text in usable if c == content)
            refined = wordings.most_common(1)[0][0] if wordings else original
            first = next((r for r in results if r.caption == refined), results[0])
            out = Refinement(image_id, original, refined, first.source, votes=n, of=len(results), usage=spent)
            if refined != original and n / len(results) <= self.min_agreement:
                out.refined, out.rejected = original, "disagreement"
                out.reason = f"{n} of {len(results)} critiques agree on {refined!r}"
        if self.gate and out.refined != original and (why := gate_rejection(original, out.refined, self.vocabulary)):
            out.rejected, out.reason = why
            out.refined = original
        return out

    def _content(self, caption: str) -> Hashable:
        """What agreement compares: the objects named and their counts, or the caption itself."""
        if self.vocabulary is None:
            return caption
        from refine.objects import mentions

        return frozenset(mentions(caption, self.vocabulary).items())


def vote_objects(original: str, refinements: Sequence[str], critiques: int, min_share: float,
                 vocabulary) -> tuple[str, int]:
    """Per-object agreement: each object's count (0: absent) is what more than ``min_share`` of the
    ``critiques`` give it in their ``refinements``; an object without such a majority keeps the
    original's count. Returns the original rewritten to those counts (``refine.objects.rewrite``; "" when
    nothing is left) and the votes behind its weakest change (``critiques`` when it changes nothing).

    Three critiques that each err on a quarter of the objects rarely name the same objects in a dense
    scene, so whole-refinement agreement keeps few pairs; two of them rarely make the same error on the
    same object, so per-object agreement keeps most pairs and drops most single critiques' errors."""
    from refine.objects import mentions, rewrite

    said = mentions(original, vocabulary)
    named = [mentions(text, vocabulary) for text in refinements]
    truth, weakest = {}, critiques
    for label in dict.fromkeys([*said, *(label for m in named for label in m)]):
        count, votes = Counter(m.get(label, 0) for m in named).most_common(1)[0] if named else (0, 0)
        decided = votes / critiques > min_share
        if decided and count != said.get(label, 0):
            weakest = min(weakest, votes)
        value = count if decided else said.get(label, 0)
        if value != 0:
            truth[label] = value
    return (original if truth == said else rewrite(original, truth, vocabulary)), weakest


def gate_rejection(original: str, refined: str, vocabulary) -> tuple[str, str] | None:
    """The pair gate: ``(reason, detail)`` when a refinement cannot be a good training target whatever the
    critic said: it names no object of ``vocabulary`` (``no_object``), or it has fewer than a third of
    the original's words (``too_short``: a rewrite that threw most of the caption away; dropping one
    wrong object of two, "a red circle and a blue square" -> "a red circle", is not that)."""
    from refine.objects import mentions

    if not mentions(refined, vocabulary):
        return "no_object", f"names no object: {refined!r}"
    if 3 * len(refined.split()) < len(original.split()):
        return "too_short", f"{len(refined.split())} words where the caption had {len(original.split())}: {refined!r}"
    return None


def _record_calls(result: StepResult, calls: list[tuple[str, ChatResult]]) -> None:
    for _, call in calls:
        for k, v in call.usage.items():
            result.usage[k] = result.usage.get(k, 0) + v
    if calls:
        prompt, last = calls[-1]
        result.meta["prompt_sha256"] = hashlib.sha256(prompt.encode()).hexdigest()
        result.meta["cache_hit"] = last.cache_hit
        result.meta["raw"] = last.content


def make_step(critic_cfg, step_cfg, loop_cfg, vocabulary=None) -> TextualStep:
    """The run's textual step: with the OpenAI-compatible critic, textgrad through its endpoint; with a
    local critic (grounded, Florence-2), its revisions alone. ``vocabulary``: the image set's, which
    agreement compares refinements by and the pair gate (``loop.pair_gate``) checks them against."""
    from refine.config import DEFAULT_OPENAI_MODEL
    from refine.infra.llm import ChatEngine

    engine = None
    if critic_cfg.backend == "openai":
        engine = ChatEngine(critic_cfg.model or DEFAULT_OPENAI_MODEL, critic_cfg.base_url, critic_cfg.api_key_env,
                            timeout=critic_cfg.timeout, max_retries=critic_cfg.max_retries)
    return TextualStep(engine, step_cfg.max_words, critic_cfg.max_concurrency, revisions_only=engine is None,
                       vocabulary=vocabulary, gate=loop_cfg.pair_gate, min_agreement=loop_cfg.min_agreement,
                       agree_by=loop_cfg.agree_by,
                       revise_approved=step_cfg.revise_approved)
