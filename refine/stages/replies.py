"""Is a reply a caption? Whatever its source (a critic's revision, a textgrad step), a refined caption
becomes a training target, so it must *be* a caption (:func:`rejection`): one sentence within the word
limit, not a refusal ("I'm sorry, but I can't help with that."), not chatter about the task ("Sure!
Here is the improved caption:"). :func:`caption_from_reply` reads the caption out of an optimizer reply.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

DEFAULT_MAX_WORDS = 20
# A refinement may run this much over ``max_words`` (rounded up): models count words loosely, but a
# 23-word "caption" under a 20-word limit is not following the instruction.
WORD_TOLERANCE = 0.1
IMPROVED_TAGS = ("<IMPROVED_VARIABLE>", "</IMPROVED_VARIABLE>")  # textgrad's default new_variable_tags


_LABEL = re.compile(r"^(?:improved|refined|revised|new|corrected)?\s*(?:caption|variable)\s*:\s*", re.I)


def clean_caption(text: str) -> str:
    """One line of caption text: code fences, 'Caption:' labels, wrapping quotes and extra spaces removed."""
    text = re.sub(r"```\w*", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = _LABEL.sub("", lines[0]) if lines else ""
    line = line.strip().strip("\"'“”‘’`").strip()
    return re.sub(r"\s+", " ", line)


def _improved_body(response: str, tags: Sequence[str]) -> tuple[str, bool]:
    """The raw text the caption comes from, and whether both tags were there."""
    start, end = tags
    if start in response and end in response.split(start, 1)[1]:
        return response.split(start, 1)[1].split(end, 1)[0], True
    if start in response:
        return response.split(start, 1)[1], False
    if end in response:
        return response.split(end, 1)[0], False
    return response, False


def caption_from_reply(response: str, max_words: int, tags: Sequence[str] = IMPROVED_TAGS
                       ) -> tuple[str, bool, tuple[str, str] | None]:
    """``(caption, tags_found, rejection)`` for an optimizer reply.

    The caption is the text between the two tags (what ``TGD.step`` takes); without them, the best
    guess: the text after a lone opening tag, before a lone closing tag, or else the whole reply; then
    cleaned to one line (an empty caption means nothing usable was in the reply). It is then checked
    with :func:`rejection`; text with more than one non-empty line (outside code fences) is rejected
    too, since only its first line would survive cleaning."""
    body, found = _improved_body(response, tags)
    caption = clean_caption(body)
    lines = [line for line in re.sub(r"```\w*", "", body).splitlines() if line.strip()]
    why = rejection(caption, max_words)
    if why is None and len(lines) > 1:
        why = ("sentences", f"{len(lines)} lines where one caption was asked for: {body.strip()[:80]!r}")
    return caption, found, why


# A refusal speaks in the first person ("I'm sorry, but I can't", "as an AI"); "a sign that says sorry
# we are closed" is a caption.
_REFUSAL = re.compile(
    r"\b(i'm\s+sorry|i\s+am\s+sorry|sorry,\s+(?:but|i)\b|i\s+apologi[sz]e|i\s+can(?:no|')t|i\s+am\s+unable"
    r"|i'm\s+unable|unable\s+to\s+(?:help|assist|comply)|as\s+an\s+ai|i\s+won't|i\s+will\s+not)", re.I)
# Talk about the task rather than a caption: a chat opener followed by punctuation ("Sure!", "OK,"), an
# introduction of something else ("Here is the improved caption"), the first person, or the task's own
# words ("a better caption would", "the feedback"). "Great Dane on a couch", "I-95 at dusk" and "a sign
# with a caption" are captions.
_META_OPENER = re.compile(
    r"^(?:(?:sure|certainly|of\s+course|okay|ok|absolutely|great|alright)\s*[!,.:]"
    r"|(?:here(?:'s|\s+is|\s+are)|below\s+is)\s+(?:the|your|my|an?)\s+(?:\w+\s+){0,2}"
    r"(?:caption|version|description|revision)\b|(?:i|i'm|i've|i'll|let\s+me)\s)", re.I)
_META_WORDS = re.compile(
    r"\b(?:(?:improved|revised|refined|updated|corrected|better|new|original)\s+caption"
    r"|caption\s+(?:should|would|could|must|needs?)|the\s+feedback|variable|constraints?)\b", re.I)
# A sentence end: a word, then ".", "!" or "?", then a capital or a digit. Titles and initials
# ("St. Bernard", "J. Smith") are not ends.
_SENTENCE_END = re.compile(r"(\w+)[.!?][\"')\]]*\s+[A-Z0-9]")
_ABBREVIATIONS = frozenset({"st", "mr", "mrs", "ms", "dr", "jr", "sr", "mt", "ft", "vs", "no", "e.g", "i.e", "etc"})


def _sentences_after_first(text: str) -> bool:
    return any(len(m.group(1)) > 1 and m.group(1).lower() not in _ABBREVIATIONS for m in _SENTENCE_END.finditer(text))


def word_limit(max_words: int) -> int:
    """The most words a refined caption may have: ``max_words`` plus ``WORD_TOLERANCE``, rounded up."""
    return max_words + math.ceil(max_words * WORD_TOLERANCE)


def rejection(caption: str, max_words: int = DEFAULT_MAX_WORDS) -> tuple[str, str] | None:
    """Why ``caption`` cannot be a training target, as ``(reason, detail)``; None when it can.

    Reasons: ``empty``, ``refusal``, ``meta`` (it talks about the task), ``sentences`` (more than one
    sentence or line), ``too_long`` (over :func:`word_limit`). Checked in that order.
    """
    text = caption.strip()
    if not text:
        return "empty", "no caption in the reply"
    words = text.split()
    if _REFUSAL.search(text):
        return "refusal", f"a refusal, not a caption: {text[:80]!r}"
    if _META_OPENER.match(text) or _META_WORDS.search(text) or text.endswith((":", "?")):
        return "meta", f"talks about the task instead of the image: {text[:80]!r}"
    if "\n" in text or _sentences_after_first(text):
        return "sentences", f"more than one sentence: {text[:80]!r}"
    if len(words) > word_limit(max_words):
        return "too_long", f"{len(words)} words, over the limit of {max_words} (+{WORD_TOLERANCE:.0%})"
    return None
