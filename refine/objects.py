"""Which objects a caption names, and how many: the one matcher behind the critics, rewrites and CHAIR.

Pipeline for a caption (no NLTK, no ``pattern``: they need downloads we cannot make):

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

The synonym table follows CHAIR's (Rohrbach et al. 2018, "Object Hallucination in Image Captioning",
EMNLP; data/synonyms.txt and the double-word rules of utils/chair.py in LisaAnne/Hallucination), with
the edits listed above ``_COCO_SYNONYM_LISTS``.

Known limits (checked by the tests where they matter): no parsing, so a number word is attached to the
nearest object noun at most three words to its right; "the dog" after "a dog" is read as the same dog,
while "a man and a woman" is two people; a label said in several places is counted by summing; negation
reaches only the next noun phrase ("without a hat or a dog" still mentions the dog).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------------
# Tokens and word forms
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Vocabularies
# ----------------------------------------------------------------------------------------------------

def _phrase_key(phrase: str) -> tuple[str, ...]:
    return tuple(t.singular for t in tokenize(phrase) if t.is_word)


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Object labels, the phrases that name them, and phrases that name no object.

    Args:
        labels: canonical labels, e.g. COCO's "dining table" or the shapes world's "red circle".
        synonyms: phrase -> label ("puppy" -> "dog"); every target must be a label.
        non_objects: phrases that contain an object word but name no object ("train track",
            "bus stop"): matched like the others, so the longest match consumes them, and then ignored.
        modifiers: one-word phrases that are also adjectives ("orange", "remote"): they name an object
            only when plural or when the next token ends the phrase (punctuation, "and", "on", a verb
            in -ing), so "an orange cat" is a cat and "an orange on a table" is an orange.

    Phrases are compared after ``tokenize`` + ``singularize`` of each word, so plurals need no entries.
    """

    labels: tuple[str, ...]
    synonyms: Mapping[str, str] = field(default_factory=dict)
    non_objects: tuple[str, ...] = ()
    modifiers: frozenset[str] = frozenset()
    _phrases: dict[tuple[str, ...], str | None] = field(init=False, repr=False, compare=False)
    _max_len: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        labels = tuple(self.labels)
        if not labels:
            raise ValueError("Vocabulary(labels=...) is empty; pass at least one object label")
        phrases: dict[tuple[str, ...], str | None] = {}

        def add(phrase: str, label: str | None, what: str, override: bool):
            if not isinstance(phrase, str) or not _phrase_key(phrase):
                raise ValueError(f"Vocabulary {what} {phrase!r} has no words; use a non-empty phrase")
            key = _phrase_key(phrase)
            if key in phrases and phrases[key] != label and not override:
                return  # labels are added first and win over synonyms that normalise the same way
            phrases[key] = label

        for label in labels:
            add(label, label, "label", override=False)
            if phrases[_phrase_key(label)] != label:
                other = phrases[_phrase_key(label)]
                raise ValueError(f"Vocabulary labels {other!r} and {label!r} are the same phrase once "
                                 "singularised; keep one of them")
        for phrase, label in self.synonyms.items():
            if label not in labels:
                raise ValueError(f"Vocabulary synonym {phrase!r} -> {label!r}: {label!r} is not a label; "
                                 "add it to labels or fix the synonym")
            add(phrase, label, "synonym", override=False)
        for phrase in self.non_objects:
            add(phrase, None, "non-object phrase", override=True)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "modifiers", frozenset(_phrase_key(m)[0] for m in self.modifiers))
        object.__setattr__(self, "_phrases", phrases)
        object.__setattr__(self, "_max_len", max(len(k) for k in phrases))

    def canonical(self, phrase: str) -> str | None:
        """The label a phrase names ("puppies" -> "dog"), or None when it names none."""
        return self._phrases.get(_phrase_key(phrase))

    def extended(self, labels: Iterable[str] = (), synonyms: Mapping[str, str] | None = None) -> Vocabulary:
        """This vocabulary plus new labels (those already named by a phrase are skipped) and synonyms."""
        new = [lab for lab in dict.fromkeys(labels) if self.canonical(lab) is None and _phrase_key(lab)]
        if not new and not synonyms:
            return self
        return Vocabulary(self.labels + tuple(new), {**self.synonyms, **(synonyms or {})}, self.non_objects,
                          self.modifiers)

    def match(self, keys: Sequence[str], i: int) -> tuple[int, str | None] | None:
        """Longest phrase starting at ``keys[i]``: ``(length, label or None)``, or None if there is none."""
        for n in range(min(self._max_len, len(keys) - i), 0, -1):
            key = tuple(keys[i:i + n])
            if key in self._phrases:
                return n, self._phrases[key]
        return None


