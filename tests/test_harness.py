"""The "tah" model of lm-evaluation-harness: scores equal lm-eval's own HF model where TaH is the base
model, text equals tah.generate's, and a local generation task and a local loglikelihood task run end
to end, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from conftest import tiny_tah
from tah import generate
from tah.eval.harness import TaHLM
from tah.toy.tokenizer import build_char_tokenizer

VOCAB = 112  # the character tokenizer's 103 ids, rounded up


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny TaH model whose random decider iterates some tokens (threshold 0.5), with its tokenizer."""
    root = tmp_path_factory.mktemp("harness") / "ckpt"
    tiny_tah(vocab=VOCAB, decider="mlp", threshold=0.5).save_pretrained(root)
    build_char_tokenizer().save_pretrained(root)
    return root


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [("12+7=", "19"), ("3+4=", "7"), ("Q: 55+1=", " 56"), ("", "hello"), ("x" * 40, "yz")]


def test_scores_equal_lm_evals_hf_model_when_no_token_iterates(checkpoint):
    """Threshold 1 iterates nothing, so TaH is its base model: lm-eval's HFLM on that base is the reference."""
    lm = TaHLM(pretrained=str(checkpoint), threshold=1.0, batch_size=3)
    reference = HFLM(pretrained=lm.model.lm, tokenizer=lm.tokenizer, batch_size=3)
    ours = lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    theirs = reference.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert greedy_a == greedy_b
    assert lm.stats.scored_iterated == 0


def test_rolling_scores_equal_lm_evals_hf_model_across_windows(checkpoint):
    lm = TaHLM(pretrained=str(checkpoint), threshold=1.0, max_length=16)
    reference = HFLM(pretrained=lm.model.lm, tokenizer=lm.tokenizer, max_length=16)
    texts = [("a" * 5,), ("The quick brown fox jumps over the lazy dog.",)]
    ours = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    theirs = reference.loglikelihood_rolling(_requests("loglikelihood_rolling", texts), disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_scores_with_iteration_are_the_tah_forward_of_each_text_alone(checkpoint):
    """Batched, padded scoring equals one unpadded forward per text; some scored tokens iterate."""
    lm = TaHLM(pretrained=str(checkpoint), batch_size=4)
    scores = lm.loglikelihood(_requests("loglikelihood", PAIRS[:3]), disable_tqdm=True)
    assert 0 < lm.stats.scored_iterated < lm.stats.scored
    for (context, continuation), (logprob, greedy) in zip(PAIRS[:3], scores, strict=True):
        ctx, cont = lm._encode_pair(context, continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, len(ctx) - 1:-1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())


def test_generate_until_is_tah_generate_cut_at_the_stop_string(checkpoint):
    lm = TaHLM(pretrained=str(checkpoint), batch_size=2)
    contexts = ["1+1=", "abc", "Q: 9+9="]
    kwargs = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}
    texts = lm.generate_until(_requests("generate_until", [(c, kwargs) for c in contexts]), disable_tqdm=True)
    for context, text in zip(contexts, texts, strict=True):
        ids = torch.tensor([lm.tok_encode(context)])
        out = generate(lm.model, ids, max_new_tokens=12, eos_token_id=lm.eot_token_id)
        made = out.sequences[0, ids.shape[1]:][out.iter_counts[0] > 0].tolist()
        assert text == lm.tok_decode(made).split("\n")[0]
    assert lm.stats.generated > 0


def _write_tasks(root: Path) -> Path:
    """A local generation task and a local multiple-choice (loglikelihood) task over local JSONL files."""
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (10, 5), (7, 7)]]
    data = root / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "tah_sums_gen.yaml").write_text(
        "task: tah_sums_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    (root / "tah_sums_choice.yaml").write_text(
        "task: tah_sums_choice\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{[answer, \"0\", \"99\"]}}'\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    return root


def test_lm_eval_runs_local_generation_and_loglikelihood_tasks(checkpoint, tmp_path):
    tasks = TaskManager(include_path=str(_write_tasks(tmp_path)))
    results = simple_evaluate(model="tah", model_args=f"pretrained={checkpoint},threshold=0.5,batch_size=4",
                              tasks=["tah_sums_gen", "tah_sums_choice"], task_manager=tasks,
                              bootstrap_iters=0, log_samples=True)
    assert set(results["results"]) == {"tah_sums_gen", "tah_sums_choice"}
    assert 0.0 <= results["results"]["tah_sums_choice"]["acc,none"] <= 1.0
    assert len(results["samples"]["tah_sums_gen"]) == 4
    assert len(results["samples"]["tah_sums_choice"]) == 4


def test_tah_lm_eval_command_finds_the_model(checkpoint, tmp_path):
    """The console script is lm-eval's command line with "tah" registered."""
    tasks = _write_tasks(tmp_path)
    out = tmp_path / "out"
    script = Path(sys.executable).parent / "tah-lm-eval"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from tah.eval.harness import main; main()"]
    done = subprocess.run([*command, "--model", "tah", "--model_args", f"pretrained={checkpoint}",
                           "--tasks", "tah_sums_choice", "--include_path", str(tasks), "--output_path", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    written = list(out.rglob("results_*.json"))
    assert written and "tah_sums_choice" in json.loads(written[0].read_text())["results"]
