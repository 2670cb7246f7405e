"""The DPO update data-parallel on 2 CPU processes: gradients are synced across ranks.

`accelerate launch` on CPU needs MPI for more than one process, so the test starts the ranks with
torchrun (gloo); the script uses the same `Accelerator` that `accelerate launch` configures on GPUs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_update_data_parallel_on_two_cpu_processes(tiny_student_dir, tmp_path):
    script = Path(__file__).parent / "scripts" / "ddp_update.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "127.0.0.1:0", str(script), str(tiny_student_dir), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    # 4 pairs sharded over 2 ranks, batch 2, 3 epochs: 3 steps each.
    assert [r["steps"] for r in ranks] == [3, 3]
    assert all(r["changed"] for r in ranks)
    # Each rank saw different pairs; identical weights afterwards mean the gradients were all-reduced.
    assert ranks[0]["first"] == ranks[1]["first"] and ranks[0]["checksum"] == ranks[1]["checksum"]