def vocabulary_for(labels: Iterable[str], synonyms: Mapping[str, str] | None = None,
                   non_objects: Iterable[str] = (), modifiers: Iterable[str] = ()) -> Vocabulary:
    """A vocabulary for any label set, e.g. the shapes world's "<colour> <shape>" labels."""
    return Vocabulary(tuple(labels), dict(synonyms or {}), tuple(non_objects), frozenset(modifiers))


COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)

# label -> phrases. From CHAIR's data/synonyms.txt and double-word rules (Rohrbach et al. 2018), with
# these edits: dropped "bow" (tie), "seat" (chair), "container" (bowl), "sub" (sandwich), "notebook"
# (laptop), "male"/"female" kept only as modifiers, because in captions they are more often something
# else; added "bat", "mitt", "racquet", "mug", "kitty", "teddy", "stuffed animal", "remote control",
# "microwave oven", "toilet bowl", "pickup truck", "jet ski" and a few more multi-word phrases whose
# parts would otherwise match two objects.
_COCO_SYNONYM_LISTS: dict[str, tuple[str, ...]] = {
    "person": (
        "girl", "boy", "man", "woman", "kid", "child", "chef", "baker", "people", "adult", "rider", "baby",
        "worker", "passenger", "sister", "brother", "biker", "policeman", "policewoman", "cop", "officer",
        "lady", "cowboy", "cowgirl", "bride", "groom", "male", "female", "guy", "traveler", "traveller",
        "mother", "father", "gentleman", "pitcher", "player", "skier", "snowboarder", "skater",
        "skateboarder", "foreigner", "caller", "offender", "coworker", "trespasser", "patient", "politician",
        "soldier", "grandchild", "serviceman", "walker", "drinker", "doctor", "bicyclist", "cyclist", "thief",
        "buyer", "teenager", "teen", "student", "camper", "driver", "hunter", "shopper", "villager",
        "surfer", "batter", "catcher", "umpire", "toddler", "infant", "youngster", "tourist", "pedestrian",
        "spectator", "athlete", "customer", "vendor", "farmer", "businessman", "businesswoman", "fireman",
        "firefighter", "human", "friend", "daughter", "son", "wife", "husband", "grandmother",
        "grandfather", "dad", "mom", "nurse", "waiter", "waitress", "cook", "swimmer", "jockey", "performer",
        "musician", "someone", "individual", "fisherman", "motorcyclist", "girlfriend", "boyfriend",
    ),
    "bicycle": ("bike", "unicycle", "minibike", "trike", "tricycle"),
    "car": ("automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab", "jeep", "coupe", "taxicab",
            "limo", "limousine", "taxi"),
    "motorcycle": ("scooter", "motor bike", "motor cycle", "motorbike", "moped", "dirt bike"),
    "airplane": ("jetliner", "plane", "air plane", "monoplane", "aircraft", "jet", "airbus", "biplane",
                 "seaplane", "airliner", "aeroplane", "passenger jet"),
    "bus": ("minibus", "trolley", "double decker"),
    "train": ("locomotive", "tramway", "caboose", "tram", "passenger train"),
    "truck": ("pickup", "lorry", "hauler", "firetruck", "fire truck", "pickup truck"),
    "boat": ("ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat", "speedboat", "canoe", "skiff",
             "yacht", "kayak", "catamaran", "pontoon", "houseboat", "vessel", "rowboat", "trawler",
             "ferryboat", "watercraft", "tugboat", "schooner", "barge", "ferry", "sailboard", "paddleboat",
             "lifeboat", "freighter", "steamboat", "riverboat", "battleship", "steamship", "jet ski"),
    "traffic light": ("street light", "traffic signal", "stop light", "streetlight", "stoplight"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": ("pew", "park bench"),
    "bird": ("ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon", "robin", "pelican",
             "waterfowl", "heron", "hummingbird", "mallard", "finch", "pigeon", "sparrow", "seabird", "osprey",
             "blackbird", "fowl", "shorebird", "woodpecker", "egret", "chickadee", "quail", "bluebird",
             "kingfisher", "buzzard", "willet", "gull", "swan", "bluejay", "flamingo", "cormorant", "parrot",
             "loon", "gosling", "waterbird", "pheasant", "rooster", "sandpiper", "crow", "raven", "turkey",
             "oriole", "cowbird", "warbler", "magpie", "peacock", "cockatiel", "lorikeet", "puffin",
             "vulture", "condor", "macaw", "peafowl", "cockatoo", "songbird", "chicken", "hen", "eagle"),
    "cat": ("kitten", "feline", "tabby", "kitty"),
    "dog": ("puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund", "rottweiler", "canine",
            "pitbull", "collie", "pug", "terrier", "poodle", "labrador", "doggie", "doberman", "mutt", "doggy",
            "spaniel", "bulldog", "sheepdog", "sheep dog", "weimaraner", "corgi", "cocker", "greyhound",
            "retriever", "brindle", "hound", "whippet", "husky"),
    "horse": ("colt", "pony", "racehorse", "stallion", "equine", "mare", "foal", "palomino", "mustang",
              "clydesdale", "bronc", "bronco"),
    "sheep": ("lamb", "ram", "goat", "ewe"),
    "cow": ("cattle", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu", "bison"),
    "elephant": (),
    "bear": ("panda", "grizzly"),
    "zebra": (),
    "giraffe": (),
    "backpack": ("knapsack", "back pack", "rucksack"),
    "umbrella": ("parasol",),
    "handbag": ("wallet", "purse", "briefcase", "hand bag"),
    "tie": ("necktie", "bow tie"),
    "suitcase": ("suit case", "luggage"),
    "frisbee": ("flying disc",),
    "skis": ("ski",),
    "snowboard": ("snow board",),
    "sports ball": ("ball", "soccer ball", "tennis ball", "beach ball"),
    "kite": (),
    "baseball bat": ("bat",),
    "baseball glove": ("mitt", "baseball mitt", "catcher mitt"),
    "skateboard": ("skate board",),
    "surfboard": ("longboard", "skimboard", "shortboard", "wakeboard", "surf board"),
    "tennis racket": ("racket", "racquet", "tennis racquet"),
    "bottle": (),
    "wine glass": ("wineglass", "glass of wine"),
    "cup": ("mug",),
    "fork": (),
    "knife": ("pocketknife",),
    "spoon": (),
    "bowl": (),
    "banana": (),
    "apple": (),
    "sandwich": ("burger", "cheeseburger", "hamburger", "sub sandwich"),
    "orange": (),
    "broccoli": (),
    "carrot": (),
    "hot dog": ("hotdog", "corn dog"),
    "pizza": (),
    "donut": ("doughnut", "bagel"),
    "cake": ("cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("stool", "armchair"),
    "couch": ("sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("houseplant", "house plant"),
    "bed": (),
    "dining table": ("table", "desk"),
    "toilet": ("urinal", "commode", "lavatory", "potty", "toilet seat", "toilet bowl"),
    "tv": ("monitor", "television", "televison", "tv set", "television set", "computer monitor",
           "computer screen"),
    "laptop": ("computer", "netbook", "macbook", "laptop computer"),
    "mouse": ("computer mouse",),
    "remote": ("remote control", "tv remote", "television remote", "controller", "wii remote"),
    "keyboard": ("computer keyboard",),
    "cell phone": ("mobile phone", "phone", "cellphone", "telephone", "smartphone", "iphone", "smart phone"),
    "microwave": ("microwave oven",),
    "oven": ("stovetop", "stove", "stove top", "stove top oven"),
    "toaster": ("toaster oven",),
    "sink": (),
    "refrigerator": ("fridge", "freezer"),
    "book": (),
    "clock": (),
    "vase": (),
    "scissors": ("scissor",),
    "teddy bear": ("teddybear", "teddy", "stuffed animal", "stuffed bear"),
    "hair drier": ("hairdryer", "hair dryer", "hairdrier", "blow dryer"),
    "toothbrush": ("tooth brush",),
}
# CHAIR's rule: "baby <animal>" and "adult <animal>" name the animal, not a person.
_COCO_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")
for _animal in _COCO_ANIMALS:
    _COCO_SYNONYM_LISTS[_animal] += (f"baby {_animal}", f"adult {_animal}")

COCO_SYNONYMS: dict[str, str] = {
    phrase: label for label, phrases in _COCO_SYNONYM_LISTS.items() for phrase in phrases
}
# Phrases with an object word in them that name no COCO object (CHAIR keeps "home plate" and
# "train track" as double words for the same reason).
COCO_NON_OBJECTS: tuple[str, ...] = (
    "train track", "railroad track", "railway track", "train station", "train platform", "home plate",
    "bus stop", "bus station", "ski slope", "ski lift", "ski resort", "ski pole", "ski area", "ski run",
    "ski trail", "ski jump", "ski lodge", "ski jacket", "ski suit", "ski mask", "ski boot", "ski goggles",
    "toilet paper", "table tennis", "baby animal", "adult animal", "baby stroller", "baby carriage",
    "dog house", "bird house", "birdhouse", "cat food", "dog food", "bird feeder", "car park",
    "parking lot", "tennis court", "baseball field", "baseball game", "baseball cap", "baseball uniform",
)
COCO_MODIFIERS: frozenset[str] = frozenset({"orange", "remote", "male", "female"})


def coco_vocabulary() -> Vocabulary:
    """The 80 COCO categories with the CHAIR-style synonym table."""
    return Vocabulary(COCO_CATEGORIES, COCO_SYNONYMS, COCO_NON_OBJECTS, COCO_MODIFIERS)


# ----------------------------------------------------------------------------------------------------
# Mentions
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Rewriting
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# CHAIR
# ----------------------------------------------------------------------------------------------------

def chair(captions: Sequence[str], truths: Sequence[Mapping[str, int | None]], vocab: Vocabulary) -> dict:
    """CHAIR hallucination metrics (Rohrbach et al. 2018, "Object Hallucination in Image Captioning").

    Definitions, over the whole set, as in the reference implementation (utils/chair.py):

    - ``chair_i`` = hallucinated object mentions / all object mentions. A mention is each place a
      caption names an object (``find_mentions``): repeats count each time, as the reference counts
      every object word ("a dog chasing the dog" is two dog mentions), and "two dogs" is one mention.
    - ``chair_s`` = captions with at least one hallucinated mention / captions.
    - ``recall`` = sum over captions of |true object types mentioned| / sum of |true object types|.
    - ``exact`` = captions whose objects match the truth exactly / captions: the same set of labels,
      and every definite count said equals the true count (counts said vaguely, "some dogs", and true
      counts given as None are not checked); this is ``ObjectDiff.exact``. Not part of CHAIR.
    - ``mean_len`` = mean number of word tokens per caption.

    Truths are label -> count (the reference builds its truth from segmentation labels plus objects
    named in the reference captions; union those in beforehand to reproduce it). Ratios with an empty
    denominator are 0.0, as in the reference. The raw counts are returned too.
    """
    if len(captions) != len(truths):
        raise ValueError(f"chair: {len(captions)} captions but {len(truths)} truths; pass one truth per "
                         "caption")
    n_mentions = n_hall_mentions = n_hall_caps = n_true = n_true_said = n_exact = n_words = 0
    for caption, truth in zip(captions, truths, strict=True):
        true = canonical_truth(truth, vocab)
        found = find_mentions(caption, vocab)
        hall = sum(m.label not in true for m in found)
        n_mentions += len(found)
        n_hall_mentions += hall
        n_hall_caps += hall > 0
        n_true += len(true)
        n_true_said += len({m.label for m in found} & set(true))
        n_exact += compare(caption, truth, vocab).exact
        n_words += sum(t.is_word for t in tokenize(caption))
    n = len(captions)

    def ratio(a: int, b: int) -> float:
        return a / b if b else 0.0

    return {
        "chair_i": ratio(n_hall_mentions, n_mentions),
        "chair_s": ratio(n_hall_caps, n),
        "recall": ratio(n_true_said, n_true),
        "exact": ratio(n_exact, n),
        "mean_len": ratio(n_words, n),
        "captions": n,
        "hallucinated_captions": n_hall_caps,
        "object_mentions": n_mentions,
        "hallucinated_mentions": n_hall_mentions,
        "true_objects": n_true,
        "true_objects_mentioned": n_true_said,
        "exact_captions": n_exact,
        "words": n_words,
    }
