"""Section 3: one DPO optimizer step of ``refine.stages.dpo.update`` against a plain SFT step, same model and optimizer.

Each variant runs in a fresh subprocess (``python -m bench.dpo_step --variant ...``), so that its RSS
belongs to it alone. DPO and SFT are loaded side by side; each takes one untimed warm-up step; then the
benchmark asks them for one step at a time, alternating, so that rep i of both runs back to back (the
idle one waits on stdin and uses no CPU). The frozen-encoder DPO variant runs afterwards, alone. Each
step trains the loaded student further (timing does not depend on the weights' values).

- ``dpo`` / ``dpo_frozen``: ``refine.stages.dpo.update(student, pairs, images, UpdateConfig(epochs=1,
  batch_size=n_pairs), in_place=True)`` as the loop calls it, i.e. exactly one optimizer step, with
  ``freeze_encoder`` off / on. The code
  under test is not modified; it is observed: ``reference_logps`` is wrapped to time the frozen
  reference pass (``update`` computes it once, up front), a ``torch.optim`` global step hook times
  RAdam, and the ``Accelerator`` handed to ``update`` times ``backward``. "step" is everything after
  the reference pass: batch preparation, forward, loss, backward, clipping, RAdam.
- ``sft``: cross-entropy on the chosen captions (``VisionEncoderDecoderModel(..., labels=...)``), the
  same model preparation (``refine.stages.dpo.prepare_for_training``: dropout off, pooler frozen), a fresh RAdam, the same
  clipping.

Per step the worker reports wall times by phase and the highest RSS sampled during the step
(``RSSPeak``); at the end, ``getrusage``'s lifetime peak. Forward hooks count the rows the encoder and
the decoder see per pass, to check that the encoder runs once per image.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.measure import Row, RSSPeak, Target, max_rss_bytes, ratios, rss_bytes

VARIANTS = ("dpo", "sft", "dpo_frozen")
GB = 1e9


def make_inputs(student, n_pairs: int, n_tokens: int):
    """``n_pairs`` preference pairs over ``n_pairs`` distinct images; every caption is ``n_tokens`` tokens."""
    from bench.data import bench_records, token_captions
    from refine.stages.pairs import PreferencePair

    records = bench_records(n_pairs)
    chosen = token_captions(student.tokenizer, n_tokens, n_pairs)
    rejected = token_captions(student.tokenizer, n_tokens, n_pairs, offset=n_pairs)
    pairs = [PreferencePair(r.id, c, x, "refined", 1.0) for r, c, x in zip(records, chosen, rejected)]
    return pairs, {r.id: r.image for r in records}


class RowCounter:
    """Forward pre-hooks on the encoder and decoder recording the batch rows of each call.

    Deep copies of the model (``Student.copy``) carry the hooks along, so the policy is counted too.
    """

    def __init__(self, model):
        self.calls: list[tuple[str, int]] = []
        self.handles = [
            model.encoder.register_forward_pre_hook(self._hook("encoder", "pixel_values"), with_kwargs=True),
            model.decoder.register_forward_pre_hook(self._hook("decoder", "input_ids"), with_kwargs=True),
        ]

    def _hook(self, name: str, key: str):
        def hook(module, args, kwargs):
            x = kwargs.get(key) if kwargs.get(key) is not None else (args[0] if args else None)
            self.calls.append((name, int(x.shape[0]) if x is not None else -1))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _StepHooks:
    """Global ``torch.optim`` step hooks: the wall time of the (outermost) optimizer step."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.start = self.end = None
        self._depth = 0
        self.handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]

    def _pre(self, *_):
        if self._depth == 0:
            self.start = time.perf_counter()
        self._depth += 1

    def _post(self, *_):
        self._depth -= 1
        if self._depth == 0:
            self.end = time.perf_counter()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def dpo_step(student, pairs, images, freeze_encoder: bool, device_sync=lambda: None) -> dict[str, float]:
    """One optimizer step of ``refine.stages.dpo.update``; wall seconds by phase."""
    from accelerate import Accelerator

    import refine.stages.dpo as dpo

    marks: dict[str, tuple[float, float]] = {}

    class TimedAccelerator(Accelerator):
        def backward(self, loss, **kwargs):
            start = time.perf_counter()
            super().backward(loss, **kwargs)
            device_sync()
            marks["backward"] = (start, time.perf_counter())

    real_reference_logps = dpo.reference_logps

    def timed_reference_logps(*args, **kwargs):
        start = time.perf_counter()
        out = real_reference_logps(*args, **kwargs)
        device_sync()
        marks["reference"] = (start, time.perf_counter())
        return out

    config = dpo.UpdateConfig(epochs=1, batch_size=len(pairs), freeze_encoder=freeze_encoder)
    accelerator = TimedAccelerator(cpu=student.device.type == "cpu")
    hooks = _StepHooks()
    dpo.reference_logps = timed_reference_logps
    try:
        start = time.perf_counter()
        policy, history = dpo.update(student, pairs, images, config, accelerator=accelerator, in_place=True)
        device_sync()
        end = time.perf_counter()
    finally:
        dpo.reference_logps = real_reference_logps
        hooks.remove()
    if len(history) != 1:
        raise RuntimeError(f"expected exactly one optimizer step, update made {len(history)}")
    ref_start, ref_end = marks["reference"]
    bw_start, bw_end = marks["backward"]
    del policy, accelerator
    return {
        "setup": ref_start - start,  # argument checks and the Accelerator, before the reference pass
        "reference": ref_end - ref_start,
        "step": end - ref_end,
        "forward": bw_start - ref_end,  # optimizer set-up, batch preparation, forward, loss
        "backward": bw_end - bw_start,
        "optimizer": hooks.end - hooks.start,
        "loss": history[0]["loss"],
        "dpo_loss": history[0]["dpo_loss"],  # ln 2 at the first step: the policy starts as the reference
        "nll": history[0]["nll"],
    }


