import math

import pytest
import torch

from refine.stages.dpo import UpdateConfig, dpo_loss, nll_per_token, update
from refine.stages.lora import targets as lora_targets
from refine.stages.pairs import PreferencePair


def test_dpo_loss_matches_hand_computed_values():
    # pair 0: chosen log-ratio (-1) - (-2) = 1, rejected log-ratio (-3) - (-2.5) = -0.5, beta 0.5
    #   z = 0.5 * (1 - (-0.5)) = 0.75, loss = -log(sigmoid(0.75)) = log(1 + e^-0.75)
    # pair 1: chosen log-ratio -2, rejected 0, z = 0.5 * -2 = -1, loss = log(1 + e^1)
    pc = torch.tensor([-1.0, -4.0])
    pr = torch.tensor([-3.0, -1.0])
    rc = torch.tensor([-2.0, -2.0])
    rr = torch.tensor([-2.5, -1.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-0.75)), math.log(1 + math.e)], abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.5, -1.0])
    assert rejected_rewards.tolist() == pytest.approx([-0.25, 0.0])


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -10.0, -0.5])
    other = torch.tensor([-7.0, -1.0, -2.5])
    losses, cr, rr = dpo_loss(logps, other, logps.clone(), other.clone(), beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-7)
    assert cr.abs().max() == 0 and rr.abs().max() == 0


def test_dpo_gradient_reaches_only_policy_terms():
    pc, pr, rc, rr = (torch.tensor([-1.0, -2.0], requires_grad=True) for _ in range(4))
    losses, cr, rr_rewards = dpo_loss(pc, pr, rc, rr, beta=0.2)
    assert not cr.requires_grad and not rr_rewards.requires_grad
    losses.sum().backward()
    assert rc.grad is None and rr.grad is None
    assert (pc.grad < 0).all(), "raising the chosen log-prob must lower the loss"
    assert (pr.grad > 0).all(), "raising the rejected log-prob must raise the loss"
    # At policy == reference, d loss / d pc = -beta * sigmoid(0) = -beta / 2.
    assert pc.grad.tolist() == pytest.approx([-0.1, -0.1])


def test_nll_per_token():
    assert nll_per_token(torch.tensor([-6.0, -1.0]), torch.tensor([3, 4])).tolist() == pytest.approx([2.0, 0.25])


def _decoder_params(student):
    return {n: p.detach().clone() for n, p in student.model.decoder.named_parameters()}


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device, precision", [
    ("cpu", "fp32"), ("cpu", "fp16"),
    pytest.param("cuda", "fp16", marks=needs_cuda), pytest.param("cuda", "bf16", marks=needs_cuda),
])
def test_update_learns_four_pairs(tiny_student_dir, four_pairs, device, precision):
    from refine.stages.student import load_student

    torch.manual_seed(0)
    tiny_student = load_student(tiny_student_dir, device=device, precision="fp32")
    pairs, images = four_pairs
    before = _decoder_params(tiny_student)
    config = UpdateConfig(beta=0.5, nll_weight=0.1, lr=3e-3, epochs=30, batch_size=4, precision=precision)
    policy, history = update(tiny_student, pairs, images, config)

    assert history[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3 if precision == "fp32" else 2e-2)
    assert history[-1]["rewards/accuracies"] == 1.0
    assert history[-1]["dpo_loss"] < 0.3
    # Every pair's margin is positive under the trained policy against the untouched reference.
    with torch.no_grad():
        idx = [p.image_id for p in pairs]
        ims = [images[i] for i in idx]
        margin = (policy.logps(ims, [p.chosen for p in pairs]) - tiny_student.logps(ims, [p.chosen for p in pairs])) - (
            policy.logps(ims, [p.rejected for p in pairs]) - tiny_student.logps(ims, [p.rejected for p in pairs])
        )
    assert (margin > 0).all(), margin
    # The input student is the reference: unchanged. The policy's every trainable decoder param moved.
    assert all(torch.equal(before[n], p) for n, p in tiny_student.model.decoder.named_parameters())
    changed = {n: not torch.equal(before[n], p) for n, p in policy.model.decoder.named_parameters()}
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    assert policy.precision == precision
    assert policy.device.type == device


def test_update_can_freeze_the_encoder(tiny_student, four_pairs):
    pairs, images = four_pairs
    config = UpdateConfig(lr=1e-3, epochs=2, batch_size=4, freeze_encoder=True)
    policy, _ = update(tiny_student, pairs, images, config)
    for (name, p0), p1 in zip(tiny_student.model.encoder.named_parameters(), policy.model.encoder.parameters()):
        assert torch.equal(p0, p1), name
    assert not torch.equal(tiny_student.model.decoder.lm_head.weight, policy.model.decoder.lm_head.weight)


def test_lora_with_a_frozen_encoder_puts_no_adapter_in_it(tiny_student, four_pairs):
    """vit-gpt2's default LoRA targets (q_proj, v_proj, ...) name the ViT's attention too: with the encoder
    frozen, adapters there would never train, yet be saved and merged. Only the decoder gets adapters."""
    pairs, images = four_pairs
    config = UpdateConfig(lr=1e-3, epochs=1, batch_size=4, lora_r=4, freeze_encoder=True)
    policy, _ = update(tiny_student, pairs, images, config)
    keys = list(policy.adapter[1])
    assert keys and all(k.startswith("base_model.model.decoder.") for k in keys), keys
    unfrozen = lora_targets(tiny_student, UpdateConfig(lora_r=4))
    assert "encoder.layers.0.attention.q_proj" in unfrozen  # the same targets do name the encoder's layers


