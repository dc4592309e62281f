"""Hugging Face checkpoints: our logits and greedy tokens against transformers' own (tests/fixtures/hf), on one
device and on an 8-device ring; save -> load; damaged folders named in the error."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

import eqx_ring
import models
from eqx_ring.sharding import make_mesh

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ("llama", "llama_tied", "llama3", "mistral", "qwen2")


def golden(name):
    return np.load(FIXTURES / name / "golden.npz")


def logits_of(model, prompt, *, ring: int = 1, layout: str = "contiguous"):
    tokens = eqx_ring.to_layout(jnp.asarray(prompt), layout, ring, axis=0)
    logits = jax.jit(lambda m, t: m.transformer.logits(m(t)))(model, tokens)
    return np.asarray(eqx_ring.from_layout(logits, layout, ring, axis=0))


def test_fixture_folders_hold_each_feature():
    configs = {name: json.loads((FIXTURES / name / "config.json").read_text()) for name in NAMES}
    assert configs["llama_tied"]["tie_word_embeddings"] and configs["llama_tied"]["head_dim"] * 4 != 32
    assert configs["llama_tied"]["torch_dtype"] == "bfloat16"
    assert configs["llama3"]["rope_scaling"]["rope_type"] == "llama3"
    assert (FIXTURES / "llama3" / "model.safetensors.index.json").exists()
    assert configs["mistral"]["sliding_window"] < golden("mistral")["prompt"].size
    assert configs["qwen2"]["architectures"] == ["Qwen2ForCausalLM"]
    assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 2**20


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_greedy_tokens_equal_transformers_on_one_device(name):
    expected = golden(name)
    model = models.from_pretrained(FIXTURES / name, dtype=jnp.float32)
    assert rel_err(logits_of(model, expected["prompt"]), expected["logits"]) <= 1e-4
    greedy = models.generate(model, [expected["prompt"]], len(expected["greedy"]))
    np.testing.assert_array_equal(np.asarray(greedy)[0], expected["greedy"])


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_transformers_on_an_8_device_zigzag_ring(name):
    expected = golden(name)
    mesh = make_mesh(sp=8)
    model = models.from_pretrained(FIXTURES / name, mesh=mesh, layout="zigzag", dtype=jnp.float32)
    assert model.transformer.spec.ring_size == 8 and model.transformer.spec.layout == "zigzag"
    assert rel_err(logits_of(model, expected["prompt"], ring=8, layout="zigzag"), expected["logits"]) <= 1e-4


@pytest.mark.parametrize("name", ["llama3", "mistral"])
def test_greedy_tokens_on_the_ring_equal_transformers(name):
    expected = golden(name)
    model = models.from_pretrained(FIXTURES / name, mesh=make_mesh(sp=8), layout="zigzag", dtype=jnp.float32)
    greedy = models.generate(model, [expected["prompt"]], len(expected["greedy"]))
    np.testing.assert_array_equal(np.asarray(greedy)[0], expected["greedy"])


def test_weights_keep_their_stored_dtype_unless_told():
    stored = models.from_pretrained(FIXTURES / "llama_tied")  # bfloat16 on disk
    blocks = stored.transformer.blocks
    assert stored.transformer.embedding.weight.dtype == jnp.bfloat16
    assert blocks.attention.query_proj.weight.dtype == jnp.bfloat16 and blocks.ffn_norm.weight.dtype == jnp.float32
    assert stored.transformer.lm_head is None  # tied
    upcast = models.from_pretrained(FIXTURES / "llama_tied", dtype=jnp.float32)
    assert upcast.transformer.embedding.weight.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(upcast.transformer.embedding.weight),
                                  np.asarray(stored.transformer.embedding.weight, np.float32))


def test_weights_are_placed_on_the_mesh_by_the_sharding_rules():
    mesh = make_mesh(fsdp=2, tp=2, sp=2)
    model = models.from_pretrained(FIXTURES / "llama", mesh=mesh)
    expected = eqx_ring.sharding.param_shardings(model, mesh)
    for array, sharding in zip(jax.tree.leaves(model), jax.tree.leaves(expected), strict=True):
        assert array.sharding == sharding


def arrays_equal(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    if len(leaves_a) != len(leaves_b):
        return False
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(leaves_a, leaves_b, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_gives_the_same_model(name, tmp_path):
    model = models.from_pretrained(FIXTURES / name)
    written = models.save_pretrained(model, tmp_path / "one")
    assert sorted(Path(p).name for p in written) == ["config.json", "model.safetensors"]
    again = models.from_pretrained(tmp_path / "one")
    assert again.config == model.config and arrays_equal(again, model)
    # The config transformers reads names the same architecture and computation as the original's.
    original = json.loads((FIXTURES / name / "config.json").read_text())
    saved = json.loads((tmp_path / "one" / "config.json").read_text())
    assert saved["architectures"] == original["architectures"]
    assert models.config_from_hf(saved) == models.config_from_hf(original)


def test_attention_dropout_becomes_the_specs_dropout(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    edit_config(folder, attention_dropout=0.25)
    model = models.from_pretrained(folder)
    assert model.spec.dropout == 0.25
    models.save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attention_dropout"] == 0.25
    # Inference (and generation, which prefills in inference) computes what transformers does, dropout or not.
    plain = models.from_pretrained(FIXTURES / "llama")
    tokens = jnp.arange(16) % plain.config.vocab_size
    hidden = [m.transformer(tokens, inference=True) for m in (model, plain)]
    assert bool(jnp.all(hidden[0] == hidden[1]))
    dropped = model.transformer(tokens, key=jax.random.key(0))
    assert float(jnp.abs(dropped - hidden[1]).max()) > 1e-3


def test_save_splits_into_shards_with_an_index(tmp_path):
    model = models.from_pretrained(FIXTURES / "llama")
    written = models.save_pretrained(model, tmp_path, max_shard_size=20_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and all(f.stat().st_size < 20_000 + 4_096 for f in shards)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert str(tmp_path / "model.safetensors.index.json") in written
    assert arrays_equal(models.from_pretrained(tmp_path), model)


def test_save_refuses_what_no_llama_family_model_computes(tmp_path, no_hook):
    config = models.LMConfig(vocab_size=16, d_model=16, num_layers=1, num_heads=2,
                             attention=eqx_ring.AttentionSpec(causal_block_size=4))
    model = models.RingLM(config, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"LMConfig.attention.causal_block_size .* is not something a LLaMA-family"):
        models.save_pretrained(model, tmp_path)
    with pytest.raises(TypeError, match="model must be a models.RingLM, got int"):
        models.save_pretrained(3, tmp_path)
    # The features of newer models that the LLaMA family lacks are refused too, not dropped from the export.
    small = dict(vocab_size=16, d_model=16, num_layers=1, num_heads=2)
    for name, config in (
            ("attention.attention_chunk_size", models.LMConfig(**small, attention=eqx_ring.AttentionSpec(
                attention_chunk_size=8))),
            ("attention.logit_softcap", models.LMConfig(**small, attention=eqx_ring.AttentionSpec(logit_softcap=30.0))),
            ("use_sinks", models.LMConfig(**small, use_sinks=True))):
        with pytest.raises(ValueError, match=rf"LMConfig.{name} .* is not something a LLaMA-family"):
            models.hf_config(config)


# ---- damaged folders --------------------------------------------------------------------------------


def copy_fixture(name, tmp_path) -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_missing_shard_is_named(tmp_path):
    folder = copy_fixture("llama3", tmp_path)
    (folder / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00003-of-00005.safetensors is missing: "
                                                r"model.safetensors.index.json lists tensors in it"):
        models.from_pretrained(folder)


def test_a_truncated_file_is_named(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file: .*not fully covered"):
        models.from_pretrained(folder)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        models.from_pretrained(folder)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = copy_fixture("llama", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:40]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' in .*model.safetensors has shape "
                                         r"\(40, 32\), but the config's model needs \(48, 32\)"):
        models.from_pretrained(folder)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds no tensor 'model.layers.1.mlp.up_proj.weight', which the config"):
        models.from_pretrained(folder)


def test_a_tensor_the_model_has_no_place_for_is_named(tmp_path):
    folder = copy_fixture("llama", tmp_path)
    edit_config(folder, num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"holds tensors the config's model has no place for: "
                                         r"\['model.layers.1.input_layernorm.weight'"):
        models.from_pretrained(folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
         "rope_scaling.rope_type='yarn' is not supported; eqx-ring implements 'linear' and 'llama3'"),
        (dict(rope_scaling={"rope_type": "linear", "factor": -1.0}),
         "rope_scaling: RopeScaling.factor must be a finite float > 0, got -1.0"),
        (dict(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel' is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        (dict(attention_bias=True), "attention_bias=True is not supported"),
        (dict(attention_dropout=1.5), "attention_dropout=1.5 must be a number in "),
        (dict(hidden_size=None), "hidden_size=None is not a int"),
    ],
)
def test_a_config_key_that_cannot_be_honoured_is_named(tmp_path, changes, message):
    folder = copy_fixture("llama", tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ValueError, match=r"config.json: " + message.replace("(", r"\(").replace("[", r"\[")):
        models.from_pretrained(folder)


def test_a_folder_without_config_or_weights_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        models.from_pretrained(tmp_path)
    folder = copy_fixture("qwen2", tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        models.from_pretrained(folder)


# ---- tokenizer and text examples --------------------------------------------------------------------


def test_hf_tokenizer_gives_transformers_ids():
    from data_pipelines import HFTokenizer, Tokenizer

    expected = golden("llama")
    tokenizer = HFTokenizer(FIXTURES / "llama")
    assert isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size == 96
    ids = tokenizer.encode(str(expected["text"]))
    np.testing.assert_array_equal(ids, expected["text_ids"])
    assert ids.dtype == np.int32
    assert tokenizer.decode(np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]])) == str(expected["text"])
    # tokenizer_config.json's <s>, </s>; no padding token, so the unknown token pads.
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
    assert tokenizer.vision_start_id is None and tokenizer.eov_id is None


def test_hf_tokenizer_adds_lwm_vision_tokens_when_asked():
    from data_pipelines import VISION_TOKENS, HFTokenizer

    tokenizer = HFTokenizer(FIXTURES / "llama", add_vision_tokens=True)
    vision = (tokenizer.vision_start_id, tokenizer.vision_end_id, tokenizer.eof_id, tokenizer.eov_id)
    assert sorted(vision) == list(range(96, 100)) and tokenizer.vocab_size == 100
    ids = tokenizer.encode(f"{VISION_TOKENS[0]}a cat{VISION_TOKENS[3]}")
    assert ids[0] == tokenizer.vision_start_id and ids[-1] == tokenizer.eov_id
    assert tokenizer.decode(ids) == "a cat"


def test_hf_tokenizer_errors_name_the_file(tmp_path):
    from data_pipelines import HFTokenizer

    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        HFTokenizer(tmp_path)
    shutil.copy(FIXTURES / "llama" / "tokenizer.json", tmp_path)
    with pytest.raises(ValueError, match="no BOS token: tokenizer_config.json has no bos_token in the vocabulary and "
                                         "config.json no bos_token_id"):
        HFTokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    tokenizer = HFTokenizer(tmp_path)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)


def test_text_examples_are_bos_text_eos_all_targets(no_hook):
    from data_pipelines import HFTokenizer, text_examples

    tokenizer = HFTokenizer(FIXTURES / "llama")
    documents = ["Ring attention.", "Each device keeps one block.", "The lazy dog."]
    examples = list(text_examples(documents, tokenizer, seed=3, num_epochs=2))
    assert len(examples) == 6
    texts = [tokenizer.decode(e["tokens"]) for e in examples]
    assert sorted(texts[:3]) == sorted(documents) and sorted(texts[3:]) == sorted(documents)
    for e in examples:
        assert e["tokens"][0] == tokenizer.bos_id and e["tokens"][-1] == tokenizer.eos_id
        assert e["loss_mask"].all() and not e["vision_mask"].any()
    with pytest.raises(ValueError, match=r"documents must be a non-empty sequence of str, got 1 items of types "
                                         r"\['int'"):
        text_examples([3], tokenizer)


# ---- context extension ------------------------------------------------------------------------------


def test_fine_tuning_extends_the_context_stage_by_stage(tmp_path):
    from data_pipelines import HFTokenizer, global_packed_batches, process_rows, text_examples
    from eqx_ring.sharding import BATCH_AXES, shard_params

    mesh = make_mesh(dp=2, sp=4)
    model = models.from_pretrained(FIXTURES / "llama", mesh=mesh, layout="zigzag", dtype=jnp.float32)
    model = shard_params(model, mesh)
    tokenizer = HFTokenizer(FIXTURES / "llama")
    documents = [str(golden("llama")["text"]) * 6, "The quick brown fox jumps over the lazy dog. " * 8]
    seen = []

    def batches(index, stage):
        seen.append((index, stage.seq_len))
        examples = text_examples(documents, tokenizer, seed=index, num_epochs=None)
        return global_packed_batches(examples, seq_len=stage.seq_len, batch_size=2, pad_id=tokenizer.pad_id,
                                     rows=process_rows(mesh, 2), layout="zigzag", ring_size=4,
                                     vocab_size=model.config.vocab_size)

    stages = (models.Stage(32, 2), models.Stage(64, 2, rope_theta=40_000.0), models.Stage(128, 2, rope_scale=2.0))
    config = models.TrainConfig(stages=stages, batch_size=2, learning_rate=1e-3, warmup_steps=1, checkpoint_every=10)
    result = models.train(model, lambda m, b: (m.loss(b, spmd_axis_name=BATCH_AXES), {}), batches, config,
                          workdir=tmp_path, mesh=mesh, progress=False)
    assert seen == [(0, 32), (1, 64), (2, 128)]
    spec = result.model.transformer.spec
    # The base raised in stage 1 is kept when stage 2 adds position interpolation.
    assert spec.rope_theta == 40_000.0 and spec.rope_scaling == eqx_ring.RopeScaling("linear", 2.0)
    assert result.model.config.attention.rope_scaling == spec.rope_scaling
    assert [r["tokens"] for r in result.records] == [64, 64, 128, 128, 256, 256]
    assert all(np.isfinite(r["loss"]) for r in result.records)
    # The extended model is a Hugging Face checkpoint again, its scaling in config.json.
    models.save_pretrained(result.model, tmp_path / "extended")
    saved = json.loads((tmp_path / "extended" / "config.json").read_text())
    assert saved["rope_theta"] == 40_000.0 and saved["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    reread = models.from_pretrained(tmp_path / "extended", layout="zigzag")
    assert reread.config == result.model.config
