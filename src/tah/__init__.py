"""tah: Think-at-Hard on Hugging Face causal LMs.

The public names below load on first use (see `tah._lazy`): `import tah` stays cheap, and torch and
transformers load when a model, config or `generate` is first touched."""

from typing import TYPE_CHECKING

from tah._lazy import lazy_exports
from tah.errors import CheckpointError, ConfigError, InputError, TaHError

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from tah.config import TaHConfig
    from tah.generation import generate
    from tah.model import TaHCache, TaHForCausalLM, TaHOutput

__all__ = ["CheckpointError", "ConfigError", "InputError", "TaHCache", "TaHConfig", "TaHError",
           "TaHForCausalLM", "TaHOutput", "generate"]
__version__ = "0.1.0"

__getattr__, __dir__ = lazy_exports(__name__, {
    "TaHConfig": "tah.config", "generate": "tah.generation", "TaHCache": "tah.model",
    "TaHForCausalLM": "tah.model", "TaHOutput": "tah.model"})
