"""`eqx-ring convert`, `generate --model` and `train lm --init` on the Hugging Face fixtures (tests/fixtures/hf)."""

import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CLI

import models
from data_pipelines import HFTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def run(*args, timeout=300):
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def refused(*args):
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_convert_to_the_zoo_and_back_keeps_every_weight(tmp_path):
    out = run("convert", str(FIXTURES / "llama_tied"), str(tmp_path / "zoo" / "tied"))
    assert out.strip() == f"wrote {tmp_path / 'zoo' / 'tied.json'}, {tmp_path / 'zoo' / 'tied.eqx'}"
    zoo = models.load(tmp_path / "zoo" / "tied")
    original = models.from_pretrained(FIXTURES / "llama_tied")
    assert zoo.config == original.config and zoo.config.param_dtype == "bfloat16"
    run("convert", str(tmp_path / "zoo" / "tied.json"), str(tmp_path / "back"), "--tokenizer",
        str(FIXTURES / "llama"))
    assert {p.name for p in (tmp_path / "back").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                               "tokenizer_config.json"}
    back = models.from_pretrained(tmp_path / "back")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(original), strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    run("convert", str(FIXTURES / "llama"), str(tmp_path / "f32"), "--dtype", "bfloat16")
    assert models.load(tmp_path / "f32").transformer.blocks.ffn.up_proj.weight.dtype == jnp.bfloat16


def test_generate_continues_a_prompt_greedily_on_one_device_and_on_the_ring():
    tokenizer = HFTokenizer(FIXTURES / "llama")
    prompt = "Ring attention keeps"
    model = models.from_pretrained(FIXTURES / "llama", dtype=jnp.float32)
    ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)])
    tokens = np.asarray(models.generate(model, [ids], 12, stop_tokens=(tokenizer.eos_id,)))[0]
    end = np.flatnonzero(tokens == tokenizer.eos_id)
    expected = prompt + tokenizer.decode(tokens[: end[0] if end.size else None])
    assert run("generate", "--model", str(FIXTURES / "llama"), prompt, "--max-new-tokens", "12") == expected + "\n"
    ring = run("generate", "--model", str(FIXTURES / "llama"), prompt, "--max-new-tokens", "12", "--mesh", "1,1,1,8")
    assert ring == expected + "\n"


def test_train_lm_init_fine_tunes_over_context_stages(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(str(np.load(FIXTURES / "llama" / "golden.npz")["text"]) * 8)
    workdir = tmp_path / "run"
    out = run("train", "lm", "--init", str(FIXTURES / "llama"), "--text", str(text), "--stages",
              "32:2,64:2:40000:x2", "--learning-rate", "1e-3", "--mesh", "2,1,1,4", "--batch-size", "2",
              "--workdir", str(workdir), "--no-progress")
    assert "fine-tuned 4 steps over stages of 32, 64 tokens" in out
    assert "rope_theta 40000, rope_scaling linear x2" in out
    saved = json.loads((workdir / "hf" / "config.json").read_text())
    assert saved["rope_theta"] == 40_000.0 and saved["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert (workdir / "hf" / "tokenizer.json").is_file() and (workdir / "finetune_loss.png").is_file()
    tuned = models.from_pretrained(workdir / "hf")
    assert models.load(workdir / "lm").config == models.from_pretrained(workdir / "hf", layout="zigzag").config
    before = models.from_pretrained(FIXTURES / "llama")
    assert not np.array_equal(np.asarray(tuned.transformer.embedding.weight),
                              np.asarray(before.transformer.embedding.weight))


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "nowhere", "hi"],
     "nowhere is neither a Hugging Face model folder (config.json with architectures) nor a zoo file"),
    (["generate", "--model", str(FIXTURES / "llama"), "hi", "--frames", "4"],
     "argument --frames: generate --model continues text; --frames is a video-model flag"),
    (["train", "lm", "--init", str(FIXTURES / "llama"), "--stages", "32:2"],
     "argument --init: fine-tuning needs `train lm --init DIR --text FILE... --stages ...`"),
    (["train", "lm", "--init", str(FIXTURES / "llama"), "--text", "a.txt"],
     "argument --stages: train lm --init needs its context stages, e.g. --stages 4096:200:5e5"),
    (["train", "lm", "--init", str(FIXTURES / "llama"), "--text", "a.txt", "--stages", "32:2", "--d-model", "64"],
     "argument --d-model: train lm --init fine-tunes the pretrained model, whose sizes are its own"),
    (["train", "lm", "--init", str(FIXTURES / "llama"), "--text", "missing.txt", "--stages", "32:2"],
     "argument --text: cannot read missing.txt"),
    (["train", "lm", "--init", str(FIXTURES / "llama"), "--text", __file__, "--stages", "24:2"],
     "argument --stages: rows of 24 tokens do not split into the 2 x 8 zigzag chunks of the sp=8 ring"),
    (["convert", str(FIXTURES / "llama"), "out", "--tokenizer", str(FIXTURES / "llama")],
     "argument --tokenizer: a zoo file holds no tokenizer"),
])
def test_pretrained_commands_refuse_bad_arguments_naming_them(argv, message):
    assert message in refused(*argv)
