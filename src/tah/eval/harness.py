"""A `tah` model for EleutherAI's lm-evaluation-harness.

Importing this module registers the model under the name "tah" (lm-eval 0.4 finds models only in its
own registry, not through package entry points), so either

    tah-lm-eval --model tah --model_args pretrained=CKPT,threshold=0.9 --tasks gsm8k

(lm-eval's own command line, with the model registered first), or in Python

    import tah.eval.harness  # registers "tah"
    lm_eval.simple_evaluate(model="tah", model_args="pretrained=CKPT", tasks=[...])

Scores come from the TaH forward (the decider picks which tokens iterate, as in generation: the
logits of a scored token are the ones generation would sample it from) and text from
`tah.generate`. The share of iterated tokens, the method's cost, is logged when a request type
finishes and kept in `TaHLM.stats`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

log = logging.getLogger(__name__)


@dataclass
class IterationStats:
    """Tokens the model predicted (scored or generated) and how many of them took a deeper pass."""

    scored: int = 0
    scored_iterated: int = 0
    generated: int = 0
    generated_iterated: int = 0

    def share(self, kind: str) -> float:
        total, iterated = getattr(self, kind), getattr(self, f"{kind}_iterated")
        return iterated / total if total else float("nan")


@register_model("tah")
class TaHLM(TemplateLM):
    """model_args: pretrained (a TaH checkpoint directory with its tokenizer; a plain Hugging Face model
    directory runs as one pass, the Standard baseline), threshold (decider
    threshold; default the checkpoint's), batch_size (default 8), max_length (tokens of context;
    default the base model's max_position_embeddings), device ("cpu", "cuda", ...; default cuda when
    available), dtype ("float32", "bfloat16", "float16"; default float32 on CPU, bfloat16 on CUDA)."""

    def __init__(self, pretrained: str, threshold: float | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, device: str | None = None, dtype: str | None = None,
                 **_: object) -> None:
        super().__init__()
        from tah.model.checkpoint import load_tah_or_plain, load_tokenizer
        from tah.model.tah_model import TaHForCausalLM

        device = _device(device)
        overrides = {} if threshold is None else {"threshold": float(threshold)}
        model, plain = load_tah_or_plain(TaHForCausalLM, pretrained, **overrides)
        if plain:
            log.warning("tah: %s is a plain Hugging Face model: scored as one pass (the Standard baseline)", pretrained)
        self.model = model.to(device=device, dtype=_dtype(dtype, device)).eval()
        self.tokenizer = load_tokenizer(pretrained)
        self.pretrained = str(pretrained)
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        text_config = self.model.lm.config.get_text_config()
        self._max_length = int(max_length or getattr(text_config, "max_position_embeddings", 2048))
        self.stats = IterationStats()

    # the tokenizer side of TemplateLM

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: object) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: object) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids). Returns, per request, the
        summed log-probability of the continuation and whether greedy decoding would produce it."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # longest first: a batch pads to its first row, and a too-long batch fails at once, not at the end
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bar = tqdm(total=len(requests), desc="tah: scoring", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            pairs = [self._window(requests[i][1], requests[i][2]) for i in chunk]
            for i, result in zip(chunk, self._score(pairs), strict=True):
                results[i] = result
            bar.update(len(chunk))
        bar.close()
        self._log("scored")
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, scored in windows of max_length tokens (as lm-eval's HF model)."""
        totals = []
        for request in tqdm(requests, desc="tah: rolling scores", disable=disable_tqdm):
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = []
            for start in range(0, len(windows), self.batch_size):
                scores += self._score(windows[start:start + self.batch_size])
            totals.append(sum(logprob for logprob, _ in scores))
        self._log("scored")
        return totals

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Keep the last max_length + 1 tokens of context + continuation (the continuation first)."""
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:len(whole) - len(continuation)], whole[len(whole) - len(continuation):]

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One right-padded forward over (context, continuation) id pairs."""
        inputs = [(context + continuation)[:-1] for context, continuation in pairs]
        width = max(len(ids) for ids in inputs)
        ids = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, row_ids in enumerate(inputs):
            ids[row, :len(row_ids)] = torch.tensor(row_ids)
            mask[row, :len(row_ids)] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        results = []
        for row, (_, continuation) in enumerate(pairs):
            end = len(inputs[row])
            logits = out.logits[row, end - len(continuation):end].float()
            target = torch.tensor(continuation, device=logits.device)
            logprob = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum().item()
            greedy = bool((logits.argmax(-1) == target).all())
            passes = out.iter_count[row, end - len(continuation):end]
            self.stats.scored += len(continuation)
            self.stats.scored_iterated += int((passes > 1).sum())
            results.append((logprob, greedy))
        return results

    # generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request: (context, gen_kwargs) with lm-eval's `until`, `max_gen_toks`, `do_sample`,
        `temperature`, `top_p`, `top_k`. Requests with equal settings share a batch."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), desc="tah: generating", disable=disable_tqdm)
        for members in groups.values():
            kwargs = requests[members[0]].args[1]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in chunk], kwargs)
                for i, text in zip(chunk, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        self._log("generated")
        return results

    def _generate(self, contexts: list[str], kwargs: dict) -> list[str]:
        from tah.generation.generate import generate

        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok_decode([self.eot_token_id])
        if eos_text and eos_text not in until:
            until.append(eos_text)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0))
        if temperature == 0.0:
            do_sample, temperature = False, 1.0
        room = max(1, self.max_length - max_new)  # prompt tokens kept: the last ones
        encoded = [self.tok_encode(context)[-room:] for context in contexts]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, row_ids in enumerate(encoded):  # left padding, as tah.generate expects
            ids[row, width - len(row_ids):] = torch.tensor(row_ids)
            mask[row, width - len(row_ids):] = 1
        stops = [s for s in until if s]
        out = generate(self.model, ids.to(self.device), mask.to(self.device), max_new_tokens=max_new,
                       do_sample=do_sample, temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0)),
                       top_k=int(kwargs.pop("top_k", 0) or 0), eos_token_id=self.eot_token_id,
                       stop_strings=stops or None, tokenizer=self.tokenizer, seed=kwargs.pop("seed", None))
        texts = []
        for row in range(len(encoded)):
            passes = out.iter_counts[row]
            made = out.sequences[row, width:width + int((passes > 0).sum())].tolist()
            self.stats.generated += len(made)
            self.stats.generated_iterated += int((passes > 1).sum())
            texts.append(_cut_at_stops(self.tok_decode(made), stops))
        return texts

    def _log(self, kind: str) -> None:
        log.info("tah: %.1f%% of %s tokens iterated", 100 * self.stats.share(kind), kind)


def _cut_at_stops(text: str, stops: list[str]) -> str:
    """The text before the first stop string (lm-eval's contract for generate_until)."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


def _device(name: str | None) -> str:
    """The device asked for, or CUDA when there is one; lm-eval's command line asks for "cuda" by default,
    so a machine without CUDA falls back to the CPU, saying so."""
    if name is None or name.startswith("cuda") and not torch.cuda.is_available():
        if name is not None:
            log.warning("tah: device %s asked for but CUDA is not available; running on the CPU", name)
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _dtype(name: str | None, device: str) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        from tah.errors import ConfigError

        raise ConfigError(f"model_args dtype must be one of {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def main() -> None:
    """`tah-lm-eval`: lm-eval's command line with the "tah" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
