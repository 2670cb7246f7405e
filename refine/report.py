"""``python -m refine.report RUN``: one self-contained HTML page for a run, ``runs/<id>/report.html``.

The page holds everything (images as data URIs, plots as SVG, a few lines of JavaScript; nothing is
fetched): the run's config; a plot per round metric (critic score, CHAIR, recall, losses, reward
margin, time per stage); and a card per image with its thumbnail and the regions stage's boxes, its
caption in every round, the critique of that caption, the refinement it led to, and the pairs it made.
Filters show only the images whose student caption changed between rounds, whose critique failed, or
whose hallucinations rose (the critic's count of named-but-absent objects, first round against last). Cards are drawn a
page at a time from data embedded in the file. A page holds at most ``--max-images`` cards (1,000, about
18 MB with their thumbnails; a card is ~18 kB): those whose hallucinations rose, whose critique failed, or
whose caption changed first, then a fixed sample of the rest; the summary counts every image of the run.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from refine.infra.atomic import atomic_write_text, read_jsonl
from refine.infra.runlog import RunLog

THUMB = 224  # px, the longer side of a card's thumbnail
PAGE = 40  # cards per page
MAX_CARDS = 1000  # cards in a page by default (0: every image's)
PLOTS = [  # (title, metric keys); a plot appears when any of its keys was recorded
    ("critic mean score", ["critic/mean_score"]),
    ("CHAIR", ["train/chair_s", "train/chair_i", "eval/chair_s", "eval/chair_i"]),
    ("recall", ["train/recall", "eval/recall"]),
    ("update losses", ["update/loss", "update/dpo_loss", "update/nll", "update/sft/loss"]),
    ("reward margin", ["update/rewards/margins"]),
    ("pairs", ["pairs/total"]),
]
COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"]


def svg_plot(title: str, series: dict[str, list[tuple[int, float]]], width: int = 360, height: int = 200,
             final: int | None = None) -> str:
    """A line chart (rounds on x) as inline SVG, with a legend and the y range written out. ``final``: the
    round whose point is the final student's (after the last round's update), labelled so."""
    points = [v for values in series.values() for _, v in values]
    rounds = [k for values in series.values() for k, _ in values]
    lo, hi = min(points), max(points)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    left, right, top, bottom = 44, 10, 24, 20 + 14 * len(series)
    k0, k1 = min(rounds), max(max(rounds), min(rounds) + 1)

    def xy(k: int, v: float) -> tuple[float, float]:
        return (left + (k - k0) / (k1 - k0) * (width - left - right),
                top + (hi - v) / (hi - lo) * (height - top - bottom))

    parts = [f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<text x="{left}" y="14" class="title">{html.escape(title)}</text>',
             f'<text x="{left - 4}" y="{top + 4}" class="axis" text-anchor="end">{hi:.3g}</text>',
             f'<text x="{left - 4}" y="{height - bottom}" class="axis" text-anchor="end">{lo:.3g}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" class="frame"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="frame"/>']
    for k in range(k0, k1 + 1):
        x, _ = xy(k, lo)
        label, anchor = (f"{k} (final)", "end" if k == k1 else "middle") if k == final else (str(k), "middle")
        parts.append(f'<text x="{x + 4 * (anchor == "end"):.1f}" y="{height - bottom + 12}" class="axis" '
                     f'text-anchor="{anchor}">{label}</text>')
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(k, v) for k, v in values))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>{html.escape(name)} round {k}'
                  f'{" (final)" if k == final else ""}: {v:.4g}</title></circle>' for k, v in values for x, y in [xy(k, v)]]
        y = height - bottom + 26 + 14 * i
        parts.append(f'<rect x="{left}" y="{y - 8}" width="10" height="3" fill="{colour}"/>'
                     f'<text x="{left + 14}" y="{y - 4}" class="axis">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def plots(metrics: list[dict[str, Any]]) -> list[str]:
    out = []
    groups = list(PLOTS) + [("seconds per stage", sorted({k for m in metrics for k in m if k.startswith("time/")}))]
    final = next((m["round"] for m in metrics if m.get("final")), None)  # as refine.runs show labels it
    for title, keys in groups:
        series = {key: [(m["round"], float(m[key])) for m in metrics if isinstance(m.get(key), int | float)]
                  for key in keys}
        series = {k: v for k, v in series.items() if v}
        if series:
            out.append(svg_plot(title, series, final=final))
    return out


def thumbnail(image: Image.Image | None, detections: list[dict[str, Any]]) -> str:
    """A JPEG data URI of the image at most ``THUMB`` px wide or high, with the detections drawn."""
    if image is None:
        return ""
    scale = min(1.0, THUMB / max(image.size))
    thumb = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    draw = ImageDraw.Draw(thumb)
    for det in detections:
        x0, y0, x1, y1 = (v * scale for v in det["box"])
        draw.rectangle((x0, y0, x1, y1), outline=(255, 64, 0), width=2)
        draw.text((x0 + 2, y0 + 1), f"{det['label']} {det['score']:.2f}", fill=(255, 255, 0))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _safe_thumbnail(images: dict[str, Any], image_id: str, detections: list[dict[str, Any]]) -> str:
    """The card's thumbnail, or none when the image no longer loads (moved, truncated since the run)."""
    try:
        return thumbnail(images.get(image_id), detections)
    except (ValueError, OSError):
        return ""


