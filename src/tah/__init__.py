"""tah: Think-at-Hard on Hugging Face causal LMs."""

from tah.config import TaHConfig
from tah.errors import CheckpointError, ConfigError, InputError, TaHError
from tah.generation import generate
from tah.model import TaHCache, TaHForCausalLM, TaHOutput

__all__ = ["CheckpointError", "ConfigError", "InputError", "TaHCache", "TaHConfig", "TaHError",
           "TaHForCausalLM", "TaHOutput", "generate"]
__version__ = "0.1.0"
