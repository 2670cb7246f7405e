"""The benchmark's own machinery: target checks, request accounting at the server, the DPO/SFT worker.

No timing is asserted anywhere: these check that the benchmark measures what it says it measures.
"""

import json
import math

import numpy as np
import pytest

from bench import critic_stage, dpo_step
from bench.data import token_captions
from bench.devserver import ServerProcess, bench_reply, classify
from bench.gpu import percentile
from bench.measure import CPUSnapshot, Row, Target, markdown_table, ratios


def test_targets_on_median_or_every_rep_and_missed_rows_stay_in_the_table():
    assert Target(">=", 12).met([11.0, 13.0, 14.0])  # median 13
    assert not Target(">=", 12).met([11.0, 11.5, 14.0])  # median 11.5
    assert not Target("==", 0, on="all").met([0, 1, 0])  # one rep with a request is a miss
    assert Target("<=", 2, on="all").met([2, 2, 1.9])
    rows = [
        Row("1", "speed-up", "×", [7.0, 7.3, 7.2], Target(">=", 12)),
        Row("2", "requests", "req", [0, 0, 0], Target("==", 0, on="all")),
        Row("3", "broken", "s", error="RuntimeError: boom"),
        Row("3", "no values", "s", [], Target("<=", 1)),
        Row("6", "gpu", "", skipped="skipped: no GPU"),
    ]
    assert [r.status for r in rows] == ["MISSED", "met", "ERROR", "MISSED (no data)", "skipped: no GPU"]
    assert rows[0].summary() == {"median": 7.2, "min": 7.0, "max": 7.3, "n": 3}
    table = markdown_table(rows)
    assert table.count("\n") == len(rows) + 1  # header, separator, one line per row: nothing hidden
    assert "| **MISSED** |" in table and "≥ 12.0 ×" in table and "| **ERROR** |" in table
    assert json.loads(json.dumps(rows[1].to_json()))["target"]["text"] == "= 0 req (every rep)"
    # Repetitions that disagree by more than 1.5x are flagged; agreeing ones are not.
    assert "noisy" not in table
    assert "noisy: max/min 3.0" in markdown_table([Row("3", "drifting", "s", [5.0, 15.0, 6.0])])


def test_ratios_pair_repetitions():
    assert ratios([9.0, 10.0], [1.5, 2.0]) == [6.0, 5.0]
    assert math.isnan(ratios([1.0], [0.0])[0])
    with pytest.raises(ValueError, match="pair them"):
        ratios([1.0, 2.0], [1.0])


def test_cpu_share_of_other_processes():
    start = CPUSnapshot(wall=100.0, busy=50.0, ours=4.0)
    # 2 s on 2 cores: the machine was busy 3 s, of which 1 s was ours, so others used 2 of 4 core-seconds.
    assert start.others_share(CPUSnapshot(wall=102.0, busy=53.0, ours=5.0), cores=2) == pytest.approx(0.5)
    assert start.others_share(CPUSnapshot(wall=102.0, busy=None, ours=5.0), cores=2) is None
    now = CPUSnapshot.take()
    assert now.busy is not None and now.ours > 0  # this is Linux: /proc/stat and os.times are there


def test_percentile_matches_numpy_linear():
    values = [float(v) for v in [12, 3, 7, 40, 5, 9, 11, 8, 6, 10]]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 95) == pytest.approx(9.55)  # 9 + 0.55 * (10 - 9)


def test_server_reply_answers_each_kind_in_its_format():
    from critics.openai_vlm import parse_critique

    critique = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Caption under review: a dog"}]}]}
    backward = {"messages": [{"role": "system", "content": "You are part of an optimization system ... You are the "
                                                           "gradient (feedback) engine. ..."},
                             {"role": "user", "content": "the caption"}]}
    step = {"messages": [{"role": "system", "content": "send the improved variable between <IMPROVED_VARIABLE> "
                                                       "{improved variable} </IMPROVED_VARIABLE> tags"},
                         {"role": "user", "content": "a dog"}]}
    assert [classify(b) for b in (critique, backward, step)] == ["critique", "backward", "step"]
    parsed = parse_critique(bench_reply(critique))
    assert parsed.revision is None and parsed.feedback  # so refine's textual step has to run
    reply = bench_reply(step)
    assert reply.startswith("<IMPROVED_VARIABLE>") and reply.endswith("</IMPROVED_VARIABLE>")
    assert bench_reply(step) == reply and bench_reply({**step, "messages": step["messages"][:1]}) != reply


def test_requests_are_counted_at_the_server_for_both_sides(tmp_path):
    """textgrad's pipeline makes 3 requests per image, refine's 2, a warm refine round none."""
    from bench.data import bench_records

    records, captions = bench_records(2), ["a bus on a street", "two men in suits"]
    with ServerProcess(latency=0.0) as server:
        textgrad = critic_stage.TextgradSide(server.base_url).round(records, captions, tmp_path / "tg")
        tg_stats = server.stats()
        server.reset()
        refine_side = critic_stage.RefineSide(server.base_url)
        cold = refine_side.round(records, captions, tmp_path / "refine")
        cold_stats = server.stats()
        server.reset()
        warm = refine_side.round(records, captions, tmp_path / "refine")
        warm_stats = server.stats()
    assert textgrad["failures"] == [] and cold["failures"] == [] and warm["failures"] == []
    assert tg_stats["kinds"] == {"critique": 2, "backward": 2, "step": 2}
    assert cold_stats["kinds"] == {"critique": 2, "step": 2}
    assert warm_stats["requests"] == 0 and warm["cache_hits"] == 2
    # Both sides really took the server's improved captions, one per image, different per image.
    for refined in (textgrad["refined"], cold["refined"]):
        assert len(set(refined)) == 2 and all(c.startswith("a street scene with a bus and people") for c in refined)
    assert warm["refined"] == cold["refined"]


def test_token_captions_have_exactly_n_tokens(tiny_student):
    captions = token_captions(tiny_student.tokenizer, 16, 4)
    assert len(set(captions)) == 4
    assert all(len(tiny_student.tokenizer(c, add_special_tokens=False).input_ids) == 16 for c in captions)
    with pytest.raises(ValueError, match="is 3 tokens"):
        token_captions(lambda text, add_special_tokens: type("T", (), {"input_ids": [0, 1, 2]})(), 16, 1)


@pytest.mark.parametrize("variant", ["dpo", "sft"])
def test_worker_makes_one_step_and_counts_encoder_rows_per_image(variant, tiny_student_dir):
    result = dpo_step.worker(variant, str(tiny_student_dir), reps=1, warmup=0, n_pairs=3, n_tokens=8)
    (step,) = result["steps"]
    assert step["step"] >= step["forward"] + step["backward"] + step["optimizer"] > 0
    assert math.isfinite(step["loss"])
    assert result["rss_peak"][0] >= result["rss_after_load"] > 0 and result["max_rss"] > 0
    if variant == "dpo":
        # The reference pass, then the policy: the encoder sees each of the 3 images once, the decoder
        # chosen + rejected.
        assert result["rows_last_rep"] == [("encoder", 3), ("decoder", 6), ("encoder", 3), ("decoder", 6)]
        assert step["reference"] > 0
        assert step["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # one step from the reference itself
        assert step["loss"] == pytest.approx(step["dpo_loss"] + 0.5 * step["nll"], rel=1e-6)  # nll_weight 0.5
    else:
        assert result["rows_last_rep"] == [("encoder", 3), ("decoder", 3)]
