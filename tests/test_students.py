"""Every student architecture behind one interface: tiny random models of the real classes (ViT-GPT2,
CLIP + GPT-2, ViT + BERT, BLIP, GIT, BLIP-2), saved like hub checkpoints and loaded by load_student.

For each: captions come out; ``logps`` equals the model's own labels loss (summed over the same tokens);
a DPO update raises the chosen-minus-rejected margin; save -> load gives identical captions. LoRA: only
adapter weights change, the reference is the adapter-disabled model, and the merged export captions as
the adapted model did. SFT and SFT+DPO train."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from PIL import Image

from refine.config import UpdateConfig
from refine.stages.dpo import update
from refine.stages.pairs import PreferencePair
from refine.students import load_student
from refine.students.base import vision_encoder

ARCHS = ["vit-gpt2", "clip-gpt2", "vit-bert", "blip", "git", "blip-2"]


@pytest.fixture(scope="session")
def student_dirs(sandbox, gpt2_tokenizer_dir, tiny_student_dir):
    from refine.offline.students import BUILDERS

    dirs = {"vit-gpt2": tiny_student_dir}
    for name, build in BUILDERS.items():
        kwargs = {"tokenizer_cache": str(gpt2_tokenizer_dir)} if "tokenizer_cache" in build.__code__.co_varnames else {}
        dirs[name] = build(sandbox / "students" / name, **kwargs)
    return dirs


def images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (50, 50), (30, 30, 200)),
            Image.new("L", (20, 60), 128)]


def load(student_dirs, arch):
    return load_student(student_dirs[arch], device="cpu", precision="fp32")


@pytest.mark.parametrize("arch", ARCHS)
def test_captions_come_out_in_every_mode(student_dirs, arch):
    student = load(student_dirs, arch)
    assert student.kind == {"vit-gpt2": "vision-encoder-decoder", "clip-gpt2": "vision-encoder-decoder",
                            "vit-bert": "vision-encoder-decoder"}.get(arch, arch)
    greedy = student.caption(images(), min_new_tokens=3, max_new_tokens=5)
    assert [len(c) for c in greedy] == [1, 1, 1] and all(c[0].strip() for c in greedy)
    assert student.caption(images(), n=2, num_beams=3, min_new_tokens=3, max_new_tokens=5)[0][1].strip()
    sampled = student.caption(images(), n=2, sample=True, temperature=2.0, min_new_tokens=3, max_new_tokens=5,
                              seeds=[1, 2, 3])
    assert [len(c) for c in sampled] == [2, 2, 2]
    # an image's samples depend on its seed alone
    assert student.caption(images()[1:2], n=2, sample=True, temperature=2.0, min_new_tokens=3, max_new_tokens=5,
                           seeds=[2])[0] == sampled[1]


def _labels_loss(student, arch, image, caption) -> float:
    """The model's own training loss for one caption, times its number of targets: -log p summed."""
    model, tokens = student.model, student.tokenize([caption])
    pixels = student.pixel_values([image])
    ids, n = tokens.decoder_input_ids, int(tokens.lengths[0])
    full = torch.cat([ids, tokens.labels[:, -1:]], 1)  # [start] c_1..c_n [end]
    with torch.no_grad():
        if student.kind == "vision-encoder-decoder":
            loss = model(pixel_values=pixels, labels=tokens.labels).loss  # the model shifts labels right itself
        elif arch == "blip":
            model.text_decoder.label_smoothing = 0.0  # BLIP trains with smoothing 0.1; we score plain NLL
            loss = model(pixel_values=pixels, input_ids=full, labels=full).loss
        elif arch == "git":
            loss = model(pixel_values=pixels, input_ids=full, labels=full).loss
        else:  # BLIP-2: the image tokens lead the language model's input; they and the start carry no label
            prefix = torch.full((1, model.config.num_query_tokens), model.config.image_token_id)
            input_ids = torch.cat([prefix, full], 1)
            labels = torch.cat([torch.full_like(prefix, -100), torch.full_like(full[:, :1], -100), full[:, 1:]], 1)
            loss = model(pixel_values=pixels, input_ids=input_ids, labels=labels).loss
    return float(loss) * n