def test_update_in_place_trains_the_input_exactly_like_a_copy(tiny_student, four_pairs):
    pairs, images = four_pairs
    config = UpdateConfig(beta=0.5, lr=3e-3, epochs=3, batch_size=2)
    copied, history = update(tiny_student, pairs, images, config)
    student = tiny_student.copy()
    trained, history_in_place = update(student, pairs, images, config, in_place=True)

    assert trained is student
    assert [h["loss"] for h in history_in_place] == pytest.approx([h["loss"] for h in history], rel=1e-5)
    moved = [not torch.equal(p0, p1) for p0, p1 in zip(tiny_student.model.decoder.parameters(), trained.model.decoder.parameters())]
    assert all(moved)
    for (name, p0), p1 in zip(copied.model.named_parameters(), trained.model.parameters()):
        torch.testing.assert_close(p1, p0, msg=name)


def test_update_names_missing_images(tiny_student):
    with pytest.raises(KeyError, match="nowhere"):
        update(tiny_student, [PreferencePair("nowhere", "a", "b", "refined")], {}, UpdateConfig())


PRECISION_SCRIPT = """
import json, math, sys
import torch
from refine.config import UpdateConfig
from refine.stages.dpo import update
from refine.stages.pairs import PreferencePair
from refine.stages.student import load_student
from PIL import Image

student = load_student(sys.argv[1], device="cpu", precision="fp32")
if sys.argv[3] == "accelerator-first":
    from accelerate import Accelerator
    Accelerator(mixed_precision="bf16")
images = {"a": Image.new("RGB", (32, 32), "red"), "b": Image.new("RGB", (32, 32), "blue")}
pairs = [PreferencePair("a", "a red square", "a blue dog", "refined"), PreferencePair("b", "blue", "a red cat", "refined")]
try:
    policy, history = update(student, pairs, images, UpdateConfig(epochs=1, batch_size=2, precision=sys.argv[2]))
except ValueError as e:
    print(json.dumps({"error": str(e)}))
else:
    print(json.dumps({"precision": policy.precision, "loss0": history[0]["dpo_loss"]}))
"""


@pytest.mark.parametrize("setting, how, expected", [
    ("fp32", "env", "fp32"),  # update.precision wins over ACCELERATE_MIXED_PRECISION
    ("auto", "env", "bf16"),  # auto follows accelerate launch --mixed_precision
    ("fp32", "accelerator-first", "error"),  # an earlier bf16 Accelerator would override it silently
])
def test_the_configured_precision_wins_over_accelerate(tiny_student_dir, setting, how, expected):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"} if how == "env" else dict(os.environ)
    out = subprocess.run([sys.executable, "-c", PRECISION_SCRIPT, str(tiny_student_dir), setting, how], env=env,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    result = json.loads(out)
    if expected == "error":
        assert "update.precision=fp32, but accelerate already applies mixed_precision=bf16" in result["error"]
        return
    assert result["precision"] == expected
    if expected == "fp32":  # policy == reference at step 0, computed in fp32 both times: ln 2 (bf16 was 2e-3 off)
        assert result["loss0"] == pytest.approx(math.log(2), abs=1e-6)


def test_the_training_precision_is_the_same_in_every_round(monkeypatch):
    """accelerate launch --mixed_precision sets ACCELERATE_MIXED_PRECISION; the Accelerator that round 0's
    update makes (mixed_precision="no") must not change what round 1 reads."""
    from accelerate import Accelerator

    from refine.infra.devices import training_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert training_precision("auto", torch.device("cpu")) == "bf16"
    Accelerator(device_placement=False, mixed_precision="no")  # what update() makes
    assert training_precision("auto", torch.device("cpu")) == "bf16"


def test_an_update_that_diverges_stops_the_run_and_saves_nothing(tiny_student_dir, tmp_path, capsys):
    """A loss that is not finite stops the run (exit 1, one line giving the resume with a lower update.lr)
    with the round's student unsaved. It was saved with NaN weights, and the run went on paying for
    critiques of its garbage captions. An infinite learning rate is refused before the run exists."""
    from refine import loop
    from refine.infra.runlog import RunLog

    args = ["--images", "shapes:4", f"--student.model={tiny_student_dir}", "--rounds=2", "--loop.use_regions=false",
            "--critic.backend=grounded", "--student.n_samples=1", "--student.max_new_tokens=8",
            f"--loop.runs_dir={tmp_path}", "--update.batch_size=1", "--update.epochs=3"]
    assert loop.main([*args, "--loop.run_id=inf", "--update.lr=inf"]) == 2
    assert "update.lr=inf: must be > 0 and finite" in capsys.readouterr().err and not (tmp_path / "inf").exists()
    assert loop.main([*args, "--loop.run_id=big", "--update.lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert "the update diverged: DPO loss nan" in err, err
    assert f"continue with a lower learning rate (the rounds done keep theirs): python -m refine.loop --resume " \
           f"{tmp_path / 'big'} --update.lr=1e+29" in err.lower().replace("\n", ""), err
    log = RunLog(tmp_path / "big", writer=False)
    assert log.completed_rounds() == 0 and not (log.root / "student" / "last").exists()
    assert log.events()[-1]["event"] == "crashed"
    # the resume the hint gives, at a rate that holds, takes the round again and finishes the run
    assert loop.main(["--resume", str(log.root), "--update.lr=1e-3"]) == 0
    assert log.status() == "done" and log.config["update"]["lr"] == 1e-3
    assert [e["changes"] for e in log.events() if e["event"] == "resume"] == [{"update.lr": [1e30, 1e-3]}]

