"""What tah asks of transformers and must hold on every supported version (5.17 to the newest)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_lm, tiny_tah
from tah import TaHConfig, TaHForCausalLM
from tah.errors import ConfigError
from tah.model.cache import TaHCache
from tah.model.step import Queries


@pytest.mark.parametrize("layers", [[0, 1, 3], [2, 3], [1]])
@pytest.mark.parametrize("own_head", [False, True])
def test_decider_hidden_states_use_hf_numbering(layers, own_head):
    """run_pass hands the decider HF's hidden_states tuple as `output_hidden_states=True` numbers it
    (0 = embeddings, num_layers = final norm), whichever way this transformers version treats a
    list of indices (5.17 counted decoder layers and dropped the embeddings)."""
    model = tiny_tah(layers=3, decider="mlp", decider_layers=layers)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7).expand(2, 7)
    real = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        reference = model.lm(input_ids=ids, output_hidden_states=True)
        assert len(reference.hidden_states) == 4
        need = real if own_head else None  # `need` makes run_pass call the inner decoder with our head
        queries = Queries(model.lm.get_input_embeddings()(ids), positions, 0, real)
        logits, hidden = model.run_pass(queries, TaHCache(), need_hidden=True, need=need)
    assert logits.view(2, 7, -1).allclose(reference.logits, atol=1e-5)
    for index in layers:
        assert hidden[index].shape == (2, 7, 32)
        assert hidden[index].allclose(reference.hidden_states[index], atol=1e-6), index


def test_mlp_decider_forward_and_generate():
    """The path of the 5.17 bug end to end: an MLP decider reads hidden states in forward and generate."""
    model = tiny_tah(layers=2, decider="mlp", threshold=0.0)  # threshold 0: every token continues
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids)
        sequences = model.generate(ids, max_new_tokens=3)
    assert out.iter_count.eq(2).all()
    assert sequences.shape == (2, 9)


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "flex_attention",
                                            "paged|sdpa", "kernels-community/flash-attn2"])
def test_refuses_attention_that_cannot_take_the_mask(implementation):
    lm = tiny_lm()
    lm.config._attn_implementation = implementation
    with pytest.raises(ConfigError, match="attn_implementation") as caught:
        TaHForCausalLM.from_base(lm, TaHConfig())
    message = str(caught.value)
    assert repr(implementation) in message and '"sdpa"' in message and '"eager"' in message


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_accepts_attention_that_takes_the_mask(implementation):
    lm = tiny_lm()
    lm.set_attn_implementation(implementation)
    model = TaHForCausalLM.from_base(lm, TaHConfig(decider="never"))
    ids = torch.randint(3, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert model(ids).logits.allclose(lm(input_ids=ids).logits, atol=1e-5)
