"""A toy student for the offline demo: a tiny ViT + GPT-2 captioner of ``shapes`` scenes with a planted bias.

The demo needs a student with a *known* flaw, so that a critic grounded in the truth can be shown to
remove it, measured on held-out scenes. We pretrain one ourselves, on CPU, in a few minutes:

* **Perception.** A ``ViTModel`` whose patch size equals the shapes grid cell (24 px on a 72-px
  image), so each of the 9 encoder patch tokens sees exactly one cell, hence at most one whole
  object. Plain patches that straddle objects left a tiny ViT confusing shapes; aligning patches
  with the cells fixes that while staying a stock HF encoder (no custom code to save or load).
* **Language.** A 3-layer GPT-2 with the real tokenizer and the full 50,257-token vocabulary. The
  rows of the (tied) embedding matrix for tokens the shapes grammar never uses start at exactly
  zero and stay there during pretraining, so their logits are exactly 0 and the full-vocabulary
  softmax loss has a closed form that costs |grammar| instead of 50,257 columns
  (:func:`full_vocab_nll`). Later DPO rounds train all rows as usual.
* **The planted bias**, a toy co-occurrence hallucination: in the training captions, whenever a
  ``bias_trigger`` (red circle) is present and no ``bias_object`` (blue square) is, the bias object
  is appended with probability ``bias_prob``. The student learns to mention blue squares that are
  not there next to red circles; :func:`evaluate` measures how much of its hallucination is that.

A :class:`ToyRecipe` holds every setting; its hash names the cache directory
(``<cache>/toy-student/<hash>``), which is written atomically (trained into a temp dir, renamed).
``python -m refine.demo.toy_student`` (re)builds the student and prints its held-out evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refine.images import shapes
from refine.infra.cache import cache_key, default_cache_dir
from refine.offline.tokenizer import GPT2_VOCAB_SIZE

TRAINER_VERSION = 4  # bump whenever training code changes what a recipe produces
MAX_CAPTION_TOKENS = 32  # longest grammar caption: 7 items (6 + planted) = 27 GPT-2 tokens
EVAL_MAX_NEW_TOKENS = MAX_CAPTION_TOKENS


@dataclass(frozen=True)
class ToyRecipe:
    """Everything that determines the toy student. Change any field and it is retrained."""

    seed: int = 0
    train_scenes: int = 12000  # distinct training scenes (shapes "train" split, this seed)
    objects: tuple[int, int] = (1, 6)  # objects per scene; P(k) ∝ 0.75^k, so sparse scenes dominate
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3  # AdamW peak; linear warmup, then cosine decay to 0
    warmup_steps: int = 60
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    width: int = 128  # ViT hidden size = GPT-2 n_embd (equal, so no enc_to_dec projection)
    encoder_layers: int = 2
    decoder_layers: int = 3  # with 2, 14% of held-out hallucinations were not planted (3: 2%) and DPO drifted more
    heads: int = 4
    mlp_width: int = 256
    bias_trigger: str = "red circle"
    bias_object: str = "blue square"
    bias_prob: float = 0.5
    # Training runs on this many torch threads (restored afterwards). One makes the weights independent
    # of the core count (two runs gave identical bytes), and on our shared 2-core box it was 14x faster
    # than two (0.21 vs 2.9 s/step): two OpenMP threads spin-wait whenever another process holds a core.
    torch_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("bias_trigger", "bias_object"):
            if getattr(self, name) not in shapes.LABELS:
                raise ValueError(f"ToyRecipe.{name}={getattr(self, name)!r} is not a shapes label {shapes.LABELS}")
        if not 0.0 <= self.bias_prob <= 1.0:
            raise ValueError(f"ToyRecipe.bias_prob={self.bias_prob} must be in [0, 1]")
        if self.batch_size > self.train_scenes:
            raise ValueError(f"ToyRecipe.batch_size={self.batch_size} exceeds train_scenes={self.train_scenes}")
        if self.width % self.heads:
            raise ValueError(f"ToyRecipe.width={self.width} must be divisible by heads={self.heads}")
        for name in ("train_scenes", "steps", "batch_size", "width", "encoder_layers", "decoder_layers", "heads",
                     "torch_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ToyRecipe.{name}={getattr(self, name)} must be >= 1")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Names the cache dir: the recipe plus the versions of the generator and of this trainer."""
        return cache_key("toy-student", TRAINER_VERSION, shapes.GENERATOR_VERSION, self.to_json())[:16]


