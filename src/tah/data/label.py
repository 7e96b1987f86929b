"""Hard-token labels from a reference model run teacher-forced over the data.

The rule, in the convention of `TaHForCausalLM`'s `iter_labels`: iter_labels[t] is the number of
passes for the prediction made at position t (of token t+1), set at every position that has a next
real token, prompt positions included (the model iterates on them at inference too):

    1   the reference's argmax at t is input_ids[t+1]          (easy)
    2   it is not                                               (hard)
        with `confidence` p set, also where the argmax is right but gives input_ids[t+1] a
        probability below p (the reference was unsure: the whole class of tokens it finds hard,
        not only the ones it happens to miss; the paper's rule is p unset)
        with `prompt_easy`, never at a position whose next token is prompt text (labels -100): a
        question's own content is often unpredictable by nature (random operands, a user's
        wording), and labelling it hard teaches the decider "odd-looking context", which it then
        applies to the copies of that content in the answer
    2+k with max_iter > 2: a hard token gets 2 + k passes, k = how many of the `deep_ce` thresholds
        (max_iter - 2 of them, in nats, increasing) the reference's cross-entropy on it exceeds:
        the more surprised the reference, the deeper. (A missed token's CE is always > ln 2.)

The last real position of a row and padding get -100.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from tah.data.collator import TaHCollator
from tah.data.shards import ShardStore, write_json
from tah.errors import InputError

IGNORE = -100
CHUNK_ELEMENTS = 1 << 24  # logits converted to float32 at a time (64 MiB): vocabularies are large
PAUSE_ENV = "TAH_LABEL_PAUSE_AFTER_SHARD"  # seconds to sleep after each shard: lets tests kill a run


def check_rule(max_iter: int, deep_ce) -> list[float] | None:
    """Validate (max_iter, deep_ce); return the thresholds as floats (None when max_iter == 2)."""
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 2:
        raise InputError(f"max_iter must be an integer >= 2 (passes per hard token), got {max_iter!r}")
    if max_iter == 2:
        if deep_ce:
            raise InputError("deep_ce (--deep-ce) only applies with max_iter > 2; drop it or raise --max-iter")
        return None
    need = max_iter - 2
    example = " ".join(str(2.0 + i) for i in range(need))
    if deep_ce is None or len(deep_ce) != need:
        raise InputError(f"max_iter={max_iter} needs {need} cross-entropy threshold(s) in nats, increasing, "
                         f"for the deeper passes (e.g. --deep-ce {example}); got {deep_ce!r}")
    thresholds = [float(x) for x in deep_ce]
    if any(not math.isfinite(x) or x < 0 for x in thresholds) or thresholds != sorted(set(thresholds)):
        raise InputError(f"--deep-ce thresholds must be finite, >= 0 and strictly increasing, got {deep_ce!r}")
    return thresholds


def check_confidence(confidence) -> float | None:
    """Validate `confidence` (None, or a probability in (0, 1))."""
    if confidence is None:
        return None
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 < confidence < 1:
        raise InputError(f"confidence (--confidence) must be a probability in (0, 1), e.g. 0.9; got {confidence!r}")
    return float(confidence)


def pass_counts(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                max_iter: int = 2, deep_ce=None, confidence: float | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The rule above for one batch. logits (B, T, V) of the reference; input_ids, attention_mask
    (B, T), either padding side; labels (B, T), -100 on prompt tokens: given, only positions whose next
    token is labelled can be hard (`prompt_easy`). Returns iter_labels (B, T) long, and the reference's ref_ce (its
    cross-entropy on the true next token) and ref_entropy, (B, T) float32 in nats, 0 where
    iter_labels is -100."""
    thresholds = check_rule(max_iter, deep_ce)
    confidence = check_confidence(confidence)
    batch, length, vocab = logits.shape
    valid = attention_mask.bool()
    has_next = torch.zeros_like(valid)
    has_next[:, :-1] = valid[:, :-1] & valid[:, 1:]
    hit = torch.zeros_like(valid)
    ce = torch.zeros(batch, length, dtype=torch.float32, device=logits.device)
    entropy = torch.zeros_like(ce)
    step = max(1, CHUNK_ELEMENTS // (batch * vocab))
    for start in range(0, length - 1, step):
        end = min(start + step, length - 1)
        chunk = logits[:, start:end].float()
        target = input_ids[:, start + 1:end + 1]
        logp = chunk.log_softmax(-1)
        hit[:, start:end] = chunk.argmax(-1) == target
        ce[:, start:end] = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        entropy[:, start:end] = torch.special.entr(logp.exp()).sum(-1)
    hard = has_next & ~hit
    if confidence is not None:
        hard |= has_next & (ce > -math.log(confidence))
    if labels is not None:
        answer_next = torch.zeros_like(valid)
        answer_next[:, :-1] = labels[:, 1:].to(valid.device) != IGNORE
        hard &= answer_next
    iters = 1 + hard.long()
    if thresholds:
        deeper = (ce.unsqueeze(-1) > torch.tensor(thresholds, device=ce.device)).sum(-1)
        iters = torch.where(hard, 2 + deeper, iters)
    return {"iter_labels": iters.masked_fill(~has_next, IGNORE), "ref_ce": ce.masked_fill(~has_next, 0.0),
            "ref_entropy": entropy.masked_fill(~has_next, 0.0)}


@torch.no_grad()
def label_batch(reference_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_iter: int = 2,
                deep_ce=None, confidence: float | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Run the reference model teacher-forced on a padded batch and apply `pass_counts` (on CPU);
    `labels` given: prompt positions stay easy (see `pass_counts`)."""
    device = next(reference_model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    # Explicit positions so left-padded rows are numbered from their first real token.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = reference_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False).logits
    return {key: value.cpu() for key, value in pass_counts(logits, input_ids, attention_mask, max_iter,
                                                            deep_ce, confidence, labels).items()}


def label_dataset(reference_model, dataset, out_dir: str | os.PathLike, *, batch_size: int = 8,
                  max_iter: int = 2, shard_size: int = 1024, deep_ce=None, confidence: float | None = None,
                  prompt_easy: bool = False, save_stats: bool = False, progress: bool = True,
                  reference_name: str | None = None) -> dict:
    """Label `dataset` (columns input_ids, labels, e.g. from `build_dataset`) with `reference_model`
    and write the result to `out_dir` (layout in `tah.data.shards`): a `datasets` dataset with
    input_ids, labels, iter_labels (and ref_entropy, ref_ce per token with `save_stats`) and
    stats.json. Returns the stats dict (rows, hard_share, assistant_hard_share, iter_histogram, ...).

    Work goes in shards of `shard_size` rows, each written atomically; a rerun of a killed run skips
    the finished shards. Under `accelerate launch`, process i labels shards i, i + n, ... and the
    main process merges. Batches are the rows of one shard sorted by length, so any run of the same
    settings writes the same labels. Raises `InputError` on bad settings, or when `out_dir` holds a
    run with other settings or data (the reference is named by `reference_name`, default its
    config's name_or_path)."""
    from accelerate import PartialState

    thresholds = check_rule(max_iter, deep_ce)
    confidence = check_confidence(confidence)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    missing = [c for c in ("input_ids", "labels") if c not in dataset.column_names]
    if missing or len(dataset) == 0:
        raise InputError(f"the dataset to label needs rows with input_ids and labels (e.g. from build_dataset); "
                         f"got {len(dataset)} rows with columns {dataset.column_names}")
    state = PartialState()
    store = ShardStore(out_dir)
    name = reference_name or getattr(getattr(reference_model, "config", None), "_name_or_path", None)
    manifest = {"format": 1, "rows": len(dataset), "data_sha256": fingerprint(dataset), "shard_size": shard_size,
                "max_iter": max_iter, "deep_ce": thresholds, "save_stats": save_stats,
                "reference": name or type(reference_model).__name__}
    if confidence is not None:  # only when set: runs labelled before the option existed still resume
        manifest["confidence"] = confidence
    if prompt_easy:
        manifest["prompt_easy"] = True
    store.check_manifest(manifest)  # every process, before anyone writes: all raise alike
    state.wait_for_everyone()
    if state.is_main_process:
        store.claim(manifest)
    state.wait_for_everyone()
    if not store.done():
        num_shards = -(-len(dataset) // shard_size)
        sizes = [min(shard_size, len(dataset) - i * shard_size) for i in range(num_shards)]
        mine = range(state.process_index, num_shards, state.num_processes)
        todo = [i for i in mine if not store.ready(i, sizes[i])]
        if len(todo) < len(mine) and state.is_main_process:
            print(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already done", file=sys.stderr)
        _label_shards(reference_model, dataset, store, todo, sizes, batch_size=batch_size, max_iter=max_iter,
                      deep_ce=thresholds, confidence=confidence, prompt_easy=prompt_easy, save_stats=save_stats,
                      progress=progress and state.is_main_process)
        state.wait_for_everyone()
        if state.is_main_process:
            counts = store.merge(num_shards)
            write_json(store.stats, summarize(counts, manifest))
            store.cleanup()
        state.wait_for_everyone()
    return json.loads(store.stats.read_text())


def _label_shards(model, dataset, store: ShardStore, todo: list[int], sizes: list[int], *, batch_size: int,
                  max_iter: int, deep_ce, confidence: float | None, prompt_easy: bool, save_stats: bool,
                  progress: bool) -> None:
    import datasets
    from tqdm.auto import tqdm

    shard_size = sizes[0]
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    collate = TaHCollator(0)  # the pad id is masked out; any id will do
    names = ["input_ids", "labels", "iter_labels"] + (["ref_entropy", "ref_ce"] if save_stats else [])
    features = datasets.Features({n: datasets.List(datasets.Value("float32" if n.startswith("ref_") else "int32"))
                                  for n in names})
    with tqdm(total=sum(sizes[i] for i in todo), desc="labelling", unit="row", disable=not progress) as bar:
        for index in todo:
            rows = dataset.select(range(index * shard_size, index * shard_size + sizes[index]))
            ids, labels = rows["input_ids"][:], rows["labels"][:]  # lists: a row index into a column reads Arrow anew
            out: list[dict] = [{} for _ in ids]
            order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))  # longest first: OOM shows early
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = collate([{"input_ids": ids[i], "labels": labels[i]} for i in chunk])
                result = label_batch(model, batch["input_ids"], batch["attention_mask"], max_iter, deep_ce,
                                     confidence, batch["labels"] if prompt_easy else None)
                for row, i in enumerate(chunk):
                    out[i] = {key: value[row, :len(ids[i])] for key, value in result.items()}
                bar.update(len(chunk))
            columns = {"input_ids": ids, "labels": labels}
            for name in names[2:]:
                columns[name] = [o[name].tolist() for o in out]
            counts = shard_counts(labels, out, max_iter)
            store.write(index, datasets.Dataset.from_dict(columns, features=features), counts)
            if pause:
                time.sleep(pause)


def shard_counts(labels: list[list[int]], out: list[dict], max_iter: int) -> dict:
    """Token counts of one shard. "assistant" positions are those predicting an assistant token."""
    counts = {"rows": len(labels), "labelled": 0, "hard": 0, "assistant": 0, "assistant_hard": 0,
              "ce_sum": 0.0, "assistant_ce_sum": 0.0, "histogram": [0] * (max_iter + 1), "pid": os.getpid()}
    for row_labels, result in zip(labels, out, strict=True):
        iters, ce = result["iter_labels"], result["ref_ce"].double()
        labelled = iters != IGNORE
        assistant = labelled.clone()
        assistant[:-1] &= torch.tensor(row_labels[1:]) != IGNORE
        counts["labelled"] += int(labelled.sum())
        counts["hard"] += int((iters >= 2).sum())
        counts["assistant"] += int(assistant.sum())
        counts["assistant_hard"] += int((assistant & (iters >= 2)).sum())
        counts["ce_sum"] += float(ce[labelled].sum())
        counts["assistant_ce_sum"] += float(ce[assistant].sum())
        for depth, n in enumerate(torch.bincount(iters[labelled], minlength=max_iter + 1).tolist()):
            counts["histogram"][depth] += n
    return counts


def summarize(counts: list[dict], manifest: dict) -> dict:
    total = {key: sum(c[key] for c in counts) for key in ("rows", "labelled", "hard", "assistant",
                                                          "assistant_hard", "ce_sum", "assistant_ce_sum")}
    histogram = [sum(c["histogram"][k] for c in counts) for k in range(manifest["max_iter"] + 1)]
    share = lambda a, b: a / b if b else 0.0  # noqa: E731
    return {"rows": total["rows"], "labelled_tokens": total["labelled"], "hard_tokens": total["hard"],
            "hard_share": share(total["hard"], total["labelled"]), "assistant_tokens": total["assistant"],
            "assistant_hard_tokens": total["assistant_hard"],
            "assistant_hard_share": share(total["assistant_hard"], total["assistant"]),
            "mean_reference_ce": share(total["ce_sum"], total["labelled"]),
            "assistant_mean_reference_ce": share(total["assistant_ce_sum"], total["assistant"]),
            "iter_histogram": {str(k): histogram[k] for k in range(1, len(histogram))},
            "max_iter": manifest["max_iter"], "deep_ce": manifest["deep_ce"],
            "confidence": manifest.get("confidence"), "prompt_easy": manifest.get("prompt_easy", False),
            "reference": manifest["reference"],
            "shards": [{"rows": c["rows"], "hard_tokens": c["hard"], "written_by_pid": c["pid"]} for c in counts]}


def fingerprint(dataset) -> str:
    """sha256 of the input_ids and labels of every row (a resumed run must label the same data)."""
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    for batch in dataset.select_columns(["input_ids", "labels"]).with_format("arrow").iter(batch_size=4096):
        for name in ("input_ids", "labels"):
            column = batch.column(name)
            for part in (pc.list_value_length(column), pc.list_flatten(column)):
                digest.update(part.to_numpy().astype("int64").tobytes())
    return digest.hexdigest()


def load_labeled(path: str | os.PathLike):
    """The labelled dataset `tah label --out PATH` wrote (give PATH or PATH/dataset): a
    `datasets.Dataset` with input_ids, labels, iter_labels (and ref_* columns with --save-stats).
    Raises `InputError` when PATH is not one, or its labelling run is unfinished."""
    import datasets

    path = Path(path)
    store = ShardStore(path)
    target = store.dataset if store.dataset.is_dir() else path
    if not ((target / "state.json").exists() or (target / "dataset_dict.json").exists()):
        if path.is_file():
            raise InputError(f"{path} is a file, not a labelled dataset; run `tah label --model REF_DIR --data "
                             f"{path} --out LABELED_DIR` and use LABELED_DIR")
        if store.manifest.exists():
            raise InputError(f"the labelling run in {path} is unfinished; rerun the same `tah label` command "
                             "to resume and finish it")
        raise InputError(f"{path} is not a labelled dataset; run `tah label --model REF_DIR --data DATA.jsonl "
                         f"--out {path}` first")
    data = datasets.load_from_disk(str(target))
    if isinstance(data, datasets.DatasetDict):
        data = data["train"] if "train" in data else next(iter(data.values()))
    missing = [c for c in ("input_ids", "labels", "iter_labels") if c not in data.column_names]
    if missing:
        raise InputError(f"{target} is a dataset without {', '.join(missing)}, not a labelled one; run "
                         "`tah label` on the data first")
    return data
