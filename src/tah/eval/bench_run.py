"""`tah eval`: generate answers to a benchmark with a TaH model, grade them, write samples and summary.

Each question goes through the tokenizer's chat template as the user's message (optionally with
an instruction, `prompt_template`), and is answered `samples` times by `tah.generate`. The
(problem, sample) pairs, problem-major in file order, are cut into batches of `batch_size`; each
batch is generated, graded and then written (samples.jsonl and summary.json, atomically). A rerun
skips every batch whose pairs are all in samples.jsonl, so a killed run loses one batch at most.

Reproducibility: a batch is always the same pairs (for the same --samples, --batch-size and the
pairs before --limit) and, when sampling, draws from a generator seeded by a hash of (seed, its
pairs). So a resumed run writes exactly what an uninterrupted one does: it does not matter where
it was stopped. Changing --batch-size changes the batches, hence the sampled (not the greedy)
answers; rows of one batch are decoded together, so greedy results can also move in the last
bits of floating point across batch sizes.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tah.errors import CheckpointError, InputError
from tah.eval.bench_files import (
    read_samples,
    read_summary,
    remove_stale_temporaries,
    summarize,
    write_samples,
    write_summary,
)
from tah.eval.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S
from tah.eval.tasks import Loaded, Problem, Task

# The original evaluation's settings (Qwen3's recommended sampling for thinking mode).
TEMPERATURE, TOP_P, TOP_K, MAX_NEW_TOKENS, THRESHOLD = 0.6, 0.95, 20, 4096, 0.9
PROMPT_PRESETS = {"boxed": "Please reason step by step, and put your final answer within \\boxed{}."}
# Settings that must match for a rerun to resume into the same directory (limit may grow or shrink).
RESUME_KEYS = ("threshold", "max_iter", "temperature", "top_p", "top_k", "max_new_tokens", "greedy",
               "prompt_template", "samples", "seed")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class EvalOptions:
    task: Task
    data: str
    model: str
    out: str
    tokenizer: str | None = None
    thresholds: list[float] = field(default_factory=lambda: [THRESHOLD])
    max_iter: int | None = None  # None: the checkpoint's
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    top_k: int = TOP_K
    max_new_tokens: int = MAX_NEW_TOKENS
    greedy: bool = False
    samples: int = 1
    limit: int | None = None
    seed: int = 0
    batch_size: int = 8
    prompt_template: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = DEFAULT_MEMORY_MB
    workers: int | None = None
    progress: bool = True


def prompt_text(question: str, template: str | None) -> str:
    """The user's message: the question, with the template's {question} filled, or the template
    (an instruction) on a line after the question."""
    if template is None:
        return question
    if "{question}" in template:
        return template.replace("{question}", question)
    return f"{question}\n{template}"


def resolve_template(template: str | None) -> str | None:
    return PROMPT_PRESETS.get(template, template)


def run_dir(out: str, threshold: float, several: bool) -> Path:
    """Where one threshold's run goes: OUT itself, or OUT/threshold-<t> when several are asked."""
    return Path(out) / f"threshold-{threshold:g}" if several else Path(out)


def settings_of(options: EvalOptions, threshold: float, max_iter: int) -> dict:
    return {"threshold": threshold, "max_iter": max_iter, "temperature": options.temperature,
            "top_p": options.top_p, "top_k": options.top_k, "max_new_tokens": options.max_new_tokens,
            "greedy": options.greedy, "prompt_template": resolve_template(options.prompt_template),
            "samples": options.samples, "limit": options.limit, "seed": options.seed,
            "batch_size": options.batch_size}


def check_options(options: EvalOptions) -> None:
    """Refuse bad numbers before anything loads; raises InputError naming the option."""
    checks = [("--samples", options.samples, options.samples >= 1),
              ("--batch-size", options.batch_size, options.batch_size >= 1),
              ("--max-new-tokens", options.max_new_tokens, options.max_new_tokens >= 1),
              ("--limit", options.limit, options.limit is None or options.limit >= 1),
              ("--temperature", options.temperature, options.temperature > 0),
              ("--top-p", options.top_p, 0 < options.top_p <= 1),
              ("--top-k", options.top_k, options.top_k >= 0),
              ("--timeout", options.timeout_s, options.timeout_s > 0)]
    for name, value, ok in checks:
        if not ok:
            raise InputError(f"{name} {value}: out of range; see tah eval --help")
    for threshold in options.thresholds:
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"--threshold {threshold:g}: a decider threshold is a probability in [0, 1]")


def check_checkpoint(model: str, tokenizer: str | None) -> None:
    """The checkpoint and its tokenizer exist (checked before torch loads, so errors come fast)."""
    if not (Path(model) / "config.json").is_file():
        raise CheckpointError(f"--model {model}: no checkpoint there (no config.json); give a directory written "
                              "by TaHForCausalLM.save_pretrained or the original implementation")
    where = Path(tokenizer or model)
    if not any((where / name).is_file() for name in TOKENIZER_FILES):
        option = "--tokenizer" if tokenizer else "--model"
        raise CheckpointError(f"{option} {where}: no tokenizer there (tokenizer.json or tokenizer_config.json); "
                              "save the model's tokenizer next to it (tokenizer.save_pretrained) or give "
                              "--tokenizer DIR")


