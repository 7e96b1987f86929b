from tah.generation.engine import DecodeStats
from tah.generation.generate import generate
from tah.generation.reference import GenerationOutput, generate_reference
from tah.generation.sampling import Sampler

__all__ = ["DecodeStats", "GenerationOutput", "Sampler", "generate", "generate_reference"]
