"""`train(recipe)`: one run of stage 1, stage 2 or a baseline, from a checked `Recipe`.

    stage 1            base HF model + fresh LoRA; oracle `iter_labels` choose who iterates;
                       base and LoRA train on next-token CE (the decider is frozen).
    stage 2            a stage-1 checkpoint; base and LoRA frozen; the decider trains on BCE.
    baseline standard  the same SFT with one pass (max_iter 1, no LoRA).
    baseline always    every token iterates once (max_iter 2, decider "always").

The final model lands in `OUTPUT_DIR/final` (our layout + tokenizer); checkpoints in
`OUTPUT_DIR/checkpoint-N`, which `--resume` continues from. An output_dir that already holds a run
needs `resume` or `overwrite` (`tah.train.checkpoints`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainingArguments, set_seed

from tah.errors import ConfigError, InputError
from tah.model.checkpoint import load_tokenizer
from tah.model.decider import build_decider
from tah.model.tah_model import TaHForCausalLM
from tah.train import checkpoints
from tah.train.recipe import Recipe
from tah.train.trainer import StopAtLoss, TaHTrainer, clean_staging

DECIDER_SHAPE = ("decider", "decider_layers", "decider_hidden_dims", "decider_topk", "decider_expansion")


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, callbacks: Sequence = ()) -> Path:
    """Train stage 1, stage 2 or a baseline from a YAML recipe. Stage 1 trains base + LoRA with oracle
    hard-token labels choosing who iterates; stage 2 trains the decider of a stage-1 checkpoint;
    `baseline: standard | always` runs the same recipe with one pass / every token iterating.
    Checkpoints go to OUTPUT_DIR/checkpoint-N, the final model to OUTPUT_DIR/final. Runs under
    `accelerate launch` for several processes.

    Args:
        recipe: a checked recipe (`tah.train.recipe.load_recipe`: the YAML and its --set overrides).
        resume: continue from the newest complete checkpoint-N in output_dir.
        overwrite: discard the run already in output_dir (checkpoint-N, final/) and start at step 0.
        callbacks: `transformers.TrainerCallback`s added to the Trainer (e.g. experiments/toy-depth/layerdrop.py's LayerDrop).
    Returns:
        The directory of the final model.
    Raises:
        InputError: `resume` with no complete checkpoint; an output_dir holding a run without
            `resume` or `overwrite`; missing paths or unlabelled data for a TaH stage.
    """
    _check_paths(recipe)
    out = Path(recipe.output_dir)
    checkpoint = _resume_point(out, resume, overwrite)
    tokenizer = _tokenizer(recipe)
    train_data = _dataset(recipe, recipe.data, tokenizer)
    eval_data = _dataset(recipe, recipe.eval_data, tokenizer) if recipe.eval_data else None
    set_seed(recipe.training.seed)  # fresh LoRA A and the decider are random: same seed, same start
    model = _model(recipe)
    if recipe.training.compile_deep_passes:
        model.compile_deep_passes()
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    args = _training_arguments(recipe, processes, has_eval=eval_data is not None)
    from tah.data import TaHCollator

    trainer = TaHTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                         data_collator=TaHCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                         base_lr_ratio=recipe.training.base_lr_ratio)
    if recipe.training.stop_at_loss is not None:
        trainer.add_callback(StopAtLoss(recipe.training.stop_at_loss))
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=checkpoint)
    final = out / "final"
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        _write_json(out / "recipe.json", {"recipe": dataclasses.asdict(recipe), "final": str(final), "processes": trainer.args.world_size,
                                          "log_history": trainer.state.log_history})
    trainer.accelerator.wait_for_everyone()
    return final


def _resume_point(out: Path, resume: bool, overwrite: bool) -> str | None:
    """The checkpoint to continue from (None: start at step 0), after checking output_dir."""
    checkpoints.check_output_dir(out, resume, overwrite)
    if out.exists():
        clean_staging(out)
    say = checkpoints.say_on_main_process
    if not resume:
        if overwrite and os.environ.get("RANK", "0") == "0":
            removed = checkpoints.discard_run(out)
            if removed:
                say(f"--overwrite: removed {', '.join(removed)} from {out}; starting at step 0")
        return None
    checkpoint = checkpoints.resume_point(out, say=say)
    say(f"resuming from {checkpoint} (step {checkpoints.checkpoint_step(checkpoint)})")
    return str(checkpoint)


def _check_paths(recipe: Recipe) -> None:
    """Name a missing input path before loading anything (transformers would read a missing directory as
    a model hub name and report a failed download)."""
    for key in ("model", "tokenizer"):
        path = getattr(recipe, key)
        if path is not None and not Path(path).is_dir():
            raise InputError(f"{key}: no such directory {path}; point it at a local model directory (config.json, "
                             "weights, tokenizer files): tah never downloads from the model hub")
    for key in ("data", "eval_data"):
        path = getattr(recipe, key)
        if path is not None and not Path(path).exists():
            raise InputError(f"{key}: no such file or directory {path}; give `tah label` output, a JSONL file or "
                             "a `datasets` directory")


def _tokenizer(recipe: Recipe):
    source = recipe.tokenizer or recipe.model
    tokenizer = load_tokenizer(source, "set `tokenizer:` in the recipe")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dataset(recipe: Recipe, path: str, tokenizer):
    """Labelled data for TaH runs; baselines also take raw chat data (iter_labels are dropped)."""
    from tah.data import build_dataset, load_labeled

    needs_labels = recipe.baseline is None
    labelled = _is_labelled(path)
    if needs_labels and not labelled:
        raise InputError(f"{path} has no hard-token labels (iter_labels); stage {recipe.stage} needs them: "
                         f"run `tah label --model REFERENCE --data {path} --out LABELED` and point `data` there")
    data = load_labeled(path) if labelled else build_dataset(path, tokenizer, recipe.max_length)
    if not needs_labels and "iter_labels" in data.column_names:
        data = data.remove_columns("iter_labels")
    keep = [c for c in ("input_ids", "labels", "iter_labels") if c in data.column_names]
    data = data.select_columns(keep)
    if any(len(ids) > recipe.max_length for ids in data["input_ids"]):
        data = data.map(lambda row: {c: row[c][:recipe.max_length] for c in keep}, desc="truncating")
    return data


def _is_labelled(path: str) -> bool:
    from tah.data import load_labeled

    try:
        load_labeled(path)
    except InputError:
        return False
    return True


def _model(recipe: Recipe) -> TaHForCausalLM:
    config = recipe.tah_config()
    source = Path(recipe.model)
    is_tah = (source / "tah_config.json").is_file()
    if recipe.stage == 2 and not is_tah:
        raise InputError(f"stage 2 trains the decider of a stage-1 checkpoint, and {source} has no "
                         "tah_config.json: point `model` at a stage-1 run's final/ directory")
    if not is_tah:
        try:
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError) as err:
            raise InputError(f"cannot load a Hugging Face causal LM from {source}: {err}") from err
        return TaHForCausalLM.from_base(lm, config)
    model = TaHForCausalLM.from_pretrained(source, dtype=torch.float32)
    old = model.tah_config
    if old.max_iter == 1 and recipe.stage == 1:  # a one-pass checkpoint is a base model: fresh adapters
        return TaHForCausalLM.from_base(model.lm, config)
    architecture = ("max_iter", "lora_rank", "lora_target_modules", "lora_per_depth")
    changed = [k for k in architecture if recipe.tah.get(k, getattr(old, k)) != getattr(old, k)]
    if changed:
        raise ConfigError(f"tah.{changed[0]} differs from the checkpoint {source} ({getattr(old, changed[0])!r}); "
                          "the adapters it holds cannot change shape: drop the key from the recipe")
    merged = old.replace(**{**recipe.tah, "training_stage": recipe.stage})
    if any(getattr(merged, k) != getattr(old, k) for k in DECIDER_SHAPE):  # stage 1 never trained it
        model.decider = build_decider(merged, model.config.get_text_config().hidden_size, model.num_layers)
    model.tah_config = merged
    model.set_threshold(merged.threshold)
    model.set_training_stage(recipe.stage)
    return model


def _training_arguments(recipe: Recipe, processes: int, has_eval: bool) -> TrainingArguments:
    t = recipe.training
    scheduler_kwargs = {"min_lr_rate": t.min_lr_ratio} if t.lr_scheduler == "cosine_with_min_lr" else {}
    every = t.eval_steps or t.save_steps
    return TrainingArguments(
        output_dir=recipe.output_dir, per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.accumulation_steps(processes), learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, lr_scheduler_kwargs=scheduler_kwargs, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, num_train_epochs=t.epochs,
        max_steps=t.max_steps, bf16=t.bf16, seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps,
        save_steps=t.save_steps, save_total_limit=t.save_total_limit, report_to=t.report_to or "none",
        eval_strategy="steps" if has_eval else "no", eval_steps=every if has_eval else None,
        remove_unused_columns=False, dataloader_num_workers=t.dataloader_num_workers,
        use_cpu=not torch.cuda.is_available(),
    )


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)
