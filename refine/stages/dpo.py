"""Preference optimisation of the student: DPO plus a likelihood term, against a frozen reference.

The maths is two pure functions of log-prob tensors (:func:`dpo_loss`, :func:`nll_per_token`).
:func:`update` is one round of training: it takes the student as it stood at the start of the round,
uses it (frozen) as the reference, and returns the trained student: a new one, or with
``in_place=True`` the input itself, trained after its reference log-probs were taken (one model in
memory instead of two; the loop does this, since the round's starting student is already on disk).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from refine.config import UpdateConfig
from refine.infra.devices import autocast, same_device, training_precision
from refine.infra.interrupts import stop_between_steps, stop_requested
from refine.stages.pairs import PreferencePair
from refine.stages.update_state import UpdateSaves
from refine.students import CaptionScorer, Student
from refine.students.base import vision_encoder


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss (Rafailov et al. 2023, Eq. 7), with TRL's two answers to flipped preferences.

    With ``z = β · [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]`` and ``ε =
    label_smoothing`` (the assumed share of flipped pairs):

    - ``"sigmoid"``: ``-(1 - ε) log σ(z) - ε log σ(-z)``; ε = 0 is DPO, ε > 0 conservative DPO
      (Mitchell 2023, "A note on DPO with noisy preferences").
    - ``"robust"``: ``(-(1 - ε) log σ(z) + ε log σ(-z)) / (1 - 2ε)``, Chowdhury et al. 2024, "Provably
      Robust DPO": unbiased for the loss on clean labels when a share ε is flipped.

    Args: four ``[B]`` tensors of summed sequence log-probs; ``beta`` is the KL strength (the paper
    uses 0.1-0.5; smaller lets the policy drift further from the reference).

    Returns: ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``. Rewards are the implicit
    ``β · log π/π_ref`` and carry no gradient; gradients reach only the policy inputs. When policy ==
    reference every loss is ln 2 (for "sigmoid", whatever ε).
    """
    # The reference is a constant of the objective: detach so no gradient can ever reach it.
    chosen_logratios = policy_chosen_logps - reference_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - reference_rejected_logps.detach()
    z = beta * (chosen_logratios - rejected_logratios)
    if loss == "sigmoid":
        losses = -F.logsigmoid(z) if not label_smoothing else \
            -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"loss={loss!r}: choose sigmoid or robust")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def image_preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_corrupted_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_corrupted_logps: torch.Tensor,
    beta: float,
    anchor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mDPO's image-side terms (Wang et al. 2024, "mDPO: Conditional Preference Optimization for
    Multimodal Large Language Models", Eqs. 3-4), for the chosen caption ``y_w`` with its image ``m``
    and with a corrupted image ``m'``:

        conditional = -log σ(β · [(log π(y_w|m) - log π_ref(y_w|m)) - (log π(y_w|m') - log π_ref(y_w|m'))])
        anchor      = -log σ(β · (log π(y_w|m) - log π_ref(y_w|m)) - δ)

    The first makes the caption depend on the image it describes (a caption the model would write
    for any picture gains nothing); the second keeps the chosen caption's reward above ``δ`` (0), so
    preferring it never means making it less likely. Inputs ``[B]``; returns two ``[B]`` losses.
    """
    chosen = policy_chosen_logps - reference_chosen_logps.detach()
    corrupted = policy_corrupted_logps - reference_corrupted_logps.detach()
    return -F.logsigmoid(beta * (chosen - corrupted)), -F.logsigmoid(beta * chosen - anchor)


def corrupt_image(image: Image.Image, rng: random.Random, keep: tuple[float, float] = (0.0, 0.2)) -> Image.Image:
    """mDPO's corrupted image: a random crop keeping a share of the area drawn from ``keep`` (at least
    one pixel), same aspect ratio; the processor resizes it like any image."""
    width, height = image.size
    side = max(rng.uniform(*keep), 1e-6) ** 0.5
    w, h = max(1, round(width * side)), max(1, round(height * side))
    x, y = rng.randint(0, width - w), rng.randint(0, height - h)
    return image.crop((x, y, x + w, y + h))


def nll_per_token(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``-logps / lengths``, ``[B]``. Keeps the chosen caption likely.

    Pure DPO can lower the chosen caption's likelihood as long as the rejected one falls faster; the
    likelihood term (as in RPO, Pang et al. 2024) anchors it. Per token, so long captions are not favoured.
    """
    return -logps / lengths.to(logps.dtype)


