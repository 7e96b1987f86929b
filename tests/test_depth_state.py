"""The depth every LoRA linear reads is put back to 0 after each pass, also after a pass that failed."""

from __future__ import annotations

import pytest
import torch

from conftest import left_padded, tiny_tah
from tah.generation import generate


class Boom(Exception):
    pass


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_an_error_in_a_deeper_pass_leaves_the_wrapped_model_the_base_model(call):
    model = tiny_tah(decider="always", max_iter=3)  # every token reaches depths 1 and 2
    ids, mask = left_padded([5, 3], seed=1)
    with torch.no_grad():
        base = model.lm(ids, attention_mask=mask).logits
        with model.depth_state.at(1):  # the adapters change the wrapped model's logits: the test can fail
            assert not torch.allclose(model.lm(ids, attention_mask=mask).logits, base)

    def explode(module, args):
        if not isinstance(model.depth_state.depth, int) or model.depth_state.depth > 0:
            raise Boom("a failure inside a deeper pass")

    hook = model.lm.get_decoder().norm.register_forward_pre_hook(explode)
    try:
        with pytest.raises(Boom), torch.no_grad():
            if call == "forward":
                model(ids, attention_mask=mask)
            else:
                generate(model, ids, mask, max_new_tokens=4)
    finally:
        hook.remove()
    assert model.depth_state.depth == 0 and model.depth_state.plain
    with torch.no_grad():
        assert torch.equal(model.lm(ids, attention_mask=mask).logits, base)
