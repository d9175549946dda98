"""The DeepSeek-V3-style model and its numerics (no torch.distributed, Hydra or wandb here)."""
from models.config import ModelConfig, model_config
from models.transformer import LossOutput, Transformer, build_model

__all__ = ["ModelConfig", "model_config", "build_model", "Transformer", "LossOutput"]
