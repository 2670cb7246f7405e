"""Preference optimisation of the student: DPO plus a likelihood term, against a frozen reference.

The maths is two pure functions of log-prob tensors (:func:`dpo_loss`, :func:`nll_per_token`).
:func:`update` is one round of training: it takes the student as it stood at the start of the round,
uses it (frozen) as the reference, and returns the trained student: a new one, or with
``in_place=True`` the input itself, trained after its reference log-probs were taken (one model in
memory instead of two; the loop does this, since the round's starting student is already on disk).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from refine.config import UpdateConfig
from refine.infra.devices import autocast, resolve_precision
from refine.stages.pairs import PreferencePair
from refine.stages.student import CaptionScorer, Student, sequence_logps


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss, Rafailov et al. 2023, Eq. 7.

        loss = -log σ(β · [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))])

    Args: four ``[B]`` tensors of summed sequence log-probs; ``beta`` is the KL strength (the paper
    uses 0.1-0.5; smaller lets the policy drift further from the reference).

    Returns: ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``. Rewards are the implicit
    ``β · log π/π_ref`` and carry no gradient; gradients reach only the policy inputs. When policy == reference every loss is ln 2.
    """
    # The reference is a constant of the objective: detach so no gradient can ever reach it.
    chosen_logratios = policy_chosen_logps - reference_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - reference_rejected_logps.detach()
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


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
    """Pairs of one minibatch as tensors: each distinct image once, chosen then rejected captions."""

    def __init__(self, student: Student, pairs: Sequence[PreferencePair], images: Mapping[str, Image.Image]):
        ids = list(dict.fromkeys(p.image_id for p in pairs))
        row = {image_id: i for i, image_id in enumerate(ids)}
        self.n = len(pairs)
        self.pixel_values = student.pixel_values([images[i] for i in ids])
        self.captions = student.tokenize([p.chosen for p in pairs] + [p.rejected for p in pairs])
        index = [row[p.image_id] for p in pairs]
        self.image_index = torch.tensor(index + index, device=student.device)


