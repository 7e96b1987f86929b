"""What `tah train` does with an output_dir that already holds a run: refuse, resume or overwrite.

Standard library only, so `tah train` decides before torch loads. A rerun without `--resume` or
`--overwrite` is refused (it would restart at step 0 and overwrite the checkpoints). `--resume`
continues from the newest *complete* checkpoint-N: one whose files are all whole (a truncated
safetensors, JSON or torch file, e.g. from a full disk or a partial copy, sends it back to the
previous one, saying so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import zipfile
from pathlib import Path

from tah.errors import InputError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
REQUIRED = ("trainer_state.json", "tah_config.json", "config.json")  # what resuming reads besides weights
RUN_FILES = ("final", "recipe.json")  # what a run writes at its end, besides checkpoint-N


def existing_run(out: Path) -> list[str]:
    """Names of what an earlier run left in `out` (checkpoint-N directories, final/, recipe.json)."""
    if not out.is_dir():
        return []
    names = sorted((p.name for p in out.iterdir() if CHECKPOINT.match(p.name)), key=_step)
    return names + [name for name in RUN_FILES if (out / name).exists()]


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse contradicting flags, and a fresh start over an earlier run. Raises `InputError`."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other: --resume continues the run in "
                         "output_dir, --overwrite discards it")
    found = existing_run(out)
    if found and not resume and not overwrite:
        raise InputError(f"output_dir {out} already holds a run ({', '.join(found)}); starting again would "
                         "overwrite it: add --resume to continue from its last checkpoint, --overwrite to discard "
                         "it and start at step 0, or --set output_dir=ANOTHER_DIR")


def discard_run(out: Path) -> list[str]:
    """Remove an earlier run's checkpoint-N, final/ and recipe.json from `out` (nothing else); returns
    their names."""
    found = existing_run(out)
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found


def resume_point(out: Path, say=print) -> Path:
    """The newest complete checkpoint-N in `out`; each newer, incomplete one is named through `say`
    with what is wrong with it. Raises `InputError` when there is none."""
    candidates = sorted((p for p in out.iterdir() if CHECKPOINT.match(p.name) and p.is_dir()),
                        key=lambda p: _step(p.name), reverse=True) if out.is_dir() else []
    if not candidates:
        raise InputError(f"--resume: no checkpoint-N directory in {out}; run without --resume to start fresh")
    broken = []
    for checkpoint in candidates:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        say(f"{checkpoint.name} is incomplete ({problem}): falling back to the checkpoint before it")
        broken.append(f"{checkpoint.name}: {problem}")
    raise InputError(f"--resume: no complete checkpoint in {out} ({'; '.join(broken)}); rerun with --overwrite "
                     "to start over")


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint directory `path` cannot be resumed from (a missing or truncated file), or None."""
    for name in REQUIRED:
        if not (path / name).is_file():
            return f"{name} is missing"
    if not any(path.glob("model*.safetensors")):
        return "model.safetensors is missing"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        problem = _file_problem(file)
        if problem is not None:
            return f"{file.relative_to(path)} {problem}"
    return None


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint was saved at (trainer_state.json's global_step)."""
    return int(json.loads((path / "trainer_state.json").read_text())["global_step"])


def say_on_main_process(message: str) -> None:
    """Print `message` once per run (on process 0 under accelerate launch / torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)


def _file_problem(file: Path) -> str | None:
    suffix = file.suffix
    if suffix == ".safetensors":
        return _safetensors_problem(file)
    if suffix == ".json":
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return "is not valid JSON (truncated?)"
    if suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):
        return "is truncated (not a whole torch.save archive)"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes: the
    file must be as long as the header says."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return f"is truncated ({size} bytes)"
        (length,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "is truncated (its header does not parse)"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    expected = 8 + length + max(ends, default=0)
    return None if size >= expected else f"is truncated ({size} of {expected} bytes)"


def _step(name: str) -> int:
    return int(CHECKPOINT.match(name).group(1))
