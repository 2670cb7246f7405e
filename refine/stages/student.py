"""The student: a Hugging Face ``VisionEncoderDecoderModel`` captioner, and the two stages it runs.

Owns loading (hub id or local dir), batched captioning, per-caption log-probabilities and saving; and
the caption stage (main caption plus samples per image, :func:`caption`) and the eval stage (greedy
captions of a held-out set, :func:`evaluate`), which share one batched loop.

Token layout used for scoring a caption ``c`` (GPT-2 decoders: BOS = EOS = PAD = 50256)::

    decoder input : [start] c_1 c_2 ... c_n
    targets       :  c_1    c_2 ... c_n  [eos]

A caption's log-probability is the sum over its ``n + 1`` targets. EOS is included because "stop
here" is part of what a caption says: without it, "a dog" would score at least as well as "a dog and
a cat" whenever the model wanted to continue. Padding is masked by length, never by token id, since
GPT-2 pads with the EOS id.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from refine.config import DEFAULT_STUDENT
from refine.infra.devices import autocast, pick_device, resolve_precision
from refine.infra.hub import load_failure


class FastSampling:
    """A logits processor that makes greedy decoding draw one token per sequence from ``softmax(logits / T)``
    (after a ``top_p`` nucleus, as transformers builds it), exactly, without ``torch.multinomial`` over
    the whole vocabulary (74% of a small student's captioning time on CPU).

    Each draw inverts the distribution's CDF at one uniform number ``u``, with the ``k`` likeliest tokens
    ordered first: with ``m`` their probability mass, ``u < m`` picks among them (a cumulative sum over
    ``k`` entries), else ``u - m`` picks from the rest of the vocabulary (rare; a full cumulative sum
    over the rows that need it). The whole-vocabulary work per step is one ``logsumexp`` and one ``topk``.
    The processor returns scores that are 0 at the drawn token and -inf elsewhere, so greedy picks it.

    ``uniforms`` (``[B, steps]``) fixes each sequence's numbers in advance, from its own seed: a
    sequence's sample then depends on its seed alone, not on which other sequences share its batch, the
    batch size, the chunk or the process (see :func:`image_uniforms`). Without it, the numbers come
    from torch's global generator.
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, k: int = 64,
                 uniforms: torch.Tensor | None = None):
        if temperature <= 0 or not 0 < top_p <= 1 or k < 1:
            raise ValueError(f"temperature={temperature} must be > 0, top_p={top_p} in (0, 1], k={k} >= 1")
        self.temperature, self.top_p, self.k = temperature, top_p, k
        self.uniforms, self.step = uniforms, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            beyond = probs.cumsum(-1) - probs >= self.top_p  # the tokens ranked after the nucleus is full
            scores = scores.masked_fill(torch.zeros_like(beyond).scatter(-1, order, beyond), float("-inf"))
        if self.uniforms is None:
            u = torch.rand(scores.shape[0], device=scores.device)
        else:
            if self.step >= self.uniforms.shape[1]:
                raise ValueError(f"FastSampling was given uniforms for {self.uniforms.shape[1]} steps; step {self.step + 1} needs more")
            u = self.uniforms[:, self.step].contiguous().to(scores.device)
        self.step += 1
        log_total = scores.logsumexp(-1, keepdim=True)
        top_scores, top_tokens = scores.topk(min(self.k, scores.shape[-1]), dim=-1)
        top_cdf = (top_scores - log_total).exp().cumsum(-1)  # [B, k]
        mass = top_cdf[:, -1]
        pick = torch.searchsorted(top_cdf, u.unsqueeze(-1).contiguous(), right=True).clamp(max=top_cdf.shape[-1] - 1)
        drawn = top_tokens.gather(-1, pick).squeeze(-1)
        tail = (u >= mass).nonzero().squeeze(-1)
        if len(tail):
            rest = (scores[tail] - log_total[tail]).exp().scatter(-1, top_tokens[tail], 0.0)
            rest_cdf = rest.cumsum(-1)
            # Rounding can leave u - m at or past the rest's total; the last token with mass takes it.
            target = torch.minimum((u[tail] - mass[tail]).unsqueeze(-1), rest_cdf[:, -1:] * (1 - 1e-6))
            has_rest = rest_cdf[:, -1] > 0  # else all the mass was in the top k: keep that draw
            index = torch.searchsorted(rest_cdf, target, right=True).squeeze(-1).clamp(max=rest.shape[-1] - 1)
            drawn[tail[has_rest]] = index[has_rest]
        return torch.full_like(scores, float("-inf")).scatter(-1, drawn.unsqueeze(-1), 0.0)