def check_resumable(directory: Path, task: str, model: str, settings: dict, ignore: tuple[str, ...] = ()) -> None:
    """A directory that already holds a run must hold this run (same task, model and settings, but
    for the `ignore`d ones)."""
    summary = read_summary(directory / "summary.json")
    if summary is None:
        return
    theirs = {"task": summary.get("task"), "model": summary.get("model"),
              **{key: summary.get("settings", {}).get(key) for key in RESUME_KEYS}}
    ours = {"task": task, "model": model, **{key: settings[key] for key in RESUME_KEYS}}
    differ = [f"{key} {theirs[key]!r} there, {ours[key]!r} now" for key in ours
              if theirs[key] != ours[key] and key not in ignore]
    if differ:
        raise InputError(f"{directory} holds another run ({'; '.join(differ)}); rerun with its options to "
                         "resume it, or give another --out")


def run_eval(options: EvalOptions, loaded: Loaded) -> list[dict]:
    """Answer a benchmark with a TaH model and grade the answers: accuracy next to the share of tokens
    that iterated. Writes OUT/samples.jsonl (a line per problem and sample) and OUT/summary.json, each
    atomically after every batch; rerun the same command to resume (finished batches are skipped).

    Tasks (local files; ../shared/benchmarks/ has them): gsm8k, math500, aime24, aime25, amc23,
    humaneval, and math (any JSONL with a question/problem and an answer field). Math answers are
    graded by math-verify (the \\boxed{} answer against the gold); HumanEval runs the benchmark's tests
    on prompt + completion in a sandboxed subprocess (time and memory limits, no network).

    Defaults are the original evaluation's: the raw question through the tokenizer's chat template,
    temperature 0.6, top_p 0.95, top_k 20, max_new_tokens 4096, decider threshold 0.9, the
    checkpoint's max_iter (2 in the paper's). With several --threshold values, each run goes to
    OUT/threshold-<t>/ and they share the loaded model.

      tah eval --model CKPT --task gsm8k --data ../shared/benchmarks/gsm8k_test.jsonl --out runs/gsm8k
      tah eval --model CKPT --task math500 --data ../shared/benchmarks/math500.jsonl --out runs/m500 \\
          --prompt-template boxed --samples 4 --threshold 0.5,0.9
      tah eval --report runs/gsm8k runs/m500 [--out DIR]   (a table, DIR/report.json and DIR/report.png)

    Args:
        options: the settings of `tah eval`'s options (`EvalOptions`).
        loaded: the benchmark's problems (`tah.eval.tasks.load_problems`).
    Returns:
        The summary of each threshold's run, in the order of `options.thresholds`.
    Raises:
        TaHError: bad options, checkpoints or directories, before generating anything.
    """
    check_options(options)
    check_checkpoint(options.model, options.tokenizer)
    model_path = str(Path(options.model).resolve())
    several = len(options.thresholds) > 1
    unknown = ("max_iter",) if options.max_iter is None else ()  # the checkpoint's: checked once it is loaded
    for threshold in options.thresholds:
        check_resumable(run_dir(options.out, threshold, several), options.task.name, model_path,
                        settings_of(options, threshold, options.max_iter), ignore=unknown)
    model, tokenizer = load_model(options)
    problems = loaded.problems[:options.limit]
    summaries = []
    for threshold in options.thresholds:
        model.set_threshold(threshold)
        settings = settings_of(options, threshold, model.tah_config.max_iter)
        directory = run_dir(options.out, threshold, several)
        check_resumable(directory, options.task.name, model_path, settings)
        runner = Runner(model, tokenizer, options, settings, directory, model_path, len(loaded.skipped))
        summaries.append(runner.run(problems))
    return summaries


def load_model(options: EvalOptions):
    import torch

    from tah.model.checkpoint import load_tah_or_plain, load_tokenizer
    from tah.model.tah_model import TaHForCausalLM

    overrides = {"threshold": options.thresholds[0]}
    if options.max_iter is not None:
        overrides["max_iter"] = options.max_iter
    cuda = torch.cuda.is_available()
    model, plain = load_tah_or_plain(TaHForCausalLM, options.model, dtype=torch.bfloat16 if cuda else None,
                                     **overrides)
    if plain:
        print(f"tah: {options.model} is a plain Hugging Face model: evaluated as one pass (the Standard baseline)",
              file=sys.stderr)
    model = model.to("cuda" if cuda else "cpu").eval()
    where = options.tokenizer or options.model
    tokenizer = load_tokenizer(where, "give --tokenizer DIR")
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(f"the tokenizer in {where} has no chat template; tah eval puts each question "
                              "through it (as the original evaluation does): give --tokenizer DIR of the chat model")
    return model, tokenizer