@torch.no_grad()
def reference_logps(
    reference: Student,
    pairs: Sequence[PreferencePair],
    images: Mapping[str, Image.Image],
    batch_size: int = 16,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` log-probs under the frozen reference, ``[N]`` each, computed once per round."""
    precision = precision or reference.precision
    reference.model.eval()
    chosen, rejected = [], []
    for idx in _batches(len(pairs), batch_size, rng=None):
        batch = _PairBatch(reference, [pairs[i] for i in idx], images)
        with autocast(reference.device, precision):
            logps = sequence_logps(reference.model, batch.pixel_values, batch.captions, batch.image_index)
        chosen.append(logps[: batch.n].float())
        rejected.append(logps[batch.n :].float())
    return torch.cat(chosen), torch.cat(rejected)


def prepare_for_training(model: torch.nn.Module, freeze_encoder: bool = False) -> list[torch.nn.Parameter]:
    """Put a ``VisionEncoderDecoderModel`` in training mode as ``update`` trains it; returns the trainable params.

    Dropout off, as TRL does by default: it would make policy != reference at step 0 and add noise to
    the log-ratios that DPO compares. The encoder's pooler is frozen: the decoder reads
    ``last_hidden_state`` only, so the pooler never gets a gradient, and DDP (accelerate launch)
    refuses parameters that take part in no backward pass.
    """
    model.train()
    model.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if freeze_encoder:
        model.encoder.requires_grad_(False)
    if getattr(model.encoder, "pooler", None) is not None:
        model.encoder.pooler.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _accelerate_mixed_precision(accelerator=None) -> tuple[str, str]:
    """``(mixed precision, where it comes from)`` as accelerate sees it before ``update`` makes its own
    Accelerator: the one passed, the process-wide state an earlier Accelerator left, or the
    ``ACCELERATE_MIXED_PRECISION`` variable that ``accelerate launch --mixed_precision`` sets."""
    import os

    from accelerate.state import AcceleratorState

    if accelerator is not None:
        return str(accelerator.mixed_precision), "the Accelerator passed to update()"
    if AcceleratorState._shared_state:
        return str(AcceleratorState().mixed_precision), "an Accelerator made earlier in this process"
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower(), "ACCELERATE_MIXED_PRECISION"


def training_precision(precision: str, device: torch.device, accelerator=None) -> str:
    """The precision ``update`` trains in: ``update.precision``, or for ``auto`` what ``accelerate launch
    --mixed_precision`` asked for, else fp16 on CUDA and fp32 on CPU.

    refine applies mixed precision itself (autocast, and a GradScaler for fp16); accelerate's own is
    left off, or every forward would be cast twice and fp16 losses scaled twice. An accelerate state
    that already applies mixed precision (a passed Accelerator, or one made earlier in this process,
    since accelerate's state is process-wide) would silently override ``update.precision``: that is an
    error naming both.
    """
    mixed, source = _accelerate_mixed_precision(accelerator)
    if accelerator is not None or source != "ACCELERATE_MIXED_PRECISION":
        if mixed != "no":
            raise ValueError(
                f"update.precision={precision}, but accelerate already applies mixed_precision={mixed} ({source}); "
                "refine applies precision itself: make that Accelerator with mixed_precision='no' and set "
                f"update.precision={mixed} instead")
        return resolve_precision(precision, device)
    if precision == "auto" and mixed in ("fp16", "bf16"):
        return mixed
    return resolve_precision(precision, device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device (an unindexed device means the current one)."""
    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" else 0

    return a.type == b.type and index(a) == index(b)


def update(
    student: Student,
    pairs: Sequence[PreferencePair],
    images: Mapping[str, Image.Image],
    config: UpdateConfig,
    accelerator=None,
    *,
    in_place: bool = False,
) -> tuple[Student, list[dict[str, float]]]:
    """One round of DPO + NLL. Returns ``(trained student, per-step metrics)``.

    ``student`` is the frozen reference for this round. Only its log-probs on the pairs are needed, and
    they are computed once, before training, so the reference need not stay in memory: with
    ``in_place=True`` the student itself is trained and returned (peak memory as for SFT); by default a
    copy is trained and ``student`` is left unmodified. Metric names follow
    TRL: ``loss``, ``nll``, ``rewards/{chosen,rejected,accuracies,margins}``, ``logps/{chosen,rejected}``.
    Pass an ``accelerate.Accelerator`` to shard pairs across processes (``accelerate launch``).
    """
    if not pairs:
        return student, []
    missing = {p.image_id for p in pairs} - set(images)
    if missing:
        raise KeyError(f"update(): no image for pair image_id(s) {sorted(missing)[:5]}")
    from accelerate import Accelerator

    # The student is already where it should run: no device placement, and no cpu= flag. Accelerator's
    # state is a process-wide singleton: one made earlier for the CPU would move a CUDA student there,
    # and cpu=True after a CUDA one raises.
    precision = training_precision(config.precision, student.device, accelerator)
    accelerator = accelerator or Accelerator(device_placement=False, mixed_precision="no")
    if accelerator.device_placement and not _same_device(accelerator.device, student.device):
        raise ValueError(f"update(): the student is on {student.device} but the accelerator places models on "
                         f"{accelerator.device}; load the student on accelerator.device, or pass device_placement=False")
    pairs = list(pairs)[accelerator.process_index :: accelerator.num_processes]
    torch.manual_seed(config.seed)

    ref_chosen, ref_rejected = reference_logps(student, pairs, images, config.batch_size, precision)
    policy = student if in_place else student.copy()
    policy.precision = precision

    model = policy.model
    params = prepare_for_training(model, config.freeze_encoder)
    optimizer = torch.optim.RAdam(params, lr=config.lr)
    scorer, optimizer = accelerator.prepare(CaptionScorer(model), optimizer)
    # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.precision == "fp16")

    rng = random.Random(config.seed)
    history = []
    for _ in range(config.epochs):
        for idx in _batches(len(pairs), config.batch_size, rng):
            batch = _PairBatch(policy, [pairs[i] for i in idx], images)
            with autocast(policy.device, policy.precision):
                logps = scorer(batch.pixel_values, batch.captions, batch.image_index).float()
            policy_chosen, policy_rejected = logps[: batch.n], logps[batch.n :]
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen, policy_rejected, ref_chosen[idx], ref_rejected[idx], config.beta
            )
            nll = nll_per_token(policy_chosen, batch.captions.lengths[: batch.n])
            loss = losses.mean() + config.nll_weight * nll.mean()

            accelerator.backward(scaler.scale(loss))
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            history.append({
                "loss": loss.item(),
                "dpo_loss": losses.mean().item(),
                "nll": nll.mean().item(),
                "rewards/chosen": chosen_rewards.mean().item(),
                "rewards/rejected": rejected_rewards.mean().item(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                "logps/chosen": policy_chosen.detach().mean().item(),
                "logps/rejected": policy_rejected.detach().mean().item(),
                "grad_norm": float(grad_norm),
            })
    policy.model = accelerator.unwrap_model(scorer).model.eval()
    return policy, history
