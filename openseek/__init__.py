"""openseek: the open, efficient reasoning-model stack. The public API is deliberately small."""

from openseek.checkpoint import CheckpointError, load, save
from openseek.config import ConfigError, ModelConfig
from openseek.engine import Engine
from openseek.model import Model

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Engine", "Model", "ModelConfig", "load", "save", "__version__"]