class Runner:
    """One threshold's run into one directory: resume, batch, generate, grade, write."""

    def __init__(self, model, tokenizer, options: EvalOptions, settings: dict, directory: Path, model_path: str,
                 skipped: int):
        self.model, self.tokenizer, self.options, self.settings = model, tokenizer, options, settings
        self.directory, self.model_path, self.skipped = directory, model_path, skipped
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    def run(self, problems: list[Problem]) -> dict:
        from tqdm.auto import tqdm

        from tah.eval.grading import grade

        remove_stale_temporaries(self.directory)
        pairs = [(problem, sample) for problem in problems for sample in range(self.options.samples)]
        wanted = {(problem.id, sample) for problem, sample in pairs}
        done = {(r["id"], r["sample"]): r for r in read_samples(self.directory / "samples.jsonl")
                if (r.get("id"), r.get("sample")) in wanted}
        previous = read_summary(self.directory / "summary.json") or {}
        self.seconds = previous.get("generation_seconds", 0.0) if done else 0.0
        size = self.options.batch_size
        batches = [pairs[start:start + size] for start in range(0, len(pairs), size)]
        bar = tqdm(total=len(pairs), initial=len(done), desc=f"{self.options.task.name} t={self.settings['threshold']:g}",
                   disable=not self.options.progress, file=sys.stderr, dynamic_ncols=True)
        summary = self.write(pairs, done)
        for batch in batches:
            todo = [(problem, sample) for problem, sample in batch if (problem.id, sample) not in done]
            if not todo:
                continue
            records = self.generate(batch)
            records = [r for r in records if (r["id"], r["sample"]) not in done]
            grades = grade(self.options.task, [p for p, _ in todo], [r["completion"] for r in records],
                           timeout_s=self.options.timeout_s, memory_mb=self.options.memory_mb,
                           workers=self.options.workers)
            for record, result in zip(records, grades, strict=True):
                record["extracted"], record["correct"] = result.extracted, result.correct
                if result.detail:
                    record["error"] = result.detail
                done[(record["id"], record["sample"])] = record
            summary = self.write(pairs, done)
            bar.update(len(records))
            bar.set_postfix(acc=f"{summary['accuracy']:.1%}", iterated=_percent(summary["iterated_share"]))
        bar.close()
        return summary

    def write(self, pairs, done: dict) -> dict:
        records = [done[(problem.id, sample)] for problem, sample in pairs if (problem.id, sample) in done]
        tokens = sum(r["tokens"] for r in records)
        speed = tokens / self.seconds if self.seconds > 0 else None
        summary = summarize(records, task=self.options.task.name, model=self.model_path, skipped=self.skipped,
                            settings=self.settings, tokens_per_second=speed)
        summary["samples"] = self.options.samples  # K asked, also before every problem has its K
        summary["generation_seconds"] = self.seconds
        write_samples(self.directory / "samples.jsonl", records)
        write_summary(self.directory / "summary.json", summary)
        return summary

    def generate(self, batch: list[tuple[Problem, int]]) -> list[dict]:
        """Generate the batch's completions: records without grades, in batch order."""
        import torch

        from tah.generation.generate import generate

        prompts = [self.chat(problem.question) for problem, _ in batch]
        ids, mask = self.encode(prompts)
        greedy = self.options.greedy
        started = time.perf_counter()
        with torch.inference_mode():
            out = generate(self.model, ids, mask, max_new_tokens=self.options.max_new_tokens, do_sample=not greedy,
                           temperature=self.options.temperature, top_p=self.options.top_p, top_k=self.options.top_k,
                           eos_token_id=sorted(self.eos_ids) or None, seed=None if greedy else self.batch_seed(batch))
        self.seconds += time.perf_counter() - started
        new_ids, counts = out.sequences[:, ids.shape[1]:].cpu(), out.iter_counts.cpu()
        records = []
        for (problem, sample), prompt, row_ids, row_counts in zip(batch, prompts, new_ids, counts, strict=True):
            made = row_counts > 0  # 0 marks the steps after the row finished
            tokens, passes = row_ids[made].tolist(), row_counts[made].tolist()
            deep = sum(1 for p in passes if p > 1)
            records.append({"id": problem.id, "sample": sample, "prompt": prompt,
                            "completion": self.tokenizer.decode(tokens, skip_special_tokens=True),
                            "extracted": None, "gold": problem.gold, "correct": False, "tokens": len(tokens),
                            "iterated_share": deep / len(tokens) if tokens else 0.0, "passes": passes})
        return records

    def chat(self, question: str) -> str:
        message = prompt_text(question, self.settings["prompt_template"])
        return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, prompts: list[str]):
        """(B, T) left-padded token ids and attention mask on the model's device."""
        import torch

        rows = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def batch_seed(self, batch: list[tuple[Problem, int]]) -> int:
        """The sampling seed of a batch: a hash of (seed, its pairs), the same on every rerun."""
        key = "\n".join([str(self.options.seed), *(f"{problem.id}\t{sample}" for problem, sample in batch)])
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and the checkpoint's generation config's (chat models end turns on their own)."""
    ids = set()
    configured = getattr(getattr(model.lm, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"
