"""Think-at-Hard written out plainly: the one reference every fast path is tested against.

Nothing here is fast, and nothing here is shared with the fast paths' cache, packing, masks, heads
or attention kernels. Every token runs depth 0. A token that continues after depth d gets one more
*entry*: the same column and position, depth d + 1, and as input the soft embedding of its
accumulated logits. The pass of depth d runs the wrapped HF model once over every entry of depths
0..d, with the textbook attention (softmax(QK^T * scaling + mask) V, in the activations' dtype) under a
mask written entry by entry from the duo-causal rule, each entry's linears with the LoRA of its own depth. Entries of
earlier depths are recomputed at every pass; they come out as before, since the rule never lets an
entry see a deeper one. Logits add up per token; the decider (or the oracle labels) reads the pass
just run.

Decoding: greedy decoding that runs `reference_forward` over the whole sequence at every step
(`reference_greedy`) is the reference decoder. A token's decisions depend on earlier tokens only,
so this is what any incremental decoder must produce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask


@dataclass
class Entry:
    """One token at one depth it reached."""

    column: int  # the token's column in input_ids
    position: int  # its position id: count of earlier real tokens in its row (deeper entries keep it)
    depth: int
    valid: bool  # False for padding: no query sees it, it never continues
    inputs: torch.Tensor  # (H,): the token's embedding at depth 0, its soft input deeper


def visible(q_pos: int, q_depth: int, k_pos: int, k_depth: int, k_valid: bool) -> bool:
    """The duo-causal rule: may the query at (q_pos, q_depth) see the key at (k_pos, k_depth)?"""
    return bool(k_valid) and k_pos <= q_pos and k_depth <= q_depth


Rule = Callable[[int, int, int, int, bool], bool]


def reference_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      iter_labels: torch.Tensor | None = None, rule: Rule = visible
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """What `TaHForCausalLM.forward` computes, from scratch: (logits (B, T, V), iter_count (B, T)).

    input_ids (B, T); attention_mask (B, T), 1 = real token, padding anywhere; iter_labels (B, T)
    oracle pass counts (-100 = stop): when given, a token continues after depth d iff its label is
    > d + 1, else the model's decider says. `rule` (see `visible`) is swappable, so that a test can
    show a wrong rule gives other numbers. Differentiable: a loss of these logits has the gradients
    a training step must have.
    """
    batch, length = input_ids.shape
    valid = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool().tolist()
    table = model.lm.get_input_embeddings().weight
    embeds = model.lm.get_input_embeddings()(input_ids)
    config = model.tah_config
    rows = [[Entry(t, sum(valid[b][:t]) if valid[b][t] else 0, 0, valid[b][t], embeds[b, t]) for t in range(length)]
            for b in range(batch)]
    acc: list[list[torch.Tensor | None]] = [[None] * length for _ in range(batch)]
    iter_count = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
    for depth in range(config.max_iter):
        logits, hidden = _dense_pass(model, rows, rule)
        ran = [(b, i, entry) for b, row in enumerate(rows) for i, entry in enumerate(row) if entry.depth == depth]
        for b, i, entry in ran:
            acc[b][entry.column] = logits[b, i] if depth == 0 else acc[b][entry.column] + logits[b, i]
            iter_count[b, entry.column] = depth + 1
        may_continue = [(b, i, entry) for b, i, entry in ran if entry.valid]
        if depth == config.max_iter - 1 or not may_continue:
            break
        go_on = _decide(model, may_continue, acc, hidden, depth, iter_labels)
        for (b, _, entry), more in zip(may_continue, go_on, strict=True):
            if more:
                soft = soft_input(acc[b][entry.column], table, config.input_topk)
                rows[b].append(Entry(entry.column, entry.position, depth + 1, True, soft))
        if not any(go_on):
            break
    return torch.stack([torch.stack(row) for row in acc]), iter_count


def soft_input(logits: torch.Tensor, table: torch.Tensor, topk: int) -> torch.Tensor:
    """(V,) accumulated logits -> (H,): softmax over their top-k, times those rows of `table` (V, H)."""
    top = torch.topk(logits, min(topk, logits.shape[-1]))
    return torch.softmax(top.values, -1).to(table.dtype) @ table[top.indices]


def _dense_pass(model, rows: list[list[Entry]], rule: Rule) -> tuple[torch.Tensor, tuple]:
    """One forward of the wrapped model over every entry: (logits (B, W, V), hidden states tuple)."""
    width = max(len(row) for row in rows)
    filler = Entry(0, 0, 0, False, torch.zeros_like(rows[0][0].inputs))  # evens out rows; nobody sees it
    grid = [row + [filler] * (width - len(row)) for row in rows]
    inputs = torch.stack([torch.stack([entry.inputs for entry in row]) for row in grid])
    lowest = torch.finfo(inputs.dtype).min
    mask = torch.tensor([[[0.0 if rule(q.position, q.depth, k.position, k.depth, k.valid) else lowest for k in row]
                          for q in row] for row in grid], dtype=inputs.dtype, device=inputs.device)[:, None]
    positions = torch.tensor([[entry.position for entry in row] for row in grid], device=inputs.device)
    depths = torch.tensor([[entry.depth for entry in row] for row in grid], device=inputs.device)
    with _depths_per_entry(model, depths, inputs.dtype), _plain_attention(model.lm):
        out = model.lm(inputs_embeds=inputs, position_ids=positions, attention_mask=mask, use_cache=False,
                       output_hidden_states=True)
    return out.logits, out.hidden_states


def _decide(model, entries: list[tuple[int, int, Entry]], acc, hidden: tuple, depth: int,
            iter_labels: torch.Tensor | None) -> list[bool]:
    """Does each of these entries (b, index in its row, entry), just run at `depth`, continue?"""
    if iter_labels is not None:
        return [int(iter_labels[b, entry.column]) > depth + 1 for b, _, entry in entries]
    flat_acc = torch.stack([acc[b][entry.column] for b, _, entry in entries])[None]
    flat_hidden = tuple(h[[b for b, _, _ in entries], [i for _, i, _ in entries]][None] for h in hidden)
    positions = torch.tensor([[entry.position for _, _, entry in entries]], device=flat_acc.device)
    go_on, _ = model.decider(flat_acc, flat_hidden, positions, depth)
    return go_on[0].tolist()


@contextmanager
def _depths_per_entry(model, depths: torch.Tensor, dtype: torch.dtype) -> Iterator[None]:
    """Each entry's linears run the LoRA of its depth (depth 0: none) inside the block."""
    model.depth_state.set_each(depths, dtype)
    try:
        yield
    finally:
        model.depth_state.set(0)


