"""Caption tokenisation as coco-caption does it, without Java.

coco-caption (and pycocoevalcap) tokenise every caption with Stanford CoreNLP 3.4.1's ``PTBTokenizer``
(``-preserveLines -lowerCase``) and then drop the punctuation tokens in ``PUNCTUATIONS``; CIDEr-D and
BLEU count n-grams of what is left. :func:`ptb_words` reproduces that pipeline for caption text:

- lower case; curly quotes and apostrophes read as straight ones, "…" as "...", "€" as "$" and "£"
  as "#" (PTB3 escaping);
- clitics split off: "isn't" -> "is n't", "can't" -> "ca n't", "man's" -> "man 's", "dogs'" ->
  "dogs '", "they're", "we've", "I'm", "you'll", "he'd've" -> "he 'd 've";
- assimilations split: "cannot" -> "can not", "gonna" -> "gon na", "gotta", "wanna", "lemme",
  "gimme", "'tis" -> "'t is", "'twas";
- words keep inner hyphens, slashes, dots, ampersands and digit groups ("t-shirt", "and/or", "3.5",
  "1,000", "10:30", "a&w"); "$", "%", "#" and "°" stand alone ("$ 5", "50 %");
- a final full stop is split off, except after an acronym ("u.s.", "a.m."), a single letter, a title
  or other abbreviation (``ABBREVIATIONS``: "mr.", "st.", "etc.", "vs."), or "no." before a number;
- runs of "!" and "?" are one token ("!!", "?!"), and only the single marks are punctuation, so "!!"
  counts as a word, as it does in COCO's numbers; "[" and "]" become "-lsb-" / "-rsb-", which COCO
  does not drop either.

``tests/data/ptb_reference.json`` holds the real tokenizer's output on a corpus of captions with these
phenomena (``tests/scripts/make_ptb_reference.py`` rebuilds it with Java); the tests check every line.
Not reproduced: emoticons (":)" -> ":-rrb-"), SGML tags, URLs and e-mail addresses with inner
punctuation other than dots, and CoreNLP's rarer abbreviations.
"""

from __future__ import annotations

import re

# coco-caption's pycocoevalcap/tokenizer/ptbtokenizer.py: the tokens it removes after tokenising. Its
# list spells brackets "-LRB-" and so on, but the tokens arrive lower-cased ("-lrb-"), so coco-caption
# keeps brackets as words: we do the same.
PUNCTUATIONS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"})

# Words whose final "." belongs to them (CoreNLP 3.4.1's ABBREV1 and ABBREV2 lists, as far as they occur
# in captions), and words that keep it only before a number (ABBREV3).
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "drs", "prof", "st", "mt", "ft", "jr", "sr", "gen", "col", "lt", "sgt", "capt", "rev",
    "gov", "sen", "rep", "inc", "co", "corp", "ltd", "bros", "vs", "etc", "jan", "feb", "mar", "apr", "jun", "jul",
    "aug", "sep", "sept", "oct", "nov", "dec", "ave", "blvd", "rd", "dept", "esq", "messrs", "mme", "mlle",
})
BEFORE_NUMBERS = frozenset({"no", "nos", "vol", "vols", "fig", "figs", "ch", "sec", "art", "p", "pp"})
_ASSIMILATIONS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                  "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me")}
_CHARS = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u00b4": "'", "\u201c": '"', "\u201d": '"',
                        "\u201e": '"', "\u2026": "...", "\u20ac": "$", "\u00a3": "#", "\u00bd": "1/2",
                        "\u2013": "--", "\u2014": "--"})
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}

_A = r"[^\W_]"  # a letter or digit, any script
_SCAN = re.compile(
    rf"""(?P<sgml><[a-z/][^<>\s]*>)                       # <a>
       |(?P<smiley>[:;=]-?[()dp](?![^\W_]))             # :) ;-(
       |(?P<email>{_A}+(?:\.{_A}+)*@{_A}+(?:\.{_A}+)+)   # me@example.com
       |(?P<handle>@{_A}+)                              # @handle
       |(?P<currency>[a-z]{{1,3}}\$)                      # us$ hk$
       |(?P<number>\d+(?:[,:]\d+)+(?:\.\d+)?)            # 1,000 10:30
       |(?P<unit>{_A}+(?:(?:[-/&.]|'(?=[^\W\d_])|'n')?{_A}+)*)  # t-shirt and/or a&w u.s dog.a can't o'clock
       |(?P<lead>(?<![^\W_])'(?:t(?=is|was)|em(?![^\W_])|n'|\d\d s?(?![^\W_])))  # 'tis 'em 'n' '90s
       |(?P<bangs>[!?]+)
       |(?P<dots>\.{{3,}}|\.)
       |(?P<dashes>--+|-)
       |(?P<other>\S)""", re.X)
_CLITIC = re.compile(r"(?:n't|'s|'re|'ve|'m|'ll|'d)$")


def _apostrophes(unit: str) -> list[str]:
    """A word with apostrophes in PTB pieces: clitics peeled off the end ("he'd've" -> he 'd 've, "can't"
    -> ca n't), "y'all" -> y' all, "rock'n'roll" -> rock 'n' roll; other inner ones stay (o'clock)."""
    if "'n'" in unit:
        left, _, right = unit.partition("'n'")
        return [*_apostrophes(left), "'n'", *_apostrophes(right)]
    tail: list[str] = []
    while (m := _CLITIC.search(unit)) and m.start() > 0:
        tail.insert(0, m.group())
        unit = unit[: m.start()]
    if unit.startswith("y'") and len(unit) > 2:
        return ["y'", unit[2:], *tail]
    return [unit, *tail]


def ptb_tokens(caption: str) -> list[str]:
    """PTB tokens of one caption, lower case, punctuation included (see the module docstring)."""
    text = caption.translate(_CHARS).lower()
    tokens: list[str] = []
    for m in _SCAN.finditer(text):
        kind, tok, end = m.lastgroup, m.group(), m.end()
        if kind == "unit":
            tokens.extend(_unit(tok, text, end))
        elif kind == "lead":
            tokens.append(tok)
        elif kind == "smiley":
            tokens.append(tok[:-1] + _BRACKETS.get(tok[-1], tok[-1]) if tok[-1] in "()" else tok)
        elif kind == "dots":
            tokens.append("..." if len(tok) >= 3 else ".")
        elif kind == "other":
            tokens.append(_quote(tok, text, m.start()) if tok in "\"'`" else _BRACKETS.get(tok, tok))
        else:  # sgml, email, handle, currency, number, bangs, dashes
            tokens.append(tok)
    return tokens


def _unit(unit: str, text: str, end: int) -> list[str]:
    """A word: its apostrophes, an assimilation, and whether a following "." belongs to it."""
    if unit in _ASSIMILATIONS and not re.match(r"[^\W\d_]", text[end:end + 1]):
        return list(_ASSIMILATIONS[unit])
    numbered = re.fullmatch(r"([^\W\d_]+)\.(\d.*)", unit)
    if numbered and numbered.group(1) in BEFORE_NUMBERS:  # "No.7" -> no. 7
        return [numbered.group(1) + ".", *_unit(numbered.group(2), text, end)]
    pieces = _apostrophes(unit) if "'" in unit else [unit]
    if text[end:end + 1] == "." and not re.match(r"\.[.\w]", text[end:end + 2]):
        last = pieces[-1]
        rest = text[end + 1:]
        final = not rest.strip()
        if (last in ABBREVIATIONS or (re.fullmatch(r"(?:[^\W\d_]\.)+[^\W\d_]", last))
                or (len(last) == 1 and last.isalpha() and not final)
                or (last in BEFORE_NUMBERS and re.match(r"\s*\d", rest))):
            pieces[-1] = last + "."  # its period; a sentence-final one is also the sentence's (dropped)
    return pieces


def _quote(mark: str, text: str, at: int) -> str:
    """An opening quote is `` (or ` for '), a closing one '' (or '): PTB's way of telling them apart."""
    opening = at == 0 or text[at - 1].isspace() or text[at - 1] in "([{<"
    if mark == "'":
        return "`" if opening and text[at + 1: at + 2].strip() else "'"
    return "``" if opening or mark == "`" else "''"


def ptb_words(caption: str) -> list[str]:
    """The words coco-caption scores: :func:`ptb_tokens` without its ``PUNCTUATIONS``."""
    return [t for t in ptb_tokens(caption) if t not in PUNCTUATIONS]
