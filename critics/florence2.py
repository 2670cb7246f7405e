"""The Florence-2 critic: a local vision model says what is in the image, we compare the caption with it.

For each image Florence-2 runs ``<MORE_DETAILED_CAPTION>`` and ``<OD>`` (object detection), plus
``<REGION_TO_DESCRIPTION>`` on up to ``max_regions`` boxes from ``request.regions.views`` (object crops
first, then tiles). Its objects are the OD labels (one count per box) and the objects its captions name,
all read through the same vocabulary as the student's caption (``refine.objects``); the critique is
``compare`` / ``rewrite`` against them, scored like the grounded critic.

Models: transformers' native classes (``Florence2ForConditionalGeneration`` + ``AutoProcessor``, in
transformers >= 4.56 / 5) load the ``florence-community/Florence-2-*`` checkpoints. The original
``microsoft/Florence-2-*`` repos need ``trust_remote_code=True`` and their own modelling code, which we do
not run. Every Florence-2 output is cached on disk (``refine.cache.DiskCache``) under (model id, task,
image sha256, task input, generation parameters); failures are never cached.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from PIL import Image

from critics.base import Critique, CritiqueRequest
from critics.grounded import critique_from_truth
from refine.config import DEFAULT_FLORENCE2_MODEL
from refine.infra.cache import DiskCache, cache_key
from refine.infra.hub import load_failure
from refine.objects import Vocabulary, coco_vocabulary, mentions

DEFAULT_FLORENCE2 = DEFAULT_FLORENCE2_MODEL
CAPTION_TASK = "<MORE_DETAILED_CAPTION>"
OD_TASK = "<OD>"
REGION_TASK = "<REGION_TO_DESCRIPTION>"
_MISSING = object()


class Florence2(NamedTuple):
    """A loaded Florence-2. Unpacks into ``Florence2Critic(model, processor)``."""

    model: Any  # transformers.Florence2ForConditionalGeneration, in eval mode, on its device
    processor: Any  # transformers.Florence2Processor


def load_florence2(model_id: str = DEFAULT_FLORENCE2, device: str | None = None, dtype: str = "auto") -> Florence2:
    """Load a Florence-2 checkpoint (hub id or local dir) with transformers' native classes.

    ``device``: None / "auto" picks CUDA when present. ``dtype``: "auto" is fp16 on CUDA and fp32 on CPU;
    or "fp32", "fp16", "bf16".
    """
    import torch
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from refine.infra.devices import pick_device

    dev = pick_device(device)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        dtype = "fp16" if dev.type == "cuda" else "fp32"
    if dtype not in dtypes:
        raise ValueError(f"load_florence2: dtype={dtype!r} is not one of {['auto', *dtypes]}")
    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = Florence2ForConditionalGeneration.from_pretrained(model_id, dtype=dtypes[dtype]).to(dev).eval()
    except OSError as e:
        raise load_failure("Florence-2 critic", model_id, e, "critic.model") from e
    return Florence2(model, processor)


def florence_objects(od: Mapping[str, Any] | None, captions: Sequence[str], vocab: Vocabulary,
                     region_captions: Sequence[str] = ()) -> dict[str, int | None]:
    """What Florence-2 sees, as label -> count (None: present, count unknown).

    ``od`` is the parsed ``<OD>`` answer (``{"bboxes": [...], "labels": [...]}``): each box counts one for
    the label its name reads as ("man" -> person; names outside the vocabulary are ignored). ``captions``
    (its detailed captions) add the objects they name, with their definite counts; a label's count is
    the largest definite count from boxes and captions. ``region_captions`` only add presence.
    """
    boxes: dict[str, int] = {}
    for name in (od or {}).get("labels", []):
        for label in mentions(name, vocab):
            boxes[label] = boxes.get(label, 0) + 1
    out: dict[str, int | None] = dict(boxes)
    for text in captions:
        for label, count in mentions(text, vocab).items():
            if count is not None:
                out[label] = max(out.get(label) or 0, count)
            else:
                out.setdefault(label, None)
    for text in region_captions:
        for label in mentions(text, vocab):
            out.setdefault(label, None)
    return out


def _checked_image(request: CritiqueRequest) -> Image.Image:
    image = request.image
    if not isinstance(image, Image.Image):
        raise TypeError(f"request.image is {type(image).__name__}, not a PIL image")
    image.load()
    if image.width < 1 or image.height < 1:
        raise ValueError(f"request.image is {image.width}x{image.height} pixels; it needs at least 1x1")
    return image.convert("RGB")


@dataclass
class _Job:
    request_index: int
    task: str
    prompt: str  # task token plus its input, e.g. "<REGION_TO_DESCRIPTION><loc_1>...<loc_9>"
    image: Image.Image
    key: str


class Florence2Critic:
    """``Critic`` backed by a local Florence-2. Batched over requests; never raises for one item.

    Args:
        model, processor: from ``load_florence2`` (loading happens there, not here):
            ``Florence2Critic(*load_florence2(model_id), cache=cache)``.
        model_id: names the model in the critic id and cache keys; default the id it was loaded from.
        vocabulary: objects read from both captions; default COCO's 80 with CHAIR's synonyms.
        cache: where Florence-2 outputs are kept; default ``DiskCache(namespace="florence2")``.
        max_new_tokens, num_beams: generation settings (greedy beam search, no sampling), part of the key.
        max_regions: region descriptions per image (0 turns them off).
        batch_size: images per ``generate`` call.
    """

    def __init__(self, model: Any, processor: Any, model_id: str | None = None, vocabulary: Vocabulary | None = None,
                 cache: DiskCache | None = None, max_new_tokens: int = 256, num_beams: int = 3, max_regions: int = 3,
                 batch_size: int = 8):
        self.model = model
        self.processor = processor
        self.model_id = model_id or getattr(model, "name_or_path", "") or DEFAULT_FLORENCE2
        self.id = f"florence2:{self.model_id}"
        self.vocabulary = vocabulary
        self.cache = cache if cache is not None else DiskCache(namespace="florence2")
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.max_regions = max_regions
        self.batch_size = batch_size

    free = True  # a local model: no budget counts it
    @property
    def params(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": False}

    def _region_prompts(self, request: CritiqueRequest, image: Image.Image) -> list[str]:
        """``<REGION_TO_DESCRIPTION>`` prompts for the request's crop views, then tiles."""
        import torch

        views = list(getattr(request.regions, "views", None) or [])
        views = [v for v in views if v.kind == "crop"] + [v for v in views if v.kind == "tile"]
        prompts = []
        for view in views[: self.max_regions]:
            box = torch.tensor([list(view.box)], dtype=torch.float32)
            # The processor's own quantizer: 1000 bins per side, as Florence-2 was trained.
            bins = self.processor.post_processor.quantize(box, size=image.size)[0].tolist()
            prompts.append(REGION_TASK + "".join(f"<loc_{b}>" for b in bins))
        return prompts

    def _generate(self, jobs: Sequence[_Job]) -> list[Any]:
        """One ``generate`` call for jobs of one task; returns the parsed answers in order."""
        import torch

        processor, model = self.processor, self.model
        inputs = processor(text=[j.prompt for j in jobs], images=[j.image for j in jobs], return_tensors="pt",
                           padding=True)
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                 do_sample=False)
        texts = processor.batch_decode(ids, skip_special_tokens=False)
        return [processor.post_process_generation(text, task=j.task, image_size=j.image.size)[j.task]
                for text, j in zip(texts, jobs, strict=True)]

    def _run(self, jobs: Sequence[_Job]) -> tuple[list[Any], list[bool]]:
        """Per job: its answer (or the exception it raised) and whether it came from the cache.

        Jobs with the same key (several captions of one image) run once. Misses are generated in batches
        of ``batch_size`` per task; when a batch fails, its jobs are rerun one by one so that only the bad
        image's jobs fail. Only answers are stored, never exceptions.
        """
        results: list[Any] = [None] * len(jobs)
        hits = [False] * len(jobs)
        first: dict[str, int] = {}  # key -> the job that computes it
        todo = []
        for n, job in enumerate(jobs):
            if job.key in first:
                continue
            first[job.key] = n
            value, hits[n] = self.cache.get_or_compute(job.key, lambda: _MISSING, cacheable=lambda _: False)
            if hits[n]:
                results[n] = value
            else:
                todo.append(n)
        self._generate_missing(jobs, todo, results)
        for n, job in enumerate(jobs):
            if first[job.key] != n:
                results[n], hits[n] = results[first[job.key]], hits[first[job.key]]
        return results, hits

    def _generate_missing(self, jobs: Sequence[_Job], todo: Sequence[int], results: list[Any]) -> None:
        for task in dict.fromkeys(jobs[n].task for n in todo):
            of_task = [n for n in todo if jobs[n].task == task]
            for b in range(0, len(of_task), self.batch_size):
                chunk = of_task[b : b + self.batch_size]
                try:
                    answers = self._generate([jobs[n] for n in chunk])
                except Exception:
                    answers = [self._generate_or_error(jobs[n]) for n in chunk]
                for n, answer in zip(chunk, answers, strict=True):
                    results[n] = answer
                    if not isinstance(answer, Exception):
                        self.cache.store.set(jobs[n].key, answer)

    def _generate_or_error(self, job: _Job) -> Any:
        try:
            return self._generate([job])[0]
        except Exception as e:
            return e

    def critique_many(self, requests: Sequence[CritiqueRequest]) -> list[Critique]:
        if self.vocabulary is None:
            self.vocabulary = coco_vocabulary()
        out: list[Critique | None] = [None] * len(requests)
        jobs: list[_Job] = []
        for r, request in enumerate(requests):
            try:
                image = _checked_image(request)
                prompts = [CAPTION_TASK, OD_TASK] + (self._region_prompts(request, image) if self.max_regions else [])
                for prompt in prompts:
                    task = prompt[: prompt.index(">") + 1]
                    key = cache_key("florence2", self.model_id, task, request.image_sha256, prompt,
                                    self.params)
                    jobs.append(_Job(r, task, prompt, image, key))
            except Exception as e:
                out[r] = Critique.failure(f"florence2 critic: image {getattr(request, 'image_id', '?')!r}: "
                                          f"{type(e).__name__}: {e}")
        try:
            answers, hits = self._run(jobs)
        except Exception as e:  # e.g. the cache is broken: every request fails, none is lost
            answers, hits = [e] * len(jobs), [False] * len(jobs)
        for r, request in enumerate(requests):
            if out[r] is not None:
                continue
            mine = [(j, a) for j, a in zip(jobs, answers, strict=True) if j.request_index == r]
            cache_hits = sum(h for j, h in zip(jobs, hits, strict=True) if j.request_index == r)
            errors = [a for _, a in mine if isinstance(a, Exception)]
            if errors:
                out[r] = Critique.failure(f"florence2 critic: image {request.image_id!r}: "
                                          f"{type(errors[0]).__name__}: {errors[0]}")
                continue
            try:
                out[r] = self._critique(request, mine)
                # A local model: no paid requests (usage stays empty); a critique counts as a cache hit
                # when every Florence-2 answer it needed came from the cache.
                out[r].meta.update(cache_hits=cache_hits, cache_hit=cache_hits == len(mine))
            except Exception as e:
                out[r] = Critique.failure(f"florence2 critic: image {request.image_id!r}: {type(e).__name__}: {e}")
        return out

    def _critique(self, request: CritiqueRequest, answers: Sequence[tuple[_Job, Any]]) -> Critique:
        caption = next(a for j, a in answers if j.task == CAPTION_TASK)
        od = next(a for j, a in answers if j.task == OD_TASK)
        regions = [a for j, a in answers if j.task == REGION_TASK]
        truth = florence_objects(od, [caption], self.vocabulary, regions)
        seen = {"caption": caption, "od_labels": list(od.get("labels", [])), "regions": regions, "objects": truth}
        critique = critique_from_truth(request.caption, truth, self.vocabulary,
                                       meta={"critic": self.id, "truth_source": "florence2", "florence": seen})
        critique.raw = json.dumps({"florence": seen, "critique": json.loads(critique.raw)}, sort_keys=True,
                                  default=str)
        critique.meta["generate_calls"] = len(answers)
        return critique