def image_uniforms(seeds: Sequence[int], n: int, steps: int) -> torch.Tensor:
    """``[len(seeds) * n, steps]`` uniform numbers for ``n`` samples of each image, image ``i``'s rows from
    its own generator seeded with ``seeds[i]``."""
    return torch.cat([torch.rand(n, steps, generator=torch.Generator().manual_seed(s)) for s in seeds])


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit seed for one image's samples: the stage's seed and the image's id."""
    digest = hashlib.blake2b(f"{seed}/{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class TokenizedCaptions:
    """Captions ready for teacher forcing. Shapes: ``[B, T]``; ``lengths[B]`` counts targets incl. EOS."""

    decoder_input_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def sequence_logps(
    model: nn.Module,
    pixel_values: torch.Tensor,
    captions: TokenizedCaptions,
    image_index: torch.Tensor,
) -> torch.Tensor:
    """Summed log p(caption | image) for each caption, running the encoder once per image.

    Args:
        pixel_values: ``[N, 3, H, W]``, one row per distinct image.
        captions: ``B`` tokenized captions.
        image_index: ``[B]`` long, the row of ``pixel_values`` each caption describes.

    Returns: ``[B]`` float32 summed log-probabilities over the targets (EOS included, padding masked).
    """
    encoder_states = model.encoder(pixel_values=pixel_values).last_hidden_state  # [N, S, C]
    encoder_states = encoder_states.index_select(0, image_index)  # [B, S, C]; grads sum back per image
    out = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
        decoder_input_ids=captions.decoder_input_ids,
        decoder_attention_mask=captions.mask,
    )
    logps = torch.log_softmax(out.logits.float(), dim=-1)  # [B, T, V]
    token_logps = logps.gather(-1, captions.labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return (token_logps * captions.mask).sum(-1)


class CaptionScorer(nn.Module):
    """``sequence_logps`` as a module, so DDP / accelerate can wrap the whole scoring forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, captions: TokenizedCaptions, image_index):
        return sequence_logps(self.model, pixel_values, captions, image_index)


@dataclass
class Student:
    """A captioner plus the processor and tokenizer it needs. Construct with :func:`load_student`."""

    model: nn.Module
    image_processor: object
    tokenizer: object
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    # Decode with a static KV cache. On CUDA, transformers then compiles the decoder step
    # (torch.compile, CUDA graphs): per-token kernel-launch overhead, which dominates ViT-GPT2 at small
    # batches, goes away. Each new batch shape compiles once (tens of seconds), so it pays off for
    # latency-bound or long runs; see bench/README.md for the measured latencies.
    static_cache: bool = False

    @property
    def positions(self) -> int | None:
        """How many tokens the decoder can hold (its position embeddings), the start token included."""
        decoder = self.model.config.decoder
        return getattr(decoder, "n_positions", None) or getattr(decoder, "max_position_embeddings", None)

    # -- inputs --------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rgb = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt").pixel_values
        return pixels.to(self.device)

    def tokenize(self, captions: Sequence[str], max_tokens: int = 64) -> TokenizedCaptions:
        """Tokenize for teacher forcing (see the module docstring for the layout).

        A caption is cut to ``max_tokens``, and to what fits the decoder's positions (the start token
        takes one), so a long critic rewrite cannot index past the position embeddings. A cut caption
        gets no EOS target: it did not end there, and training must not teach it to.
        """
        cfg = self.model.config
        start, eos = cfg.decoder_start_token_id, self.tokenizer.eos_token_id
        if self.positions:
            max_tokens = min(max_tokens, self.positions - 1)
        full = [self.tokenizer(c.strip(), add_special_tokens=False).input_ids for c in captions]
        ids = [x[:max_tokens] for x in full]
        T = max(len(x) for x in ids) + 1
        B = len(ids)
        dec = torch.full((B, T), cfg.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, (x, whole) in enumerate(zip(ids, full)):
            n = len(x)
            dec[i, : n + 1] = torch.tensor([start, *x])
            labels[i, : n + 1] = torch.tensor([*x, eos])
            mask[i, : n + 1 if len(whole) == n else n] = 1  # a cut caption: no EOS target
        return TokenizedCaptions(dec.to(self.device), labels.to(self.device), mask.to(self.device), mask.sum(1).to(self.device))

    # -- captioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def caption(
        self,
        images: Sequence[Image.Image],
        n: int = 1,
        sample: bool = False,
        num_beams: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 20,
        min_new_tokens: int = 0,
        batch_size: int = 16,
        seeds: Sequence[int] | None = None,
    ) -> list[list[str]]:
        """Caption each image ``n`` times: greedy (``n=1``), beam search, or ``n`` samples.

        ``seeds`` (one per image) makes each image's samples a function of its seed alone, whatever
        the batch; without it, sampling uses torch's global generator.
        Returns one list of ``n`` captions per image, in input order.
        """
        if seeds is not None and len(seeds) != len(images):
            raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
        if n > 1 and not sample and num_beams < n:
            raise ValueError(f"n={n} distinct captions need sample=True or num_beams >= n (got num_beams={num_beams})")
        self.model.eval()
        kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False)
        if not sample:
            kwargs.update(num_beams=num_beams, num_return_sequences=n)
        if self.static_cache:
            kwargs["cache_implementation"] = "static"
        out: list[list[str]] = []
        for i in range(0, len(images), batch_size):
            pixels = self.pixel_values(images[i : i + batch_size])
            with autocast(self.device, self.precision):
                if sample:  # greedy over a token drawn per sequence and step (see FastSampling)
                    from transformers import LogitsProcessorList

                    uniforms = None if seeds is None else image_uniforms(seeds[i : i + batch_size], n, max_new_tokens)
                    kwargs["logits_processor"] = LogitsProcessorList([FastSampling(temperature, top_p, uniforms=uniforms)])
                    # the encoder runs once per image; its states are repeated for the n samples
                    states = self.model.encoder(pixel_values=pixels).last_hidden_state.repeat_interleave(n, dim=0)
                    ids = self.model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=states), **kwargs)
                else:
                    ids = self.model.generate(pixel_values=pixels, **kwargs)
            text = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            out.extend(text[j : j + n] for j in range(0, len(text), n))
        return out

    # -- scoring -------------------------------------------------------------------------------
    def logps(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        image_index: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Summed log p(caption_b | images[image_index[b]]), shape ``[B]``; differentiable.

        ``image_index`` defaults to ``range(len(captions))`` (one caption per image).
        """
        index = torch.arange(len(captions)) if image_index is None else torch.as_tensor(list(image_index))
        tokens = self.tokenize(captions)
        with autocast(self.device, self.precision):
            return sequence_logps(self.model, self.pixel_values(images), tokens, index.to(self.device))

    # -- state ---------------------------------------------------------------------------------
    def copy(self) -> Student:
        """A deep copy of the model sharing the (stateless) processor and tokenizer."""
        return Student(copy.deepcopy(self.model), self.image_processor, self.tokenizer, self.device, self.precision,
                       self.static_cache)

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write a dir loadable by ``VisionEncoderDecoderModel.from_pretrained`` and ``pipeline``.

        transformers 5 removed the ``image-to-text`` pipeline; the name now maps to
        ``image-text-to-text``, which needs a ``ProcessorMixin`` that returns ``pixel_values`` and
        ``input_ids``. ``GitProcessor`` is exactly "an image processor plus a tokenizer", so we save one.
        The pipeline then wants a text prompt: pass the decoder-start token, e.g.
        ``pipe(image, text=tokenizer.bos_token, return_full_text=False)``.
        """
        from transformers import GitProcessor

        self.model.save_pretrained(out_dir)
        GitProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer).save_pretrained(out_dir)


def _fix_special_tokens(model, tokenizer) -> None:
    """GPT-2 has no pad token and no decoder-start token; use EOS for both, as ViT-GPT2 does."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = model.config
    if cfg.decoder_start_token_id is None:
        cfg.decoder_start_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if cfg.pad_token_id is None:
        cfg.pad_token_id = tokenizer.pad_token_id
    if getattr(cfg, "eos_token_id", None) is None:
        cfg.eos_token_id = tokenizer.eos_token_id
    gen = model.generation_config
    gen.decoder_start_token_id = cfg.decoder_start_token_id
    gen.pad_token_id = cfg.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.bos_token_id = cfg.decoder_start_token_id


