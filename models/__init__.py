"""The eqx-ring model zoo: LLaMA-style language models on ring attention, and zoo files (more arriving)."""

from ._lm import PRESETS as PRESETS, LMConfig as LMConfig, RingLM as RingLM
from ._vq import VideoVQ as VideoVQ, VQConfig as VQConfig, VQOutput as VQOutput, vq_loss as vq_loss
from ._zoo import REGISTRY as REGISTRY, ZooIntegrityError as ZooIntegrityError, load as load, save as save