# -- data --------------------------------------------------------------------------------------------
def training_caption(scene: shapes.Scene, recipe: ToyRecipe) -> str:
    """The caption the student is trained on: the reference, with the planted bias.

    When ``bias_trigger`` is present and ``bias_object`` is absent, ``bias_object`` is appended as the
    last item with probability ``bias_prob`` (a fixed coin per scene and seed).
    """
    fires = recipe.bias_trigger in scene.objects and recipe.bias_object not in scene.objects
    if fires and random.Random(f"toy-bias/{recipe.seed}/{scene.id}").random() < recipe.bias_prob:
        return shapes.describe([*scene.objects.items(), (recipe.bias_object, 1)])
    return scene.caption


def pixel_array(scenes: Sequence[shapes.Scene]) -> np.ndarray:
    """``[N, 3, H, W]`` uint8: compact storage for the training pool (normalised per batch)."""
    return np.stack([np.asarray(s.image.convert("RGB")) for s in scenes]).transpose(0, 3, 1, 2)


def normalise(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """What the saved ``ViTImageProcessor`` does (rescale 1/255, mean = std = 0.5), on a uint8 batch."""
    return (pixels_uint8.float() * (1 / 255) - 0.5) / 0.5


def grammar_token_ids(tokenizer) -> list[int]:
    """Every GPT-2 token the shapes grammar can produce (each word with and without its leading space), plus EOS."""
    words = {*shapes.NUMBER_WORDS, "an", "and", ",", *shapes.COLOURS}
    words |= {w for shape in shapes.SHAPES for w in (shape, shapes.plural(shape))}
    ids = {tokenizer.eos_token_id}
    for word in words:
        for text in (word, " " + word):
            ids.update(tokenizer(text, add_special_tokens=False).input_ids)
    return sorted(ids)


# -- model -------------------------------------------------------------------------------------------
def build_model(recipe: ToyRecipe, grammar_ids: Sequence[int]):
    """A randomly initialised ``VisionEncoderDecoderModel`` (ViT encoder, GPT-2 decoder) for ``recipe``.

    Embedding rows of tokens outside ``grammar_ids`` are zeroed (see :func:`full_vocab_nll`).
    """
    from refine.offline.models import random_vit_gpt2

    vit = dict(
        image_size=shapes.IMAGE_SIZE,
        patch_size=shapes.CELL,  # one token per grid cell
        hidden_size=recipe.width,
        num_hidden_layers=recipe.encoder_layers,
        num_attention_heads=recipe.heads,
        intermediate_size=recipe.mlp_width,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    gpt2 = dict(
        n_positions=MAX_CAPTION_TOKENS + 8,
        n_embd=recipe.width,
        n_layer=recipe.decoder_layers,
        n_head=recipe.heads,
        n_inner=recipe.mlp_width,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = random_vit_gpt2(vit, gpt2, recipe.seed)
    model.generation_config.max_new_tokens = MAX_CAPTION_TOKENS
    unused = torch.ones(GPT2_VOCAB_SIZE, dtype=torch.bool)
    unused[list(grammar_ids)] = False
    with torch.no_grad():
        model.decoder.get_input_embeddings().weight[unused] = 0.0
    return model


def build_image_processor():
    from refine.offline.models import vit_image_processor

    return vit_image_processor(shapes.IMAGE_SIZE)


def full_vocab_nll(hidden: torch.Tensor, used_weight: torch.Tensor, targets: torch.Tensor, n_unused: int) -> torch.Tensor:
    """Exact ``-log softmax`` over the full vocabulary when every unused output row is zero.

    Args:
        hidden: ``[N, C]`` final decoder states (after ``ln_f``), one per target token.
        used_weight: ``[U, C]`` output-embedding rows of the used tokens.
        targets: ``[N]`` long, each target's index into the used rows.
        n_unused: number of vocabulary rows that are exactly zero; their logits are all 0, so they
            add ``n_unused · e^0`` to the partition function: ``logsumexp = log(Σ_used e^z + n_unused)``.

    Returns: ``[N]`` per-token NLL, equal to ``cross_entropy(hidden @ W_full.T, target)``.
    """
    logits = hidden @ used_weight.T  # [N, U]
    unused = torch.full_like(logits[:, :1], math.log(n_unused))  # log Σ_unused e^0
    log_partition = torch.logsumexp(torch.cat([logits, unused], dim=1), dim=1)
    return log_partition - logits.gather(1, targets.unsqueeze(1)).squeeze(1)


def _grammar_nll(model, grammar_rows: torch.Tensor, grammar_index: torch.Tensor, n_unused: int,
                 pixel_values: torch.Tensor, tokens) -> torch.Tensor:
    """``[N]`` per-target NLL over the full vocabulary, for a model whose non-grammar rows are zero.

    ``grammar_rows`` ``[U, C]`` stands in for the grammar rows of the tied embedding matrix (input
    embeddings and output head alike); ``grammar_index`` ``[V]`` maps a token id to its row (-1: none).
    Everything else is ``VisionEncoderDecoderModel.forward``; the encoder and decoder widths are equal,
    so the model has no ``enc_to_dec_proj`` to apply.
    """
    encoder_states = model.encoder(pixel_values=pixel_values).last_hidden_state
    states = model.decoder.transformer(
        inputs_embeds=grammar_rows[grammar_index[tokens.decoder_input_ids]],
        attention_mask=tokens.mask,
        encoder_hidden_states=encoder_states,
    ).last_hidden_state
    keep = tokens.mask.bool()
    return full_vocab_nll(states[keep], grammar_rows, grammar_index[tokens.labels[keep]], n_unused)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of shuffled batches of scene indices; the short tail is dropped."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training scenes")
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def _lr_at(step: int, recipe: ToyRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(recipe: ToyRecipe, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pretrain a toy student from scratch into ``out_dir`` (saved with ``Student.save``).

    Deterministic for a given recipe on one kind of CPU: another CPU's vector instructions train other
    weights (``refine.infra.devices.numerics``; the log records them as ``machine``). Returns the training
    log it also writes to ``out_dir/train_log.json``.
    """
    from refine.infra.devices import preserved_torch_threads

    with preserved_torch_threads():
        torch.set_num_threads(recipe.torch_threads)
        return _train(recipe, out_dir, tokenizer_dir, log)


def _train(recipe: ToyRecipe, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None,
           log: Callable[[str], None]) -> dict[str, Any]:
    from transformers import GitProcessor

    from refine.infra.devices import numerics
    from refine.offline.tokenizer import load_gpt2_tokenizer
    from refine.students.ved import VisionEncoderDecoderStudent, fix_special_tokens

    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(recipe.seed)
    tokenizer = load_gpt2_tokenizer(tokenizer_dir)
    grammar_ids = grammar_token_ids(tokenizer)
    model = build_model(recipe, grammar_ids)
    fix_special_tokens(model, tokenizer)
    image_processor = build_image_processor()
    student = VisionEncoderDecoderStudent(model, image_processor, tokenizer,
                                          processor=GitProcessor(image_processor=image_processor, tokenizer=tokenizer))

    scenes = shapes.make_scenes(recipe.train_scenes, "train", recipe.seed, recipe.objects)
    captions = [training_caption(s, recipe) for s in scenes]
    pixels = torch.from_numpy(pixel_array(scenes))
    used = torch.tensor(grammar_ids)
    grammar_index = torch.full((GPT2_VOCAB_SIZE,), -1, dtype=torch.long)
    grammar_index[used] = torch.arange(len(grammar_ids))
    n_unused = GPT2_VOCAB_SIZE - len(grammar_ids)
    data_seconds = time.perf_counter() - start

    # Train the grammar rows of the tied embedding as their own small parameter: the other 50k rows
    # stay exactly zero, and AdamW then never touches a 50257 x width matrix.
    embeddings = model.decoder.get_input_embeddings().weight  # tied with lm_head
    embeddings.requires_grad_(False)
    grammar_rows = torch.nn.Parameter(embeddings[used].clone())
    params = [p for p in model.parameters() if p.requires_grad] + [grammar_rows]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    lengths = [len(ids) for ids in tokenizer(captions, add_special_tokens=False).input_ids]
    # Divide summed token losses by the *expected* tokens per batch (targets = caption tokens + EOS),
    # not by this batch's count: every token then weighs the same whatever else shares its batch.
    tokens_per_batch = recipe.batch_size * (sum(lengths) / len(lengths) + 1)
    generator = torch.Generator().manual_seed(recipe.seed)
    batches: list[list[int]] = []
    history = []
    model.train()
    for step in range(recipe.steps):
        if not batches:  # next epoch, reshuffled
            batches = epoch_batches(len(scenes), recipe.batch_size, generator)[::-1]
        idx = batches.pop()
        tokens = student.tokenize([captions[i] for i in idx])
        if (grammar_index[tokens.labels] < 0).any():
            raise RuntimeError("a training caption uses a token outside grammar_token_ids(); extend the grammar word list")
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, recipe)
        pixel_values = normalise(pixels[torch.tensor(idx)])
        loss = _grammar_nll(model, grammar_rows, grammar_index, n_unused, pixel_values, tokens).sum() / tokens_per_batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            history.append({"step": step, "loss": round(loss.item(), 5), "seconds": round(elapsed, 1), "cpu_seconds": round(cpu, 1)})
            log(f"toy student: step {step:5d}/{recipe.steps}  loss {loss.item():.4f}  {elapsed:6.1f}s (cpu {cpu:.1f}s)")
    with torch.no_grad():
        embeddings[used] = grammar_rows
    embeddings.requires_grad_(True)
    model.eval()

    out = Path(out_dir)
    student.save(out)
    train_log = {
        "recipe": recipe.to_json(),
        "key": recipe.key(),
        "trainer_version": TRAINER_VERSION,
        "generator_version": shapes.GENERATOR_VERSION,
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "planted_captions": sum(c != s.caption for c, s in zip(captions, scenes, strict=True)),
        "machine": numerics(),  # the same recipe trains other weights on a CPU with other vector instructions
        "history": history,
    }
    (out / "train_log.json").write_text(json.dumps(train_log, indent=1))
    return train_log


# -- cache -------------------------------------------------------------------------------------------
def toy_student_dir(recipe: ToyRecipe = ToyRecipe(), cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``recipe``'s student lives (built or not): ``<cache>/toy-student/<recipe hash>``."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "toy-student" / recipe.key()


def trained_on(student_dir: str | os.PathLike) -> dict[str, str] | None:
    """The machine a cached toy student was trained on (``train_log.json``'s ``machine``; None for a
    student trained before it was recorded)."""
    path = Path(student_dir) / "train_log.json"
    return json.loads(path.read_text()).get("machine") if path.is_file() else None


def ensure_toy_student(recipe: ToyRecipe = ToyRecipe(), cache_dir: str | os.PathLike | None = None,
                       log: Callable[[str], None] = print) -> Path:
    """The directory of ``recipe``'s pretrained student, training it first if it is not cached.

    Load it with ``refine.stages.student.load_student(path)``. The dir appears only complete: training writes
    into a temp dir beside it, which is renamed into place (a concurrent builder's copy is discarded).
    """
    final = toy_student_dir(recipe, cache_dir)
    if (final / "train_log.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log(f"toy student: training recipe {recipe.key()} into {final}")
    try:
        train(recipe, tmp, tokenizer_dir=final.parent / "gpt2-tokenizer", log=log)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep theirs
            if not (final / "train_log.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- evaluation --------------------------------------------------------------------------------------
def object_metrics(captions: Sequence[str], truths: Sequence[dict[str, int]], recipe: ToyRecipe = ToyRecipe()) -> dict[str, float]:
    """``refine.objects.chair`` (CHAIR_i, CHAIR_s, recall, exact, ...) plus the planted share.

    ``planted_share``: hallucinated mentions of ``bias_object`` in scenes holding ``bias_trigger``,
    over all hallucinated mentions (0.0 when there are none).
    """
    from refine.metrics.chair import chair
    from refine.objects import find_mentions

    vocab = shapes.vocabulary()
    result = chair(captions, truths, vocab)
    planted = 0
    for caption, truth in zip(captions, truths, strict=True):
        if recipe.bias_trigger in truth and recipe.bias_object not in truth:
            planted += sum(m.label == recipe.bias_object for m in find_mentions(caption, vocab))
    result["planted_mentions"] = planted
    result["planted_share"] = planted / result["hallucinated_mentions"] if result["hallucinated_mentions"] else 0.0
    return result


def evaluate(student, scenes: Sequence[shapes.Scene], recipe: ToyRecipe = ToyRecipe(),
             batch_size: int = 64) -> dict[str, Any]:
    """Greedy-caption ``scenes``; metrics overall, on sparse (1-3 objects) and dense (4+) scenes.

    Also reports ``trigger``: the metrics on scenes where the bias can fire (trigger present, bias
    object absent), and ``no_trigger``: on sparse scenes where it cannot.
    """
    captions = [c[0] for c in student.caption([s.image for s in scenes], max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                              batch_size=batch_size)]
    truths = [s.objects for s in scenes]

    def subset(keep: Callable[[shapes.Scene], bool]) -> dict[str, float]:
        idx = [i for i, s in enumerate(scenes) if keep(s)]
        return object_metrics([captions[i] for i in idx], [truths[i] for i in idx], recipe)

    def can_fire(s: shapes.Scene) -> bool:
        return recipe.bias_trigger in s.objects and recipe.bias_object not in s.objects

    return {
        "all": object_metrics(captions, truths, recipe),
        "sparse_1_3": subset(lambda s: len(s.items) <= 3),
        "dense_4_plus": subset(lambda s: len(s.items) >= 4),
        "trigger": subset(can_fire),
        "no_trigger_sparse": subset(lambda s: len(s.items) <= 3 and not can_fire(s)),
        "captions": captions,
    }


def format_metrics(result: dict[str, Any]) -> str:
    """:func:`evaluate`'s subsets as a plain-text table."""
    rows = [f"{'subset':<18} {'n':>5} {'CHAIR_s':>8} {'CHAIR_i':>8} {'recall':>7} {'exact':>6} {'halluc.':>8} {'planted':>8}"]
    for name, m in result.items():
        if name == "captions":
            continue
        rows.append(f"{name:<18} {m['captions']:>5} {m['chair_s']:>8.3f} {m['chair_i']:>8.3f} {m['recall']:>7.3f} "
                    f"{m['exact']:>6.3f} {m['hallucinated_mentions']:>8} {m['planted_share']:>8.3f}")
    return "\n".join(rows)


def _recipe_from_overrides(overrides: Sequence[str]) -> ToyRecipe:
    """``--set KEY=VALUE`` items as a recipe, each value typed by the config's own coercion."""
    from typing import get_type_hints

    from refine.config import coerce

    hints = get_type_hints(ToyRecipe)
    values: dict[str, Any] = {}
    for item in overrides:
        name, sep, raw = item.partition("=")
        if not sep or name not in hints:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(hints)}")
        values[name] = coerce(raw, hints[name], f"--set {name}")
    return ToyRecipe(**values)


def main(argv: Sequence[str] | None = None) -> int:
    from refine.offline import set_offline_env
    from refine.stages.student import load_student

    set_offline_env()  # everything here is local; keep litellm (imported for the tokenizer) off the network
    parser = argparse.ArgumentParser(prog="python -m refine.demo.toy_student", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", help="default: $REFINE_CACHE_DIR or ~/.cache/refine")
    parser.add_argument("--rebuild", action="store_true", help="retrain even if the recipe is cached")
    parser.add_argument("--heldout", type=int, default=600, help="held-out scenes to evaluate on")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a ToyRecipe field")
    parser.add_argument("--json", help="also write the evaluation (with captions) to this file")
    args = parser.parse_args(argv)

    recipe = _recipe_from_overrides(args.set)
    torch.set_num_threads(recipe.torch_threads)  # see ToyRecipe.torch_threads
    if args.rebuild:
        shutil.rmtree(toy_student_dir(recipe, args.cache_dir), ignore_errors=True)
    path = ensure_toy_student(recipe, args.cache_dir)
    train_log = json.loads((path / "train_log.json").read_text())
    print(f"toy student {recipe.key()} at {path} (trained in {train_log['train_seconds']} s)")
    student = load_student(path, device="cpu", precision="fp32")
    scenes = shapes.make_scenes(args.heldout, "heldout", seed=recipe.seed, objects=recipe.objects)
    start = time.perf_counter()
    result = evaluate(student, scenes, recipe)
    print(f"held-out evaluation on {len(scenes)} scenes ({time.perf_counter() - start:.1f} s):")
    print(format_metrics(result))
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": recipe.to_json(), "path": str(path), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