def load_student(
    name_or_dir: str | os.PathLike = DEFAULT_STUDENT,
    device: str | None = None,
    precision: str = "auto",
    static_cache: bool = False,
) -> Student:
    """Load model, image processor and tokenizer from a hub id or a local directory.

    Weights stay in fp32 (they are the optimizer's master copy); ``precision`` sets autocast;
    ``static_cache`` see :class:`Student`.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    dev = pick_device(device, "student.device")  # before loading anything: a missing GPU fails at once
    name = str(name_or_dir)
    try:
        model = VisionEncoderDecoderModel.from_pretrained(name)
        image_processor = AutoImageProcessor.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise load_failure("student", name, e, "student.model") from e
    _fix_special_tokens(model, tokenizer)
    return Student(model.to(dev), image_processor, tokenizer, dev, resolve_precision(precision, dev), static_cache)


# -- the caption and eval stages ---------------------------------------------------------------------

@dataclass
class CaptionSet:
    """The caption stage's row for one image: the main caption (greedy or beam) and the sampled ones."""

    image_id: str
    caption: str
    samples: list[str] = field(default_factory=list)

    def texts(self) -> list[str]:
        return [self.caption, *self.samples]


@dataclass
class EvalCaption:
    """The eval stage's row: a held-out image's greedy caption, with its truth for the object metrics."""

    image_id: str
    caption: str
    objects: dict[str, int] | None = None