def _rows(log: RunLog, k: int, name: str) -> list[dict[str, Any]]:
    path = log.stage_path(k, name)
    return read_jsonl(path) if path.exists() else []


def flags(log: RunLog) -> dict[str, dict[str, bool]]:
    """Per image of the run, what the filters and the summary count: ``changed`` (its student caption
    changed between rounds), ``failed`` (a critique of it failed), ``rose`` (its hallucinations, first round
    against last). One round's rows in memory at a time."""
    state: dict[str, list] = {}  # image id: [first caption, changed, failed, first count, last count]
    for k in log.rounds_with("captions"):
        critiques = {(r["image_id"], r["caption"]): r["critique"] for r in _rows(log, k, "critiques")
                     if r.get("sample", 0) == 0}
        for row in _rows(log, k, "captions"):
            c = critiques.get((row["image_id"], row["caption"])) or {}
            caption, hallucinated = row["caption"].strip(), len(c.get("hallucinated", []))
            f = state.setdefault(row["image_id"], [caption, False, False, hallucinated, 0])
            f[1], f[2], f[4] = f[1] or caption != f[0], f[2] or bool(c.get("error")), hallucinated
    return {i: {"changed": f[1], "failed": f[2], "rose": f[4] > f[3]} for i, f in state.items()}


def chosen(flagged: dict[str, dict[str, bool]], keep: int) -> set[str]:
    """The ``keep`` images a page shows (0: all): those whose hallucinations rose, then whose critique
    failed, then whose caption changed, then the rest in a fixed order that does not follow the ids'."""
    if not keep or len(flagged) <= keep:
        return set(flagged)

    def rank(image_id: str) -> tuple:
        f = flagged[image_id]
        return not f["rose"], not f["failed"], not f["changed"], hashlib.sha256(image_id.encode()).digest()

    return set(sorted(flagged, key=rank)[:keep])


def cards(log: RunLog, images: dict[str, Any], flagged: dict[str, dict[str, bool]] | None = None,
          only: set[str] | None = None) -> list[dict[str, Any]]:
    """One card per image (of ``only``, if given): its rounds (caption, critique, refinement, pairs) and
    its filter flags (``flagged``, from :func:`flags`)."""
    flagged = flags(log) if flagged is None else flagged
    wanted = (lambda image_id: True) if only is None else only.__contains__
    rounds = log.rounds_with("captions")
    by_image: dict[str, dict[str, Any]] = defaultdict(lambda: {"rounds": []})
    detections: dict[str, list] = {}
    for k in rounds:
        critiques = {(r["image_id"], r["caption"]): r["critique"] for r in _rows(log, k, "critiques")
                     if r.get("sample", 0) == 0 and wanted(r["image_id"])}
        refined = {(r["image_id"], r["original"]): r for r in _rows(log, k, "refined") if wanted(r["image_id"])}
        pairs: dict[str, list] = defaultdict(list)
        for p in _rows(log, k, "pairs"):
            if wanted(p["image_id"]):
                pairs[p["image_id"]].append({"chosen": p["chosen"], "rejected": p["rejected"], "source": p["source"]})
        for r in _rows(log, k, "regions"):
            if wanted(r["image_id"]):
                detections[r["image_id"]] = r.get("detections", [])
        for row in _rows(log, k, "captions"):
            if not wanted(row["image_id"]):
                continue
            key = (row["image_id"], row["caption"])
            c, ref = critiques.get(key) or {}, refined.get(key) or {}
            by_image[row["image_id"]]["rounds"].append({
                "round": k, "caption": row["caption"], "samples": row.get("samples", []),
                "score": c.get("score"), "feedback": c.get("feedback", ""), "hallucinated": c.get("hallucinated", []),
                "missing": c.get("missing", []), "count_errors": c.get("count_errors", {}), "error": c.get("error"),
                "refined": ref.get("refined"), "source": ref.get("source"), "rejected": ref.get("rejected"),
                "reason": ref.get("reason"), "pairs": pairs.get(row["image_id"], []),
            })
    out = []
    for image_id, card in by_image.items():
        card.update(id=image_id, thumb=_safe_thumbnail(images, image_id, detections.get(image_id, [])),
                    detections=[f"{d['label']} {d['score']:.2f}" for d in detections.get(image_id, [])],
                    **flagged[image_id])
        out.append(card)
    return out