def plain_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor, scaling: float, dropout: float = 0.0, **_) -> tuple:
    """query (B, H, A, D), key/value (B, KV, S, D), attention_mask (B, 1, A, S) additive ->
    ((B, A, H, D), weights). HF's eager attention, but with the softmax in the inputs' dtype
    (HF's takes float32), so that a float64 reference is float64 throughout."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    weights = torch.softmax(query @ key.transpose(-1, -2) * scaling + attention_mask, dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


PLAIN_ATTENTION = "tah_reference"
AttentionInterface.register(PLAIN_ATTENTION, plain_attention)
AttentionMaskInterface.register(PLAIN_ATTENTION, eager_mask)


@contextmanager
def _plain_attention(lm) -> Iterator[None]:
    """`plain_attention` inside the block, whatever attention the model runs."""
    previous = lm.config._attn_implementation
    lm.set_attn_implementation(PLAIN_ATTENTION)
    try:
        yield
    finally:
        lm.set_attn_implementation(previous)


def reference_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """HF's causal-LM loss of (B, T, V) logits: position t predicts labels[:, t + 1], -100 ignored;
    the mean over labelled tokens, or their sum / num_items_in_batch (what HF Trainer passes)."""
    targets = labels[:, 1:].flatten()
    predicted = logits[:, :-1].flatten(0, 1).float()  # in float32 at least, as HF computes it
    if num_items_in_batch is None:
        return F.cross_entropy(predicted, targets, ignore_index=-100)
    return F.cross_entropy(predicted, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


@torch.no_grad()
def reference_greedy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                     max_new_tokens: int, eos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding by `reference_forward` over the whole sequence at every step.

    input_ids (B, T) left-padded prompts. Returns (sequences (B, T + new), iter_counts (B, new)) as
    `tah.generate` does: a new token's count is the passes of the position that predicted it; a row
    that emitted EOS gets EOS and count 0 from then on; decoding ends when every row has.
    """
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    sequences, counts = input_ids, []
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits, passes = reference_forward(model, sequences, mask)
        token = logits[:, -1].argmax(-1)
        counts.append(torch.where(done, 0, passes[:, -1]))
        if eos_token_id is not None:
            token = torch.where(done, eos_token_id, token)
        sequences = torch.cat([sequences, token[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        if bool(done.all()):
            break
    return sequences, torch.stack(counts, 1)
