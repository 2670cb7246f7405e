"""Images lost mid-run: an image read when the set was loaded that cannot be read later (its file gone,
no longer decoding, or rewritten with other bytes: :class:`~refine.images.records.ImageLost`).

Such an image is left out of what remains of the round, with its reason, and never stops the run on its
own: the caption and eval stages give it no row, the critique stage records a failed critique without
asking the critic, and its pairs are dropped before the update. Too many of them stop the run
(``loop.max_failure_share``, as for failed requests): a round of a drive that was unmounted would
pretend to be one. A later round reads each image again, so a file put back is used again.
"""

from __future__ import annotations

from collections.abc import Sequence

from refine.images.records import ImageRecord, present
from refine.stages.critique import TooManyFailures


def readable_rows(rows: list, records: Sequence[ImageRecord], lost: dict[str, str], share: float | None = None,
                  stage: str = "") -> list:
    """The caption (or eval) rows of the images still in the set; the reasons of the others go into
    ``lost`` (a stage's own rows leave out the images it could not read; rows recorded before a resume
    may name an image no longer in the set, or one whose file holds other bytes now). With ``share``,
    raises :class:`TooManyFailures` when more than that share of the images have no row."""
    shas = {r.id: r.sha256 for r in records}
    kept = []
    for row in rows:
        if row.image_id not in shas:
            lost.setdefault(row.image_id, f"{row.image_id}: no longer in the image set")
        elif getattr(row, "sha256", "") not in ("", shas[row.image_id]):
            lost.setdefault(row.image_id, f"{row.image_id}: its bytes changed after the run captioned it")
        else:
            kept.append(row)
    total = len(shas.keys() | {row.image_id for row in rows})
    if share is not None and total - len(kept) > share * total:
        raise TooManyFailures(stage, total - len(kept), total, next(iter(lost.values()), "unreadable images"))
    return kept


def readable_pairs(pairs: list, records: Sequence[ImageRecord], captions: Sequence, lost: dict[str, str],
                   share: float) -> list:
    """The pairs whose image has a caption row this round (:func:`readable_rows` kept it) and is still
    there (:func:`~refine.images.records.present`: one ``stat`` a file, a read only if it changed). The main process decides before it hands the pairs out:
    in a data-parallel run every process trains on the same ones. Raises :class:`TooManyFailures` when
    more than ``share`` of the pairs' images are lost."""
    captioned = {c.image_id for c in captions}
    by_id = {r.id: r for r in records if r.id in captioned}
    ids = list(dict.fromkeys(p.image_id for p in pairs))
    ok = {i for i in ids if i in by_id and present(by_id[i], lost)}
    if len(ids) - len(ok) > share * len(ids):
        raise TooManyFailures("images of the update", len(ids) - len(ok), len(ids),
                              next(iter(lost.values()), "unreadable images"))
    return [p for p in pairs if p.image_id in ok]


def lost_metrics(lost: dict[str, str], lost_eval: dict[str, str]) -> dict[str, int | str]:
    """The round summary's account of them: counts, and the first reason of each (for its note)."""
    out: dict[str, int | str] = {}
    for prefix, reasons in (("images", lost), ("eval", lost_eval)):
        if reasons:
            out[f"{prefix}/lost"], out[f"{prefix}/lost_first"] = len(reasons), next(iter(reasons.values()))
    return out


def gone_since(log, ids: set[str], loop) -> str | None:
    """On a resume: the images the run has used (round 0's, and the slice of the round in progress) that
    are not among ``ids``, the set as loaded now. More than ``loop.max_failure_share`` of them gone is an
    input error (``ValueError``, before anything is written); fewer, a note: the run goes on without them."""
    notes = []
    for k, name in ((0, "captions"), (log.completed_rounds(), "images")):
        if not log.has_stage(k, name):
            continue
        had = {r["image_id"] for r in log.read_stage(k, name)}
        gone = sorted(had - ids)
        some = (f"{len(gone)} of round {k}'s {len(had)} images are no longer in {loop.images} "
                f"({', '.join(gone[:3])}{', ...' if len(gone) > 3 else ''})")
        if len(gone) > loop.max_failure_share * len(had):
            raise ValueError(f"--resume {log.root}: {some}, more than loop.max_failure_share={loop.max_failure_share}; "
                             "restore them, or start a new run")
        if gone:
            notes.append(some)
    return "; ".join(notes) + "; the run goes on without them" if notes else None
