"""One DPO update, under torchrun / `accelerate launch` (data-parallel) or as one plain process.

Writes rank-<i>.json (into OUT_DIR) with the per-step metrics and a checksum of the trained decoder, so
the test can compare the ranks with each other and a 2-process run with a 1-process one.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image

from refine.stages.dpo import UpdateConfig, update
from refine.stages.pairs import PreferencePair
from refine.stages.student import load_student

student_dir, out_dir = sys.argv[1], Path(sys.argv[2])
out_dir.mkdir(parents=True, exist_ok=True)
from accelerate import DistributedDataParallelKwargs  # noqa: E402

# as update() makes its own: some students have parameters no caption loss reaches
accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
student = load_student(student_dir, device="cpu", precision="fp32")
images = {f"im{i}": Image.new("RGB", (32, 32), (40 * i, 255 - 40 * i, 100)) for i in range(6)}
# 7 pairs in batches of 3: the last batch of each epoch has one pair, so one rank takes a zero-weight
# step; weights differ, as agreement makes them.
pairs = [PreferencePair(f"im{i % 6}", f"a picture number {i}", f"two dogs and a cat {i}", "refined",
                        weight=1.0 if i % 2 else 0.5) for i in range(7)]
config = UpdateConfig(lr=1e-3, epochs=2, batch_size=3, image_negatives=True)
policy, history = update(student, pairs, images, config, accelerator=accelerator)
weights = torch.cat([p.detach().flatten() for p in policy.model.decoder.parameters()])
(out_dir / f"rank-{accelerator.process_index}.json").write_text(json.dumps({
    "world": accelerator.num_processes, "history": history, "checksum": float(weights.double().sum()),
    "first": weights[:8].tolist(), "changed": not torch.equal(
        weights, torch.cat([p.detach().flatten() for p in student.model.decoder.parameters()])),
}))
