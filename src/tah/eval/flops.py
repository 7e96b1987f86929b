"""Forward FLOPs per token: the equal-compute view of a TaH model beside its parameter count.

The usual estimate, 2 FLOPs per weight a token is multiplied by (a multiply and an add), counted
per pass, plus the attention products (4 x layers x context x query width per pass: scores and the
weighted sum). A TaH model runs depth 0 on every token and the deeper passes on the iterated
share only, with one LoRA adapter on top of the base weights in each deeper pass; the decider runs
after every pass that may continue. Embedding lookups, norms and activations are left out (a few
percent at most).
"""

from __future__ import annotations

from torch import nn


def forward_flops_per_token(model, passes: float, context: float = 0.0) -> float:
    """Forward FLOPs per token of `model` (a `TaHForCausalLM`) when a token takes `passes` passes
    on average (1 + the iterated share with max_iter 2; 2 for always-iterate), at a mean attended
    `context` (tokens). Raises ValueError when passes is outside [1, max_iter]."""
    from tah.model.lora import DepthLoRALinear

    max_iter = model.tah_config.max_iter
    if not 1.0 <= passes <= max_iter:
        raise ValueError(f"passes must be in [1, max_iter={max_iter}]; got {passes}")
    decider = model.decider if max_iter > 1 else None
    wrapped = [m for m in model.lm.modules() if isinstance(m, DepthLoRALinear)]
    base = _linear_weights(model.lm)  # the wrapped layers' base weights included (a DepthLoRALinear is no Linear)
    adapter = sum(m.lora_A[0].numel() + m.lora_B[0].numel() for m in wrapped)  # one adapter per deeper pass
    decider_weights = _linear_weights(decider) if decider is not None else 0
    config = model.lm.config
    query_width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * context * query_width * config.num_attention_heads
    decider_runs = min(passes, max_iter - 1) if decider is not None else 0.0
    return (2 * base + attention) * passes + 2 * adapter * (passes - 1) + 2 * decider_weights * decider_runs


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
