"""The caption and eval stages: the student (any architecture, ``refine.students``) captions an image set.

The caption stage gives each image its main caption (greedy or beam) and sampled ones; the eval stage
greedy captions of a held-out set. Both share one batched loop that streams rows to the run log, and,
in a data-parallel run, shares the batches between processes (:func:`_streamed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from refine.images.records import readable
from refine.students import (  # noqa: F401  (the student interface, re-exported for the stages' callers)
    CaptionScorer,
    FastSampling,
    Student,
    TokenizedCaptions,
    image_seed,
    image_uniforms,
    load_student,
)

# -- the caption and eval stages ---------------------------------------------------------------------

@dataclass
class CaptionSet:
    """The caption stage's row for one image: the main caption (greedy or beam) and the sampled ones."""

    image_id: str
    caption: str
    samples: list[str] = field(default_factory=list)
    sha256: str = ""  # of the image it captioned: a resume tells a file rewritten since (older runs: "")

    def texts(self) -> list[str]:
        return [self.caption, *self.samples]


@dataclass
class EvalCaption:
    """The eval stage's row: a held-out image's greedy caption, with its truth for the object metrics."""

    image_id: str
    caption: str
    objects: dict[str, int] | None = None


def caption_batches(student: Student, records: Sequence, cfg, samples: int = 0, num_beams: int = 1,
                    progress: Callable[[int], None] = lambda n: None, seed: int = 0,
                    lost: dict[str, str] | None = None):
    """Yield one list of ``(record, main caption, sampled captions)`` per ``cfg.batch_size`` images, in
    order: the main caption with ``num_beams`` (1 = greedy), then ``samples`` sampled ones per image,
    drawn from a generator per image seeded by ``(seed, image id)``. Pixels are decoded a batch at a
    time; an image that can no longer be read (:class:`~refine.images.records.ImageLost`) is left out,
    its reason put in ``lost``."""
    for i in range(0, len(records), cfg.batch_size):
        decoded = [(r, readable(r, lost)) for r in records[i : i + cfg.batch_size]]
        batch = [r for r, image in decoded if image is not None]
        images = [image for _, image in decoded if image is not None]
        if not batch:
            progress(len(decoded))
            continue
        main = student.caption(images, num_beams=num_beams, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        sampled = (student.caption(images, n=samples, sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                   seeds=[image_seed(seed, r.id) for r in batch])
                   if samples else [[] for _ in batch])
        yield [(record, m[0], s) for record, m, s in zip(batch, main, sampled)]
        progress(len(decoded))


def _streamed(records: Sequence, done: Sequence, batches, make, sink, batch_size: int, ranks=None,
              progress: Callable[[int], None] = lambda n: None) -> list:
    """Rows for ``records`` in order: ``done`` ones as recorded, the rest from ``batches(todo)`` (made
    into rows by ``make``), each batch given to ``sink`` as it finishes.

    With ``ranks`` (a data-parallel run), the todo is cut into chunks of ``world`` batches; each process
    captions its batch of a chunk, and every process gets the chunk's rows. A batch is then exactly the
    batch one process would caption, so the rows are those of a one-process run.
    """
    have = {row.image_id: row for row in done}
    todo = [r for r in records if r.id not in have]
    world = ranks.world if ranks is not None else 1
    for i in range(0, len(todo), batch_size * world):
        chunk = todo[i : i + batch_size * world]
        mine = ranks.shard(chunk, batch_size) if world > 1 else chunk
        rows = [make(*item) for part in batches(mine) for item in part]
        if world > 1:
            rows = [row for part in ranks.gather(rows) for row in part]
        sink(rows)
        progress(len(chunk))
        have.update((row.image_id, row) for row in rows)
    return [have[r.id] for r in records if r.id in have]  # an image no process could read has no row


def caption(student: Student, records: Sequence, cfg, seed: int = 0,
            progress: Callable[[int], None] = lambda n: None, done: Sequence[CaptionSet] = (),
            sink: Callable[[list[CaptionSet]], None] = lambda rows: None, ranks=None,
            lost: dict[str, str] | None = None) -> list[CaptionSet]:
    """The caption stage: the main caption plus ``cfg.n_samples`` sampled captions per image, in record
    order. An image's samples depend only on ``seed`` (the loop passes one per run seed and round) and
    its id, not on the order, batching, chunking or process of the images. ``done``: rows an earlier
    session recorded (not captioned again); each finished batch goes to ``sink``. ``ranks``: see
    :func:`_streamed`. An image that can no longer be read has no row (its reason goes in ``lost``)."""
    progress(len({row.image_id for row in done}))
    return _streamed(records, done, lambda todo: caption_batches(student, todo, cfg, cfg.n_samples, cfg.num_beams,
                                                                  seed=seed, lost=lost),
                     lambda r, main, samples: CaptionSet(r.id, main, samples, r.sha256), sink, cfg.batch_size, ranks, progress)


def evaluate(student: Student, records: Sequence, cfg, done: Sequence[EvalCaption] = (),
             sink: Callable[[list[EvalCaption]], None] = lambda rows: None, ranks=None,
             lost: dict[str, str] | None = None) -> list[EvalCaption]:
    """The eval stage: greedy captions; rows carry the truth, so metrics need nothing else. An image that
    can no longer be read has no row (its reason goes in ``lost``)."""
    return _streamed(records, done, lambda todo: caption_batches(student, todo, cfg, lost=lost),
                     lambda r, main, _: EvalCaption(r.id, main, r.objects), sink, cfg.batch_size, ranks)
