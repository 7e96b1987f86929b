"""`TaHForCausalLM.generate`'s HF-style arguments, mapped onto `tah.generate`'s.

What TaH's decoder cannot honour (beam search, repetition penalties, several sequences per prompt,
scores, ...) is refused with an `InputError` naming the field, whether it comes as an argument or in
a `GenerationConfig`: never dropped silently. A field at its no-op value (num_beams=1,
repetition_penalty=1.0, ...) is accepted.
"""

from __future__ import annotations

import inspect

from transformers import GenerationConfig

from tah.errors import InputError
from tah.generation.generate import generate

# GenerationConfig fields tah.generate takes under the same name
TAKEN = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "eos_token_id", "stop_strings")
# fields whose effect TaH's decoder has anyway (it pads with its own ids and always caches)
HARMLESS = ("pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "return_dict_in_generate",
            "transformers_version", "_from_model_config")
# values at which a field changes nothing (HF's defaults, and its "off" values)
NO_OP = {"num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "repetition_penalty": 1.0,
         "encoder_repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
         "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0, "typical_p": 1.0,
         "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0, "early_stopping": False,
         "output_scores": False, "output_logits": False, "output_attentions": False,
         "output_hidden_states": False, "remove_invalid_values": False, "renormalize_logits": False}
# tah.generate's own options (fused, draft_candidates, engine, seed, tokenizer, ...)
OWN = frozenset(inspect.signature(generate).parameters) - {"model", "input_ids", "attention_mask"}


def generate_settings(generation_config: GenerationConfig | None, kwargs: dict, prompt_length: int,
                      default_eos: int | list[int] | None) -> tuple[dict, bool]:
    """(keyword arguments for tah.generate, whether to return its whole output) from a
    `GenerationConfig` (or None) and `model.generate`'s keyword arguments, which win over it.

    max_length becomes max_new_tokens (prompt_length fewer); without either, 20 new tokens (HF's
    default). eos_token_id defaults to `default_eos`; an explicit None means no EOS. Raises
    `InputError` naming the first field or argument TaH cannot honour.
    """
    fields = set(GenerationConfig().to_dict())
    given = {}
    if generation_config is not None:
        if not isinstance(generation_config, GenerationConfig):
            raise InputError(f"generation_config must be a transformers GenerationConfig; got "
                             f"{type(generation_config).__name__}")
        given = {k: v for k, v in generation_config.to_dict().items() if v is not None}
    given.update(kwargs)
    settings, as_dict = {}, bool(given.get("return_dict_in_generate", False))
    for name, value in given.items():
        if name in TAKEN or name in OWN:
            settings[name] = value
        elif name == "max_length" or name in HARMLESS or value is None or NO_OP.get(name, ...) == value:
            continue
        elif name in fields:
            raise InputError(
                f"generate: {name}={value!r} is not supported (TaH decodes one sequence per prompt, greedy or "
                f"sampled with temperature, top_k, top_p, min_p); remove {name} from the arguments and the "
                "generation_config")
        else:
            raise InputError(f"generate got an unknown argument {name!r}; it takes {', '.join(TAKEN)}, "
                             f"max_length, or tah.generate's options ({', '.join(sorted(OWN))})")
    if "max_new_tokens" not in settings:
        settings["max_new_tokens"] = _from_max_length(given.get("max_length"), prompt_length)
    settings.setdefault("eos_token_id", default_eos)
    return settings, as_dict


def _from_max_length(max_length: int | None, prompt_length: int) -> int:
    if max_length is None:
        return 20  # HF's default length
    if max_length <= prompt_length:
        raise InputError(f"generate: max_length={max_length} leaves no room after the {prompt_length}-token "
                         "prompt; raise it or pass max_new_tokens")
    return max_length - prompt_length