def sft_step(student, pairs, images, params, lr: float = 1e-5, device_sync=lambda: None) -> dict[str, float]:
    """One cross-entropy step on the chosen captions with a fresh RAdam; wall seconds by phase."""
    import torch

    model = student.model
    start = time.perf_counter()
    optimizer = torch.optim.RAdam(params, lr=lr)
    pixels = student.pixel_values([images[p.image_id] for p in pairs])
    tokens = student.tokenize([p.chosen for p in pairs])
    labels = tokens.labels.masked_fill(tokens.mask == 0, -100)  # -100: ignored by CrossEntropyLoss
    out = model(pixel_values=pixels, decoder_input_ids=tokens.decoder_input_ids,
                decoder_attention_mask=tokens.mask, labels=labels)
    device_sync()
    forward_end = time.perf_counter()
    out.loss.backward()
    device_sync()
    backward_end = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt_start = time.perf_counter()
    optimizer.step()
    device_sync()
    opt_end = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = out.loss.item()
    end = time.perf_counter()
    return {"step": end - start, "forward": forward_end - start, "backward": backward_end - forward_end,
            "optimizer": opt_end - opt_start, "loss": loss}


class Stepper:
    """One variant, loaded once: ``step()`` runs one timed optimizer step from the loaded student."""

    def __init__(self, variant: str, model_dir: str, n_pairs: int, n_tokens: int, device: str = "cpu"):
        import torch

        from refine.stages.dpo import prepare_for_training
        from refine.stages.student import load_student

        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        torch.manual_seed(0)
        self.variant = variant
        self.student = load_student(model_dir, device=device, precision="auto")
        self.cuda = self.student.device.type == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.pairs, self.images = make_inputs(self.student, n_pairs, n_tokens)
        self.counter = RowCounter(self.student.model)
        self.params = prepare_for_training(self.student.model) if variant == "sft" else None
        self.sampler = RSSPeak()
        self.info = {
            "variant": variant, "threads": torch.get_num_threads(), "device": str(self.student.device),
            "precision": self.student.precision, "params": sum(p.numel() for p in self.student.model.parameters()),
            "rss_after_load": rss_bytes(),
        }

    def step(self) -> dict[str, Any]:
        import torch

        self.counter.calls.clear()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        with self.sampler():
            if self.variant == "sft":
                phases = sft_step(self.student, self.pairs, self.images, self.params, device_sync=self.sync)
            else:
                phases = dpo_step(self.student, self.pairs, self.images, freeze_encoder=self.variant == "dpo_frozen",
                                  device_sync=self.sync)
            gc.collect()
        return {"phases": phases, "rss_peak": self.sampler.peak, "rss_after": rss_bytes(), "rows": list(self.counter.calls),
                "gpu_peak": torch.cuda.max_memory_allocated() if self.cuda else None}

    def close(self) -> dict[str, Any]:
        self.counter.remove()
        return {"max_rss": max_rss_bytes()}


def collect(info: dict[str, Any], steps: list[dict[str, Any]], final: dict[str, Any]) -> dict[str, Any]:
    """One variant's record: its info, per-step phases and peaks, the rows of its last step, ``max_rss``."""
    return {**info, **final, "steps": [s["phases"] for s in steps], "rss_peak": [s["rss_peak"] for s in steps],
            "gpu_peak": [s["gpu_peak"] for s in steps if s["gpu_peak"] is not None],
            "rows_last_rep": steps[-1]["rows"] if steps else []}


def worker(variant: str, model_dir: str, reps: int, warmup: int, n_pairs: int, n_tokens: int,
           device: str = "cpu") -> dict[str, Any]:
    """In this process: ``warmup`` untimed steps, then ``reps`` timed ones."""
    stepper = Stepper(variant, model_dir, n_pairs, n_tokens, device)
    steps = [stepper.step() for _ in range(warmup + reps)][warmup:]
    return collect(stepper.info, steps, stepper.close())


def serve(args: argparse.Namespace) -> int:
    """Load, print ``info`` as a JSON line, then run one step per ``step`` line read on stdin (answering
    each with a JSON line) until ``done`` or end of input, which is answered with ``{"max_rss": ...}``."""
    stepper = Stepper(args.variant, args.model_dir, args.pairs, args.tokens, args.device)
    print(json.dumps(stepper.info), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            print(json.dumps(stepper.step()), flush=True)
        elif command in ("done", ""):
            break
        else:
            print(json.dumps({"error": f"unknown command {command!r}; use step or done"}), flush=True)
    print(json.dumps(stepper.close()), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dpo_step",
                                     description="one variant of benchmark section 3, stepped over stdin")
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    return serve(parser.parse_args(argv))


# --- the orchestrator (runs in the benchmark's process) -----------------------------------------


class WorkerProcess:
    """A ``python -m bench.dpo_step`` process for one variant, driven one step at a time."""

    def __init__(self, variant: str, model_dir: Path, n_pairs: int = 4, n_tokens: int = 16, device: str = "cpu"):
        self.variant = variant
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: progress bars cannot block it
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.dpo_step", "--variant", variant, "--model-dir", str(model_dir),
             "--pairs", str(n_pairs), "--tokens", str(n_tokens), "--device", device],
            cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True)
        self.info: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"bench.dpo_step --variant {self.variant} exited (code {self._proc.returncode}): "
                               f"{self._stderr.read()[-1500:]}")
        return json.loads(line)

    def ready(self) -> dict[str, Any]:
        self.info = self._read()
        return self.info

    def step(self) -> dict[str, Any]:
        self._proc.stdin.write("step\n")
        self._proc.stdin.flush()
        return self._read()

    def finish(self) -> dict[str, Any]:
        self._proc.stdin.write("done\n")
        self._proc.stdin.flush()
        final = self._read()
        self._proc.wait(timeout=60)
        self._stderr.close()
        return final

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


def interleaved(variants: tuple[str, ...], model_dir: Path, reps: int, n_pairs: int = 4, n_tokens: int = 16,
                device: str = "cpu", warmup: int = 1) -> dict[str, dict[str, Any]]:
    """One fresh process per variant, all loaded up front; steps then alternate between them.

    Only the process taking a step computes (the others wait on stdin), so each repetition's steps run
    back to back in rotating order: rep i of DPO and of SFT see the same machine load, and each
    process's RSS (sampled per step, and ``getrusage``'s lifetime peak) belongs to one variant alone.
    """
    workers = {v: WorkerProcess(v, model_dir, n_pairs, n_tokens, device) for v in variants}
    try:
        for w in workers.values():
            w.ready()
        for w in workers.values():
            for _ in range(warmup):
                w.step()  # untimed: first-touch allocations, kernel selection
        steps: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for rep in range(reps):
            for v in variants[rep % len(variants):] + variants[: rep % len(variants)]:
                steps[v].append(workers[v].step())
        return {v: collect(w.info, steps[v], w.finish()) for v, w in workers.items()}
    finally:
        for w in workers.values():
            w.kill()


def _phase(result: dict[str, Any], name: str) -> list[float]:
    return [s[name] for s in result["steps"]]


def _rows_text(calls: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} {rows}" for name, rows in calls)


def run(model_dir: Path, reps: int, size: str) -> list[Row]:
    section = "3 DPO vs SFT step"
    # DPO and SFT alternate (their ratio is the target); the frozen-encoder variant runs afterwards, on
    # its own: a process keeps ~3-4 GB of freed memory between steps, and three at once would crowd out
    # everyone else on a shared 2-core, 23 GB machine.
    results = interleaved(("dpo", "sft"), model_dir, reps)
    results.update(interleaved(("dpo_frozen",), model_dir, reps))
    dpo, sft, frozen = results["dpo"], results["sft"], results["dpo_frozen"]
    model_gb = dpo["params"] * 4 / GB
    setup = (f"ViT-GPT2 {size}, random weights ({dpo['params'] / 1e6:.0f}M params), 4 pairs of 16-token captions, "
             f"CPU fp32, {dpo['threads']} torch threads; one fresh subprocess per variant, 1 untimed warm-up step each; "
             "DPO and SFT steps alternate (one rep = one step of each, in rotating order), then the frozen-encoder "
             "variant runs alone")
    med = statistics.median
    breakdown = {v: {p: med(_phase(results[v], p)) for p in ("forward", "backward", "optimizer")} for v in ("dpo", "sft")}
    why_time = (f"medians, DPO vs SFT: forward {breakdown['dpo']['forward']:.2f} vs {breakdown['sft']['forward']:.2f} s, "
                f"backward {breakdown['dpo']['backward']:.2f} vs {breakdown['sft']['backward']:.2f} s, "
                f"RAdam {breakdown['dpo']['optimizer']:.2f} vs {breakdown['sft']['optimizer']:.2f} s. Rows per call "
                f"(one DPO rep: reference pass, then policy): {_rows_text(dpo['rows_last_rep'])}; SFT: "
                f"{_rows_text(sft['rows_last_rep'])}")
    why_memory = (f"update(in_place=True), as the loop calls it, takes the reference log-probs first and then trains "
                  f"the student itself: no second model ({model_gb:.2f} GB of fp32 weights) in memory. RSS after loading: "
                  f"DPO {dpo['rss_after_load'] / GB:.2f}, SFT {sft['rss_after_load'] / GB:.2f} GB; lifetime peak "
                  f"(getrusage maxrss) of each process: DPO {dpo['max_rss'] / GB:.2f}, SFT {sft['max_rss'] / GB:.2f}, "
                  f"DPO frozen encoder {frozen['max_rss'] / GB:.2f} GB")
    return [
        Row(section, "DPO step: refine.stages.dpo.update, 1 optimizer step, excl. reference pass", "s", _phase(dpo, "step"),
            earlier="earlier (plain implementation): 7.4–8.3 s", note=setup),
        Row(section, "DPO reference pass (computed once per update)", "s", _phase(dpo, "reference")),
        Row(section, "SFT step: cross-entropy on the 4 chosen captions, RAdam", "s", _phase(sft, "step"),
            earlier="earlier: 6.3–6.4 s"),
        Row(section, "DPO step / SFT step (rep i vs rep i)", "×", ratios(_phase(dpo, "step"), _phase(sft, "step")),
            Target("<=", 1.2), earlier="earlier: 1.15–1.3×", note=why_time),
        Row(section, "DPO forward (after the reference pass, up to backward)", "s", _phase(dpo, "forward"),
            earlier="earlier: 2.3 s"),
        Row(section, "DPO backward", "s", _phase(dpo, "backward"), earlier="earlier: 4.6 s"),
        Row(section, "DPO RAdam step", "s", _phase(dpo, "optimizer"), earlier="earlier: 1.0 s"),
        Row(section, "SFT forward (batch preparation + forward + loss)", "s", _phase(sft, "forward")),
        Row(section, "SFT backward", "s", _phase(sft, "backward")),
        Row(section, "SFT RAdam step", "s", _phase(sft, "optimizer")),
        Row(section, "DPO step with freeze_encoder=True", "s", _phase(frozen, "step"), earlier="earlier: 4.0–4.5 s"),
        Row(section, "peak RSS during a DPO step (whole process, sampled every 10 ms)", "GB",
            [b / GB for b in dpo["rss_peak"]], earlier="earlier: ~5.3 GB"),
        Row(section, "peak RSS during an SFT step (whole process, sampled every 10 ms)", "GB",
            [b / GB for b in sft["rss_peak"]], earlier="earlier: ~5.3 GB"),
        Row(section, "peak RSS, DPO / SFT (rep i vs rep i)", "×", ratios(dpo["rss_peak"], sft["rss_peak"]),
            Target("<=", 1.1), note=why_memory),
        Row(section, "peak RSS during a DPO step, frozen encoder", "GB", [b / GB for b in frozen["rss_peak"]]),
    ]


if __name__ == "__main__":
    sys.exit(main())
