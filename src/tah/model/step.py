"""One pass over tagged queries: the step that forward's depth loop and every decoder run.

A pass runs a (B, A) grid of `Queries` through the wrapped model once. Each query is tagged with
its position and depth (the duo-causal rule reads nothing else) and whether it is real (False:
padding of the grid, which writes an invalid KV entry and whose outputs nobody reads), and comes
with its input: its token's embedding (`embed`) at depth 0, the soft input of its accumulated
logits (`soft_input`) deeper. `run_pass` runs them, each query's linears with the LoRA of its own
depth; `decide` says which go on.

`TaHForCausalLM.forward` makes one `Queries` per depth (`PassTokens`: the tokens that reached it,
packed); a decoder makes one per step, mixing rows at different depths and positions. Neither
computes an input, a pass or a decision any other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import output_capturing

import tah.kernels.choose as kernels
from tah.model.cache import Branches, KnownReal, TaHCache
from tah.model.soft_input import soft_embedding

# transformers 5.24 renamed `past_key_values` to `cache` (model arguments and output fields); the
# older name is deprecated there. The wrapped model is called with whichever its version uses.
HF_CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# From transformers 5.23 `output_hidden_states=[indices]` keeps the usual numbering (0 = embeddings) and
# captures only those. Before, a list counted decoder layers and never held the embeddings; there we ask
# for all hidden states: the same tuple, fixed per process (no per-call probing, nothing data-dependent).
HF_SELECTS_HIDDEN = hasattr(output_capturing, "resolve_hidden_states_indices")


@dataclass
class Queries:
    """The queries of one pass: inputs (B, A, H); positions (B, A); depth an int (every query) or
    (B, A); real (B, A) bool; branches: alternatives among them (`TaHCache.begin_pass`), None for
    none; known: what the host knows of `real` without reading it (None: nothing)."""

    inputs: torch.Tensor
    positions: torch.Tensor
    depth: int | torch.Tensor
    real: torch.Tensor
    branches: Branches | None = None
    known: KnownReal | None = None


class TaggedPasses:
    """The pieces of every pass, mixed into `TaHForCausalLM` (which provides `lm`, `decider`,
    `depth_state` and `tah_config`)."""

    @property
    def embed(self) -> nn.Module:
        """The wrapped model's input embeddings: a depth-0 query's input is its token's row.
        (`get_input_embeddings()` costs microseconds a call: looked up once per wrapped model.)"""
        kept = self.__dict__.get("_kept_embed")  # a tuple: not registered as a submodule
        if kept is None or kept[0] is not self.lm:
            kept = self.__dict__["_kept_embed"] = (self.lm, self.lm.get_input_embeddings())
        return kept[1]

    def soft_input(self, sums: torch.Tensor) -> torch.Tensor:
        """(N, V) accumulated logits -> (N, H): the input of their tokens' next pass, softmax over
        the top-k (input_topk) of the sums times those rows of the input embeddings, summed."""
        return soft_embedding(sums, self.embed.weight, self.tah_config.input_topk)

    def run_pass(self, queries: Queries, cache: TaHCache, need_hidden: bool, need: torch.Tensor | None = None,
                 head=None) -> tuple[torch.Tensor, tuple | None]:
        """One forward of the base model over tagged queries (`Queries`, (B, A); their depths may
        differ), each writing its KV entry to `cache`. Returns logits (B, A, V) and HF's
        hidden_states tuple (only the decider's layers filled) when `need_hidden`. With `need`
        (B, A) bool, the LM head runs only there and the logits come back as (N_need, V),
        row-major; or `need` (N_need,) long: those rows of the flattened (B * A) queries, in that
        order (no host read on a GPU, where a boolean selection waits for its count). `head`, when
        given, replaces the LM head: it maps the final hidden states ((B, A, H), or their (N_need,
        H) rows) to what comes back instead of logits."""
        inputs, positions, depth, real = queries.inputs, queries.positions, queries.depth, queries.real
        mask = cache.begin_pass(positions, depth, real, inputs.dtype, queries.branches, queries.known)
        wanted = self.decider.needs_hidden if need_hidden else ()
        wanted = (list(wanted) if HF_SELECTS_HIDDEN else True) if wanted else False
        # A decode step on CPU runs the LM head itself too, as the CPU layouts choose (HF's head is F.linear)
        own_head = head is not None or need is not None or self._cpu_layout_head(positions)
        # Our own head takes the decoder's final-norm output: the inner model is called, so HF's
        # head, and the capture of hidden states (hooks on every layer) when no decider reads them, are skipped.
        model = self._compiled(self._decoder() if own_head else self.lm, depth)
        extra = {} if own_head else {"logits_to_keep": 0}
        # real: the linears skip padding queries in decode steps (DepthState.rows); not the LM head,
        # which reads a 65 MB weight at bench_decode's size whatever its rows, and whose product
        # at 9-12 rows took longer than at 16 (10.8 vs 7.4 ms, in-loop profile). Not in a training
        # forward's passes (`known` given: its frozen stage-2 passes run without autograd too)
        packable = real if queries.known is None else None
        with self.depth_state.at(depth, inputs.dtype, packable):  # depth 0 again after, also after an error
            out = model(inputs_embeds=inputs, position_ids=positions, attention_mask=mask,
                        **{HF_CACHE_ARG: cache}, use_cache=True, output_hidden_states=wanted, **extra)
        if not own_head:
            return out.logits, out.hidden_states
        final = out.last_hidden_state
        if need is not None:
            final = final[need] if need.dtype == torch.bool else final.flatten(0, 1).index_select(0, need)
        return (head or self._lm_head)(final), out.hidden_states

    def compile_deep_passes(self, **options) -> None:
        """From now on, run every pass at depth >= 1 under autograd (training's hard tokens) through
        `torch.compile(wrapped model, dynamic=True, **options)`; depth 0, decoding and stage 2 (no
        autograd) stay eager. Why: a deeper pass covers the few hard tokens with every layer's ops,
        so on a GPU it waits on the host, not the device (issue 26: a stage-1 step at 10% hard tokens
        dispatched 1.85x the ops of its depth-0 pass over ten times the tokens); compiled, each layer
        is a few fused kernels. dynamic=True: the hard tokens per row change every batch, and one
        graph serves every count (the first call compiles, for minutes on a large model). The same
        numbers as eager up to float rounding (tests/test_compile.py)."""
        self.__dict__["_deep_compile"] = ({}, {"dynamic": True, **options})  # not a submodule: no state_dict entry

    def _compiled(self, model: nn.Module, depth: int | torch.Tensor) -> nn.Module:
        """`model`, or its compiled form for a deeper training pass after `compile_deep_passes`."""
        kept = self.__dict__.get("_deep_compile")
        if kept is None or not isinstance(depth, int) or depth == 0 or not torch.is_grad_enabled():
            return model
        compiled, options = kept
        if model not in compiled:
            compiled[model] = _floats_specialized(torch.compile(model, **options))
        return compiled[model]

    def decide(self, sums: torch.Tensor | None, hidden: tuple | None, positions: torch.Tensor,
               depth: int | torch.Tensor) -> torch.Tensor:
        """(B, A) bool: do these queries run another pass after the pass of index `depth` (an int
        or (B, A))? The decider reads their accumulated logits `sums` (B, A, V) and the pass's
        hidden states (HF's tuple of (B, A, H); either None for a decider that reads none) and
        their positions (B, A). Padding and max_iter are the caller's to apply."""
        go_on, _ = self.decider(sums, hidden, positions, depth)
        return go_on

    def _decoder(self) -> nn.Module:
        """The wrapped model's inner decoder (`get_decoder()`, which tries several attribute names
        and costs tens of microseconds a call: looked up once per wrapped model)."""
        kept = self.__dict__.get("_kept_decoder")  # a tuple: not registered as a submodule
        if kept is None or kept[0] is not self.lm:
            kept = self.__dict__["_kept_decoder"] = (self.lm, self.lm.get_decoder())
        return kept[1]

    def _cpu_layout_head(self, positions: torch.Tensor) -> bool:
        """Should a pass over these (B, A) queries run the LM head through the CPU linear layouts?"""
        head = self.lm.get_output_embeddings()
        return type(head) is nn.Linear and kernels.linear_layouts(head.weight.device).handles(positions.numel(),
                                                                                              head.weight)

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) final hidden states -> (N, V) logits, as the wrapped model's own head computes them."""
        head = self.lm.get_output_embeddings()
        if torch.is_grad_enabled() and type(head) is nn.Linear and head.weight.requires_grad:
            logits = _HeadLinear.apply(hidden, head.weight, head.bias)
        else:
            logits = kernels.linear_layouts(head.weight.device).linear(hidden, head.weight, head.bias) \
                if type(head) is nn.Linear else head(hidden)
        config = self.lm.config
        if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies its logits
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None) is not None:  # Granite divides them
            logits = logits / config.logits_scaling
        cap = getattr(config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def _floats_specialized(compiled: nn.Module):
    """`compiled` called with dynamo's float specialization on. Under dynamic=True dynamo first traces
    the model's Python floats (LoRA scalings, norm epsilons, attention scales) as symbols, finds while
    compiling the backward that they must be constants, and traces the whole pass again: a quarter to a
    third of a deeper pass's compile time (one-off, bench_host's model: 2 layers 19 vs 13 s with
    aot_eager, 4 layers 77 vs 55 s and 28 layers 414 vs 303 s with inductor).
    The floats never change between calls, so constants lose nothing."""
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)
    return call


class _HeadLinear(torch.autograd.Function):
    """F.linear for our LM head on (N, H) rows, whose weight gradient comes back as a tensor of its
    own rather than F.linear's transposed view: the first gradient to reach a (tied) head weight
    then takes the others in place, instead of one more (V, H) tensor for the sum."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        return F.linear(hidden, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight = ctx.saved_tensors
        # under autocast the logits, so grad, are bf16 while hidden and weight are float32
        grad_hidden = (grad @ weight.to(grad.dtype)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.t() @ hidden.to(grad.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None  # (V, H)
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias
