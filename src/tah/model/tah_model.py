"""`TaHForCausalLM`: the depth loop around a Hugging Face causal LM.

One code path serves training, prefill and decoding:

    ids -> embed -> depth-0 pass (all tokens, no adapter) -> logits, hidden
        -> decider (or oracle iter_labels) -> tokens that continue
        -> soft input from their accumulated logits -> depth-1 pass (those tokens only, adapter 1)
        -> accumulated logits += depth-1 logits -> decider ... until max_iter or nobody continues
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput, output_capturing

from tah.config import TaHConfig
from tah.errors import ConfigError, InputError
from tah.model import few_rows
from tah.model.attention import check_attn_implementation
from tah.model.cache import TaHCache
from tah.model.decider import Decider, MLPDecider, build_decider
from tah.model.lora import DepthLoRALinear, DepthState, add_depth_lora
from tah.model.packing import Packing
from tah.model.rows_grad import DepthZeroLogits, GatherRows, RowsGradient
from tah.model.sdpa import use_tah_sdpa
from tah.model.shared_head import SharedHead
from tah.model.soft_input import soft_embedding, soft_embedding_of_top

# transformers 5.24 renamed `past_key_values` to `cache` (model arguments and output fields); the
# older name is deprecated there. The wrapped model is called with whichever its version uses.
HF_CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# From transformers 5.23 `output_hidden_states=[indices]` keeps the usual numbering (0 = embeddings) and
# captures only those. Before, a list counted decoder layers and never held the embeddings; there we ask
# for all hidden states: the same tuple, fixed per process (no per-call probing, nothing data-dependent).
HF_SELECTS_HIDDEN = hasattr(output_capturing, "resolve_hidden_states_indices")


@dataclass
class TaHOutput(ModelOutput):
    """loss: scalar or None; logits: (B, T, V) final accumulated logits; iter_count: (B, T) passes
    per token (1..max_iter); cache (also readable as past_key_values, under any transformers
    version): the `TaHCache` when use_cache."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    iter_count: torch.Tensor | None = None
    cache: TaHCache | None = None
    decider_logits: torch.Tensor | None = None  # stage 2: (N,) decider scores of the labelled tokens
    decider_targets: torch.Tensor | None = None  # stage 2: (N,) 1.0 where the oracle says continue
    # defer_deep: the depth-1 pass not run, as (inputs (B, A, H), positions (B, A), real (B, A) bool)
    deferred: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def past_key_values(self) -> TaHCache | None:
        """The cache under its pre-5.24 name (without the deprecation warning of newer versions)."""
        return self.cache


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


