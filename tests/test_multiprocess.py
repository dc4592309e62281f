"""Real multi-process JAX: 2 processes x 4 CPU devices on 127.0.0.1, against one process with 8 devices."""

import json

import numpy as np
import pytest
from helpers import CLI, TOY, ring_fn
from multiprocess import launch, run_processes
from multiprocess_inputs import attention_inputs

import eqx_ring


def test_ring_attention_spanning_two_processes_equals_one_process(tmp_path):
    launch("ring_attention_across_processes", tmp_path)
    shards = sorted(tmp_path.glob("slots_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(shards) == 8  # each device's slots, written by the process that owns the device
    laid_out = np.concatenate([np.load(p) for p in shards], axis=1)
    q, k, v = attention_inputs()
    got = eqx_ring.from_layout(laid_out, "zigzag", 8, axis=1)
    expected = np.asarray(ring_fn(8, "zigzag", causal=True, query_chunk_size=8, key_chunk_size=8)(q, k, v))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_training_without_a_mesh_is_refused_in_a_multi_process_run(tmp_path):
    for out in launch("train_without_a_mesh", tmp_path, timeout=120):
        assert "refused: train runs in 2 processes but was given no mesh" in out


def test_a_failing_or_hanging_peer_fails_the_test_with_its_output(tmp_path):
    with pytest.raises(AssertionError, match=r"(?s)process \d of 2 exited with 1 .*no_such_worker"):
        launch("no_such_worker", tmp_path, timeout=120)
    with pytest.raises(AssertionError, match="process 1 of 2 did not finish within 20 s"):
        launch("hang_in_process_1", tmp_path, timeout=20)


def run_plan(out_dir, runs, *, processes):
    (out_dir / "plan.json").write_text(json.dumps({"runs": [{"workdir": str(w), "stop_after": s} for w, s in runs]}))
    return launch("train_video_text_runs", out_dir, processes=processes, devices_per_process=8 // processes,
                  timeout=420)


def losses(workdir):
    with open(workdir / "lm" / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def training_runs(tmp_path_factory):
    """5 steps of the tiny video-text LM on (dp=2, sp=4): in 1 process x 8 devices and in 2 x 4, each also
    stopped after the step-3 checkpoint and resumed on the other process count."""
    root = tmp_path_factory.mktemp("training")
    one, two, one_to_two, two_to_one = (root / name for name in ("one", "two", "one_to_two", "two_to_one"))
    outputs = {}
    outputs["1 process"] = run_plan(root, [(one, None), (one_to_two, 3)], processes=1)
    outputs["2 processes"] = run_plan(root, [(two, None), (two_to_one, 3), (one_to_two, None)], processes=2)
    outputs["1 process, resuming"] = run_plan(root, [(two_to_one, None)], processes=1)
    return {"one": one, "two": two, "one_to_two": one_to_two, "two_to_one": two_to_one}, outputs


def test_training_across_two_processes_equals_one_process(training_runs):
    runs, outputs = training_runs
    assert "process 1 of 2: mesh {'dp': 2, 'fsdp': 1, 'tp': 1, 'sp': 4}" in outputs["2 processes"][1]
    one, two = losses(runs["one"]), losses(runs["two"])
    assert sorted(two) == [1, 2, 3, 4, 5] and sorted(one) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([two[s] for s in range(1, 6)], [one[s] for s in range(1, 6)], rtol=1e-5)
    assert len(set(one.values())) == 5  # the steps differ: the comparison covers distinct batches


def test_checkpoints_move_between_process_counts_and_continue_identically(training_runs):
    runs, outputs = training_runs
    assert "stopped" in outputs["1 process"][0] and "stopped" in outputs["2 processes"][0]
    assert "resuming video-text LM from step 3 of 5" in outputs["2 processes"][0]  # written by 1, read by 2
    assert "resuming video-text LM from step 3 of 5" in outputs["1 process, resuming"][0]  # written by 2, read by 1
    one = losses(runs["one"])
    for name in ("one_to_two", "two_to_one"):
        resumed = losses(runs[name])
        assert sorted(resumed) == [1, 2, 3, 4, 5], name
        np.testing.assert_allclose([resumed[s] for s in range(1, 6)], [one[s] for s in range(1, 6)], rtol=1e-5,
                                   err_msg=name)


def test_cli_demo_in_two_processes_matches_one_process(tmp_path):
    toy = [*TOY, "--stages", "128:4"]
    one, two = tmp_path / "one", tmp_path / "two"
    (out,) = run_processes(lambda port, i: [*CLI, "demo", "--workdir", str(one), *toy], 1, timeout=300)
    outputs = run_processes(
        lambda port, i: [*CLI, "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                         "--process-id", str(i), "demo", "--workdir", str(two), *toy],
        2, timeout=300,
    )
    # Process 0 reports; process 1 only computes.
    assert "Held-out captions" in outputs[0] and "Held-out captions" not in outputs[1]
    assert "on 8 cpu devices" in outputs[0] and "video-text LM step" not in outputs[1]
    for stage in ("vq", "lm"):
        with open(one / stage / "metrics.jsonl") as a, open(two / stage / "metrics.jsonl") as b:
            np.testing.assert_allclose([json.loads(r)["loss"] for r in b], [json.loads(r)["loss"] for r in a],
                                       rtol=1e-5, err_msg=stage)
    results = [json.loads((w / "results.json").read_text()) for w in (one, two)]
    assert results[0]["examples"] == results[1]["examples"]  # the same greedy captions
    for name in ("vq.json", "video_text_lm.json", "lm_loss.png", "generated.png"):
        assert (two / name).stat().st_size > 0
