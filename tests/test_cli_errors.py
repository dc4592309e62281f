"""The `eqx-ring` command refuses bad arguments up front: exit status 2, one line naming the flag, nothing written."""

import dataclasses
import json
import re
import subprocess

import pytest
from helpers import CLI

from models import Stage
from models._cli import main
from models._demo import DemoConfig


def refused(capsys, argv):
    """Run the command in this process; it must exit 2 before any work. Returns its last stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def refused_in_subprocess(argv):
    result = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def fake_workdir(path, settings=None, frames=2):
    """A workdir whose zoo files exist (the checks read the LM's frame count) but hold no weights."""
    path.mkdir()
    for name in ("vq", "video_text_lm"):
        (path / f"{name}.json").write_text(json.dumps({"config": {"num_frames": frames}}))
    if settings is not None:
        (path / "config.json").write_text(json.dumps(dataclasses.asdict(settings)))
    return path


@pytest.mark.parametrize("argv, message", [
    (["train", "lm", "--grad-accum", "0"], "argument --grad-accum: expected a positive int, got '0'"),
    (["train", "lm", "--checkpoint-every", "0"], "argument --checkpoint-every: expected a positive int, got '0'"),
    (["demo", "--train-videos", "0"], "argument --train-videos: expected a positive int, got '0'"),
    (["demo", "--eval-videos", "0"], "argument --eval-videos: expected a positive int, got '0'"),
    (["train", "vq", "--vq-steps", "-5"], "argument --vq-steps: expected a positive int, got '-5'"),
    (["train", "lm", "--stages", "256:x"],
     r"argument --stages: a stage is SEQ_LEN:STEPS\[:ROPE_THETA\]\[:xSCALE\] .* '256:x'"),
    (["train", "lm", "--stages", "256:10:x2:x3"], r"argument --stages: .* got '256:10:x2:x3'"),
    (["train", "lm", "--stages", "256:10:-1"], "argument --stages: .* got '256:10:-1'"),
    (["train", "lm", "--stages", "0:10"], "argument --stages: .* got '0:10'"),
    (["train", "lm", "--learning-rate", "-1"], r"argument --learning-rate: expected a finite number > 0, got '-1'"),
    (["train", "lm", "--learning-rate", "nan"], r"argument --learning-rate: expected a finite number > 0, got 'nan'"),
    (["demo", "--mesh", "2,4"], "argument --mesh: expected four comma-separated sizes .* got '2,4'"),
    (["demo", "--mesh=-1,-1,1,1"], "argument --mesh: .* at most one -1 .* got '-1,-1,1,1'"),
    (["demo", "--mesh", "0,1,1,8"], "argument --mesh: .* got '0,1,1,8'"),
    (["--cpu-devices", "0", "demo"], "argument --cpu-devices: expected a positive int, got '0'"),
    (["demo", "--frames", "0"], "argument --frames: expected a positive int, got '0'"),
    (["demo", "--max-shapes", "4"], "argument --max-shapes: expected 1, 2 or 3 shapes, got '4'"),
    (["demo", "--max-shapes", "0"], "argument --max-shapes: expected 1, 2 or 3 shapes, got '0'"),
    (["demo", "--seed", "-1"], "argument --seed: expected an int >= 0, got '-1'"),
    (["demo", "--d-model", "0"], "argument --d-model: expected a positive int, got '0'"),
    (["demo", "--d-model", "30"], "argument --d-model: expected a multiple of 8 .* got 30"),
    (["demo", "--layers", "-2"], "argument --layers: expected a positive int, got '-2'"),
    (["demo", "--batch-size", "6", "--grad-accum", "4"], "argument --grad-accum: --grad-accum 4 microbatches must "
                                                          "divide --batch-size 6"),
    (["generate", "a red circle moves up", "--temperature", "-1"], "argument --temperature: .* >= 0, got '-1'"),
    (["caption", "--index", "-1"], "argument --index: expected an int >= 0, got '-1'"),
    (["--coordinator", "nohost", "eval"], "argument --coordinator: expected HOST:PORT .* got 'nohost'"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2", "eval"],
     "argument --process-id: expected 0 to --num-processes - 1 = 1, got 2"),
])
def test_bad_flag_is_one_line_naming_it_and_nothing_is_written(capsys, tmp_path, argv, message):
    workdir = tmp_path / "run"
    line = refused(capsys, [*argv, "--workdir", str(workdir)])
    assert line.startswith("eqx-ring") and ": error: " in line
    assert re.search(message, line), line
    assert not workdir.exists()


def test_workdir_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert refused(capsys, ["train", "vq", "--workdir", str(tmp_path / "file")]).endswith(
        f"argument --workdir: {tmp_path / 'file'} is a file, not a folder")
    assert refused(capsys, ["demo", "--workdir", str(tmp_path / "file" / "run")]).endswith(
        f"argument --workdir: {tmp_path / 'file'} is a file, so the folder {tmp_path / 'file' / 'run'} cannot be made")


@pytest.mark.parametrize("command", [["eval"], ["caption"], ["generate", "a red circle moves up"], ["train", "lm"]])
def test_missing_model_is_one_line_and_creates_no_workdir(capsys, tmp_path, command):
    workdir = tmp_path / "run"
    line = refused(capsys, [*command, "--workdir", str(workdir)])
    assert line == (f"eqx-ring {command[0]}: error: {workdir}/vq.json not found: run `eqx-ring train vq --workdir "
                    f"{workdir}` or `eqx-ring demo --workdir {workdir}` first")
    assert not workdir.exists()


def test_caption_arguments_are_checked_before_loading(capsys, tmp_path):
    workdir = fake_workdir(tmp_path / "run")
    assert refused(capsys, ["caption", "--workdir", str(workdir), str(tmp_path / "missing.mp4")]).endswith(
        f"argument videos: no such file: {tmp_path / 'missing.mp4'}")
    assert refused(capsys, ["caption", "--workdir", str(workdir), "--index", "3", "200"]).endswith(
        "argument --index: expected indices below --eval-videos 200, got [200]")
    (tmp_path / "clip.mp4").write_bytes(b"")
    assert refused(capsys, ["caption", "--workdir", str(workdir), str(tmp_path / "clip.mp4"), "--index", "0"]
                   ).endswith("argument --index: --index picks held-out videos; give it or video files, not both")
    assert refused(capsys, ["caption", "--workdir", str(workdir), "--frames", "4"]).endswith(
        f"argument --frames: the LM in {workdir} reads videos of 2 frames, not --frames 4; give --frames 2")


def test_generate_out_is_checked_before_any_work(capsys, tmp_path):
    workdir = fake_workdir(tmp_path / "run")
    (tmp_path / "file").write_text("")
    generate = ["generate", "a red circle moves up", "--workdir", str(workdir), "--out"]
    assert refused(capsys, [*generate, str(tmp_path / "file" / "grid.png")]).endswith(
        f"argument --out: {tmp_path / 'file'} is a file, not a folder")
    assert refused(capsys, [*generate, str(tmp_path)]).endswith(f"argument --out: {tmp_path} is a folder; give a "
                                                                f"file name, e.g. {tmp_path / 'generate.png'}")
    assert "argument --out: expected an image file name ending in one of" in refused(
        capsys, [*generate, str(tmp_path / "grid.xyz")])


def test_saved_settings_are_reused_and_a_flag_given_replaces_them_with_a_note(capsys, tmp_path):
    saved = dataclasses.replace(DemoConfig(), eval_videos=8)
    workdir = fake_workdir(tmp_path / "run", saved)
    # The saved --eval-videos 8 (not the default 200) bounds --index.
    assert refused(capsys, ["caption", "--workdir", str(workdir), "--index", "8"]).endswith(
        "argument --index: expected indices below --eval-videos 8, got [8]")
    # A flag given replaces the saved value, with a note; the command then gets as far as loading the models.
    result = subprocess.run([*CLI, "caption", "--workdir", str(workdir), "--index", "8", "--eval-videos", "12"],
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"note: --eval-videos 12 replaces 8, the value saved in {workdir / 'config.json'}" in lines
    assert lines[-1].startswith(f"eqx-ring caption: error: cannot load {workdir / 'vq'}.json")
    assert json.loads((workdir / "config.json").read_text())["eval_videos"] == 8  # inference does not save


def test_corrupt_settings_file_is_one_line(capsys, tmp_path):
    workdir = fake_workdir(tmp_path / "run")
    (workdir / "config.json").write_text('{"num_frames": 2, "colour": 1}')
    assert refused(capsys, ["eval", "--workdir", str(workdir)]) == (
        f"eqx-ring eval: error: {workdir / 'config.json'} does not hold the settings of an eqx-ring run "
        "(DemoConfig has no fields ['colour']); move it away to start from the defaults")


@pytest.mark.parametrize("argv, message", [
    (["--cpu-devices", "1", "demo"], r"argument --mesh: 4,1,1,2 \(the default --mesh\) does not fit the 1 cpu device "
                                     r"\(--cpu-devices 1, before the command, sets them per process\): mesh .* needs 8 "
                                     "devices, but 1 are given"),
    (["--cpu-devices", "2", "demo", "--mesh", "2,1,1,2"], "argument --mesh: 2,1,1,2 does not fit the 2 cpu devices"),
    (["demo", "--batch-size", "6"], r"argument --batch-size: each of the --grad-accum 1 microbatches of --batch-size "
                                    r"6 holds 6 rows, which the 4 data shards \(dp \* fsdp\) of --mesh 4,1,1,2 must "
                                    "divide"),
    (["demo", "--batch-size", "8", "--grad-accum", "4"], "argument --batch-size: .* holds 2 rows, which the 4 data"),
    (["--cpu-devices", "3", "train", "vq", "--mesh", "1,1,1,3"], "argument --cpu-devices: the VQ stage splits its 16 "
                                                                 "frames per step over all 3 cpu devices"),
    (["demo", "--stages", "1030:5"], "argument --stages: rows of 1030 tokens do not fit the LM on --mesh 4,1,1,2: "
                                     ".*1030 must be divisible by 4"),
    (["demo", "--stages", "1024:5,1100:5"], "argument --stages: rows of 1100 tokens do not fit the LM on --mesh "
                                            "4,1,1,2: query_chunk_size=256 must divide"),
])
def test_settings_that_do_not_fit_the_devices_are_refused_before_training(tmp_path, argv, message):
    workdir = tmp_path / "run"
    line = refused_in_subprocess([*argv, "--workdir", str(workdir)])
    assert re.search(message, line), line
    assert not workdir.exists()


def test_help_shows_the_recipe_defaults():
    out = subprocess.run([*CLI, "train", "--help"], capture_output=True, text=True, timeout=120).stdout
    flat = " ".join(out.split())
    for text in ("frames per video (default: 2)", "training videos (default: 30000)", "(default: 4,1,1,2)",
                 "(default: 1024:500)", "peak LM learning rate (default: 0.003)", "(default: off)",
                 "LM width (default: 96)", "LM depth (default: 3)", "LM feed-forward width (default: 256)",
                 "config.json"):
        assert text in flat, text


def test_demo_config_refuses_inconsistent_derived_values():
    config = DemoConfig()
    with pytest.raises(ValueError, match=r"DemoConfig.lm.num_frames must equal num_frames=4, got 2"):
        dataclasses.replace(config, num_frames=4)
    with pytest.raises(ValueError, match=r"DemoConfig.lm.codebook_size must equal vq.codebook_size=64, got 256"):
        dataclasses.replace(config, vq=dataclasses.replace(config.vq, codebook_size=64))
    with pytest.raises(ValueError, match=r"DemoConfig.lm.codes_per_frame must equal vq.grid \*\* 2=16, got 64"):
        dataclasses.replace(config, vq=dataclasses.replace(config.vq, patch=8))
    with pytest.raises(ValueError, match=r"DemoConfig.vq.frame_size must equal frame_size=64, got 32"):
        dataclasses.replace(config, frame_size=64)
    with pytest.raises(ValueError, match=r"DemoConfig.train_videos must be a positive int, got 0"):
        dataclasses.replace(config, train_videos=0)


def test_demo_config_round_trips_through_json():
    default = DemoConfig()
    stages = (Stage(1024, 10), Stage(2048, 5, 5e4))
    config = dataclasses.replace(default, eval_videos=8, lm_train=dataclasses.replace(default.lm_train, stages=stages))
    assert DemoConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config
    with pytest.raises(ValueError, match=r"DemoConfig.lm has no fields \['width'\]"):
        DemoConfig.from_dict({"lm": {"width": 3}})