def _batches(n: int, batch_size: int, rng: random.Random | None) -> list[list[int]]:
    order = list(range(n))
    if rng is not None:
        rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


class _PairBatch:
    """Pairs of one minibatch as tensors: each distinct image once, chosen then rejected captions, and
    with ``corrupted`` images (one per pair, mDPO) the chosen captions again on those images."""

    def __init__(self, student: Student, pairs: Sequence[PreferencePair], images: Mapping[str, Image.Image],
                 corrupted: Sequence[Image.Image] | None = None, chosen_only: bool = False):
        ids = list(dict.fromkeys(p.image_id for p in pairs))
        row = {image_id: i for i, image_id in enumerate(ids)}
        self.n = len(pairs)
        index = [row[p.image_id] for p in pairs]
        captions = [p.chosen for p in pairs] + ([] if chosen_only else [p.rejected for p in pairs])
        if corrupted is not None:
            captions += [p.chosen for p in pairs]
            index_corrupt = [len(ids) + i for i in range(self.n)]
            self.pixel_values = student.pixel_values([images[i] for i in ids] + list(corrupted))
            self.image_index = torch.tensor(index + index + index_corrupt, device=student.device)
        else:
            self.pixel_values = student.pixel_values([images[i] for i in ids])
            self.image_index = torch.tensor(index if chosen_only else index + index, device=student.device)
        self.captions = student.tokenize(captions)
        self.weights = torch.tensor([p.weight for p in pairs], device=student.device)

    def split(self, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(chosen, rejected, chosen on corrupted images or None)`` of a ``[B]`` log-prob vector."""
        n = self.n
        return logps[:n], logps[n : 2 * n], (logps[2 * n :] if len(logps) > 2 * n else None)


@torch.no_grad()
def reference_logps(
    reference: Student,
    pairs: Sequence[PreferencePair],
    images: Mapping[str, Image.Image],
    batch_size: int = 16,
    precision: str | None = None,
    corrupted: Callable[[int], Image.Image] | None = None,
    rank: int = 0,
    world: int = 1,
    model: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(chosen, rejected, chosen on corrupted)`` log-probs under the frozen reference, ``[N]`` each
    (the last None without ``corrupted``, which gives pair ``i``'s corrupted image), computed once per
    round. With ``world`` processes each computes every ``world``-th pair, and an all-reduce (a sum
    with zeros elsewhere, so exact) gives every process all of them."""
    precision = precision or reference.precision
    model = model if model is not None else reference.model
    model.eval()
    n = len(pairs)
    out = torch.zeros(3, n, device=reference.device)
    mine = list(range(rank, n, world))
    for start in range(0, len(mine), batch_size):
        if world == 1 and stop_requested():  # several processes: their next step boundary stops them together
            raise KeyboardInterrupt
        idx = mine[start : start + batch_size]
        batch = _PairBatch(reference, [pairs[i] for i in idx], images,
                           [corrupted(i) for i in idx] if corrupted is not None else None)
        with autocast(reference.device, precision):
            logps = reference.sequence_logps(model, batch.pixel_values, batch.captions, batch.image_index).float()
        for row, part in enumerate(batch.split(logps)):
            if part is not None:
                out[row, idx] = part
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(out)
    return out[0], out[1], (out[2] if corrupted is not None else None)


def prepare_for_training(model: torch.nn.Module, freeze_encoder: bool = False) -> list[torch.nn.Parameter]:
    """Put a student's model (any architecture, or a peft model around one) in training mode as ``update``
    trains it; returns the trainable parameters.

    Dropout off, as TRL does by default: it would make policy != reference at step 0 and add noise to
    the log-ratios that DPO compares. The encoder's pooler is frozen: the decoder reads
    ``last_hidden_state`` only, so the pooler never gets a gradient. ``freeze_encoder`` freezes the
    vision encoder (ViT/CLIP, BLIP's and BLIP-2's vision model, GIT's image encoder), with LoRA its
    adapters. With LoRA only the adapters train (peft decides which parameters those are).
    """
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    lora = hasattr(model, "peft_config")  # peft has made the adapters, and only them, trainable
    base = model.get_base_model() if lora else model
    if not lora:
        model.requires_grad_(True)
    encoder = vision_encoder(base)
    if freeze_encoder and encoder is not None:
        encoder.requires_grad_(False)  # with LoRA: the encoder's adapters
    if not lora and getattr(encoder, "pooler", None) is not None:
        encoder.pooler.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def update(
    student: Student,
    pairs: Sequence[PreferencePair],
    images: Mapping[str, Image.Image],
    config: UpdateConfig,
    accelerator=None,
    *,
    in_place: bool = False,
    saves: UpdateSaves | None = None,
) -> tuple[Student, list[dict[str, float]]]:
    """One round of training on the round's pairs. Returns ``(trained student, per-step metrics)``.

    ``config.mode``: ``dpo`` (DPO + NLL against the student as it entered the round), ``sft``
    (cross-entropy on the chosen captions) or ``sft+dpo`` (``sft_epochs`` of SFT, then DPO against the
    post-SFT student). With ``lora_r`` > 0 only LoRA adapters train (:mod:`refine.stages.lora`): the DPO
    reference is the same model with its adapters disabled, and the adapters are merged into the
    returned student (which keeps them in ``student.adapter`` for saving).

    The reference's log-probs are computed once, before DPO training, so the reference need not stay in
    memory: with ``in_place=True`` the student itself is trained and returned (peak memory as for SFT);
    by default a copy is trained and ``student`` is left unmodified. Metric names follow TRL: ``loss``,
    ``nll``, ``rewards/{chosen,rejected,accuracies,margins}``, ``logps/{chosen,rejected}``; SFT steps
    carry ``phase: sft``. Under ``accelerate launch`` (or with an ``Accelerator`` passed) each batch is
    split across the processes, with the same batches, gradients and metrics as one process (up to
    float rounding). With ``saves`` the update saves its progress as it goes and on a stop, and continues
    from progress saved for the same pairs and settings (:mod:`refine.stages.update_state`).
    """
    if not pairs:
        return student, []
    missing = {p.image_id for p in pairs} - set(images)
    if missing:
        raise KeyError(f"update(): no image for pair image_id(s) {sorted(missing)[:5]}")
    from accelerate import Accelerator

    from refine.stages.lora import lora_model, merge_lora

    # The student is already where it should run: no device placement, and no cpu= flag. Accelerator's
    # state is a process-wide singleton: one made earlier for the CPU would move a CUDA student there,
    # and cpu=True after a CUDA one raises.
    precision = training_precision(config.precision, student.device, accelerator)
    if accelerator is None:
        from accelerate import DistributedDataParallelKwargs

        # Some students have parameters no caption loss reaches (CLIP's post-layernorm feeds only its
        # pooled output; BLIP-2's Q-Former text branch is idle in captioning): DDP must not wait for them.
        accelerator = Accelerator(device_placement=False, mixed_precision="no",
                                  kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU,
                                            DistributedType.MULTI_XPU, DistributedType.MULTI_NPU):
        raise ValueError(f"update(): accelerate is configured for {accelerator.distributed_type.value}; refine's "
                         "update runs plain data parallelism (DDP) only: launch with a multi-GPU config without "
                         "DeepSpeed or FSDP")
    if accelerator.device_placement and not same_device(accelerator.device, student.device):
        raise ValueError(f"update(): the student is on {student.device} but the accelerator places models on "
                         f"{accelerator.device}; load the student on accelerator.device, or pass device_placement=False")
    torch.manual_seed(config.seed)
    policy = student if in_place else student.copy()
    policy.precision = precision
    model = lora_model(policy, config) if config.lora_r > 0 else policy.model
    with stop_between_steps():  # a stop waits for a step boundary; one after the last step, for the return
        run = _Training(policy, model, list(pairs), images, config, accelerator, saves or UpdateSaves(None))
        if config.mode in ("sft", "sft+dpo"):
            run.sft(run.sft_epochs)
        if config.mode in ("dpo", "sft+dpo"):
            run.dpo(config.epochs, adapters_off=config.lora_r > 0 and config.mode == "dpo")
        _check_weights(run.params, config)
        policy.model = merge_lora(policy, model) if config.lora_r > 0 else model.eval()
    return policy, run.history


class UpdateDiverged(ValueError):
    """A training step's loss is not finite: the weights are lost, and nothing of the round is saved. Its
    ``hint`` (with ``{resume}``, the command that resumes the run) takes the round again at a tenth the rate."""

    def __init__(self, message: str, lr: float):
        super().__init__(message)
        self.hint = f"Continue with a lower learning rate (the rounds done keep theirs): {{resume}} --update.lr={lr / 10:g}"


def _check_finite(loss: float, phase: str, step: int, config: UpdateConfig, precision: str) -> None:
    """A step whose loss is not finite has lost the weights: stop. Under fp16 the GradScaler skips a step
    that overflowed and lowers its scale, so there it is not a divergence (the weights are checked at the
    end of the update)."""
    if not math.isfinite(loss) and precision != "fp16":
        raise UpdateDiverged(f"the update diverged: {phase} loss {loss} at step {step + 1} (update.lr={config.lr}); "
                             "the student entering the round is kept, nothing of the round's update is saved", config.lr)


def _check_weights(params: list[torch.nn.Parameter], config: UpdateConfig) -> None:
    """The trained weights are finite (the last step's loss is never computed; DDP keeps them equal on
    every process, so every process decides alike)."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise UpdateDiverged(f"the update diverged: the trained weights are not finite (update.lr={config.lr}); "
                             "the student entering the round is kept, nothing of the round's update is saved", config.lr)


class _Training:
    """The optimizer steps of one update, shared by its phases: every process draws the same batches and
    takes every ``world``-th item of each. A process's loss is its items' share of the batch's sum over
    the batch size, times ``world`` (DDP averages gradients over processes), so the gradient is the
    single-process one for any number of processes; metrics are summed across processes the same way.
    Steps are counted across phases; those of saved progress are skipped, their batches drawn alike."""

    def __init__(self, policy: Student, model, pairs: list[PreferencePair], images, config: UpdateConfig, accelerator,
                 saves: UpdateSaves):
        self.policy, self.model, self.pairs, self.images, self.config = policy, model, pairs, images, config
        self.accelerator, self.saves = accelerator, saves
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.params = prepare_for_training(model, config.freeze_encoder)
        optimizer = torch.optim.RAdam(self.params, lr=config.lr)
        self.scorer, self.optimizer = accelerator.prepare(CaptionScorer(policy, model), optimizer)
        # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.precision == "fp16")
        self.rng = random.Random(config.seed)
        self.examples = list({(p.image_id, p.chosen): p for p in pairs}.values())  # SFT's: each chosen caption once
        self.sft_epochs = {"sft": config.epochs, "sft+dpo": config.sft_epochs}.get(config.mode, 0)
        self.total = (math.ceil(len(self.examples) / config.batch_size) * self.sft_epochs
                      + math.ceil(len(pairs) / config.batch_size) * (config.epochs if config.mode != "sft" else 0))
        self.history: list[dict[str, float]] = []
        self.reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.step = self.done = 0  # steps drawn so far, and those the saved progress had taken
        saves.resume(self)

    def _stepped(self) -> None:
        """After a step: save the progress when it is due or a stop was asked for (every process decides
        alike), then stop."""
        stop, due = stop_requested(), self.saves.due()
        if self.world > 1:
            import torch.distributed as dist

            flags = torch.tensor([stop, due], dtype=torch.int32, device=self.policy.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, due = bool(flags[0]), bool(flags[1])
        if stop or due:
            self.saves.save(self, announce=stop)
        if stop:
            raise KeyboardInterrupt

    def corrupted(self, i: int) -> Image.Image:
        """mDPO's corrupted image for pair ``i``: a pure function of (seed, image, i), drawn when a batch
        needs it, so the reference and the policy see the same one and no process holds them all."""
        pair = self.pairs[i]
        return corrupt_image(self.images[pair.image_id], random.Random(f"mdpo/{self.config.seed}/{pair.image_id}/{i}"))

    def _steps(self, n: int, epochs: int):
        """``(this process's indices, its share, the batch size)`` per optimizer step not yet taken."""
        for _ in range(epochs):
            for batch_idx in _batches(n, self.config.batch_size, self.rng):
                self.step += 1
                if self.step <= self.done:
                    continue
                idx = batch_idx[self.rank :: self.world]
                share = float(self.world) / len(batch_idx)
                if not idx:  # fewer items than processes: take part in the step with a zero-weight item
                    idx, share = batch_idx[:1], 0.0
                yield idx, share, len(batch_idx)

    def _backward(self, loss: torch.Tensor) -> float:
        self.accelerator.backward(self.scaler.scale(loss))
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _reduce(self, rows: list[torch.Tensor], share: float, size: int) -> list[float]:
        sums = torch.stack(rows).sum(1) * (share * size / self.world)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        return (sums / size).tolist()

    def sft(self, epochs: int) -> None:
        """Cross-entropy (per-token NLL) on each distinct chosen caption, weighted by its pair's weight."""
        for idx, share, size in self._steps(len(self.examples), epochs):
            self.history.append(self._sft_step([self.examples[i] for i in idx], share, size))
            self._stepped()

    def _sft_step(self, examples: list[PreferencePair], share: float, size: int) -> dict[str, float]:
        batch = _PairBatch(self.policy, examples, self.images, chosen_only=True)
        with autocast(self.policy.device, self.policy.precision):
            logps = self.scorer(batch.pixel_values, batch.captions, batch.image_index).float()
        nll = nll_per_token(logps, batch.captions.lengths)
        per_item = batch.weights * nll
        grad_norm = self._backward(per_item.sum() * share)
        loss, mean_nll = self._reduce([per_item.detach(), nll.detach()], share, size)
        _check_finite(loss, "SFT", len(self.history), self.config, self.policy.precision)
        return {"phase": "sft", "loss": loss, "nll": mean_nll, "grad_norm": grad_norm}

    def dpo(self, epochs: int, adapters_off: bool = False) -> None:
        """DPO + NLL (+ mDPO's image terms) against the model as it is now (with LoRA in ``dpo`` mode:
        the same model with its adapters disabled, which is what it was before training)."""
        from refine.stages.lora import adapters_disabled

        config = self.config
        negatives = self.corrupted if config.image_negatives else None
        if self.reference is None:  # else: the saved progress's
            try:
                with adapters_disabled(self.model, adapters_off):
                    self.reference = reference_logps(
                        self.policy, self.pairs, self.images, config.batch_size, self.policy.precision, negatives,
                        self.rank, self.world, model=self.model)
            except KeyboardInterrupt:  # a stop in the reference pass: the SFT steps before it are kept
                if self.history:
                    self.saves.save(self, announce=True)
                raise
        prepare_for_training(self.model, config.freeze_encoder)
        for idx, share, size in self._steps(len(self.pairs), epochs):
            self.history.append(self._dpo_step(idx, negatives, share, size))
            self._stepped()

    def _dpo_step(self, idx: list[int], negatives, share: float, size: int) -> dict[str, float]:
        config, (ref_chosen, ref_rejected, ref_corrupted) = self.config, self.reference
        batch = _PairBatch(self.policy, [self.pairs[i] for i in idx], self.images,
                           [negatives(i) for i in idx] if negatives is not None else None)
        with autocast(self.policy.device, self.policy.precision):
            logps = self.scorer(batch.pixel_values, batch.captions, batch.image_index).float()
        policy_chosen, policy_rejected, policy_corrupted = batch.split(logps)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen[idx], ref_rejected[idx], config.beta,
            config.label_smoothing, config.loss,
        )
        nll = nll_per_token(policy_chosen, batch.captions.lengths[: batch.n])
        w = batch.weights  # a pair's weight: the share of critiques that agreed on it (1 without agreement)
        per_pair = w * losses + config.nll_weight * w * nll
        conditional = anchor = torch.zeros_like(losses)
        if policy_corrupted is not None:
            conditional, anchor = image_preference_loss(policy_chosen, policy_corrupted, ref_chosen[idx],
                                                        ref_corrupted[idx], config.beta)
            per_pair = per_pair + w * conditional + w * anchor
        grad_norm = self._backward(per_pair.sum() * share)
        means = self._reduce([per_pair.detach(), losses.detach(), nll.detach(), chosen_rewards, rejected_rewards,
                              (chosen_rewards > rejected_rewards).float(), chosen_rewards - rejected_rewards,
                              policy_chosen.detach(), policy_rejected.detach(), conditional.detach(),
                              anchor.detach()], share, size)
        step = dict(zip(("loss", "dpo_loss", "nll", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                         "rewards/margins", "logps/chosen", "logps/rejected"), means))
        _check_finite(step["loss"], "DPO", len(self.history), self.config, self.policy.precision)  # reduced: alike everywhere
        step["grad_norm"] = grad_norm
        if policy_corrupted is not None:
            step["mdpo/conditional"], step["mdpo/anchor"] = means[9], means[10]
        return step
