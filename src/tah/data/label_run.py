"""`run_label`: hard-token labels of a data file by a reference model directory (`tah label`)."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState

from tah.data.chat import build_dataset
from tah.data.label import check_confidence, check_rule, label_dataset
from tah.data.shards import write_json
from tah.errors import CheckpointError, InputError
from tah.model.checkpoint import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_label(model: str, data: str, out: str, *, tokenizer: str | None = None, max_length: int = 2048,
              batch_size: int = 8, shard_size: int = 1024, max_iter: int = 2, deep_ce: list[float] | None = None,
              confidence: float | None = None, prompt_easy: bool = False, strict: bool = False, save_stats: bool = False, dtype: str = "auto", progress: bool = True) -> dict:
    """Run a reference model teacher-forced over chat data and mark the hard tokens: those where the
    reference's argmax is not the true next token (with --confidence P, also those it predicts right
    with a probability below P: the tokens it is unsure of). Writes OUT/dataset (a `datasets` dataset with
    input_ids, labels, iter_labels; plus ref_entropy and ref_ce with --save-stats) and OUT/stats.json.

    iter_labels[t] = passes for the prediction at position t (of token t+1): 1 easy, 2 hard, -100 for
    the last position and padding. With --max-iter N > 2, a hard token gets 2 + k passes, k = how many
    of the N-2 --deep-ce thresholds (nats, increasing) the reference's cross-entropy on it exceeds.

    The run is written in shards, each atomically: rerun the same command after a crash to resume.
    Under `accelerate launch --num_processes N -m tah.cli label ...` (or `torchrun --nproc_per_node N
    -m tah.cli label ...`; on a CPU-only machine add `--multi_gpu` to accelerate launch, which then runs
    N CPU processes) every process labels its share of the shards.

    Args:
        model, data, out, tokenizer, max_length, batch_size, shard_size, max_iter, deep_ce, confidence,
        prompt_easy, strict, save_stats, dtype: as `tah label`'s options of the same names (dtype "auto": bfloat16 on a
        GPU, float32 on CPU). progress: draw a progress bar.
    Returns:
        The stats of `label_dataset`, with what the data held (rows kept and skipped) under "data".
    Raises:
        InputError for bad settings or data, CheckpointError for a model directory that cannot load,
        both before any labelling.
    """
    check_rule(max_iter, deep_ce)  # fail before loading anything
    check_confidence(confidence)
    # cpu=True without CUDA: processes started by `accelerate launch --multi_gpu` / torchrun then talk
    # over gloo (accelerate's own --cpu launcher starts one process unless MPI is set up). Long
    # timeout: on a resumed run one process may have many more shards left than another.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=24))
    say = print if state.is_main_process else (lambda *a, **k: None)
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"reference model directory {model_dir} does not exist or has no config.json; "
                              "give a directory written by save_pretrained")
    text_tokenizer = load_tokenizer(tokenizer or model, "give --tokenizer DIR with the reference model's tokenizer files")
    dataset, report = build_dataset(data, text_tokenizer, max_length, strict=strict, return_report=True)
    say(f"data: {report.summary()}", file=sys.stderr)
    reference = _load_reference(model_dir, DTYPES.get(dtype) or _default_dtype(state))
    reference = reference.to(state.device).eval()
    vocab = reference.get_input_embeddings().num_embeddings
    top = max(max(ids) for ids in dataset["input_ids"])
    if top >= vocab:
        raise InputError(f"the tokenizer produced id {top} but the reference model has {vocab} embeddings; "
                         "use the reference model's own tokenizer (--tokenizer)")
    stats = label_dataset(reference, dataset, out, batch_size=batch_size, max_iter=max_iter, shard_size=shard_size,
                          deep_ce=deep_ce, confidence=confidence, prompt_easy=prompt_easy,
                          save_stats=save_stats, progress=progress,
                          reference_name=str(model_dir.resolve()))
    stats["data"] = {"source": report.source, "rows": report.total, "kept": report.kept,
                     "skipped": len(report.skipped), "first_skipped": report.skipped[:5]}
    if state.is_main_process:
        write_json(Path(out) / "stats.json", stats)
    passes = ", ".join(f"{k}: {n}" for k, n in stats["iter_histogram"].items())
    say(f"labelled {stats['rows']} rows, {stats['labelled_tokens']} tokens: {stats['hard_share']:.1%} hard "
        f"overall, {stats['assistant_hard_share']:.1%} on assistant tokens (tokens by passes: {passes})")
    say(f"wrote {Path(out) / 'dataset'} and {Path(out) / 'stats.json'}")
    return stats


def _default_dtype(state: PartialState) -> torch.dtype:
    return torch.bfloat16 if state.device.type == "cuda" else torch.float32


def _load_reference(model_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the reference model from {model_dir}: {err}") from err