class TaHForCausalLM(nn.Module):
    """A Think-at-Hard model wrapping a loaded HF decoder-only causal LM (`self.lm`)."""

    def __init__(self, lm: nn.Module, config: TaHConfig) -> None:
        super().__init__()
        text_config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
        if "sliding_attention" in (getattr(text_config, "layer_types", None) or []):
            raise ConfigError(
                f"{type(lm).__name__} uses sliding-window attention layers, which the duo-causal attention "
                "does not implement yet; use a model with full attention (e.g. Qwen3, Llama)"
            )
        check_attn_implementation(text_config)
        use_tah_sdpa(lm)  # HF's sdpa without its KV-head copies under a mask on CPU
        self.lm = lm
        self.tah_config = config
        self.num_layers = text_config.num_hidden_layers
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self.depth_state = DepthState()
        self.depth_state.deepest = max(config.max_iter - 1, 1)
        self.use_shared_head = True  # see shared_head.py; False: each pass runs its own LM head (for comparisons)
        self.lora: dict[str, DepthLoRALinear] = {}
        if config.max_iter > 1:
            adapters = config.max_iter - 1 if config.lora_per_depth else 1
            self.lora = add_depth_lora(lm, config.lora_target_modules, config.lora_rank, config.lora_alpha,
                                       config.lora_dropout, adapters, self.depth_state)
        self.decider: Decider = build_decider(config, text_config.hidden_size, self.num_layers)
        self.set_training_stage(config.training_stage)

    @classmethod
    def from_base(cls, lm: nn.Module, config: TaHConfig | None = None) -> TaHForCausalLM:
        """Wrap an HF causal LM in place (its target linears become `DepthLoRALinear`s)."""
        return cls(lm, config or TaHConfig())

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, **overrides) -> TaHForCausalLM:
        """Load our layout or the original implementation's; `overrides` replace TaHConfig fields."""
        from tah.model.checkpoint import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, **overrides)

    def save_pretrained(self, path) -> None:
        """Write safetensors + JSON atomically; the base model stays readable by AutoModelForCausalLM."""
        from tah.model.checkpoint import save_pretrained
        save_pretrained(self, path)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config=None, streamer=None, **kwargs):
        """HF-style `generate`: the usual arguments (max_new_tokens or max_length, do_sample,
        temperature, top_p, top_k, min_p, eos_token_id, stop_strings, tokenizer, seed), or a
        `GenerationConfig`. Returns the (B, prompt + new) sequences, or `tah.generate`'s output with
        return_dict_in_generate. Raises `InputError` naming any setting TaH cannot honour (num_beams,
        repetition_penalty, ...) rather than ignoring it."""
        from tah.generation.generate import generate
        from tah.generation.hf_args import generate_settings

        default_eos = getattr(getattr(self.lm, "generation_config", None), "eos_token_id", None)
        settings, as_dict = generate_settings(generation_config, kwargs, input_ids.shape[-1], default_eos)
        out = generate(self, input_ids, attention_mask, streamer=streamer, **settings)
        return out if as_dict else out.sequences

    @property
    def config(self):
        """The wrapped model's HF config (what HF tooling expects under `.config`)."""
        return self.lm.config

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    # -- settings ------------------------------------------------------------------------------
    def set_threshold(self, threshold: float) -> None:
        """Change the MLP decider's continue threshold (probability in [0, 1]) at inference time."""
        self.tah_config = self.tah_config.replace(threshold=threshold)
        if isinstance(self.decider, MLPDecider):
            self.decider.threshold = threshold

    def set_training_stage(self, stage: int) -> None:
        """Stage 1: base + LoRA train, the decider is frozen. Stage 2: only the decider trains."""
        self.tah_config = self.tah_config.replace(training_stage=stage)
        for p in self.lm.parameters():
            p.requires_grad_(stage == 1)
        for p in self.decider.parameters():
            p.requires_grad_(stage == 2)

    def merge_lora(self) -> None:
        """Fold each adapter into a per-depth weight copy (inference only)."""
        for module in self.lora.values():
            module.merge()

    def unmerge_lora(self) -> None:
        for module in self.lora.values():
            module.unmerge()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, iter_labels: torch.Tensor | None = None,
                past_key_values: TaHCache | None = None, use_cache: bool = False, logits_to_keep: int = 0,
                num_items_in_batch: int | torch.Tensor | None = None, cache: TaHCache | None = None,
                defer_deep: bool = False, **_: object) -> TaHOutput:
        """input_ids (B, T); attention_mask (B, past + T) or (B, T), 1 = real token, any padding side;
        labels (B, T), shifted inside as in HF; iter_labels (B, T) oracle pass counts (-100 = none):
        when given they, not the decider, choose who iterates. logits_to_keep = n > 0 returns the
        logits of the last n positions only (B, n, V), and skips the LM head for tokens whose logits
        nobody reads (when the decider does not read logits): what prefill for generation wants.
        num_items_in_batch (HF Trainer): the stage-1 loss is the CE sum divided by it, so that
        gradient accumulation and several processes weigh every token alike. The cache may come as
        `cache` (transformers' name from 5.24 on) or `past_key_values`.

        defer_deep (max_iter 2, inference): run depth 0 and decide, but return the depth-1 pass as
        `deferred` (its packed inputs, positions and real mask) instead of running it, for a decoder
        that runs it in the same forward as its first step (saving a pass over the weights). The
        logits are then depth 0's and iter_count counts depth 0 only; the cache lacks the deferred
        entries until the caller runs them."""
        if defer_deep and (self.tah_config.max_iter != 2 or labels is not None or iter_labels is not None):
            raise InputError("defer_deep is for inference with max_iter 2 (the depth-1 pass is the last one); "
                             "pass defer_deep=False")
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise InputError("pass the cache once, as `cache` or as `past_key_values`, not two different ones")
        batch, length = input_ids.shape
        valid = self._valid_mask(input_ids, attention_mask)
        self._check_labels(input_ids, labels, "labels")
        self._check_labels(input_ids, iter_labels, "iter_labels")
        cache = cache if cache is not None else past_key_values if past_key_values is not None else TaHCache()
        positions = cache.positions_for(valid)
        self._check_positions(positions, fresh=cache.seen is None)
        stage2 = self.tah_config.training_stage == 2 and iter_labels is not None
        frozen = torch.no_grad() if stage2 else nullcontext()
        max_iter = self.tah_config.max_iter
        keep = logits_to_keep if 0 < logits_to_keep < length and labels is None and not stage2 else length
        # Deciders that ignore logits decide before each pass; then only needed logits are computed.
        early = iter_labels is not None or not self.decider.reads_logits
        sparse = keep < length and early

        with frozen:
            embeds = self.lm.get_input_embeddings()(input_ids)
        packing = Packing.everything(batch, length, input_ids.device)
        iter_count = torch.ones_like(input_ids)
        # acc: (B * keep, V) accumulated logits, 2-D so that the loss reads it without a view (see
        # rows_grad.py); carry: accumulated logits of the packed tokens.
        acc, carry, inputs, rows_grad = None, None, embeds, None
        shared = self._shared_head(keep == length and not stage2)
        bce_terms, deferred = [], None
        for depth in range(max_iter):
            real = packing.pack(packing.gather(valid), fill=False)
            pos = packing.pack(packing.gather(positions))
            labels_packed = None if iter_labels is None else packing.pack(packing.gather(iter_labels), fill=-100)
            if depth > 0 and defer_deep:
                deferred = (inputs, pos, real)
                break
            last = depth == max_iter - 1
            go_on = None
            if early and not last:
                go_on = self._decide(None, None, pos, depth, labels_packed) & real
            in_tail = packing.cols >= length - keep
            need = in_tail | packing.unpack(go_on) if sparse and go_on is not None else in_tail if sparse else None
            head_rows = None if need is None else packing.pack(need)  # (B, A): where the LM head runs
            if head_rows is None and not packing.full:  # all packed tokens (all real at depth >= 1):
                head_rows = real  # straight to (N, V), no unpack copy
            if shared is not None:  # our head over every token (depth 0), then it adds in the deep rows
                final, hidden = self.run_pass(inputs, pos, real, depth, cache, need_hidden=not last, need=head_rows,
                                              head=lambda states: states)
                acc = shared.depth_zero(final) if depth == 0 else shared.add_deep(acc, final)
                flat_acc = acc
            else:
                with frozen:
                    logits, hidden = self.run_pass(inputs, pos, real, depth, cache, need_hidden=not last,
                                                   need=head_rows)
                    flat_logits = packing.unpack(logits) if head_rows is None else logits
                    # (N, V) or (N_need, V); depth 0 adds nothing, so no (B*T, V) copy is made; the last
                    # pass's sum is read by nobody
                    flat_acc = flat_logits if carry is None else None if last else \
                        (carry if need is None else carry[need]) + flat_logits
                    if acc is None and keep == length:  # depth 0 over every token: its logits are the sum so far
                        rows_grad = RowsGradient() if torch.is_grad_enabled() and self._logits_in_place else None
                        acc = logits.flatten(0, 1) if rows_grad is None else DepthZeroLogits.apply(logits, rows_grad)
                    else:
                        acc = self._accumulate(acc, flat_logits, packing, in_tail, need, batch, keep, length,
                                               in_place=self._logits_in_place)
            if depth > 0:
                iter_count = iter_count.index_put((packing.rows, packing.cols), torch.ones_like(packing.rows), accumulate=True)
            if last:
                break
            if stage2:
                scores = self.decider.scores(packing.pack(flat_acc).detach(), tuple(
                    h.detach() if h is not None else None for h in hidden))
                bce_terms.append(self._bce_term(packing.unpack(scores), packing.gather(iter_labels),
                                                packing.gather(valid), depth))
            if go_on is None:
                go_on = self._decide(packing.pack(flat_acc), hidden, pos, depth, labels_packed) & real
            go_on_flat = packing.unpack(go_on)
            if not bool(go_on_flat.any()):
                break
            rows, cols = packing.rows[go_on_flat], packing.cols[go_on_flat]
            table, index = self.lm.get_input_embeddings().weight, rows * length + cols
            if shared is not None:  # depth 0 -> 1 of a two-pass training step (never stage 2: nothing frozen)
                soft = soft_embedding_of_top(*shared.top_k(acc, index, self.tah_config.input_topk), table)
            else:
                if depth == 0 and keep == length:  # acc holds depth 0 of every token: its rows are the packed tokens
                    carry = acc.index_select(0, index) if rows_grad is None else GatherRows.apply(acc, index, rows_grad)
                else:
                    carry = flat_acc[go_on_flat if need is None else go_on_flat[need]]
                with frozen:
                    soft = soft_embedding(carry, table, self.tah_config.input_topk)
            packing = Packing.select(rows, cols, batch)
            inputs = packing.pack(soft)

        loss, scores, targets = None, None, None
        if stage2:
            loss, scores, targets = self._bce_loss(bce_terms, acc)
        elif labels is not None:
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
            if num_items_in_batch is None:
                loss = F.cross_entropy(acc.float(), shifted.flatten(), ignore_index=-100)
            else:
                loss = F.cross_entropy(acc.float(), shifted.flatten(), ignore_index=-100,
                                       reduction="sum") / num_items_in_batch
        return TaHOutput(loss=loss, logits=acc.view(batch, keep, acc.shape[-1]), iter_count=iter_count,
                         cache=cache if use_cache else None, decider_logits=scores,
                         decider_targets=targets, deferred=deferred)

    def _shared_head(self, every_token: bool) -> SharedHead | None:
        """A SharedHead for this forward when its two passes' LM heads may share their products: a
        training step (gradients on, the head trains) of max_iter 2 over every token, with a plain
        linear head (no bias, scaling or soft-capping). Otherwise None: each pass runs its own head."""
        head = self.lm.get_output_embeddings()
        config = self.lm.config
        plain = (type(head) is nn.Linear and head.bias is None and self._logits_in_place
                 and getattr(config, "logit_scale", None) is None and getattr(config, "logits_scaling", None) is None)
        if (every_token and plain and self.tah_config.max_iter == 2 and torch.is_grad_enabled()
                and head.weight.requires_grad and self.use_shared_head):
            return SharedHead(head.weight)
        return None

    def _decide(self, acc_packed, hidden, pos, depth: int, labels_packed) -> torch.Tensor:
        """(B, A) bool: which packed tokens run another pass (oracle labels win over the decider)."""
        if labels_packed is not None:
            return labels_packed > depth + 1
        go_on, _ = self.decider(acc_packed, hidden, pos, depth)
        return go_on

    @staticmethod
    def _accumulate(acc, flat_logits, packing: Packing, in_tail: torch.Tensor, need: torch.Tensor | None,
                    batch: int, keep: int, length: int, in_place: bool) -> torch.Tensor:
        """Add a pass's logits (rows of `flat_logits`: the packed tokens, or those in `need`) of the
        tail tokens into acc (B * keep, V), row b * keep + t for the token at column
        length - keep + t of row b; acc is None before the first pass.

        Adding instead of overwriting with carry + logits gives the same numbers (acc holds carry
        there) and, in place, copies no (B * T, V) tensor forward or backward (the backward of
        index_add passes the gradient through).
        """
        if keep == length:  # need is None then (see forward), every row is in the tail
            values, where = flat_logits, slice(None)
        else:
            values = flat_logits[in_tail if need is None else in_tail[need]]
            where = in_tail if need is None else need & in_tail
        index = packing.rows[where] * keep + packing.cols[where] - (length - keep)
        if acc is None:
            return values.new_zeros(batch * keep, values.shape[-1]).index_copy_(0, index, values)
        # index_add: ~20x faster on CPU than an accumulating index_put, the same sums
        return acc.index_add_(0, index, values) if in_place else acc.index_add(0, index, values)

    @property
    def _logits_in_place(self) -> bool:
        """May the accumulated logits be added to in place? Not when the wrapped model's logits went
        through an op that saves its output for backward (tanh soft-capping)."""
        return not getattr(self.lm.config, "final_logit_softcapping", None)

    def run_pass(self, inputs: torch.Tensor, positions: torch.Tensor, real: torch.Tensor,
                 depth: int | torch.Tensor, cache: TaHCache, need_hidden: bool,
                 need: torch.Tensor | None = None, head=None) -> tuple[torch.Tensor, tuple | None]:
        """One forward of the base model over (B, A) queries: inputs (B, A, H) embeddings, positions
        (B, A), real (B, A) bool (False = padding), depth an int or a (B, A) tensor (queries of one
        forward may sit at different depths). Returns logits (B, A, V) and HF's hidden_states tuple
        (only the decider's layers filled) when `need_hidden`. With `need` (B, A) bool, the LM head
        runs only there and the logits come back as (N_need, V), row-major. `head`, when given, replaces
        the LM head: it maps the final hidden states ((B, A, H), or their (N_need, H) rows) to what
        comes back instead of logits."""
        mask = cache.begin_pass(positions, depth, real, inputs.dtype)
        wanted = self.decider.needs_hidden if need_hidden else ()
        wanted = (list(wanted) if HF_SELECTS_HIDDEN else True) if wanted else False
        # A decode step on CPU runs the LM head itself too, as few_rows chooses (HF's head is F.linear)
        own_head = head is not None or need is not None or self._few_rows_head(positions)
        # Our own head takes the decoder's final-norm output: the inner model is called, so HF's
        # head, and the capture of hidden states (hooks on every layer) when no decider reads them, are skipped.
        model = self._decoder() if own_head else self.lm
        extra = {} if own_head else {"logits_to_keep": 0}
        # real: the linears skip padding queries in decode steps (DepthState.rows); not the LM head,
        # which reads a 65 MB weight at bench_decode's size whatever its rows, and whose product
        # at 9-12 rows took longer than at 16 (10.8 vs 7.4 ms, in-loop profile)
        with self.depth_state.at(depth, inputs.dtype, real):  # depth 0 again after, also after an error
            out = model(inputs_embeds=inputs, position_ids=positions, attention_mask=mask,
                        **{HF_CACHE_ARG: cache}, use_cache=True, output_hidden_states=wanted, **extra)
        if not own_head:
            return out.logits, out.hidden_states
        final = out.last_hidden_state
        return (head or self._lm_head)(final if need is None else final[need]), out.hidden_states

    def _decoder(self) -> nn.Module:
        """The wrapped model's inner decoder (`get_decoder()`, which tries several attribute names
        and costs tens of microseconds a call: looked up once per wrapped model)."""
        kept = self.__dict__.get("_kept_decoder")  # a tuple: not registered as a submodule
        if kept is None or kept[0] is not self.lm:
            kept = self.__dict__["_kept_decoder"] = (self.lm, self.lm.get_decoder())
        return kept[1]

    def _few_rows_head(self, positions: torch.Tensor) -> bool:
        """Should a pass over these (B, A) queries run the LM head through `few_rows`?"""
        head = self.lm.get_output_embeddings()
        return type(head) is nn.Linear and few_rows.handles(positions.numel(), head.weight)

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) final hidden states -> (N, V) logits, as the wrapped model's own head computes them."""
        head = self.lm.get_output_embeddings()
        if torch.is_grad_enabled() and type(head) is nn.Linear and head.weight.requires_grad:
            logits = _HeadLinear.apply(hidden, head.weight, head.bias)
        else:
            logits = few_rows.linear(hidden, head.weight, head.bias) if type(head) is nn.Linear else head(hidden)
        config = self.lm.config
        if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies its logits
            logits = logits * config.logit_scale
        if getattr(config, "logits_scaling", None) is not None:  # Granite divides them
            logits = logits / config.logits_scaling
        cap = getattr(config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _bce_term(self, scores, iter_labels, valid, depth) -> tuple[torch.Tensor, torch.Tensor]:
        keep = valid & (iter_labels != -100)
        return scores[keep], (iter_labels[keep] > depth + 1).to(scores.dtype)

    def _bce_loss(self, terms, acc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, scores (N,), targets (N,)) over every labelled token and depth."""
        scores = torch.cat([s for s, _ in terms]) if terms else acc.new_zeros(0)
        targets = torch.cat([t for _, t in terms]) if terms else acc.new_zeros(0)
        if scores.numel() == 0:  # keeps the graph connected so every rank can step
            return sum(p.sum() * 0.0 for p in self.decider.parameters()), scores, targets
        weight = torch.tensor(self.tah_config.pos_weight, device=scores.device, dtype=torch.float32)
        loss = F.binary_cross_entropy_with_logits(scores.float(), targets.float(), pos_weight=weight)
        return loss, scores.detach(), targets

    # -- input checks --------------------------------------------------------------------------
    def _valid_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise InputError(f"input_ids must be a non-empty (batch, length) tensor; got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0] \
                or attention_mask.shape[1] < input_ids.shape[1]:
            raise InputError(
                f"attention_mask must be (batch, past + length) = ({input_ids.shape[0]}, >= {input_ids.shape[1]}); "
                f"got {tuple(attention_mask.shape)}"
            )
        return attention_mask[:, -input_ids.shape[1]:].bool()

    @staticmethod
    def _check_labels(input_ids: torch.Tensor, labels: torch.Tensor | None, name: str) -> None:
        if labels is not None and labels.shape != input_ids.shape:
            raise InputError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}")

    def _check_positions(self, positions: torch.Tensor, fresh: bool) -> None:
        # From an empty cache every position is below the length: no need to read them (a host sync)
        if fresh and positions.shape[-1] <= (self.max_positions or 0):
            return
        if self.max_positions is not None and positions.numel() and int(positions.max()) >= self.max_positions:
            raise InputError(
                f"sequence reaches position {int(positions.max())} but the model supports at most "
                f"{self.max_positions} positions (max_position_embeddings); shorten the input or the generation"
            )
