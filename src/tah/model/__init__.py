from tah.model.cache import TaHCache
from tah.model.tah_model import TaHForCausalLM, TaHOutput

__all__ = ["TaHCache", "TaHForCausalLM", "TaHOutput"]
