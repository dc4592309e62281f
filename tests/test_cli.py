"""The `eqx-ring` command: help, the demo at toy size, and exact resume after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from helpers import CLI, TOY


def run(*args, timeout=300):
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def records(workdir):
    with open(workdir / "lm" / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("command",
                         [[], ["demo"], ["train"], ["eval"], ["caption"], ["generate"], ["needle"], ["bench"],
                          ["convert"]])
def test_help(command):
    out = run(*command, "--help")
    option = {"bench": "--out", "convert": "--dtype"}.get(command[0] if command else "", "--workdir")
    assert "usage: eqx-ring" in out and option in (out if command else option)


def test_demo_runs_end_to_end_at_toy_size(tmp_path):
    # Output to a pipe: the demo's lines come as they happen, not at exit.
    process = subprocess.Popen([*CLI, "demo", "--workdir", str(tmp_path), "--stages", "128:6", *TOY],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    first = process.stdout.readline()
    assert process.poll() is None, "the first line came only when the demo ended"
    out = first + process.stdout.read()
    assert process.wait(timeout=300) == 0
    assert "mesh {'dp': 2, 'fsdp': 1, 'tp': 1, 'sp': 4} on 8 cpu devices" in out
    for attribute in ("color", "shape", "motion", "exact"):
        assert any(line.startswith(attribute) for line in out.splitlines())
    for name in ("vq.json", "video_text_lm.json", "lm_loss.png", "vq_loss.png", "generated.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["examples"]) == 6 and set(results["accuracy"]) == {"shape", "color", "motion", "exact"}
    # Each stage's wall time is printed as it ends and kept; they add up to the run's.
    stages = results["stage_seconds"]
    assert list(stages) == ["VQ stage", "encoding the training videos", "LM stage", "captioning", "generating videos"]
    assert all(f"[{name}: " in out for name in stages)
    assert sum(stages.values()) == pytest.approx(results["seconds"], abs=1.0)
    # Text to video: one sampled video per held-out caption, read back by the detector.
    generation = results["text_to_video"]
    assert generation["videos"] == 6 and set(generation["match"]) == {"shape", "color", "motion", "all"}
    assert generation["chance"]["color"] == pytest.approx(1 / 8) and "Text to video" in out
    assert [r["step"] for r in records(tmp_path)] == list(range(1, 7))
    # Later commands reuse the workdir's settings (6 held-out videos, 2,1,1,4 mesh) without the flags.
    assert json.loads((tmp_path / "config.json").read_text())["eval_videos"] == 6
    scores = json.loads(run("eval", "--workdir", str(tmp_path)))
    assert scores["accuracy"] == results["accuracy"] and scores["chance"] == results["chance"]
    # On one device the saved 2,1,1,4 mesh does not fit: inference decodes on one that does.
    caption = subprocess.run([*CLI, "--cpu-devices", "1", "caption", "--workdir", str(tmp_path), "--index", "0", "5"],
                             capture_output=True, text=True, timeout=300)
    assert caption.returncode == 0, caption.stderr[-3000:]
    assert caption.stdout.count("held-out #") == 2 and "decodes on -1,1,1,1" in caption.stderr
    out = tmp_path / "new" / "folder" / "grid.png"
    generate = run("--cpu-devices", "1", "generate", "--workdir", str(tmp_path), "a red circle moves up", "--out",
                   str(out))
    assert f"wrote {out}" in generate and out.stat().st_size > 0


def test_resume_after_sigkill_repeats_the_uninterrupted_run(tmp_path):
    k = 5
    full, killed = tmp_path / "full", tmp_path / "killed"
    lm = ["train", "lm", *TOY, "--stages", f"128:{2 * k}", "--checkpoint-every", "1"]
    run("train", "vq", "--workdir", str(full), *TOY)
    killed.mkdir()
    for name in ("vq.json", "vq.eqx"):
        shutil.copy(full / name, killed / name)
    run(*lm, "--workdir", str(full))

    process = subprocess.Popen([*CLI, *lm, "--workdir", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (killed / "lm" / "metrics.jsonl").exists() and len(records(killed)) >= k:
                break
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = sorted(int(p.name) for p in (killed / "lm" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 0 < saved[-1] < 2 * k

    resumed = subprocess.run([*CLI, *lm, "--workdir", str(killed)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming video-text LM from step {saved[-1]}" in resumed.stderr
    expected, got = records(full), records(killed)
    assert [r["step"] for r in got] == list(range(1, 2 * k + 1))
    # Every step's data (digest of the batch) and loss equal the uninterrupted run's: nothing repeated or skipped.
    assert [r["batch_digest"] for r in got] == [r["batch_digest"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1"], "needs all three of --coordinator, --num-processes and --process-id"),
    (["--distributed", "--process-id", "0"], "--distributed finds the settings itself"),
])
def test_incomplete_multi_process_flags_are_refused(flags, message):
    result = subprocess.run([*CLI, *flags, "eval"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.slow
def test_bench_quick_runs_every_benchmark_script(tmp_path):
    out = run("bench", "--quick", "--out", str(tmp_path), timeout=600)
    for name in ("load_balance", "max_context", "memory_scaling", "attention_memory", "attention", "strategies"):
        assert (tmp_path / f"{name}.txt").stat().st_size > 0, name
    rows = json.loads((tmp_path / "strategies.json").read_text())["rows"]
    sent = {(r["heads"], r["strategy"]): r["sent_bytes"] for r in rows}
    assert {s for _, s in sent} == {"ring", "allgather", "ulysses", "hybrid"}
    # With as many kv heads as query heads, Ulysses' all-to-alls move far less than the ring's blocks.
    assert sent["MHA 32", "ulysses"] < sent["MHA 32", "ring"] / 4
    for name in ("max_context.png", "memory_scaling.png", "attention_memory.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    balance = (tmp_path / "load_balance.txt").read_text()
    assert " 2 zigzag " in balance and "1.000" in balance
    assert "wrote tables" in out
