"""Rebuild tests/data/ptb_reference.json: coco-caption's tokenisation of tests/data/ptb_corpus.txt.

Runs pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, needs ``java`` on the PATH), which is
exactly what coco-caption feeds CIDEr and BLEU: PTB tokens, lower case, punctuation removed.

    .venv/bin/python tests/scripts/make_ptb_reference.py
"""

import json
from pathlib import Path

from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

DATA = Path(__file__).resolve().parents[1] / "data"


def coco_tokenize(captions: list[str]) -> list[str]:
    """Each caption as coco-caption tokenises it (one string of space-separated words)."""
    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0] for i in range(len(captions))]


def main() -> None:
    corpus = [line for line in (DATA / "ptb_corpus.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    reference = dict(zip(corpus, coco_tokenize(corpus)))
    (DATA / "ptb_reference.json").write_text(json.dumps(reference, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(reference)} captions written to {DATA / 'ptb_reference.json'}")


if __name__ == "__main__":
    main()
