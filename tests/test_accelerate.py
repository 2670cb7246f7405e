"""Data parallelism on 2 CPU processes: the DPO update, and the whole loop, match one process.

`accelerate launch` on CPU needs MPI for more than one process, so the tests start the ranks with
torchrun (gloo); the code uses the same `Accelerator` / `PartialState` that `accelerate launch`
configures on GPUs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_update.py"


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "127.0.0.1:0", *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(params=["vit-gpt2", "clip-gpt2"])
def student_dir(request, tiny_student_dir, sandbox, gpt2_tokenizer_dir):
    """ViT-GPT2, and CLIP + GPT-2, whose post-layernorm no caption loss reaches (DDP must not wait for it)."""
    if request.param == "vit-gpt2":
        return tiny_student_dir
    from refine.offline.students import build_clip_gpt2

    out = sandbox / "students" / "clip-gpt2"
    return out if (out / "config.json").exists() else build_clip_gpt2(out, tokenizer_cache=str(gpt2_tokenizer_dir))


def test_update_on_two_processes_matches_one(student_dir, tmp_path):
    two = torchrun(str(SCRIPT), str(student_dir), str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(SCRIPT), str(student_dir), str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"rank-{i}.json").read_text()) for i in range(2)]
    single = json.loads((tmp_path / "one" / "rank-0.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    # 7 pairs in batches of 3 for 2 epochs: 3 steps an epoch on every process, as on one.
    assert [len(r["history"]) for r in ranks] == [6, 6] == [len(single["history"])] * 2
    assert all(r["changed"] for r in ranks)
    # The ranks agree exactly (gradients all-reduced), and with one process up to float rounding.
    assert ranks[0]["first"] == ranks[1]["first"] and ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["first"] == pytest.approx(single["first"], rel=1e-4, abs=1e-6)
    for two_step, one_step in zip(ranks[0]["history"], single["history"]):
        assert two_step == pytest.approx(one_step, rel=1e-4, abs=1e-5)


def test_the_whole_loop_on_two_processes_writes_the_run_of_one(tiny_student_dir, tmp_path):
    """`torchrun -m refine.loop`: captions and the update shared by 2 processes, the critic asked by the
    main one, one run directory. Given the seed it holds what a 1-process run writes: the same
    captions, critiques and pairs, the update's metrics equal up to float rounding."""
    from refine.infra.runlog import RunLog

    def args(run_id):
        return ["--images", "shapes:10", "--rounds", "2", f"--student.model={tiny_student_dir}",
                f"--loop.runs_dir={tmp_path / 'runs'}", f"--loop.run_id={run_id}", "--student.n_samples=2",
                "--student.batch_size=3", "--student.max_new_tokens=8", "--student.temperature=1.5",
                "--loop.refine_samples=true", "--update.batch_size=3", "--update.epochs=2", "--update.lr=1e-3",
                "--loop.eval_images=shapes-val:5", "--student.device=cpu"]

    two = torchrun("-m", "refine.loop", *args("two"))
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "refine.loop", *args("one")], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = RunLog(tmp_path / "runs" / "one"), RunLog(tmp_path / "runs" / "two")
    assert a.status() == b.status() == "done"
    for k in range(2):
        for stage in ("eval", "captions", "pairs"):
            assert a.read_stage(k, stage) == b.read_stage(k, stage), (k, stage)
        assert [r["critique"]["score"] for r in a.read_stage(k, "critiques")] == \
            [r["critique"]["score"] for r in b.read_stage(k, "critiques")]
        assert a.read_stage(k, "pairs"), "the test must train on something"
        for x, y in zip(a.read_stage(k, "update"), b.read_stage(k, "update"), strict=True):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-5)
    assert a.read_stage(2, "eval") == b.read_stage(2, "eval")
    assert not list((tmp_path / "runs").glob("two/**/*.partial.jsonl"))


def test_a_stop_on_the_main_process_stops_the_others_with_its_exit_status(tiny_student_dir, tmp_path):
    """The critic-call budget runs out on the main process, mid-round, while the other one waits for the
    pairs: both exit 0, the stop is recorded once, and a 2-process resume finishes the run."""
    from refine.infra.runlog import RunLog
    from refine.offline.devserver import FakeOpenAIServer
    from refine.stages.critique import row_calls

    reply = ('{"score": 0.5, "feedback": "Name the shapes.", "hallucinated": [], "missing": [], '
             '"count_errors": {}, "revision": "a red circle"}')
    with FakeOpenAIServer(reply=lambda body: reply) as server:
        args = ["-m", "refine.loop", "--images", "shapes:6", "--rounds", "2", f"--student.model={tiny_student_dir}",
                f"--loop.runs_dir={tmp_path}", "--loop.run_id=b", "--student.n_samples=0", "--student.batch_size=2",
                "--student.max_new_tokens=6", "--student.device=cpu", "--critic.backend=openai",
                f"--critic.base_url={server.base_url}", "--critic.model=fake", "--max-critic-calls", "4"]
        stopped = torchrun(*args, timeout=300)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        log = RunLog(tmp_path / "b")
        assert [e["event"] for e in log.events()].count("budget_stop") == 1
        assert log.critic_calls(row_calls) == server.request_count == 4
        resumed = torchrun("-m", "refine.loop", "--resume", "b", f"--loop.runs_dir={tmp_path}", "--max-critic-calls",
                           "100", timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log.status() == "done" and log.read_stage(1, "pairs")


@pytest.mark.parametrize("var", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_a_deepspeed_or_fsdp_launch_is_refused_before_the_run(var, tiny_student_dir, tmp_path, monkeypatch, capsys):
    """The update splits batches and sums reference log-probs for plain DDP; a sharded model would train
    on something else. Refused before any critic call or run directory, not at the first update."""
    from refine import loop

    monkeypatch.setenv(var, "true")
    code = loop.main(["--images", "shapes:2", f"--student.model={tiny_student_dir}", f"--loop.runs_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and f"{var}=true: accelerate is set up for" in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_ctrl_c_on_two_processes_says_how_to_continue_once(tiny_student_dir, tmp_path):
    """A terminal's Ctrl-C reaches every process of the launch: the run stops recorded, and one line (the
    main process's) says how to continue; every rank printed it."""
    import signal
    import time

    from refine.infra.runlog import RunLog

    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "127.0.0.1:0", "-m", "refine.loop", "--images", "shapes:40", "--rounds", "3",
           f"--student.model={tiny_student_dir}", f"--loop.runs_dir={runs}", "--loop.run_id=c",
           "--student.batch_size=2", "--student.max_new_tokens=8", "--student.device=cpu"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while not list((runs / "c" / "rounds").glob("000/captions*")):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before captioning"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert out.count("Interrupted") == 1, out[-3000:]  # (torchrun itself prints its SignalException's traceback)
    assert "Continue with: python -m refine.loop --resume" in out, out[-3000:]
    assert RunLog(runs / "c", writer=False).events()[-1]["event"] == "interrupted"
