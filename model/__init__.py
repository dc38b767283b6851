"""The DeepSeek-V3 model, free of any process-group logic (DESIGN.md principle 1)."""

from core.config import ConfigError
from model.config import ModelConfig, YarnConfig
from model.params import count_params
from model.transformer import LossOutput, Transformer

__all__ = ["ConfigError", "LossOutput", "ModelConfig", "Transformer", "YarnConfig", "count_params"]