def caption_batches(student: Student, records: Sequence, cfg, samples: int = 0, num_beams: int = 1,
                    progress: Callable[[int], None] = lambda n: None, seed: int = 0):
    """Yield one list of ``(record, main caption, sampled captions)`` per ``cfg.batch_size`` images, in
    order: the main caption with ``num_beams`` (1 = greedy), then ``samples`` sampled ones per image,
    drawn from a generator per image seeded by ``(seed, image id)``. Pixels are decoded a batch at a
    time."""
    for i in range(0, len(records), cfg.batch_size):
        batch = records[i : i + cfg.batch_size]
        images = [r.image for r in batch]
        main = student.caption(images, num_beams=num_beams, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        sampled = (student.caption(images, n=samples, sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                   seeds=[image_seed(seed, r.id) for r in batch])
                   if samples else [[] for _ in batch])
        yield [(record, m[0], s) for record, m, s in zip(batch, main, sampled)]
        progress(len(batch))


def _streamed(records: Sequence, done: Sequence, batches, make, sink, batch_size: int, ranks=None,
              progress: Callable[[int], None] = lambda n: None) -> list:
    """Rows for ``records`` in order: ``done`` ones as recorded, the rest from ``batches(todo)`` (made
    into rows by ``make``), each batch given to ``sink`` as it finishes.

    With ``ranks`` (a data-parallel run), the todo is cut into chunks of ``world`` batches; each process
    captions its batch of a chunk, and every process gets the chunk's rows. A batch is then exactly the
    batch one process would caption, so the rows are those of a one-process run.
    """
    have = {row.image_id: row for row in done}
    todo = [r for r in records if r.id not in have]
    world = ranks.world if ranks is not None else 1
    for i in range(0, len(todo), batch_size * world):
        chunk = todo[i : i + batch_size * world]
        mine = ranks.shard(chunk, batch_size) if world > 1 else chunk
        rows = [make(*item) for part in batches(mine) for item in part]
        if world > 1:
            rows = [row for part in ranks.gather(rows) for row in part]
        sink(rows)
        progress(len(rows))
        have.update((row.image_id, row) for row in rows)
    return [have[r.id] for r in records]


def caption(student: Student, records: Sequence, cfg, seed: int = 0,
            progress: Callable[[int], None] = lambda n: None, done: Sequence[CaptionSet] = (),
            sink: Callable[[list[CaptionSet]], None] = lambda rows: None, ranks=None) -> list[CaptionSet]:
    """The caption stage: the main caption plus ``cfg.n_samples`` sampled captions per image, in record
    order. An image's samples depend only on ``seed`` (the loop passes one per run seed and round) and
    its id, not on the order, batching, chunking or process of the images. ``done``: rows an earlier
    session recorded (not captioned again); each finished batch goes to ``sink``. ``ranks``: see
    :func:`_streamed`."""
    progress(len({row.image_id for row in done}))
    return _streamed(records, done, lambda todo: caption_batches(student, todo, cfg, cfg.n_samples, cfg.num_beams,
                                                                  seed=seed),
                     lambda r, main, samples: CaptionSet(r.id, main, samples), sink, cfg.batch_size, ranks, progress)


def evaluate(student: Student, records: Sequence, cfg, done: Sequence[EvalCaption] = (),
             sink: Callable[[list[EvalCaption]], None] = lambda rows: None, ranks=None) -> list[EvalCaption]:
    """The eval stage: greedy captions; rows carry the truth, so metrics need nothing else."""
    return _streamed(records, done, lambda todo: caption_batches(student, todo, cfg),
                     lambda r, main, _: EvalCaption(r.id, main, r.objects), sink, cfg.batch_size, ranks)
