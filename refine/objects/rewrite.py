"""Deterministic rewriting of a caption against the truth: the grounded critic's revision.

Also the one noun-phrase grammar ("a red circle", "two red circles", "a, b and c") that the shapes
world's reference captions and every rewrite use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from refine.objects.mentions import Mention, ObjectDiff, _head, compare, find_mentions
from refine.objects.vocabulary import Vocabulary
from refine.objects.words import (
    Token,
    indefinite_article,
    number_word,
    pluralize,
    pluralize_phrase,
    singularize,
    tokenize,
)

_DISPLAY_FORMS = {"skis": ("pair of skis", "pairs of skis"), "scissors": ("pair of scissors", "pairs of scissors")}
_LIST_SEPARATORS = frozenset({",", "and"})


def noun_phrase(noun: str, count: int | None) -> str:
    """"a red circle", "two red circles", "some red circles", "a pair of skis", "three people".

    ``noun`` is singular ("red circle", "person"); None counts read "some".
    """
    if noun in _DISPLAY_FORMS:
        singular, plural = _DISPLAY_FORMS[noun]
    else:
        singular, plural = noun, pluralize_phrase(noun)
    if count is None:
        return f"some {plural}"
    if count == 1:
        return f"{indefinite_article(singular)} {singular}"
    return f"{number_word(count)} {plural}"


def join_list(items: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c" (no Oxford comma: the shapes grammar)."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def is_list_caption(caption: str, vocab: Vocabulary) -> bool:
    """True when the caption is only counted objects joined by "," / "and" (optionally ending in ".")."""
    tokens = tokenize(caption)
    found = find_mentions(caption, vocab)
    if not found:
        return False
    covered = [False] * len(tokens)
    for m in found:
        for k in range(m.start, m.end):
            covered[k] = True
    words = [k for k, t in enumerate(tokens) if not (t.text == "." and k == len(tokens) - 1)]
    return all(covered[k] or tokens[k].text in _LIST_SEPARATORS for k in words)


def _restyle(text: str, original: str) -> str:
    """Keep the original's leading capital and final full stop."""
    text = text.strip()
    if not text:
        return text
    if original[:1].isupper():
        text = text[0].upper() + text[1:]
    if original.rstrip().endswith(".") and not text.endswith("."):
        text += "."
    return text


def rewrite(caption: str, truth: Mapping[str, int | None], vocab: Vocabulary) -> str:
    """Deterministically correct ``caption`` against ``truth``: drop hallucinated objects, fix counts,
    add missing ones.

    List captions (``is_list_caption``: the shapes grammar, "two red circles and a blue square") are
    rebuilt exactly: correctly named objects in their order, then missing ones in the truth's order,
    each as ``noun_phrase(label, true count)``, joined by ", " and " and ". Kept objects keep their
    words ("a man" stays "a man", not "a person") when the label was named once.

    Free-form captions get phrase edits, best effort:

    - a hallucinated noun phrase (with its quantity) is cut together with a joining "and" / "," /
      "with" or a preposition just before it ("sitting on a couch" -> "sitting"); if it opens the
      caption and an object is missing, the first missing object takes its place instead;
    - a wrong count is fixed by replacing the number word and re-inflecting the noun, when the label
      was named once (with several mentions, "a man and a woman" for three people, it is left alone);
    - missing objects are appended as " with <list>" (" and <list>" when the caption already has
      "with").

    Limits: verbs are not re-conjugated ("a dog is" stays singular after "two dogs"), removing a
    subject can leave a fragment ("on a couch"), and relative clauses about a removed object remain.
    Returns "" when nothing is left to say (no true object and every said one removed).
    """
    found = find_mentions(caption, vocab)
    diff = compare(caption, truth, vocab)
    true = diff.truth
    if is_list_caption(caption, vocab):
        return _rewrite_list(caption, found, true)
    return _rewrite_free(caption, found, diff)


def _inflect(word: str, count: int | None) -> str:
    return singularize(word) if count == 1 else pluralize(singularize(word))


def _object_words(m: Mention, tokens: Sequence[Token], count: int | None) -> list[str]:
    """The adjectives and object words of a mention, inflected for ``count``: "two red circles" -> 1 ->
    ["red", "circle"]."""
    words = [t.text for t in tokens[m.quantity_end:m.end]]
    head = (m.noun_start - m.quantity_end) + _head(tokens[m.noun_start:m.end])
    words[head] = _inflect(words[head], count)
    return words


def _counted(words: Sequence[str], count: int | None) -> str:
    if count is None:
        return " ".join(["some", *words])
    lead = indefinite_article(words[0]) if count == 1 else number_word(count)
    return " ".join([lead, *words])


