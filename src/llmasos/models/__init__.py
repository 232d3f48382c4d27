"""Model shapes and the transformer. Import `llmasos.models.llama` for the torch module itself."""

from llmasos.models.config import ModelConfig
from llmasos.models.zoo import ZOO, zoo_config

__all__ = ["ModelConfig", "ZOO", "zoo_config"]
