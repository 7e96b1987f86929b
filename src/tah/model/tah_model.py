"""`TaHForCausalLM`: the depth loop around a Hugging Face causal LM.

One code path serves training, prefill and decoding:

    ids -> embed -> depth-0 pass (all tokens, no adapter) -> logits, hidden
        -> decider (or oracle iter_labels) -> tokens that continue
        -> soft input from their accumulated logits -> depth-1 pass (those tokens only, adapter 1)
        -> accumulated logits += depth-1 logits -> decider ... until max_iter or nobody continues

`forward` is that loop, a `depth_step` per depth (a decoder may run them itself: `begin_forward`);
each step is a method below with its contract. A pass itself (its queries, their inputs, the
decisions after it) is step.py's, shared with the decoders. Where the LM head runs and how the
logits add up (every token, the kept tail only, a head shared by two passes) is a plan from
depth_logits.py, chosen once per call: speed only, the same numbers. The method written plainly,
slow and cache-free, is `tah.model.reference`; the tests hold every fast path against it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from tah.config import TaHConfig
from tah.errors import ConfigError, InputError
from tah.kernels.sdpa import use_tah_sdpa
from tah.kernels.shared_head import SharedHead
from tah.model.attention import check_attn_implementation
from tah.model.cache import TaHCache
from tah.model.decider import Decider, MLPDecider, build_decider
from tah.model.depth_logits import EveryTokenLogits, LogitsPlan, SharedHeadLogits, TailLogits
from tah.model.lora import DepthLoRALinear, DepthState, add_depth_lora
from tah.model.packing import LabelPlan, Packing, PassTokens
from tah.model.step import TaggedPasses


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

    @property
    def past_key_values(self) -> TaHCache | None:
        """The cache under its pre-5.24 name (without the deprecation warning of newer versions)."""
        return self.cache


@dataclass
class ForwardCall:
    """What one forward was asked, fixed for all its passes."""

    batch: int
    length: int
    valid: torch.Tensor  # (B, T) bool, False = padding
    positions: torch.Tensor  # (B, T) position ids
    iter_labels: torch.Tensor | None  # (B, T) oracle pass counts, -100 = none
    labels: torch.Tensor | None  # (B, T) next-token labels (unshifted), -100 = none
    num_items_in_batch: int | torch.Tensor | None  # HF Trainer's count of labelled tokens
    cache: TaHCache
    max_iter: int
    keep: int  # logits returned: those of the last `keep` columns (logits_to_keep), else T
    stage2: bool  # decider training: base and LoRA frozen, the loss is the decider's BCE
    early: bool  # decisions come before each pass (oracle labels, or a decider that reads no logits)
    plan: LabelPlan | None  # with iter_labels: every pass's tokens, known on the host

    def frozen(self):
        """no_grad in stage 2 (base and LoRA frozen), else nothing."""
        return torch.no_grad() if self.stage2 else nullcontext()


@dataclass
class DepthLoop:
    """A forward under way (`begin_forward`, then `depth_step` while `tokens`, then `end_forward`):
    what it was asked, where its logits go, the tokens of its next pass (None once nobody
    continues), the passes each token has run so far (B, T), and stage 2's decider terms."""

    call: ForwardCall
    plan: LogitsPlan
    tokens: PassTokens | None
    iter_count: torch.Tensor
    decider_terms: list = field(default_factory=list)


