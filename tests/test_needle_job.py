"""The long-context job: `eqx-ring needle` end to end at toy size, and its scoring against an independent one."""

import json
import re
import subprocess

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CLI

from data_pipelines import COLORS, ByteTokenizer
from models import Stage, VideoTextLM, load
from models._cli import main
from models._needle import NeedleConfig, _source, needle_accuracy, stage_mesh, train_needle

TOY = ["--stages", "128:6,256:3:1e5", "--eval-lengths", "256", "512", "--examples-per-cell", "2", "--window", "64",
       "--no-progress"]
DEPTHS = [str(d) for d in range(0, 101, 10)]


def run(*args):
    result = subprocess.run([*CLI, "needle", *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_grid(grid, lengths, examples):
    assert list(grid) == [str(n) for n in lengths]
    for row in grid.values():
        assert list(row) == DEPTHS
        # Each cell is a share of `examples` videos.
        assert all(0 <= a <= 1 and (a * examples).is_integer() for a in row.values())


def test_needle_job_end_to_end_resumes_and_re_evaluates(tmp_path):
    first = run("--workdir", str(tmp_path), *TOY)
    result = json.loads((tmp_path / "needle.json").read_text())
    assert {"trained_length", "window", "ring", "window_control", "examples_per_cell"} <= result.keys()
    assert (result["trained_length"], result["window"], result["examples_per_cell"]) == (256, 64, 2)
    for key in ("ring", "window_control"):
        check_grid(result[key], [256, 512], 2)
    assert (tmp_path / "needle.png").stat().st_size > 10_000
    assert "training the ring model" in first.stdout and "training the window model" in first.stdout
    for model in ("ring", "window"):
        steps = [json.loads(line)["step"] for line in (tmp_path / model / "stage1" / "metrics.jsonl").open()]
        assert steps == [1, 2, 3]

    # A rerun finds every stage saved: nothing trains again and the same models give the same scores.
    again = run("--workdir", str(tmp_path), "--no-progress")
    assert "step" not in again.stdout.replace("steps", "")
    assert json.loads((tmp_path / "needle.json").read_text())["ring"] == result["ring"]

    out = tmp_path / "other" / "seed3.json"
    run("--workdir", str(tmp_path), "--eval-only", "--seed", "3", "--out", str(out), "--eval-lengths", "512")
    other = json.loads(out.read_text())
    assert other["seed"] == 3 and out.with_suffix(".png").exists()
    check_grid(other["ring"], [512], 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--eval-only"], "argument --eval-only: .* holds no trained needle run"),
        (["--stages", "128:0"], "argument --stages: a stage is SEQ_LEN:STEPS"),
        (["--eval-lengths", "10"], "NeedleConfig.eval_lengths must be >= 45 tokens"),
        (["--window", "0"], "argument --window: expected a positive int"),
    ],
)
def test_bad_needle_flags_are_refused_naming_them(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["needle", "--workdir", str(tmp_path / "w"), *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])
    assert not (tmp_path / "w").exists()


def test_accuracy_on_the_ring_equals_an_independent_one_device_reading(tmp_path):
    """`needle_accuracy` (zigzag rows over an 8-device ring, first answer token found by position) against
    each example run alone in natural order on one device, its answer read off the logits by hand."""
    config = NeedleConfig(stages=(Stage(128, 30, rope_theta=1e4),), examples_per_cell=6)
    lm, _ = train_needle(config, tmp_path, progress=False, echo=lambda *a: None)
    tok = ByteTokenizer()
    initials = [tok.encode(name)[0] for name in COLORS]
    for length, depth in ((256, 0.3), (512, 1.0)):
        source = _source(6, length=length, seed=1, depth=depth)
        on_ring = needle_accuracy(lm.respec(mesh=stage_mesh(1)), source, stage_mesh(1), seq_len=length)
        alone = lm.respec(mesh=None, layout="contiguous")  # natural order, one device
        chosen = exact = 0
        for i in range(len(source)):
            record = source[i]
            # Padded at the end to the cell's length (the chunk sizes divide it); causal, so no logit below changes.
            tokens = jnp.asarray(np.pad(record["tokens"], (0, length - len(record["tokens"])),
                                        constant_values=tok.pad_id))
            logits = np.asarray(alone.transformer.logits(alone(tokens)), np.float64)
            answer = np.flatnonzero(record["loss_mask"])  # the answer's tokens and <eos>
            predicted = logits[answer - 1].argmax(-1)  # position t predicts token t + 1
            first = logits[answer[0] - 1, initials]
            chosen += initials[int(first.argmax())] == record["tokens"][answer[0]]
            exact += bool((predicted == record["tokens"][answer]).all())
        assert on_ring == {"accuracy": chosen / len(source), "exact": exact / len(source)}


def test_the_last_stage_trains_at_its_own_learning_rate(tmp_path):
    """At a last-stage rate of 1e-30 every update rounds away, so the last stage ends on the stage before's weights."""
    config = NeedleConfig(stages=(Stage(128, 4, rope_theta=1e4), Stage(256, 2)), last_stage_learning_rate=1e-30,
                          warmup_steps=1)
    lm, _ = train_needle(config, tmp_path, progress=False, echo=lambda *a: None)
    before = load(tmp_path / "stage0")
    initial = VideoTextLM(config.lm, key=jax.random.key(config.seed))
    leaves = [jax.tree.leaves(eqx.filter(m, eqx.is_array)) for m in (initial, before, lm)]
    assert any(not np.array_equal(a, b) for a, b in zip(leaves[0], leaves[1], strict=True))  # stage 0 learned
    assert all(np.array_equal(a, b) for a, b in zip(leaves[1], leaves[2], strict=True))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learning_rate", 0.0, "NeedleConfig.learning_rate must be a finite float > 0, got 0.0"),
        ("last_stage_learning_rate", float("nan"), "NeedleConfig.last_stage_learning_rate must be a finite float > 0, "
                                                   "got nan"),
        ("examples_per_cell", 0, "NeedleConfig.examples_per_cell must be a positive int, got 0"),
        ("stages", (), "NeedleConfig.stages must hold at least one Stage"),
    ],
)
def test_bad_needle_config_is_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        NeedleConfig(**{field: value})