def strict_json(value: Any) -> Any:
    """``value`` with NaN and infinities as None: the page parses its data with JSON.parse, which takes
    no NaN (a failed critique's score is NaN in the run's files)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def render(log: RunLog, images: dict[str, Any] | None = None, max_cards: int = MAX_CARDS) -> str:
    config = log.config
    metrics = log.metrics()
    flagged = flags(log)
    data = cards(log, images or {}, flagged, chosen(flagged, max_cards))
    blob = json.dumps(strict_json(data), ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    title = f"refine run {log.root.name}"
    count = {k: sum(f[k] for f in flagged.values()) for k in ("changed", "failed", "rose")}
    summary = (f"{len(flagged)} images, {len(metrics)} round(s), status: {log.status()}; "
               f"{count['changed']} whose student caption changed, {count['failed']} with a failed critique, "
               f"{count['rose']} whose hallucinations rose")
    if len(data) < len(flagged):
        summary += (f". This page shows {len(data)} of them: those whose hallucinations rose, whose critique failed "
                    "or whose caption changed first, then a fixed sample of the rest (--max-images 0: all)")
    return _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__SUMMARY__", html.escape(summary)) \
        .replace("__PLOTS__", "".join(plots(log.metrics(final=True))) or "<p>No completed round yet.</p>") \
        .replace("__CONFIG__", html.escape(json.dumps(config, indent=2, ensure_ascii=False))) \
        .replace("__PAGE__", str(PAGE)).replace("__DATA__", blob)


def load_pixels(log: RunLog) -> dict[str, Any]:
    """The run's images by id (from its image set, as the config names it), or {} if they are gone."""
    from refine.images import load_images
    from refine.images.hf import Columns

    loop = log.config.get("loop", {})
    try:
        images = load_images(loop["images"], loop.get("coco_root") or None,
                             columns=Columns(loop.get("image_column", ""), loop.get("caption_column", ""),
                                             loop.get("objects_column", "")))
    except (ValueError, OSError, KeyError) as e:
        print(f"note: no thumbnails ({e})", file=sys.stderr)
        return {}
    return images.pixels()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m refine.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run id (under --runs-dir) or a run directory")
    parser.add_argument("--runs-dir", default="runs", help="where runs live (default: runs)")
    parser.add_argument("--out", type=Path, help="where to write the page (default: RUN/report.html)")
    parser.add_argument("--max-images", type=int, default=MAX_CARDS, metavar="N",
                        help=f"cards in the page, about 18 kB each (default: {MAX_CARDS}; 0: every image)")
    args = parser.parse_args(argv)
    if args.max_images < 0:
        print(f"error: --max-images {args.max_images}: give the number of cards the page holds, or 0 for every image",
              file=sys.stderr)
        return 2
    try:
        log = RunLog.open(args.run, args.runs_dir)
        page = render(log, load_pixels(log), args.max_images)
    except (FileNotFoundError, ValueError) as e:  # no such run; its config.json damaged
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or log.root / "report.html"
    folder = Path(out).parent
    if not folder.is_dir():  # atomic_write_text would make it: a mistyped path would go unnoticed
        print(f"error: cannot write the report to {out}: {folder} {'is a file' if folder.exists() else 'does not exist'}"
              "; pass --out PATH in an existing folder", file=sys.stderr)
        return 2
    try:
        atomic_write_text(out, page)
    except OSError as e:  # --out in a folder that is not writable, a full disk
        print(f"error: cannot write the report to {out}: {e.strerror or e}; pass --out PATH in a writable folder",
              file=sys.stderr)
        return 2
    print(f"written: {out}")
    return 0


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#111;background:#f6f7f9}
header{padding:16px 24px;background:#111827;color:#fff}header h1{margin:0 0 4px;font-size:20px}
main{padding:16px 24px}h2{font-size:16px;margin:20px 0 8px}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{background:#fff;border:1px solid #e5e7eb;border-radius:6px}
.plot .title{font-weight:600;font-size:12px}.plot .axis{font-size:10px;fill:#4b5563}.plot .frame{stroke:#9ca3af}
.controls{display:flex;gap:16px;align-items:center;margin:8px 0;flex-wrap:wrap}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:10px;display:flex;gap:10px}
.card img{max-width:224px;max-height:224px;border-radius:4px;align-self:flex-start}
.card h3{margin:0 0 4px;font-size:13px;word-break:break-all}.rounds{flex:1;min-width:0}
.round{border-top:1px solid #f0f0f0;padding:4px 0;font-size:12px}.cap{font-weight:600}
.bad{color:#b91c1c}.good{color:#15803d}.muted{color:#6b7280}.tag{font-size:11px;padding:0 4px;border-radius:3px;background:#eef2ff}
pre{background:#fff;border:1px solid #e5e7eb;padding:8px;overflow:auto;max-height:320px;font-size:12px}
button{padding:2px 10px}
</style></head><body>
<header><h1>__TITLE__</h1><div>__SUMMARY__</div></header>
<main>
<h2>Rounds</h2><div class="plots">__PLOTS__</div>
<h2>Images</h2>
<div class="controls">
 <label><input type="checkbox" id="f-changed"> student caption changed</label>
 <label><input type="checkbox" id="f-failed"> critique failed</label>
 <label><input type="checkbox" id="f-rose"> hallucinations rose</label>
 <input type="search" id="f-text" placeholder="image id or caption text">
 <button id="prev">&larr;</button><span id="page"></span><button id="next">&rarr;</button>
</div>
<div class="cards" id="cards"></div>
<h2>Config</h2><pre>__CONFIG__</pre>
</main>
<script type="application/json" id="data">__DATA__</script>
<script>
const DATA = JSON.parse(document.getElementById('data').textContent), PAGE = __PAGE__;
let page = 0;
const esc = s => String(s ?? '').replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
function shown() {
  const want = k => document.getElementById('f-' + k).checked, q = document.getElementById('f-text').value.toLowerCase();
  return DATA.filter(c => (!want('changed') || c.changed) && (!want('failed') || c.failed) && (!want('rose') || c.rose)
    && (!q || c.id.toLowerCase().includes(q) || c.rounds.some(r => r.caption.toLowerCase().includes(q))));
}
function round(r) {
  const errs = [...r.hallucinated.map(h => 'not there: ' + h), ...r.missing.map(m => 'missing: ' + m),
    ...Object.entries(r.count_errors).map(([k, v]) => k + ': said ' + v[0] + ', is ' + v[1])];
  const score = r.error ? '<span class="bad">critique failed: ' + esc(r.error) + '</span>'
    : (r.score == null ? '' : 'score ' + Number(r.score).toFixed(2));
  const ref = r.refined && r.refined !== r.caption ? '<div class="good">&rarr; ' + esc(r.refined) + ' <span class="tag">' + esc(r.source) + '</span></div>'
    : (r.rejected ? '<div class="muted">refinement rejected: ' + esc(r.rejected) + (r.reason ? ' (' + esc(r.reason) + ')' : '') + '</div>' : '');
  return '<div class="round"><span class="tag">round ' + r.round + '</span> <span class="cap">' + esc(r.caption) + '</span> ' + score
    + (errs.length ? '<div class="bad">' + esc(errs.join('; ')) + '</div>' : '')
    + (r.feedback ? '<div class="muted">' + esc(r.feedback) + '</div>' : '') + ref
    + (r.pairs.length ? '<div class="muted">' + r.pairs.length + ' pair(s): ' + r.pairs.map(p => esc(p.chosen) + ' &#8827; ' + esc(p.rejected)).join(' | ') + '</div>' : '')
    + '</div>';
}
function draw() {
  const cards = shown(), pages = Math.max(1, Math.ceil(cards.length / PAGE));
  page = Math.min(page, pages - 1);
  document.getElementById('page').textContent = ' page ' + (page + 1) + ' of ' + pages + ' (' + cards.length + ' images) ';
  document.getElementById('cards').innerHTML = cards.slice(page * PAGE, (page + 1) * PAGE).map(c =>
    '<div class="card">' + (c.thumb ? '<img loading="lazy" alt="' + esc(c.id) + '" src="' + c.thumb + '">' : '')
    + '<div class="rounds"><h3>' + esc(c.id) + '</h3>' + (c.detections.length ? '<div class="muted">detected: ' + esc(c.detections.join(', ')) + '</div>' : '')
    + c.rounds.map(round).join('') + '</div></div>').join('');
}
for (const id of ['f-changed', 'f-failed', 'f-rose', 'f-text']) document.getElementById(id).addEventListener('input', () => { page = 0; draw(); });
document.getElementById('prev').onclick = () => { page = Math.max(0, page - 1); draw(); };
document.getElementById('next').onclick = () => { page += 1; draw(); };
draw();
</script></body></html>
"""

if __name__ == "__main__":
    sys.exit(main())
