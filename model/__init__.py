"""The DeepSeek-V3 model, free of any process-group logic (DESIGN.md principle 1)."""

from model.config import ConfigError, ModelConfig, YarnConfig
from model.params import count_params
from model.transformer import LossOutput, Transformer

__all__ = ["ConfigError", "LossOutput", "ModelConfig", "Transformer", "YarnConfig", "count_params"]