def _rewrite_list(caption: str, found: Sequence[Mention], true: Mapping[str, int | None]) -> str:
    tokens = tokenize(caption)
    by_label: dict[str, list[Mention]] = {}
    for m in found:
        by_label.setdefault(m.label, []).append(m)
    items = []
    for label, ms in by_label.items():
        if label not in true:
            continue
        if len(ms) == 1 and label not in _DISPLAY_FORMS:  # keep the caption's own words ("a man")
            items.append(_counted(_object_words(ms[0], tokens, true[label]), true[label]))
        else:
            items.append(noun_phrase(label, true[label]))
    items += [noun_phrase(label, count) for label, count in true.items() if label not in by_label]
    return _restyle(join_list(items), caption)


_PREPOSITIONS = ("next to", "in front of", "on top of", "on", "in", "at", "near", "under", "beside",
                 "behind", "by", "above", "below", "over", "with", "inside", "atop", "underneath")
# What goes with a cut noun phrase: a joining word or a preposition before it, else a joining word after.
_BEFORE_CUT = re.compile(r"(?:\s*,\s*|\s+(?:and|or|" + "|".join(p.replace(" ", r"\s+") for p in _PREPOSITIONS)
                         + r")\s+)$", re.IGNORECASE)
_AFTER_CUT = re.compile(r"^(?:\s*,\s*|\s+(?:and|or|with)\s+)", re.IGNORECASE)


def _rewrite_free(caption: str, found: Sequence[Mention], diff: ObjectDiff) -> str:
    tokens = tokenize(caption)
    cuts: list[tuple[int, int]] = []
    replacements: list[tuple[int, int, str]] = []
    missing = list(diff.missing)
    for m in found:
        if m.label not in diff.hallucinated:
            continue
        s, e = tokens[m.start].start, tokens[m.end - 1].end
        if m.start == 0 and missing:  # the subject: put a missing object in its place
            label = missing.pop(0)
            replacements.append((s, e, noun_phrase(label, diff.truth[label])))
            continue
        if before := _BEFORE_CUT.search(caption[:s]):
            s = before.start()
        elif after := _AFTER_CUT.search(caption[e:]):
            e += after.end()
        cuts.append((s, e))
    counted: dict[str, list[Mention]] = {}
    for m in found:
        if not m.rereference:
            counted.setdefault(m.label, []).append(m)
    for label, (_, true_count) in diff.count_errors.items():
        if len(counted[label]) != 1:
            continue  # several places add up to the count: there is no one number word to fix
        m = counted[label][0]
        if label in _DISPLAY_FORMS:
            phrase = noun_phrase(label, true_count)
        elif m.quantity == "definite":  # "the dog" -> "the two dogs"
            words = _object_words(m, tokens, true_count)
            phrase = " ".join([tokens[m.start].text] + ([] if true_count == 1 else [number_word(true_count)]) + words)
        else:
            phrase = _counted(_object_words(m, tokens, true_count), true_count)
        replacements.append((tokens[m.start].start, tokens[m.end - 1].end, phrase))
    text = _apply_edits(caption, cuts, replacements)
    if missing:
        body = text.rstrip().rstrip(".").rstrip()
        extra = join_list([noun_phrase(label, diff.truth[label]) for label in missing])
        if not _tidy(body):
            text = extra
        else:
            text = body + (" and " if re.search(r"\bwith\b", body, re.IGNORECASE) else " with ") + extra
    return _restyle(_tidy(text), caption)


def _apply_edits(text: str, cuts: list[tuple[int, int]], replacements: list[tuple[int, int, str]]) -> str:
    """Delete ``cuts`` (overlapping ones merged) and apply ``replacements`` (character spans).

    Replacements are whole noun phrases and cuts only reach over joining words and prepositions, so the
    two never overlap; a cut that would is shortened.
    """
    merged: list[list[int]] = []
    for s, e in sorted(cuts):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    edits = [(s, e, "") for s, e in merged]
    for rs, re_, r in replacements:
        clipped = []
        for s, e, x in edits:
            if e <= rs or s >= re_:
                clipped.append((s, e, x))
            elif s < rs:
                clipped.append((s, rs, x))  # a cut running into the replacement stops before it
            else:
                clipped.append((re_, max(re_, e), x))  # one starting inside it starts after it
        edits = clipped + [(rs, re_, r)]
    for s, e, r in sorted(edits, reverse=True):
        text = text[:s] + r + text[e:]
    return text


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"^(?:(?:(?:and|or|with)\b|,)\s*)+", "", text, flags=re.IGNORECASE)
    text = re.sub(r"(?:\s*(?:,|\band\b|\bor\b|\bwith\b))+\s*(\.?)$", r"\1", text, flags=re.IGNORECASE)
    return text.strip()


