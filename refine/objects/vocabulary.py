"""Vocabularies: object labels, the phrases that name them, and phrases that name no object; COCO's.

The COCO synonym table follows CHAIR's (Rohrbach et al. 2018, "Object Hallucination in Image
Captioning", EMNLP; data/synonyms.txt and the double-word rules of utils/chair.py in
LisaAnne/Hallucination), with the edits listed above ``_COCO_SYNONYM_LISTS``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from refine.objects.words import tokenize


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


