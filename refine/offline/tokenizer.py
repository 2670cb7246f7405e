"""The real GPT-2 tokenizer without the hub, rebuilt from a rank file that litellm ships.

litellm (pulled in by textgrad) ships tiktoken's ``p50k_base`` rank file, whose first 50,256 ranks are
exactly GPT-2's vocabulary, so we rebuild ``vocab.json`` and ``merges.txt`` from it.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

GPT2_VOCAB_SIZE = 50257  # 50,256 BPE tokens + <|endoftext|>


_P50K_SHA1_NAME = "ec7223a39ce59f226a68acc30dc1af2788490e15"  # tiktoken's cache name for p50k_base


def find_p50k_base() -> Path:
    """The p50k_base rank file that litellm ships (no download)."""
    import litellm

    for root in Path(litellm.__file__).parent.rglob(_P50K_SHA1_NAME):
        return root
    raise FileNotFoundError(
        "tiktoken's p50k_base rank file was not found inside the installed litellm package; "
        "reinstall textgrad/litellm (`pip install -e .`) or pass a tokenizer dir instead."
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (openai/gpt-2, encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _split_by_bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run BPE on ``token`` using only merges ranked below ``max_rank``; the last merge is the one we want."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def write_gpt2_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write GPT-2's ``vocab.json`` and ``merges.txt`` into ``out_dir``, rebuilt from p50k_base."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks: dict[bytes, int] = {}
    for line in find_p50k_base().read_text().splitlines():
        token_b64, rank = line.split()
        if int(rank) < GPT2_VOCAB_SIZE - 1:
            ranks[base64.b64decode(token_b64)] = int(rank)
    byte_char = _bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = GPT2_VOCAB_SIZE - 1
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        left, right = _split_by_bpe(ranks, token, max_rank=rank)
        merges.append(f"{to_str(left)} {to_str(right)}")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def load_gpt2_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The real GPT-2 tokenizer, without the hub. Files are cached in ``cache_dir`` when given."""
    from transformers import GPT2TokenizerFast

    if cache_dir is None or not (Path(cache_dir) / "merges.txt").exists():
        import tempfile

        cache_dir = write_gpt2_tokenizer_files(cache_dir or tempfile.mkdtemp(prefix="gpt2-tok-"))
    return GPT2TokenizerFast.from_pretrained(str(cache_dir))
