"""`model.generate`'s HF-style arguments: the ones TaH honours are honoured, the others refused by name."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from conftest import left_padded, tiny_tah
from tah import InputError
from tah.generation import generate


@pytest.fixture(scope="module")
def model():
    return tiny_tah(decider="random", random_rate=0.4)


@pytest.mark.parametrize("settings, field", [
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(num_beams=4), "num_beams"),
    (dict(num_return_sequences=2, do_sample=True), "num_return_sequences"),
    (dict(output_scores=True), "output_scores"),
    (dict(min_new_tokens=3), "min_new_tokens"),
])
@pytest.mark.parametrize("where", ["argument", "generation_config"])
def test_settings_tah_cannot_honour_raise_an_input_error_naming_them(model, settings, field, where):
    ids, mask = left_padded([4, 6], seed=2)
    with pytest.raises(InputError, match=field):
        if where == "argument":
            model.generate(ids, attention_mask=mask, max_new_tokens=4, **settings)
        else:
            model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(max_new_tokens=4, **settings))


def test_an_unknown_argument_is_an_input_error_not_a_type_error(model):
    ids, _ = left_padded([4])
    with pytest.raises(InputError, match="unknown argument 'beam_width'"):
        model.generate(ids, max_new_tokens=4, beam_width=3)
    with pytest.raises(InputError, match="GenerationConfig"):
        model.generate(ids, generation_config={"max_new_tokens": 4})


def test_honoured_and_no_op_settings_give_tah_generate_s_tokens(model):
    ids, mask = left_padded([4, 6], seed=3)
    expected = generate(model, ids, mask, max_new_tokens=5, eos_token_id=None).sequences
    no_ops = dict(num_beams=1, repetition_penalty=1.0, output_scores=False, pad_token_id=0, use_cache=True)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None, **no_ops),
                       expected)
    config = GenerationConfig(max_length=ids.shape[1] + 5, do_sample=False, num_beams=1, eos_token_id=None)
    assert torch.equal(model.generate(ids, attention_mask=mask, generation_config=config, eos_token_id=None),
                       expected)
    sampled = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7, top_k=5)
    out = model.generate(ids, attention_mask=mask, generation_config=sampled, seed=1, engine="eager",
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, generate(model, ids, mask, max_new_tokens=5, do_sample=True, temperature=0.7,
                                               top_k=5, seed=1, eos_token_id=2).sequences)
    with pytest.raises(InputError, match="max_length"):
        model.generate(ids, attention_mask=mask, max_length=ids.shape[1])