@pytest.mark.parametrize("arch", ARCHS)
def test_logps_equal_the_models_own_labels_loss(student_dirs, arch):
    student = load(student_dirs, arch)
    captions = ["a red circle", "two blue dogs on a table"]
    with torch.no_grad():
        ours = student.logps(images()[:2], captions)
    for image, caption, logp in zip(images()[:2], captions, ours):
        assert -float(logp) == pytest.approx(_labels_loss(student, arch, image, caption), rel=1e-4)
    # batched with padding, and several captions of one image (the encoder once per image where it can)
    again = student.logps(images()[:1], captions, image_index=[0, 0])
    alone = torch.stack([student.logps(images()[:1], [c])[0] for c in captions])
    assert torch.allclose(again, alone, atol=1e-4)


@contextlib.contextmanager
def image_side_rows(student):
    """The batch size of each pass of the student's image side (``vision_encoder``) while active."""
    rows: list[int] = []
    hook = vision_encoder(student.model).register_forward_hook(lambda _m, _i, out: rows.append(len(out[0])))
    try:
        yield rows
    finally:
        hook.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_image_side_runs_once_per_distinct_image_when_scoring(student_dirs, arch):
    """A DPO pair's two captions share one image: scoring them encodes it once, and each caption still
    reads its own image (an index that is neither one caption per image nor the images tiled)."""
    student = load(student_dirs, arch)
    captions = ["a red circle", "two blue dogs", "a cat", "a bus on a road", "a red circle"]
    index = [2, 0, 0, 1, 2]
    with image_side_rows(student) as rows, torch.no_grad():
        together = student.logps(images(), captions, image_index=index)
    assert rows == [len(images())]
    with torch.no_grad():
        alone = torch.stack([student.logps([images()[i]], [c])[0] for i, c in zip(index, captions)])
    assert torch.allclose(together, alone, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_runs_the_image_side_once_per_image(student_dirs, arch):
    """n samples of an image read one pass of its image side, and each image's samples are still its
    own: the same as when it is captioned alone with its seed."""
    student = load(student_dirs, arch)
    kwargs = dict(n=3, sample=True, temperature=2.0, min_new_tokens=3, max_new_tokens=5)
    with image_side_rows(student) as rows:
        together = student.caption(images(), seeds=[1, 2, 3], **kwargs)
    assert rows == [len(images())]
    assert [len(c) for c in together] == [3, 3, 3]
    for i, image in enumerate(images()):
        assert student.caption([image], seeds=[i + 1], **kwargs)[0] == together[i]


PAIRS = [PreferencePair(f"im{i}", chosen, rejected, "refined") for i, (chosen, rejected) in
         enumerate([("a red circle", "a red circle and a dog"), ("a blue square", "two cats on a bus"),
                    ("a picture of a ball", "a man and a woman")])]


def _margin(student, pairs) -> float:
    pics = {f"im{i}": im for i, im in enumerate(images())}
    with torch.no_grad():
        chosen = student.logps([pics[p.image_id] for p in pairs], [p.chosen for p in pairs])
        rejected = student.logps([pics[p.image_id] for p in pairs], [p.rejected for p in pairs])
    return float((chosen - rejected).mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_dpo_update_raises_the_margin_and_the_student_saves_and_loads(student_dirs, arch, tmp_path):
    student = load(student_dirs, arch)
    pics = {f"im{i}": im for i, im in enumerate(images())}
    before = _margin(student, PAIRS)
    trained, history = update(student, PAIRS, pics, UpdateConfig(lr=1e-2, epochs=4, batch_size=3, beta=0.5))
    assert len(history) == 4 and _margin(trained, PAIRS) > before + 0.3
    trained.save(tmp_path / "saved")
    reloaded = load_student(tmp_path / "saved", device="cpu", precision="fp32")
    assert type(reloaded) is type(trained)
    kwargs = dict(min_new_tokens=3, max_new_tokens=6)
    assert reloaded.caption(images(), **kwargs) == trained.caption(images(), **kwargs)


@pytest.mark.parametrize("arch", ["vit-gpt2", "blip", "git", "blip-2"])
def test_lora_trains_adapters_only_and_merges_into_a_plain_checkpoint(student_dirs, arch, tmp_path):
    from refine.stages.dpo import reference_logps
    from refine.stages.lora import adapters_disabled, lora_model, merge_lora

    student = load(student_dirs, arch)
    pics = {f"im{i}": im for i, im in enumerate(images())}
    # RAdam takes plain momentum steps for its first five (no adaptive scale yet), and LoRA's B starts
    # at zero, so a few more steps than for full fine-tuning
    config = UpdateConfig(lr=1e-2, epochs=10, batch_size=3, beta=0.5, lora_r=4)
    start = {k: v.clone() for k, v in student.model.state_dict().items()}
    reference = reference_logps(student, PAIRS, pics)

    # the reference is the model with its adapters disabled, even after they moved
    wrapped = load(student_dirs, arch)
    peft_model = lora_model(wrapped, config)
    for name, p in peft_model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with adapters_disabled(peft_model):
        assert torch.allclose(reference_logps(wrapped, PAIRS, pics, model=peft_model)[0], reference[0], atol=1e-5)
    assert not torch.allclose(reference_logps(wrapped, PAIRS, pics, model=peft_model)[0], reference[0], atol=1e-3)
    kwargs = dict(min_new_tokens=3, max_new_tokens=6)
    wrapped.model = peft_model
    adapted = wrapped.caption(images(), **kwargs)
    wrapped.model = merge_lora(wrapped, peft_model)
    wrapped.save(tmp_path / "merged")
    assert (tmp_path / "merged" / "adapter" / "adapter_model.safetensors").is_file()
    plain = load_student(tmp_path / "merged", device="cpu", precision="fp32")  # no peft involved
    assert not any("lora" in k for k in plain.model.state_dict())
    assert plain.caption(images(), **kwargs) == adapted

    # a LoRA update: only the adapted layers' weights moved, and the margin rose (GIT's the least: its
    # tiny random text layers barely react to low-rank changes, +0.02; the others +0.2 or more)
    before = _margin(student, PAIRS)
    trained, _ = update(student, PAIRS, pics, config)
    assert _margin(trained, PAIRS) > before + 0.01
    targets = set(config.lora_targets.split(",")) if config.lora_targets else set(student.lora_targets)
    moved = [k for k, v in trained.model.state_dict().items() if not torch.equal(v, start[k])]
    assert moved and all(k.rsplit(".", 2)[-2] in targets for k in moved), moved


@pytest.mark.parametrize("mode", ["sft", "sft+dpo"])
def test_supervised_modes_train_on_the_chosen_captions(student_dirs, mode):
    student = load(student_dirs, "vit-gpt2")
    pics = {f"im{i}": im for i, im in enumerate(images())}
    with torch.no_grad():
        before = student.logps(images(), [p.chosen for p in PAIRS])
    trained, history = update(student, PAIRS, pics, UpdateConfig(lr=1e-2, epochs=8, sft_epochs=8, batch_size=3,
                                                                  mode=mode))
    with torch.no_grad():
        after = trained.logps(images(), [p.chosen for p in PAIRS])
    assert bool((after > before + 1).all()), (before, after)
    phases = [h.get("phase", "dpo") for h in history]
    assert phases == (["sft"] * 8 if mode == "sft" else ["sft"] * 8 + ["dpo"] * 8)


def test_a_tokenizer_without_an_end_token_is_refused_by_name(student_dirs, tmp_path):
    from transformers import VisionEncoderDecoderModel

    from refine.students.ved import fix_special_tokens

    model = VisionEncoderDecoderModel.from_pretrained(student_dirs["vit-bert"])
    student = load(student_dirs, "vit-bert")
    assert (student.special_tokens().start, student.special_tokens().end) == (
        student.tokenizer.cls_token_id, student.tokenizer.sep_token_id)  # [CLS] starts, [SEP] ends
    tokenizer = student.tokenizer
    tokenizer.sep_token = None
    model.config.eos_token_id = None
    with pytest.raises(ValueError, match="neither an EOS nor a SEP token"):
        fix_special_tokens(model, tokenizer, "student.model=x")


def test_an_unsupported_architecture_is_refused_by_name(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="a 'bert' model; refine's students are vision-encoder-decoder, blip"):
        load_student(tmp_path, device="cpu")


def test_quantized_weights_need_a_gpu_and_are_not_trained(tmp_path, tiny_student_dir):
    with pytest.raises(ValueError, match="^quantize=8bit: 8- and 4-bit weights need a CUDA device"):
        load_student(tiny_student_dir, device="cpu", quantize="8bit")
    from refine import serve

    with pytest.raises(ValueError, match="--quantize=4bit: 8- and 4-bit weights need a CUDA device"):
        serve.create_app(str(tiny_student_dir), device="cpu", quantize="4bit")
    from refine import loop

    # each round merges its update into the weights: 8/4 bits would round it away, so the loop has no such key
    with pytest.raises(ValueError, match="student.quantize is no longer a setting: the loop merges each round"):
        loop.run(["--images", "shapes:2", f"--student.model={tiny_student_dir}", "--student.quantize=8bit",
                  f"--loop.runs_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_a_run_saved_with_the_retired_quantize_key_still_resumes(tmp_path, tiny_student_dir, capsys):
    """Runs made while student.quantize existed have it in config.json ("none"): they resume; a saved
    8bit is refused with the reason."""
    from refine import loop

    args = ["--images", "shapes:2", "--rounds", "1", f"--student.model={tiny_student_dir}", "--student.n_samples=1",
            "--student.max_new_tokens=6", f"--loop.runs_dir={tmp_path}", "--loop.run_id=old", "--max-critic-calls=0"]
    log = loop.run(args)
    saved = json.loads((log.root / "config.json").read_text())
    events = len(log.events())
    for value, code in (("none", 0), ("8bit", 2)):
        saved["student"]["quantize"] = value
        (log.root / "config.json").write_text(json.dumps(saved))
        capsys.readouterr()
        assert loop.main(["--resume", "old", f"--loop.runs_dir={tmp_path}"]) == code
    assert "student.quantize=8bit is no longer a setting" in capsys.readouterr().err
    assert len(log.events()) == events  # a finished run: nothing to resume, nothing written


def test_a_lora_target_the_student_lacks_is_refused_before_the_run(tiny_student_dir, tmp_path):
    """Named targets must all exist (c_attn is GPT-2's; the tiny student has no "query"), and the check comes
    before any critic call or run directory."""
    from refine import loop

    with pytest.raises(ValueError, match=r"update.lora_targets=c_attn,query: no linear layer named query in this"):
        loop.run(["--images", "shapes:2", f"--student.model={tiny_student_dir}", "--update.lora.r=4",
                  "--update.lora_targets=c_attn,query", f"--loop.runs_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arch, extra", [("blip", []), ("git", ["--update.mode=sft+dpo"]),
                                         ("blip-2", ["--update.lora.r=4"]), ("vit-gpt2", ["--update.lora.r=4"])])
def test_the_loop_runs_with_every_architecture(student_dirs, arch, extra, tmp_path):
    """The loop, the run directory and resume are the same for every architecture; a LoRA run's student
    is a plain checkpoint with its adapter beside it."""
    from refine import loop

    log = loop.run(["--images", "shapes:4", "--rounds", "2", f"--student.model={student_dirs[arch]}",
                    f"--loop.runs_dir={tmp_path}", "--loop.run_id=r", "--student.n_samples=1",
                    "--student.max_new_tokens=6", "--student.device=cpu", "--update.lr=1e-3", *extra])
    assert log.status() == "done" and log.read_stage(1, "pairs")
    reloaded = load_student(log.student_dir("last"), device="cpu")
    assert reloaded.kind == load(student_dirs, arch).kind
    adapter = log.student_dir("last") / "adapter" / "adapter_config.json"
    assert adapter.exists() == bool(extra and "lora" in extra[0])
    if adapter.exists():  # it applies to the round's starting student, not to the hub id peft would name
        assert json.loads(adapter.read_text())["base_model_name_or_path"] is None
    update_rows = log.read_stage(0, "update")
    assert update_rows and (update_rows[0].get("phase") == "sft") == ("sft+dpo" in " ".join(extra))
    # the round table (the loop's and refine.runs show's) shows the SFT phase's loss (it showed none)
    from rich.console import Console

    from refine.runs import metrics_table

    out = Console(width=200, record=True)
    out.print(metrics_table(log.metrics()))
    assert ("SFT loss" in out.export_text()) == ("sft+dpo" in " ".join(extra))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_student_captions_at_its_longest_allowed_length(student_dirs, arch, tmp_path, capsys):
    """The loop refuses a max_new_tokens past what the text model holds, and the most it allows works.
    BLIP-2's query tokens sit in the same positions: the suggested limit crashed round 0 (an IndexError)."""
    from refine import loop

    student = load(student_dirs, arch)
    limit = student.caption_limit
    assert limit is not None and limit < 256
    args = ["--images", "shapes:1", "--rounds", "0", f"--student.model={student_dirs[arch]}", "--student.device=cpu",
            f"--loop.runs_dir={tmp_path}", "--student.n_samples=0"]
    capsys.readouterr()
    assert loop.main([*args, f"--student.max_new_tokens={limit + 1}"]) == 2
    assert f"use at most {limit}" in capsys.readouterr().err
    ids = student.model.generate(pixel_values=student.pixel_values(images()[:1]), max_new_tokens=limit, min_new_tokens=limit,
                                 **({"do_sample": False} if arch != "blip-2" else {}))
    assert ids.shape[-1] >= limit  # generated to the limit without indexing past the positions
