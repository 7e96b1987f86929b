"""`TaHTrainer`: HF `Trainer` (accelerate underneath) for stage 1, stage 2 and the baselines.

What it adds to `Trainer`:
- the stage-1 loss normalised by HF's `num_items_in_batch`, so gradient accumulation and several
  processes weigh every supervised token alike (a 2-process run follows the 1-process loss curve);
- logged metrics: `iterated` (share of real tokens that ran a second pass) and, in stage 2, the
  decider's `decider_accuracy` / `decider_precision` / `decider_recall` at the inference threshold;
- `base_lr_ratio`: the base model's weights may train at a share of the learning rate, the LoRA
  adapters and the decider at the whole of it;
- checkpoints in our layout (`save_pretrained`), each written under `.staging/` and renamed into
  place, so a kill while saving never leaves a half-written `checkpoint-N` behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from tah.model.tah_model import TaHForCausalLM

STAGING = ".staging"
COUNTERS = ("real", "iterated", "tp", "fp", "fn", "tn")


class TaHTrainer(Trainer):
    """A `Trainer` whose model is a `TaHForCausalLM` (see the module docstring).

    base_lr_ratio: the learning rate of the base model's own weights (everything but the LoRA
    adapters and the decider) as a share of `args.learning_rate`, schedule included; 1 is one rate.
    """

    def __init__(self, *args, base_lr_ratio: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.base_lr_ratio = base_lr_ratio
        self.loss_is_scaled_for_ga = self.model.tah_config.training_stage == 1
        # COUNTERS summed since the last log, on the batches' device: read (one host sync) only when logging
        self._counts: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self._staging_root: str | None = None

    # -- loss and metrics ----------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stage1 = self.model.tah_config.training_stage == 1
        extra = {"num_items_in_batch": num_items_in_batch} if stage1 and num_items_in_batch is not None else {}
        outputs = model(**inputs, **extra)
        loss = outputs.loss
        if extra and self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count was global
        self._count(outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _count(self, outputs, inputs) -> None:
        real = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
        counts = [real.sum(), (real & (outputs.iter_count > 1)).sum()]
        if outputs.decider_logits is not None:
            threshold = self.model.tah_config.threshold
            predicted = torch.sigmoid(outputs.decider_logits.float()) > threshold
            target = outputs.decider_targets.bool()
            counts += [(predicted & target).sum(), (predicted & ~target).sum(), (~predicted & target).sum(),
                       (~predicted & ~target).sum()]
        else:
            counts += [real.new_zeros((), dtype=torch.long)] * 4
        split = "train" if self.model.training else "eval"
        step = torch.stack(counts)  # (6,) int64 where the batch is: summed without waiting on the device
        self._counts[split] = step if self._counts[split] is None else self._counts[split].add_(step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train" if "loss" in logs else None
        if split is not None:
            counts = self._counts[split]
            counts = torch.zeros(len(COUNTERS), dtype=torch.long) if counts is None else counts
            # every process reduces (even one with no batch since the last log); .cpu() is the one sync
            totals = self.accelerator.reduce(counts.to(self.accelerator.device), reduction="sum").cpu()
            self._counts[split] = None
            logs.update({("eval_" if split == "eval" else "") + k: v for k, v in _metrics(totals).items()})
        super().log(logs, start_time)

    # -- optimiser -----------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """HF's optimiser, its parameter groups split into base weights (at `base_lr_ratio` of the
        rate) and adapters; the schedule scales every group's own rate, so the ratio holds throughout."""
        optimizer = super().create_optimizer(model)
        if self.base_lr_ratio == 1.0:
            return optimizer
        names = {id(p): n for n, p in (model or self.model).named_parameters()}
        groups, optimizer.param_groups = optimizer.param_groups, []  # no step taken yet: no state to move
        for group in groups:
            for base in (False, True):
                params = [p for p in group["params"] if is_base_weight(names[id(p)]) == base]
                if params:
                    lr = group["lr"] * (self.base_lr_ratio if base else 1.0)
                    optimizer.add_param_group({**group, "params": params, "lr": lr})
        return optimizer

    # -- checkpoints ---------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Our layout (safetensors + JSON) instead of a bare state dict; the tokenizer next to it."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        saved = TaHForCausalLM.from_pretrained(resume_from_checkpoint)
        model.load_state_dict(saved.state_dict())

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write checkpoint-N under .staging/, then rename it into place (atomic on one filesystem)."""
        run_dir = super()._get_output_dir(trial)
        self._staging_root = os.path.join(run_dir, STAGING)
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(os.path.join(self._staging_root, name), ignore_errors=True)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = Path(run_dir) / name
            if final.exists():  # a rerun of the same step: replace it
                shutil.rmtree(final)
            os.replace(Path(run_dir) / STAGING / name, final)
            clean_staging(run_dir)
            self._rotate_into(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate_into(self, run_dir: str) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)


class StopAtLoss(TrainerCallback):
    """Ends training at the first logged training loss <= `target` (the mean over a logging window of
    `logging_steps`; every process logs the same gathered mean, so all stop together). For a base
    trained to a quality rather than a step count: seeds that learn slowly get more steps."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and logs["loss"] <= self.target:
            control.should_training_stop = True
        return control


def _metrics(totals: torch.Tensor) -> dict[str, float]:
    real, iterated, tp, fp, fn, tn = totals.tolist()
    out = {"iterated": iterated / real if real else 0.0}
    judged = tp + fp + fn + tn
    if judged:
        out["decider_accuracy"] = (tp + tn) / judged
        out["decider_precision"] = tp / (tp + fp) if tp + fp else 0.0
        out["decider_recall"] = tp / (tp + fn) if tp + fn else 0.0
    return out


def is_base_weight(name: str) -> bool:
    """Whether the parameter `name` of a TaHForCausalLM is the wrapped model's own (not a LoRA adapter's
    or the decider's), whatever prefix a wrapper (DDP's `module.`) adds to it."""
    parts = name.split(".")
    return "lm" in parts and "decider" not in parts and not any(part.startswith("lora_") for part in parts)


def clean_staging(run_dir: str | Path) -> None:
    """Drop what a killed save left under .staging/ (never a finished checkpoint)."""
    shutil.rmtree(Path(run_dir) / STAGING, ignore_errors=True)
