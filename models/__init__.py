"""The eqx-ring model zoo: a VQ video tokenizer, the LWM-style video-text model, LLaMA-style LMs, and training."""

from ._generate import generate as generate, respec as respec
from ._hf import (
    ARCHITECTURES as ARCHITECTURES,
    config_from_hf as config_from_hf,
    from_pretrained as from_pretrained,
    hf_config as hf_config,
    save_pretrained as save_pretrained,
)
from ._lm import PRESETS as PRESETS, LMConfig as LMConfig, RingLM as RingLM
from ._needle import (
    NeedleConfig as NeedleConfig,
    evaluate_needle as evaluate_needle,
    needle_accuracy as needle_accuracy,
    run_needle as run_needle,
    stage_mesh as stage_mesh,
    train_needle as train_needle,
)
from ._protocol import RingModel as RingModel, ZooModel as ZooModel
from ._train import (
    Stage as Stage,
    TrainConfig as TrainConfig,
    TrainResult as TrainResult,
    make_optimizer as make_optimizer,
    make_train_step as make_train_step,
    plot_metrics as plot_metrics,
    train as train,
)
from ._video_lm import VideoTextConfig as VideoTextConfig, VideoTextLM as VideoTextLM
from ._vq import VideoVQ as VideoVQ, VQConfig as VQConfig, VQOutput as VQOutput, vq_loss as vq_loss
from ._zoo import REGISTRY as REGISTRY, ZooIntegrityError as ZooIntegrityError, load as load, save as save
