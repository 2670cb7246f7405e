"""Run under `accelerate launch --num_processes 2 --cpu`: one DPO update, data-parallel.

Writes rank-<i>.json with a checksum of the trained decoder so the test can compare ranks.
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
accelerator = Accelerator(cpu=True)
student = load_student(student_dir, device="cpu", precision="fp32")
images = {f"im{i}": Image.new("RGB", (32, 32), (60 * i, 255 - 60 * i, 100)) for i in range(4)}
pairs = [PreferencePair(f"im{i}", f"a picture number {i}", f"two dogs and a cat {i}", "refined") for i in range(4)]
policy, history = update(student, pairs, images, UpdateConfig(lr=1e-3, epochs=3, batch_size=2), accelerator=accelerator)
weights = torch.cat([p.detach().flatten() for p in policy.model.decoder.parameters()])
(out_dir / f"rank-{accelerator.process_index}.json").write_text(json.dumps({
    "world": accelerator.num_processes, "steps": len(history), "checksum": float(weights.double().sum()),
    "first": weights[:8].tolist(), "changed": not torch.equal(
        weights, torch.cat([p.detach().flatten() for p in student.model.decoder.parameters()])),
}))
