"""llmkern.train: training loops on llmkern models and kernels.

    from llmkern.train import Pretrainer, preset
    Pretrainer(preset("tiny-test"), "runs/tiny").train()   # or: llmkern train pretrain --preset tiny-test --out DIR
"""

from llmkern.train.config import PRESETS, PretrainConfig, preset
from llmkern.train.pretrain import Pretrainer, SpikeGuard

__all__ = ["PretrainConfig", "PRESETS", "preset", "Pretrainer", "SpikeGuard"]
