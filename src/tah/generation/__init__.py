from tah.generation.reference import GenerationOutput, generate_reference

__all__ = ["GenerationOutput", "generate_reference"]
