"""The Llama 3 backbone in plain PyTorch: no Lightning, no Hydra, no file I/O."""

from herd.model.attention import KVCache
from herd.model.config import ModelConfig, RopeScaling
from herd.model.generate import generate, stream
from herd.model.quantize import Float8RowwiseLinear, quantize, quantize_fp8_rowwise
from herd.model.reward import RewardModel
from herd.model.transformer import Transformer, default_position_ids

__all__ = ["Float8RowwiseLinear", "KVCache", "ModelConfig", "RewardModel", "RopeScaling", "Transformer", "default_position_ids",
           "generate", "quantize", "quantize_fp8_rowwise", "stream"]
