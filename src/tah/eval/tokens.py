"""Teacher-forced evaluation: next-token accuracy under an iteration policy, the oracle, and
latent overthinking.

A *supervised position* t is one whose next token t+1 has a label (labels[t+1] != -100: the
assistant's tokens and its EOS). The prediction made there is argmax of the final accumulated
logits at t; its passes are iter_count[t]. Because `iter_labels` override the decider, every
policy runs through the same `TaHForCausalLM.forward`:

    model         the model's own decider (an oracle-decider model reads the data's iter_labels)
    labels        the data's iter_labels (the reference model's hard-token labels)
    always1       every token one pass (depth 0 alone: the base model with the trained weights)
    always2       every token two passes (what AlwaysIterate does)
    oracle        per token, the depth-0 prediction where it is right, else the always2 prediction
    oracle_joint  one forward that iterates exactly the tokens whose depth-0 prediction is wrong

Why `oracle` selects per token: the paper's oracle iterates a token iff its first-pass
prediction is wrong, and compares it with always-1 and always-2 as *policies over the same
weights*. Run jointly (`oracle_joint`), a hard token's depth-1 pass attends to the depth-1 KV of
the earlier hard tokens only, not of every earlier token as under always2, so its outcome can
differ from always2's at that token and "oracle >= both" is not guaranteed. Selecting per token
between the always1 and always2 runs makes oracle correct = (always1 correct) or (always2
correct), so oracle >= always1 and oracle >= always2 on the same tokens by construction, and
the gap measures how much a perfect per-token stop rule could gain over each fixed depth.
`oracle_joint` is what a perfect decider would get in this model as it runs; both are reported.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from tah.errors import InputError
from tah.eval.batches import (
    IGNORE,
    check_depth,
    forced_passes,
    inference,
    make_batches,
    next_targets,
    to_device,
)
from tah.model.decider import OracleDecider

POLICIES = ("model", "labels", "always1", "always2", "oracle", "oracle_joint")


def next_token_accuracy(model, data, policy: str = "model", batch_size: int = 16, pad_token_id: int = 0,
                        progress: bool | None = None) -> dict:
    """Teacher-forced next-token accuracy of `model` on `data` under `policy` (see the module doc).

    data: examples with input_ids and labels (and iter_labels for policy "labels" or an oracle-
    decider model), or ready (B, T) batches; see `tah.eval.batches.iterate_batches`.
    Returns {"policy", "accuracy", "iterated_share", "tokens", "correct", "iterated"} over the
    supervised positions (accuracy and share are None when there are none). Raises `InputError`
    for an unknown policy, or one needing a second pass on a max_iter-1 model.
    """
    _check_policy(model, policy)
    outcome = _collect(model, data, policy, batch_size, pad_token_id, progress)
    return _summary(policy, outcome["target"], outcome["predicted"], outcome["passes"])


def depth_analysis(model, data, batch_size: int = 16, pad_token_id: int = 0, joint: bool = True,
                   progress: bool | None = None) -> dict:
    """The paper's oracle analysis on the same supervised tokens, from one always1 and one always2
    forward per batch (plus one oracle_joint forward with `joint`):

        {"tokens": N,
         "always1" / "always2" / "oracle" / "oracle_joint": next_token_accuracy's dict,
         "overthinking": see `overthinking`}

    Needs max_iter >= 2 (every policy but always1 iterates)."""
    check_depth(model, "always2")
    found = {name: {"target": [], "predicted": [], "passes": []}
             for name in ("always1", "always2", "oracle") + (("oracle_joint",) if joint else ())}
    batches = make_batches(data, batch_size, pad_token_id)
    with inference(model):
        for batch in tqdm(batches, desc="depth analysis", leave=False, disable=_quiet(progress, batches)):
            batch = to_device(batch, model.device)
            target = next_targets(batch["labels"])
            keep = target != IGNORE
            runs = _depth_runs(model, batch, target, joint)
            for name, (predicted, passes) in runs.items():
                found[name]["target"].append(target[keep].cpu())
                found[name]["predicted"].append(predicted[keep].cpu())
                found[name]["passes"].append(passes[keep].cpu())
    flat = {name: {key: torch.cat(values) for key, values in parts.items()} for name, parts in found.items()}
    result = {"tokens": int(flat["always1"]["target"].numel())}
    for name, parts in flat.items():
        result[name] = _summary(name, parts["target"], parts["predicted"], parts["passes"])
    result["overthinking"] = _overthinking(flat["always1"]["target"], flat["always1"]["predicted"],
                                           flat["always2"]["predicted"])
    return result


def overthinking(model, data, batch_size: int = 16, pad_token_id: int = 0, progress: bool | None = None) -> dict:
    """Latent overthinking of a model forced to iterate every token once (max_iter >= 2):

        right_after_depth0  supervised tokens whose depth-0 argmax is the target
        turned_wrong        of those, how many the final (depth-1) argmax gets wrong
        overthink_share     turned_wrong / right_after_depth0
        wrong_after_depth0, fixed, fix_share   the same for tokens depth 0 gets wrong and depth 1 fixes

    Depth-0 logits come from a forward with every iter_label 1 (depth 0 never sees deeper KV, so
    they equal the depth-0 logits of the always-iterate forward); final ones with every label 2.
    Shares are None when their denominator is 0."""
    return depth_analysis(model, data, batch_size, pad_token_id, joint=False, progress=progress)["overthinking"]


def solution_records(model, tokenizer, data, count: int | None = None, policy: str = "model", batch_size: int = 16,
                     pad_token_id: int = 0) -> list[dict]:
    """Per-token records of the first `count` examples of `data`, teacher-forced under `policy`, for
    `tah.eval.samples_html`. Each record: "question" (the unsupervised prefix as text), "tokens"
    (the supervised tokens as text, EOS included), "iter_counts" (passes of the prediction of each),
    "predicted" (the predicted token's text), "token_correct" (bools), and "hard" (bools: the
    data's iter_labels say "iterate") when the data has iter_labels, else None."""
    _check_policy(model, policy)
    examples = data if count is None else [data[i] for i in range(min(count, len(data)))]
    records = []
    with inference(model):
        for batch in make_batches(examples, batch_size, pad_token_id):
            batch = to_device(batch, model.device)
            target = next_targets(batch["labels"])
            predicted, passes = _policy_run(model, batch, target, policy)
            for row in range(target.shape[0]):
                keep = target[row] != IGNORE
                first = int(keep.nonzero()[0, 0]) if bool(keep.any()) else target.shape[1]
                prefix = batch["input_ids"][row, :first + 1][batch["attention_mask"][row, :first + 1].bool()]
                hard = batch.get("iter_labels")
                records.append({
                    "question": tokenizer.decode(prefix.tolist(), skip_special_tokens=True),
                    "tokens": [tokenizer.decode([i]) for i in target[row][keep].tolist()],
                    "iter_counts": passes[row][keep].tolist(),
                    "predicted": [tokenizer.decode([i]) for i in predicted[row][keep].tolist()],
                    "token_correct": (predicted[row][keep] == target[row][keep]).tolist(),
                    "hard": None if hard is None else (hard[row][keep] > 1).tolist(),
                })
    return records


# -- internals -------------------------------------------------------------------------------------
def _check_policy(model, policy: str) -> None:
    if policy not in POLICIES:
        raise InputError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if policy in ("always2", "oracle", "oracle_joint"):
        check_depth(model, policy)


def _quiet(progress: bool | None, batches: list) -> bool | None:
    # tqdm: disable=None hides the bar when stderr is not a terminal; short runs need none.
    return (not progress) if progress is not None else (True if len(batches) < 4 else None)


def _collect(model, data, policy: str, batch_size: int, pad_token_id: int, progress) -> dict[str, torch.Tensor]:
    """Flat (N,) target, predicted and passes over the supervised positions of every batch."""
    parts = {"target": [], "predicted": [], "passes": []}
    batches = make_batches(data, batch_size, pad_token_id)
    with inference(model):
        for batch in tqdm(batches, desc=f"next-token ({policy})", leave=False, disable=_quiet(progress, batches)):
            batch = to_device(batch, model.device)
            target = next_targets(batch["labels"])
            predicted, passes = _policy_run(model, batch, target, policy)
            keep = target != IGNORE
            parts["target"].append(target[keep].cpu())
            parts["predicted"].append(predicted[keep].cpu())
            parts["passes"].append(passes[keep].cpu())
    return {key: torch.cat(values) for key, values in parts.items()}


def _forward(model, batch, iter_labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) argmax of the final logits and (B, T) passes."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], iter_labels=iter_labels)
    return out.logits.argmax(-1), out.iter_count


def _policy_run(model, batch, target, policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) predictions and passes of `policy` on one batch (target: (B, T) next-token labels)."""
    ids = batch["input_ids"]
    if policy in ("oracle", "oracle_joint"):
        joint = policy == "oracle_joint"
        return _depth_runs(model, batch, target, joint=joint, selection=not joint)[policy]
    if policy == "always1":
        return _forward(model, batch, forced_passes(ids, 1))
    if policy == "always2":
        return _forward(model, batch, forced_passes(ids, 2))
    labels = batch.get("iter_labels")
    if policy == "labels" or isinstance(model.decider, OracleDecider):
        if labels is None:
            why = "policy 'labels'" if policy == "labels" else "a model with decider 'oracle'"
            raise InputError(f"{why} needs iter_labels in the data; label it first (`tah label`)")
        return _forward(model, batch, labels)
    return _forward(model, batch, None)


def _depth_runs(model, batch, target, joint: bool, selection: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """always1 and, with `selection`, always2 and oracle (per-token selection between the two);
    with `joint`, oracle_joint: (B, T) predictions and passes of each on one batch."""
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    pred1, passes1 = _forward(model, batch, forced_passes(ids, 1))
    runs = {"always1": (pred1, passes1)}
    if selection:
        pred2, passes2 = _forward(model, batch, forced_passes(ids, 2))
        right0 = pred1 == target
        runs["always2"] = (pred2, passes2)
        runs["oracle"] = (torch.where(right0, pred1, pred2), torch.where(right0, passes1, passes2))
    if joint:
        # Iterate wherever depth 0 misses the true next token, prompt included (as `tah label` does).
        has_next = torch.zeros_like(valid)
        has_next[:, :-1] = valid[:, :-1] & valid[:, 1:]
        wrong0 = has_next & (pred1 != torch.roll(ids, -1, dims=1))
        runs["oracle_joint"] = _forward(model, batch, 1 + wrong0.long())
    return runs


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _summary(policy: str, target, predicted, passes) -> dict:
    correct = int((predicted == target).sum())
    iterated = int((passes > 1).sum())
    tokens = int(target.numel())
    return {"policy": policy, "accuracy": _share(correct, tokens), "iterated_share": _share(iterated, tokens),
            "tokens": tokens, "correct": correct, "iterated": iterated}


def _overthinking(target, pred0, pred_final) -> dict:
    right0 = pred0 == target
    right1 = pred_final == target
    right, wrong = int(right0.sum()), int((~right0).sum())
    turned, fixed = int((right0 & ~right1).sum()), int((~right0 & right1).sum())
    return {"right_after_depth0": right, "turned_wrong": turned, "overthink_share": _share(turned, right),
            "wrong_after_depth0": wrong, "fixed": fixed, "fix_share": _share(fixed, wrong)}
