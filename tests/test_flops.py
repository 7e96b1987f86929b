"""forward_flops_per_token against torch's FLOP counter over a real forward."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen3Config, Qwen3ForCausalLM

from tah import TaHConfig, TaHForCausalLM
from tah.eval.flops import forward_flops_per_token

TOKENS = 2 * 24


def _model(**tah) -> TaHForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    return TaHForCausalLM.from_base(Qwen3ForCausalLM(config), TaHConfig(**tah)).eval()


# The weight products: what forward_flops_per_token counts (at context 0, no attention). Not the rotary
# embedding's (position x frequency) product, a bmm in transformers 5.17 and none in 5.25.
WEIGHT_PRODUCTS = ("aten.mm", "aten.addmm")


def _counted(model: TaHForCausalLM, iter_labels=None) -> int:
    ids = torch.randint(3, 48, (2, TOKENS // 2), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, iter_labels=iter_labels)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return sum(counts.get(op, 0) for op in WEIGHT_PRODUCTS)


def test_one_pass_model_counts_every_weight_product():
    model = _model(max_iter=1)
    assert forward_flops_per_token(model, 1.0) * TOKENS == _counted(model)


@pytest.mark.parametrize("decider", ["oracle", "mlp"])
def test_iterated_tokens_add_a_pass_and_the_decider_runs_once(decider):
    """With the adapters merged, a deeper pass costs exactly the base weights; the decider's MLP runs
    on every token after depth 0 (max_iter 2)."""
    model = _model(max_iter=2, decider=decider, lora_rank=2, decider_hidden_dims=[16], decider_topk=8, threshold=0.0)
    model.merge_lora()
    labels = torch.ones(2, TOKENS // 2, dtype=torch.long)
    labels[:, ::4] = 2
    share = 0.25 if decider == "oracle" else 1.0  # threshold 0: the MLP decider iterates every token
    adapter = forward_flops_per_token(model, 2.0) - forward_flops_per_token(model, 1.0) \
        - (forward_flops_per_token(_model(max_iter=1), 1.0))
    expected = (forward_flops_per_token(model, 1 + share) - adapter * share) * TOKENS
    assert _counted(model, labels if decider == "oracle" else None) == pytest.approx(expected, rel=1e-9)


def test_passes_outside_the_model_s_range_are_refused():
    with pytest.raises(ValueError, match="passes"):
        forward_flops_per_token(_model(max_iter=2, decider="always"), 2.5)
