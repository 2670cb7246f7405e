"""Word forms for the object matcher: tokens, singulars and plurals, number words, quantity words.

Singulars come from an irregular table of ours, then lemminflect's English noun lexicon (no NLTK, no
``pattern``: they need downloads we cannot make); the plural table is derived from the singular one.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# Words (with an optional apostrophe suffix, dropped below) and the punctuation that ends a phrase.
# Hyphens and other symbols separate words without being tokens: "hot-dog" reads as "hot dog".
_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]*)?|[.,;:!?()\[\]\"]")


@dataclass(frozen=True)
class Token:
    text: str  # lower-cased surface form, possessive dropped ("man's" -> "man")
    singular: str  # singularize(text) for words; the character itself for punctuation
    start: int  # character span in the caption
    end: int

    @property
    def is_word(self) -> bool:
        return self.text[0].isalnum()


def tokenize(caption: str) -> list[Token]:
    """Lower-cased word and punctuation tokens of ``caption`` with their character spans."""
    tokens = []
    for m in _TOKEN_RE.finditer(caption):
        text = m.group().lower()
        if "'" in text:
            text = text.split("'", 1)[0]
        singular = singularize(text) if text[0].isalnum() else text
        tokens.append(Token(text, singular, m.start(), m.end()))
    return tokens


# Our irregular table, consulted before lemminflect: forms it lacks or reads otherwise for captions
# ("people" is its own lemma there; "leaves" is "leave" first). The plural table is derived from it.
_IRREGULAR_SINGULAR = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "cacti": "cactus",
    "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "loaves": "loaf",
    "shelves": "shelf", "wolves": "wolf", "calves": "calf", "halves": "half", "scarves": "scarf",
    "thieves": "thief", "elves": "elf", "hooves": "hoof",
    "buses": "bus", "busses": "bus", "skis": "ski", "taxis": "taxi", "kiwis": "kiwi",
    "tomatoes": "tomato", "potatoes": "potato", "heroes": "hero", "mangoes": "mango",
    "volcanoes": "volcano", "mosquitoes": "mosquito", "buffaloes": "buffalo",
}
# The first plural listed for a singular is the one we write ("buses", not "busses").
_IRREGULAR_PLURAL = {singular: plural for plural, singular in reversed(_IRREGULAR_SINGULAR.items())}
# Same form in singular and plural (or plural only). Short words are left alone, but for 'tvs'.
_INVARIANT = frozenset({
    "sheep", "deer", "fish", "bison", "moose", "aircraft", "cattle", "series", "species", "scissors",
    "news", "police", "offspring", "swiss", "christmas", "always", "perhaps", "towards", "across",
    "broccoli", "luggage",
})
# Bare, these say no definite count: "sheep on a hill", "broccoli on a plate".
_AMBIGUOUS_NUMBER = frozenset({"sheep", "deer", "fish", "bison", "moose", "aircraft", "scissors", "series",
                               "species", "offspring", "broccoli", "luggage"})
_ALWAYS_PLURAL = frozenset({"cattle", "police", "people"})


@functools.lru_cache(maxsize=1 << 16)
def singularize(word: str) -> str:
    """The singular of an English noun (lower case); other words pass through mostly unchanged.

    Our irregular table first, then lemminflect's noun lexicon (a well-kept English inflection
    database: "grandchildren", "magpies", "pocketknives"), then, for words it does not know that end
    in "s", its suffix model ("corgis", "iphones"), with one rule of ours for the "-buses" it gets
    wrong. A singular maps to itself. Only the result's use as a
    lookup key matters: a wrong singular of a word in no vocabulary ("has" -> "ha") is harmless.
    """
    if word in _IRREGULAR_SINGULAR:
        return _IRREGULAR_SINGULAR[word]
    if len(word) == 3 and word[2] == "s" and word[1] not in "aeiouys":  # tvs, pcs (not bus, has, yes)
        return word[:2]
    if len(word) <= 3 or word in _INVARIANT or not word.isalpha():
        return word
    if word.endswith("buses"):  # minibuses, airbuses, omnibuses
        return word[:-2]
    from lemminflect import getLemma

    known = getLemma(word, upos="NOUN", lemmatize_oov=False)
    if known:
        return known[0]
    if not word.endswith("s") or word.endswith(("ss", "us", "ous")):
        return word  # an unknown word that is no regular plural (its suffix model turns "corgi" into "corgus")
    guessed = getLemma(word, upos="NOUN", lemmatize_oov=True)
    return guessed[0] if guessed else word


@functools.lru_cache(maxsize=1 << 14)
def pluralize(word: str) -> str:
    """The plural of an English noun (lower case); a plural stays as it is. For phrases use
    ``pluralize_phrase``. Our irregular table, then lemminflect, as for :func:`singularize`."""
    if word in _IRREGULAR_PLURAL:
        return _IRREGULAR_PLURAL[word]
    if word in _INVARIANT or singularize(word) != word:
        return word
    from lemminflect import getInflection

    forms = getInflection(word, tag="NNS", inflect_oov=True)
    return forms[0] if forms else word + "s"


def pluralize_phrase(phrase: str) -> str:
    """Pluralize the last word: "red circle" -> "red circles", "hot dog" -> "hot dogs"."""
    head, _, last = phrase.rpartition(" ")
    return f"{head} {pluralize(last)}" if head else pluralize(last)


_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}
_COUNT_WORDS = {**_NUMBER_WORDS, "a": 1, "an": 1, "another": 1, "both": 2, "couple": 2, "dozen": 12}
_SPOKEN = {v: k for k, v in _NUMBER_WORDS.items()}


def number_word(n: int) -> str:
    """"two" for 2, up to "twenty"; digits above. (1 is "one"; use ``indefinite_article`` for "a"/"an".)"""
    return _SPOKEN.get(n, str(n))


def indefinite_article(next_word: str) -> str:
    """"an" before a vowel sound, by spelling: "an apple", "a unicycle", "an hour"."""
    w = next_word.lower()
    if w.startswith(("uni", "use", "usu", "eu", "one", "once")):
        return "a"
    if w.startswith(("hour", "honest", "heir", "honor", "honour")) or (w[:1] and w[0] in "aeiou"):
        return "an"
    return "a"


# Words that tell how many, read leftwards from the object noun.
_VAGUE = frozenset({
    "some", "several", "many", "few", "various", "multiple", "numerous", "plenty", "countless", "assorted",
    "any", "all", "more", "most", "each", "every", "dozens", "hundreds", "thousands", "lots",
})
_DEFINITE = frozenset({"the", "this", "that", "these", "those", "his", "her", "their", "its", "my", "your",
                       "our"})
_NEGATORS = frozenset({"no", "without"})
# "<collective> of <noun>": a quantity without a definite count, except pair / couple / dozen.
_COLLECTIVES = frozenset({
    "group", "herd", "flock", "bunch", "lot", "number", "pack", "crowd", "team", "pile", "stack", "row",
    "line", "set", "collection", "variety", "assortment", "cluster", "family", "school", "fleet", "swarm",
    "litter", "pod", "troop", "array", "bundle", "handful", "gaggle", "herds", "mob", "colony",
})
_EXACT_COLLECTIVES = {"pair": 2, "couple": 2, "dozen": 12}
# COCO annotates one instance per pair of these, so "a pair of skis" is one object.
_PAIR_LABELS = frozenset({"skis", "scissors"})
# Words that end a noun phrase: the quantity search stops there.
_BOUNDARY = frozenset({
    "and", "or", "but", "with", "on", "in", "at", "near", "to", "by", "from", "under", "over", "above",
    "below", "behind", "beside", "besides", "between", "into", "onto", "for", "while", "as", "is", "are",
    "was", "were", "be", "been", "being", "has", "have", "had", "which", "who", "where", "there", "here",
    "it", "they", "he", "she", "next", "front", "top", "inside", "outside", "around", "across", "through",
    "against", "along", "up", "down", "off", "out", "like", "than", "then", "not", "of", "when",
    "during", "after", "before", "beneath", "underneath", "toward", "towards", "via", "per", "atop",
})
_MAX_ADJECTIVES = 3  # words allowed between a quantity and its noun: "two small brown dogs"


