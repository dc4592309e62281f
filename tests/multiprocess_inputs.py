"""Inputs shared by the multi-process workers and the tests that check them."""

import numpy as np


def attention_inputs(t: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((2, t, 4, 16)).astype(np.float32) for _ in range(3))


def tiny_video_text():
    """The demo recipe at toy size: 32 videos as patch codes, a 1-layer LM, 5 steps of 4 x 128 tokens, (dp=2, sp=4)."""
    from data_pipelines import MovingShapes, PatchQuantizer
    from eqx_ring import AttentionSpec, KernelTuning
    from models import Stage, TrainConfig, VideoTextConfig, VQConfig
    from models._demo import DemoConfig

    quantizer = PatchQuantizer(patch=8, levels=4)
    videos = MovingShapes(32, num_frames=2, size=32, seed=0)
    records = [{"caption": v["caption"], "codes": quantizer(v["frames"])} for v in (videos[i] for i in range(32))]
    lm = VideoTextConfig(codebook_size=quantizer.codebook_size, num_frames=2, codes_per_frame=16, d_model=32,
                         num_layers=1, num_heads=4, num_kv_heads=2, hidden_size=64, remat_policy=None,
                         attention=AttentionSpec(layout="zigzag", tuning=KernelTuning(query_chunk_size=16,
                                                                                      key_chunk_size=16)))
    train = TrainConfig(stages=(Stage(seq_len=128, steps=5),), batch_size=4, learning_rate=3e-3, warmup_steps=2,
                        checkpoint_every=3)
    vq = VQConfig(frame_size=32, patch=8, codebook_size=quantizer.codebook_size)  # the codes' shape and range
    return DemoConfig(mesh="2,1,1,4", vq=vq, lm=lm, lm_train=train), records
