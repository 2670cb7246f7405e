"""The round's stages as functions from inputs to JSON rows, so the loop can record and resume them.

Each function calls into the module that owns the work (student, regions, critics, step, pairs, dpo)
and turns its result into rows for ``runs/<id>/rounds/<k>/<stage>.jsonl``. None of them write files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from critics.base import Critic, Critique, CritiqueRequest
from refine import pairs as pairs_mod
from refine.images import ImageRecord

Rows = list[dict[str, Any]]
Progress = Callable[[int], None]


class BudgetExhausted(Exception):
    """The critic-call budget ran out mid-stage. Finished critiques are in the disk cache."""

    def __init__(self, calls: int):
        super().__init__(f"critic-call budget exhausted after {calls} calls")
        self.calls = calls


class TooManyFailures(Exception):
    """More of a stage's requests failed than ``loop.max_failure_share`` allows. Nothing of the stage is
    recorded; the answers that did arrive are in the disk cache, so a resume asks only the failed ones."""

    def __init__(self, stage: str, failures: int, total: int, first_error: str, critic_calls: int = 0):
        super().__init__(f"{failures} of {total} {stage} failed; the first error: {first_error}")
        self.stage, self.failures, self.total, self.first_error = stage, failures, total, first_error
        self.critic_calls = critic_calls


def check_failures(stage: str, errors: Sequence[str | None], max_share: float, critic_calls: int = 0) -> None:
    """Raise :class:`TooManyFailures` when the share of non-None ``errors`` exceeds ``max_share``."""
    failed = [e for e in errors if e is not None]
    if failed and len(failed) / len(errors) > max_share:
        raise TooManyFailures(stage, len(failed), len(errors), failed[0], critic_calls)


def caption(student, records: Sequence[ImageRecord], cfg, progress: Progress = lambda n: None) -> Rows:
    """Main caption (greedy or beam) plus ``cfg.n_samples`` sampled captions per image."""
    rows = []
    for i in range(0, len(records), cfg.batch_size):
        batch = [r.image for r in records[i : i + cfg.batch_size]]
        main = student.caption(batch, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        samples = (
            student.caption(batch, n=cfg.n_samples, sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
            if cfg.n_samples else [[] for _ in batch]
        )
        for record, m, s in zip(records[i : i + cfg.batch_size], main, samples):
            rows.append({"image_id": record.id, "caption": m[0], "samples": s})
        progress(len(batch))
    return rows


def critique(
    critic: Critic,
    records: Sequence[ImageRecord],
    captions: Rows,
    regions: dict[str, Any],
    budget: int | None = None,
    chunk: int = 32,
    progress: Progress = lambda n: None,
    max_failure_share: float = 1.0,
) -> tuple[Rows, int]:
    """Critique every distinct (image, caption). Returns ``(rows, critic calls made)``.

    ``budget`` caps calls that miss the cache; hits are free. When it runs out, raises
    :class:`BudgetExhausted` after the calls it did make are cached, so a resume re-asks nothing.
    Raises :class:`TooManyFailures` as soon as more than ``max_failure_share`` of the stage's critiques
    have failed (the stage can then no longer succeed); failures are never cached, so a resume asks
    them again.
    """
    by_id = {r.id: r for r in records}
    requests, seen = [], set()
    for row in captions:
        record = by_id[row["image_id"]]
        for text in [row["caption"], *row["samples"]]:
            if (record.id, text) not in seen:
                seen.add((record.id, text))
                requests.append(CritiqueRequest(record.id, record.image, record.sha256, text,
                                                regions.get(record.id), record.objects))
    rows, calls = [], 0
    i = 0
    while i < len(requests):
        take = chunk if budget is None else min(chunk, budget - calls)
        if take <= 0:
            raise BudgetExhausted(calls)
        batch = requests[i : i + take]
        for request, result in zip(batch, critic.critique_many(batch)):
            calls += 0 if result.meta.get("cache_hit") else 1
            rows.append({"image_id": request.image_id, "caption": request.caption, "critique": result.to_json()})
        progress(len(batch))
        i += take
        errors = [r["critique"]["error"] for r in rows]
        failed = [e for e in errors if e is not None]
        if failed and (len(failed) > max_failure_share * len(requests) or i >= len(requests)):
            check_failures("critiques", errors + [None] * (len(requests) - len(rows)), max_failure_share, calls)
    return rows, calls


def critiques_by_caption(rows: Rows) -> dict[tuple[str, str], Critique]:
    return {(r["image_id"], r["caption"]): Critique.from_json(r["critique"]) for r in rows}


def refine_captions(
    captions: Rows, critiques: Rows, apply_many: Callable[[list[tuple[str, Critique]]], list], samples_too: bool,
    max_failure_share: float = 1.0,
) -> Rows:
    """The textual step on each main caption (and each sample, if ``samples_too``) whose critique succeeded.

    Rows carry the refined caption (the original when nothing was applied) and why: the step's source,
    its rejection reason (a reply that was not a caption) and its error (a failed call). Raises
    :class:`TooManyFailures` when more than ``max_failure_share`` of the steps failed.
    """
    table = critiques_by_caption(critiques)
    todo = list(dict.fromkeys(
        (row["image_id"], text)
        for row in captions
        for text in ([row["caption"], *row["samples"]] if samples_too else [row["caption"]])
        if table[(row["image_id"], text)].ok
    ))
    results = apply_many([(text, table[(image_id, text)]) for image_id, text in todo])
    check_failures("textual steps", [r.error for r in results], max_failure_share)
    return [{"image_id": image_id, "original": text, "refined": r.caption, "source": r.source,
             "rejected": r.rejected, "reason": r.meta.get("reason"), "error": r.error}
            for (image_id, text), r in zip(todo, results)]


def make_step(critic_cfg, step_cfg) -> Callable[[list[tuple[str, Critique]]], list]:
    """The textual step for the configured critic: its own revisions, else textgrad via our chat engine.
    Returns ``apply_many(items) -> [StepResult]``."""
    from critics import DEFAULT_MODELS
    from refine import step

    engine = None
    if critic_cfg.backend == "openai":
        engine = step.ChatEngine(critic_cfg.model or DEFAULT_MODELS["openai"], critic_cfg.base_url,
                                 critic_cfg.api_key_env, timeout=critic_cfg.timeout, max_retries=critic_cfg.max_retries)
    step.default_constraints(step_cfg.max_words)  # a broken prompts/step.txt fails now, before any paid call

    def apply_many(items: list[tuple[str, Critique]]) -> list:
        if engine is None:  # local critics: a critique without a revision leaves the caption as it is
            items = [(c, k if k.revision else Critique(k.score, "", error=k.error)) for c, k in items]
        return step.apply_many([c for c, _ in items], [k for _, k in items], engine,
                               max_words=step_cfg.max_words, max_concurrency=critic_cfg.max_concurrency)

    return apply_many


def build_pairs(captions: Rows, critiques: Rows, refined: Rows, sources: str, swap: bool = False) -> Rows:
    """Preference pairs: refined ≻ original, and best ≻ worst of the critic-scored captions."""
    table = critiques_by_caption(critiques)
    out: list[pairs_mod.PreferencePair] = []
    if "refined" in sources:
        for row in refined:
            out += pairs_mod.refined_pairs(row["image_id"], row["original"], row["refined"])
    if "ranked" in sources:
        for row in captions:
            scored = [(t, table[(row["image_id"], t)].score) for t in [row["caption"], *row["samples"]]
                      if table[(row["image_id"], t)].ok]
            out += pairs_mod.ranked_pairs(row["image_id"], scored)
    rows = [asdict(p) for p in pairs_mod.dedupe(out)]
    if swap:  # the control experiment: the same pairs, preference reversed
        rows = [{**r, "chosen": r["rejected"], "rejected": r["chosen"], "source": r["source"] + ":swapped"} for r in rows]
    return rows


def mean_score(critique_rows: Rows) -> float:
    scores = [r["critique"]["score"] for r in critique_rows if r["critique"]["error"] is None]
    return sum(scores) / len(scores) if scores else float("nan")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize_round(
    k: int, records: Sequence[ImageRecord], captions: Rows, critiques: Rows, refined: Rows, pairs: Rows,
    history: Rows, evaluation: Rows,
) -> dict[str, Any]:
    """The per-round summary written to ``metrics.json`` and shown after each round."""
    from refine.evaluate import metrics_of_rows, object_metrics

    ok = [r["critique"] for r in critiques if r["critique"]["error"] is None]
    usage = [r["critique"].get("usage", {}) for r in critiques]
    metrics: dict[str, Any] = {
        "round": k,
        "images": len(records),
        "critic/mean_score": mean_score(critiques),
        "critic/critiques": len(critiques),
        "critic/failures": len(critiques) - len(ok),
        "critic/cache_hits": sum(1 for r in critiques if r["critique"]["meta"].get("cache_hit")),
        "critic/requests": sum(u.get("requests", 0) for u in usage),
        "critic/tokens": sum(u.get("prompt_tokens", 0) + u.get("completion_tokens", 0) for u in usage),
        "step/changed": sum(1 for r in refined if r["refined"].strip() != r["original"].strip()),
        "step/rejected": sum(1 for r in refined if r.get("rejected")),
        **{f"step/rejected/{why}": sum(1 for r in refined if r.get("rejected") == why)
           for why in sorted({r["rejected"] for r in refined if r.get("rejected")})},
        "step/errors": sum(1 for r in refined if r.get("error")),
        "pairs/total": len(pairs),
        **{f"pairs/{s}": sum(1 for p in pairs if p["source"] == s) for s in sorted({p["source"] for p in pairs})},
    }
    if history:
        last = history[-max(1, len(history) // 10):]  # the round's final tenth of steps
        metrics["update/steps"] = len(history)
        metrics.update({f"update/{key}": _mean([h[key] for h in last]) for key in history[0]})
    known = [r for r in records if r.objects is not None]
    if known:
        main = {row["image_id"]: row["caption"] for row in captions}
        metrics.update({f"train/{key}": v for key, v in object_metrics([main[r.id] for r in known], [r.objects for r in known]).items()})
    if evaluation:
        metrics.update({f"eval/{key}": v for key, v in metrics_of_rows(evaluation).items()})
    return metrics
