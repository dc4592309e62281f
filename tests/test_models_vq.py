"""VideoVQ: shapes, straight-through gradients, losses against their formulas, dead-code restarts, zoo files."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from data_pipelines import MovingShapes
from models._vq import from_unit, to_unit

CONFIG = models.VQConfig(frame_size=16, patch=4, hidden=8, codebook_size=8, code_dim=4)


def video(n=2, frames=3):
    source = MovingShapes(n, num_frames=frames, size=16)
    return jnp.asarray(np.stack([source[i]["frames"] for i in range(n)]))


def test_encode_decode_shapes_and_unit_scaling():
    vq = models.VideoVQ(CONFIG, key=jax.random.key(0))
    v = video()[0]
    codes = vq.encode(v)
    assert codes.shape == (3, 16) and codes.dtype == jnp.int32
    assert (codes >= 0).all() and (codes < 8).all()
    assert vq.decode(codes).shape == (3, 16, 16, 3) and vq.decode(codes).dtype == jnp.uint8
    np.testing.assert_array_equal(from_unit(to_unit(v)), v)
    with pytest.raises(ValueError, match="frame_size=18 must be divisible by patch=4"):
        models.VideoVQ(models.VQConfig(frame_size=18), key=jax.random.key(0))


def test_codes_are_the_nearest_codebook_vectors_and_losses_match_their_formulas():
    vq = models.VideoVQ(CONFIG, key=jax.random.key(0))
    frames = to_unit(video()[0])
    out = vq(frames)
    z = np.asarray(vq.encode_latents(frames), np.float64)  # [frames, grid, grid, dim]
    vectors = z.reshape(-1, CONFIG.code_dim)
    book = np.asarray(vq.codebook, np.float64)
    nearest = ((vectors[:, None] - book[None]) ** 2).sum(-1).argmin(-1)
    np.testing.assert_array_equal(np.asarray(out.codes).reshape(-1), nearest)
    expected = ((vectors - book[nearest]) ** 2).mean()
    assert abs(float(out.codebook_loss) - expected) <= 1e-5 * expected
    assert abs(float(out.commitment_loss) - expected) <= 1e-5 * expected


def test_straight_through_gradients_reach_encoder_decoder_and_codebook():
    vq = models.VideoVQ(CONFIG, key=jax.random.key(0))
    grads = eqx.filter_grad(lambda m: models.vq_loss(m, video())[0])(vq)
    for part in (grads.encoder.into, grads.encoder.mix, grads.decoder.out, grads.codebook):
        assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(part))


def test_restart_moves_only_dead_codes():
    vq = models.VideoVQ(CONFIG, key=jax.random.key(0))
    _, metrics = models.vq_loss(vq, video())
    usage = metrics["usage"]
    assert abs(float(usage.sum()) - 1.0) < 1e-6 and 1.0 <= float(metrics["perplexity"]) <= 8.0
    dead = usage < 1e-3
    assert dead.any() and not dead.all()
    restarted = vq.restart_dead_codes(usage, to_unit(video()[0]), jax.random.key(1))
    moved = (restarted.codebook != vq.codebook).any(-1)
    np.testing.assert_array_equal(np.asarray(moved), np.asarray(dead))


def test_vq_zoo_round_trip(tmp_path):
    vq = models.VideoVQ(CONFIG, key=jax.random.key(3))
    json_path, _ = models.save(tmp_path / "vq", vq)
    loaded = models.load(json_path)
    np.testing.assert_array_equal(loaded.encode(video()[1]), vq.encode(video()[1]))
    # save and load take the same paths, with or without the .json ending.
    assert models.save(tmp_path / "vq.json", vq) == (json_path, str(tmp_path / "vq.eqx"))
    assert models.load(models.save(tmp_path / "new" / "dir" / "vq", vq)[0]).config == vq.config


def test_each_code_sees_its_own_patch():
    """encode_latents = the encoder applied to patches cut out independently here (row-major grid)."""
    vq = models.VideoVQ(CONFIG, key=jax.random.key(0))
    frames = to_unit(video()[0])
    f = np.asarray(frames)
    cells = np.stack([
        np.stack([f[:, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(f.shape[0], -1) for c in range(4)], 1)
        for r in range(4)
    ], 1)  # [frames, row, col, 3 * 4 * 4], channel-major within a cell
    expected = jax.vmap(vq.encoder)(jnp.asarray(cells))
    np.testing.assert_allclose(vq.encode_latents(frames), expected, rtol=1e-5, atol=1e-6)