class TaHForCausalLM(TaggedPasses, nn.Module):
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
        self.use_shared_head = True  # see kernels/shared_head.py; False: each pass runs its own LM head (for comparisons)
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

    def compile_decode_steps(self, enabled: bool = True, **options) -> None:
        """Have the static engine (greedy GPU decoding: `generate`'s engine "auto" on CUDA, or
        "static") compile its two step functions with `torch.compile(fullgraph=True, **options)`
        (inductor by default) before capturing them in CUDA graphs, so that a step replays fused
        kernels as HF's compiled static-cache `generate` does. The same tokens as the eager steps
        (tests). Each runner (batch, cache capacity) compiles once per step kind: minutes on a
        large model, so for long-lived processes (a server) rather than a few calls; past
        torch.compile's recompile limit (8 by default) further runners' steps run uncompiled.
        `enabled=False` turns it off again. Not measured on a GPU yet (issue 26)."""
        self.__dict__["_decode_compile"] = options if enabled else None  # runners built after this see it

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
                **_: object) -> TaHOutput:
        """input_ids (B, T); attention_mask (B, past + T) or (B, T), 1 = real token, any padding side;
        labels (B, T), shifted inside as in HF; iter_labels (B, T) oracle pass counts (-100 = none):
        when given they, not the decider, choose who iterates. logits_to_keep = n > 0 returns the
        logits of the last n positions only (B, n, V), and skips the LM head for tokens whose logits
        nobody reads (when the decider does not read logits): what prefill for generation wants.
        num_items_in_batch (HF Trainer): the stage-1 loss is the CE sum divided by it, so that
        gradient accumulation and several processes weigh every token alike. The cache may come as
        `cache` (transformers' name from 5.24 on) or `past_key_values`.

        The loop of depths, which a caller may also run a depth at a time (`begin_forward`)."""
        loop = self.begin_forward(input_ids, attention_mask, labels, iter_labels, past_key_values, logits_to_keep,
                                  num_items_in_batch, cache)
        while loop.tokens is not None:  # depth 0 (every token), then the tokens that continue
            self.depth_step(loop)
        return self.end_forward(loop, use_cache)

    def begin_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, iter_labels: torch.Tensor | None = None,
                      past_key_values: TaHCache | None = None, logits_to_keep: int = 0,
                      num_items_in_batch: int | torch.Tensor | None = None,
                      cache: TaHCache | None = None) -> DepthLoop:
        """`forward`'s arguments checked (InputError names a bad one), its plan chosen, its depth-0
        tokens ready: every token, its embedding as input. A decoder that runs a forward's last
        pass within its own first step stops `depth_step` before it; `end_forward` then returns
        the logits and pass counts so far."""
        call = self._forward_call(input_ids, attention_mask, labels, iter_labels, past_key_values, cache,
                                  logits_to_keep, num_items_in_batch)
        plan = self._logits_plan(call)  # where the LM head runs and how logits add up: speed, not results
        return DepthLoop(call, plan, self._every_token(input_ids, call), torch.ones_like(input_ids))

    def depth_step(self, loop: DepthLoop) -> None:
        """Run the pass of loop.tokens (the tokens at one depth), add its logits to their sums and
        decide who continues: loop.tokens becomes those, each with the soft input of its sums, or
        None after the last depth or when nobody does."""
        tokens, call, plan = loop.tokens, loop.call, loop.plan
        last = tokens.depth == call.max_iter - 1
        go_on = self._decide(tokens) if call.early and not last else None  # oracle labels, random decider
        sums, hidden = plan.run(tokens, last, go_on)  # the pass at this depth; its logits added to the sums
        if tokens.depth > 0:
            loop.iter_count = tokens.count_pass(loop.iter_count)
        loop.tokens = None
        if last:
            return
        if call.stage2:  # the decider's training signal at this depth
            loop.decider_terms.append(self._decider_term(tokens, sums, hidden, call))
        if go_on is None:
            go_on = self._decide(tokens, sums, hidden)
        go_on_flat = tokens.packing.unpack(go_on)
        counts = call.plan.continuing[tokens.depth] if call.plan is not None else None
        if any(counts) if counts is not None else bool(go_on_flat.any()):  # (without a plan, a host sync a depth)
            loop.tokens = self._continuing(tokens, go_on_flat, plan, call)  # the hard tokens, with soft inputs

    def end_forward(self, loop: DepthLoop, use_cache: bool = False) -> TaHOutput:
        """The output of the passes run: the loss, the logits kept, the pass counts."""
        call, logits = loop.call, loop.plan.logits
        loss, scores, targets = self._loss(call, logits, loop.decider_terms)
        return TaHOutput(loss=loss, logits=logits.view(call.batch, call.keep, -1), iter_count=loop.iter_count,
                         cache=call.cache if use_cache else None, decider_logits=scores, decider_targets=targets)

    def _forward_call(self, input_ids, attention_mask, labels, iter_labels, past_key_values, cache,
                      logits_to_keep: int, num_items_in_batch) -> ForwardCall:
        """Check forward's arguments (InputError names the bad one) and fix what holds for all its passes."""
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
        keep = logits_to_keep if 0 < logits_to_keep < length and labels is None and not stage2 else length
        # Deciders that ignore logits decide before each pass; then only needed logits are computed.
        early = iter_labels is not None or not self.decider.reads_logits
        max_iter = self.tah_config.max_iter
        plan = LabelPlan.read(valid, iter_labels, max_iter) if iter_labels is not None and max_iter > 1 else None
        return ForwardCall(batch, length, valid, positions, iter_labels, labels, num_items_in_batch, cache,
                           max_iter, keep, stage2, early, plan)

    def _logits_plan(self, call: ForwardCall) -> LogitsPlan:
        """The fastest plan (depth_logits.py) that computes what this call returns."""
        if call.keep < call.length:
            return TailLogits(self, call, sparse=call.early)
        shared = self._shared_head(every_token=not call.stage2)
        return EveryTokenLogits(self, call) if shared is None else SharedHeadLogits(self, call, shared)

    def _decide(self, tokens: PassTokens, sums: torch.Tensor | None = None, hidden: tuple | None = None) -> torch.Tensor:
        """(B, A) bool: which of the pass's tokens run another pass; padding never does. The oracle
        labels when given, else the decider, before the pass (sums and hidden None: it reads no
        logits) or after it, reading the sums (packing order) and hidden states of the pass."""
        if tokens.labels is not None:
            return (tokens.labels > tokens.depth + 1) & tokens.real
        packed = None if sums is None else tokens.packing.pack(sums)
        return self.decide(packed, hidden, tokens.positions, tokens.depth) & tokens.real

    def _every_token(self, input_ids: torch.Tensor, call: ForwardCall) -> PassTokens:
        """The tokens of the depth-0 pass: all of them, in place, their embeddings as inputs."""
        with call.frozen():
            embeds = self.embed(input_ids)
        packing = Packing.everything(call.batch, call.length, input_ids.device)
        known = call.plan.known(0) if call.plan is not None else None
        return PassTokens.of(packing, 0, embeds, call.valid, call.positions, call.iter_labels, known)

    def _continuing(self, tokens: PassTokens, go_on_flat: torch.Tensor, plan: LogitsPlan,
                    call: ForwardCall) -> PassTokens:
        """The tokens of the next pass: those of `tokens` where go_on_flat (N,), packed, each with the
        soft embedding of its sums as input, at its own position. With a plan, their count per row
        is known: no boolean selection, which waits for its count on a GPU."""
        packing, depth = tokens.packing, tokens.depth
        if call.plan is None:
            rows, cols = packing.rows[go_on_flat], packing.cols[go_on_flat]
            chosen = width = known = None
        else:
            counts = call.plan.continuing[depth]
            chosen = go_on_flat.int().argsort(descending=True, stable=True)[:sum(counts)]  # the True ones, in order
            rows, cols = packing.rows[chosen], packing.cols[chosen]
            width, known = max(counts), call.plan.known(depth + 1)
        soft = plan.soft_input(go_on_flat, rows * call.length + cols, chosen)
        packing = Packing.select(rows, cols, call.batch, width)
        return PassTokens.of(packing, depth + 1, packing.pack(soft), call.valid, call.positions,
                             call.iter_labels, known)

    def _decider_term(self, tokens: PassTokens, sums: torch.Tensor, hidden: tuple,
                      call: ForwardCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 2: (scores (n,), targets (n,)) of the decider after this pass, over the labelled tokens."""
        packing = tokens.packing
        scores = self.decider.scores(packing.pack(sums).detach(), tuple(
            h.detach() if h is not None else None for h in hidden))
        scores, labels, valid = packing.unpack(scores), packing.gather(call.iter_labels), packing.gather(call.valid)
        # the labelled ones, by index: the plan knows how many (a boolean selection waits on a GPU, in backward too)
        labelled = (valid & (labels != -100)).int().argsort(descending=True, stable=True)
        keep = labelled[:call.plan.labelled_at(tokens.depth)]
        return scores[keep], (labels[keep] > tokens.depth + 1).to(scores.dtype)

    def _loss(self, call: ForwardCall, sums: torch.Tensor,
              decider_terms: list) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(loss, decider scores, decider targets): stage 2's BCE, else next-token CE of the (B * T, V)
        sums when labels are given."""
        if call.stage2:
            return self._bce_loss(decider_terms, sums)
        labels, num_items_in_batch = call.labels, call.num_items_in_batch
        if labels is None:
            return None, None, None
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()
        weight = self.tah_config.hard_token_weight
        if weight == 1.0 or call.iter_labels is None:  # the paper's loss, in one fused call
            if num_items_in_batch is None:
                return F.cross_entropy(sums.float(), shifted, ignore_index=-100), None, None
            loss = F.cross_entropy(sums.float(), shifted, ignore_index=-100, reduction="sum")
            return loss / num_items_in_batch, None, None
        losses = F.cross_entropy(sums.float(), shifted, ignore_index=-100, reduction="none")  # (B * T,), 0 where ignored
        losses = torch.where(call.iter_labels.flatten() >= 2, losses * weight, losses)
        count = (shifted != -100).sum() if num_items_in_batch is None else num_items_in_batch
        return losses.sum() / count, None, None

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

    @property
    def _logits_in_place(self) -> bool:
        """May the accumulated logits be added to in place? Not when the wrapped model's logits went
        through an op that saves its output for backward (tanh soft-capping)."""
        return not getattr(self.lm.config, "final_logit_softcapping", None)

    def _bce_loss(self, terms, acc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, scores (N,), targets (N,)) over every labelled token and depth."""
        scores = torch.cat([s for s, _ in terms]) if terms else acc.new_zeros(0)
        targets = torch.cat([t for _, t in terms]) if terms else acc.new_zeros(0)
        if scores.numel() == 0:  # keeps the graph connected so every rank can step
            return sum(p.sum() * 0.0 for p in self.decider.parameters()), scores, targets
        weight = torch.full((), self.tah_config.pos_weight, device=scores.device)  # (a fill: no host-to-device copy)
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
