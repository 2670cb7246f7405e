"""Which objects a caption names, and how many: the one matcher behind the critics, rewrites and CHAIR.

Pipeline for a caption:

1. ``tokenize``: lower-cased word tokens (possessive ``'s`` dropped, hyphens split) and punctuation.
2. ``singularize`` each word (an irregular table of ours, then lemminflect's English noun lexicon:
   people -> person, knives -> knife, buses -> bus, glasses -> glass, skis -> ski, magpies -> magpie).
3. Greedy longest match of singular n-grams against a ``Vocabulary`` (labels, synonyms, and phrases that
   name *no* object, such as "train track" or "bus stop"). Longest match is what keeps "hot dog" from
   being a dog, "teddy bear" from being a bear and "jet ski" from being an airplane plus skis.
4. For each match, read the quantity to its left: a number word or digit ("a", "two", "3", "a pair of",
   "a couple of", "a dozen"), a vague quantity ("some", "several", "many", "a few", "a group of",
   "a herd of") or a definite determiner ("the", "his"). A singular noun says 1, a plural noun without a
   number says "some" (``None``: mentioned without a definite count). "no dogs" / "without a dog" is
   not a mention.

Modules: ``words`` (tokens and word forms), ``vocabulary`` (labels, synonyms, COCO's table),
``mentions`` (reading a caption, comparing it with the truth), ``rewrite`` (the grounded revision and the
noun-phrase grammar). CHAIR is in ``refine.metrics.chair``.

Known limits (checked by the tests where they matter): no parsing, so a number word is attached to the
nearest object noun at most three words to its right; "the dog" after "a dog" is read as the same dog,
while "a man and a woman" is two people; a label said in several places is counted by summing; negation
reaches only the next noun phrase ("without a hat or a dog" still mentions the dog).
"""

from refine.objects.mentions import (
    Mention,
    ObjectDiff,
    canonical_truth,
    compare,
    confusable,
    find_mentions,
    mentions,
)
from refine.objects.rewrite import is_list_caption, join_list, noun_phrase, rewrite
from refine.objects.vocabulary import (
    COCO_CATEGORIES,
    COCO_MODIFIERS,
    COCO_NON_OBJECTS,
    COCO_SYNONYMS,
    Vocabulary,
    coco_vocabulary,
    vocabulary_for,
)
from refine.objects.words import (
    Token,
    indefinite_article,
    number_word,
    pluralize,
    pluralize_phrase,
    singularize,
    tokenize,
)

__all__ = [
    "COCO_CATEGORIES", "COCO_MODIFIERS", "COCO_NON_OBJECTS", "COCO_SYNONYMS", "Mention", "ObjectDiff", "Token", "confusable",
    "Vocabulary", "canonical_truth", "coco_vocabulary", "compare", "find_mentions", "indefinite_article",
    "is_list_caption", "join_list", "mentions", "noun_phrase", "number_word", "pluralize", "pluralize_phrase",
    "rewrite", "singularize", "tokenize", "vocabulary_for",
]
