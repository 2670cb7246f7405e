"""Reading a caption: every object mention with its count (``find_mentions``, ``mentions``), and how that
differs from the truth (``compare``). The pipeline is described in ``refine.objects``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from refine.objects.vocabulary import Vocabulary
from refine.objects.words import (
    _ALWAYS_PLURAL,
    _AMBIGUOUS_NUMBER,
    _BOUNDARY,
    _COLLECTIVES,
    _COUNT_WORDS,
    _DEFINITE,
    _EXACT_COLLECTIVES,
    _MAX_ADJECTIVES,
    _NEGATORS,
    _PAIR_LABELS,
    _VAGUE,
    Token,
    tokenize,
)


@dataclass(frozen=True)
class Mention:
    """One place where a caption names an object.

    ``quantity`` says how the count was read: "number" ("two dogs", "a dog", "a pair of skis"), "vague"
    ("some dogs", "a herd of cows"), "definite" ("the dog"), "partitive" ("a slice of pizza") or "bare"
    (no determiner: "dogs on grass"). Token indices are into ``tokenize(caption)``: the noun phrase is
    ``start .. end``, its quantity words ``start .. quantity_end`` (empty for "bare" and "partitive"),
    then adjectives up to ``noun_start``, then the object words ``noun_start .. end``.
    """

    label: str
    count: int | None  # what this mention says; None = no definite count
    surface: str  # the object words as written, lower case ("men", "red circles")
    plural: bool
    quantity: str
    start: int
    quantity_end: int
    noun_start: int
    end: int
    rereference: bool = False  # "the dog" after "a dog": the same object again, adds no count


def _read_quantity(tokens: Sequence[Token], j: int, lo: int) -> tuple[str, int | None, int, int]:
    """Read leftwards from ``tokens[j]`` (the word before a noun) down to ``tokens[lo]``.

    Returns ``(kind, count, start, end)``: kind is "number", "vague", "definite", "negated",
    "partitive" or "bare"; ``start .. end`` are the quantity's tokens (both the noun's start when
    there are none).
    """
    noun_start = j + 1
    for _ in range(_MAX_ADJECTIVES + 1):
        if j < lo or not tokens[j].is_word:
            break
        w = tokens[j].text
        if w == "of":
            return _read_collective(tokens, j, lo, noun_start)
        if w in _COUNT_WORDS or w.isdigit():
            if w in ("a", "an") and j - 1 >= lo and tokens[j - 1].text == "without":
                return "negated", None, j - 1, j + 1
            return "number", (int(w) if w.isdigit() else _COUNT_WORDS[w]), j, j + 1
        if w in _VAGUE:
            if w == "any" and j - 1 >= lo and tokens[j - 1].text == "without":
                return "negated", None, j - 1, j + 1
            if w == "few" and j - 1 >= lo and tokens[j - 1].text == "a":
                return "vague", None, j - 1, j + 1
            return "vague", None, j, j + 1
        if w in _DEFINITE:
            return "definite", None, j, j + 1
        if w in _NEGATORS:
            return "negated", None, j, j + 1
        if w in _BOUNDARY:
            break
        j -= 1  # an adjective (or a word we do not know): keep looking left
    return "bare", None, noun_start, noun_start


def _read_collective(tokens: Sequence[Token], of: int, lo: int, noun_start: int) -> tuple[str, int | None, int, int]:
    """The quantity ending in ``tokens[of]`` == "of": "a herd of", "a pair of", "two pairs of"."""
    c = of - 1
    coll = tokens[c].singular if c >= lo and tokens[c].is_word else ""
    if coll not in _EXACT_COLLECTIVES and coll not in _COLLECTIVES:
        return "partitive", None, noun_start, noun_start  # "a slice of pizza", "a bowl of oranges"
    start, times = c, None  # include "a" / "two" / "a large" before the collective
    for k in range(c - 1, max(lo, c - 3) - 1, -1):
        wk = tokens[k].text
        if wk in _COUNT_WORDS or wk.isdigit():
            start, times = k, (int(wk) if wk.isdigit() else _COUNT_WORDS[wk])
            break
        if wk in _DEFINITE or wk in _VAGUE:
            start = k
            break
        if wk in _BOUNDARY or not tokens[k].is_word:
            break
    if coll in _EXACT_COLLECTIVES and (times is not None or tokens[c].text == coll):
        return "number", (times or 1) * _EXACT_COLLECTIVES[coll], start, of + 1  # "two pairs of" = 4
    return "vague", None, start, of + 1  # "a group of", "dozens of"


def _is_modifier_use(tokens: Sequence[Token], after: int) -> bool:
    """True when the word before ``tokens[after]`` is used as an adjective ("an orange cat")."""
    if after >= len(tokens):
        return False
    nxt = tokens[after]
    return nxt.is_word and nxt.text not in _BOUNDARY and not nxt.text.endswith("ing")


def _head(words: Sequence[Token]) -> int:
    """Index of the word that carries number: the last, or the one before "of" ("glasses of wine")."""
    texts = [t.text for t in words]
    return texts.index("of") - 1 if "of" in texts[1:] else len(words) - 1


def find_mentions(caption: str, vocab: Vocabulary) -> list[Mention]:
    """Every object mention in ``caption``, in order (negated ones, "no dogs", are left out)."""
    tokens = tokenize(caption)
    keys = [t.singular for t in tokens]
    out: list[Mention] = []
    seen: set[str] = set()
    lo = 0  # the quantity of a noun never reaches back past the previous match
    i = 0
    while i < len(tokens):
        hit = vocab.match(keys, i) if tokens[i].is_word else None
        if hit is None:
            i += 1
            continue
        n, label = hit
        end = i + n
        words = tokens[i:end]
        head = words[_head(words)]
        plural = head.text != head.singular or head.text in _ALWAYS_PLURAL
        if label is None or (n == 1 and keys[i] in vocab.modifiers and not plural and _is_modifier_use(tokens, end)):
            lo = end if label is None else lo
            i = end
            continue
        kind, count, start, quantity_end = _read_quantity(tokens, i - 1, lo)
        lo = end
        if kind != "negated":
            if kind == "number" and label in _PAIR_LABELS and any(
                    t.text in ("pair", "pairs") for t in tokens[start:quantity_end]):
                count //= 2  # COCO counts a pair of skis as one object
            if kind in ("definite", "bare"):
                count = None if (plural or head.text in _AMBIGUOUS_NUMBER) else 1
            singular_surface = " ".join(keys[i:end])
            rereference = kind in ("definite", "bare") and singular_surface in seen
            seen.add(singular_surface)
            surface = " ".join(t.text for t in words)
            out.append(Mention(label, count, surface, plural, kind, start, quantity_end, i, end, rereference))
        i = end
    return out


def mentions(caption: str, vocab: Vocabulary) -> dict[str, int | None]:
    """Canonical label -> count said (None: mentioned without a definite count), in order of mention.

    Counts of several mentions of one label add up ("a man and a woman" -> person: 2); one mention
    without a definite count makes the label's count None; re-references ("the man") add nothing.
    """
    said: dict[str, int | None] = {}
    for m in find_mentions(caption, vocab):
        if m.rereference and m.label in said:
            continue
        if m.label not in said:
            said[m.label] = m.count
        elif said[m.label] is None or m.count is None:
            said[m.label] = None
        else:
            said[m.label] += m.count
    return said


# ----------------------------------------------------------------------------------------------------
# Comparison with the truth
# ----------------------------------------------------------------------------------------------------

@dataclass
class ObjectDiff:
    """What a caption gets wrong about a set of objects.

    ``truth`` is the canonicalised truth (label -> count, None when the count is unknown).
    """

    hallucinated: list[str]  # said but absent, in order of mention
    missing: list[str]  # present but not said, in the truth's order
    count_errors: dict[str, tuple[int, int]]  # label -> (said, true), only where both are definite
    said: dict[str, int | None]
    truth: dict[str, int | None] = field(default_factory=dict)

    @property
    def correct(self) -> list[str]:
        """Labels both said and present."""
        return [label for label in self.said if label in self.truth]

    @property
    def exact(self) -> bool:
        """No hallucinated or missing object and no wrong definite count."""
        return not (self.hallucinated or self.missing or self.count_errors)

    @property
    def substitutions(self) -> list[tuple[str, str]]:
        """``(said, true)`` pairs where the caption named a present object as another it resembles: a
        hallucinated label and a missing one that share a word ("blue square" for a present "blue
        circle", "red circle" for "green circle"). Matched greedily in mention order, each label once."""
        pairs, free = [], list(self.missing)
        for said in self.hallucinated:
            match = next((true for true in free if confusable(said, true)), None)
            if match is not None:
                free.remove(match)
                pairs.append((said, match))
        return pairs

    @property
    def additions(self) -> list[str]:
        """Hallucinated labels that are not substitutions: objects added out of nowhere."""
        substituted = {said for said, _ in self.substitutions}
        return [label for label in self.hallucinated if label not in substituted]

    @property
    def omissions(self) -> list[str]:
        """Missing labels that are not substitutions: objects left out."""
        substituted = {true for _, true in self.substitutions}
        return [label for label in self.missing if label not in substituted]


def confusable(a: str, b: str) -> bool:
    """Two different labels that share a word: the same colour or the same shape in the shapes world
    ("blue square", "blue circle"); in COCO's, pairs such as "wine glass" / "glass" rarely matter."""
    return a != b and bool(set(a.split()) & set(b.split()))


def canonical_truth(truth: Mapping[str, int | None], vocab: Vocabulary) -> dict[str, int | None]:
    """Map truth labels through the vocabulary and merge them ("man": 1, "woman": 1 -> person: 2).

    Counts must be non-negative ints or None (present, count unknown); zero means absent. Labels the
    vocabulary does not know are kept as they are (they can never be said, so they are always missing).
    """
    if not isinstance(truth, Mapping):
        raise TypeError(f"truth must be a mapping label -> count, got {type(truth).__name__}")
    out: dict[str, int | None] = {}
    for name, count in truth.items():
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise ValueError(f"truth[{name!r}] = {count!r}: counts must be ints >= 0 (or None for present "
                             "with an unknown count)")
        if count == 0:
            continue
        label = vocab.canonical(name) or name
        if label in out:
            out[label] = None if out[label] is None or count is None else out[label] + count
        else:
            out[label] = count
    return out


def compare(caption: str, truth: Mapping[str, int | None], vocab: Vocabulary) -> ObjectDiff:
    """Compare what ``caption`` says with ``truth`` (label -> count).

    Example: "a dog and two cats" against {"cat": 1, "person": 1} gives hallucinated ["dog"],
    missing ["person"], count_errors {"cat": (2, 1)}.
    """
    said = mentions(caption, vocab)
    true = canonical_truth(truth, vocab)
    return ObjectDiff(
        hallucinated=[label for label in said if label not in true],
        missing=[label for label in true if label not in said],
        count_errors={
            label: (said[label], true[label]) for label in said
            if label in true and said[label] is not None and true[label] is not None and said[label] != true[label]
        },
        said=said,
        truth=true,
    )


