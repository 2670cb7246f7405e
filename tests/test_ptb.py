"""coco-caption's tokenisation without Java, and CIDEr-D / BLEU-4 against pycocoevalcap (the reference).

tests/data/ptb_reference.json is Stanford CoreNLP 3.4.1's PTBTokenizer, run through pycocoevalcap, on
tests/data/ptb_corpus.txt (245 captions: plain COCO-style ones and every phenomenon refine.ptb
handles). tests/scripts/make_ptb_reference.py rebuilds it; the last test re-runs the real tokenizer
when Java is installed, so the stored reference cannot drift from it.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest

from refine.metrics.ptb import ptb_tokens, ptb_words
from refine.metrics.text import cider_d, corpus_bleu

DATA = Path(__file__).parent / "data"
REFERENCE: dict[str, str] = json.loads((DATA / "ptb_reference.json").read_text(encoding="utf-8"))


def test_the_reference_covers_the_whole_corpus():
    corpus = [line for line in (DATA / "ptb_corpus.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert list(REFERENCE) == corpus and len(corpus) >= 200


@pytest.mark.parametrize("caption", list(REFERENCE), ids=range(len(REFERENCE)))
def test_every_caption_is_tokenised_as_coco_caption_does(caption):
    assert " ".join(ptb_words(caption)) == REFERENCE[caption]


def test_the_cases_that_used_to_differ():
    assert ptb_words("The cat cannot see the mouse.") == "the cat can not see the mouse".split()
    assert ptb_words("What a view!!!") == "what a view !!!".split()  # "!!!" is no punctuation to COCO
    assert ptb_words("A woman (wearing a hat).") == "a woman -lrb- wearing a hat -rrb-".split()
    assert ptb_tokens("It's 3 p.m.") == ["it", "'s", "3", "p.m.", "."]


def _caption_sets(n_images: int = 40, n_refs: int = 5, seed: int = 0):
    """``n_images`` (candidate, references) sets drawn from the corpus, deterministically."""
    rng = random.Random(seed)
    lines = list(REFERENCE)
    sets = []
    for _ in range(n_images):
        picked = rng.sample(lines, n_refs + 1)
        sets.append((picked[0], picked[1:]))
    # Overlap, so that every n-gram order has matches: every third candidate is one of its references.
    for i in range(0, n_images, 3):
        sets[i] = (sets[i][1][0], sets[i][1])
    return sets


def _pycoco(sets, tokenized):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {i: [tokenized(c)] for i, (c, _) in enumerate(sets)}
    gts = {i: [tokenized(r) for r in refs] for i, (_, refs) in enumerate(sets)}
    cider, per_image = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return cider, per_image, bleu[3]


def test_cider_d_and_bleu_4_match_pycocoevalcap():
    sets = _caption_sets()
    assert len({c for c, refs in sets for c in [c, *refs]}) > 120  # most of the corpus, in 40 sets
    cider, per_image, bleu4 = _pycoco(sets, REFERENCE.__getitem__)  # pycocoevalcap takes PTB-tokenised text
    ours = cider_d([c for c, _ in sets], [refs for _, refs in sets])
    assert ours.tolist() == pytest.approx(list(per_image), abs=1e-9)
    assert float(ours.mean()) == pytest.approx(cider, abs=1e-9)
    assert corpus_bleu([c for c, _ in sets], [refs for _, refs in sets]) == pytest.approx(bleu4, abs=1e-6)


@pytest.mark.skipif(shutil.which("java") is None, reason="the real PTBTokenizer needs Java (apt-get install default-jre-headless)")
def test_the_stored_reference_is_what_the_real_tokenizer_prints():
    sys.path.insert(0, str(Path(__file__).parent / "scripts"))
    from make_ptb_reference import coco_tokenize

    corpus = list(REFERENCE)
    assert coco_tokenize(corpus) == [REFERENCE[c] for c in corpus]
