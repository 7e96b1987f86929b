"""A character-level tokenizer for the toy task, as a `PreTrainedTokenizerFast` with a chat template.

Every character is one token (WordLevel over single characters, a Split pre-tokenizer that isolates
each character, a Fuse decoder), so any CLI stage that takes a Hugging Face tokenizer works on it
unchanged: `save_pretrained` / `AutoTokenizer.from_pretrained` keep ids and template.

A conversation renders as

    <bos><|user|>47+38=?<|assistant|>47+38=85\\n#### 85<eos>

The role markers and <eos> are special tokens (one id each), so a rendered prefix always ends on a
token boundary: what incremental rendering (assistant masks, `add_generation_prompt`) relies on.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# Printable ASCII and the newline: the task needs digits, "+-=?#", space and newline; the rest lets
# the same tokenizer carry a little free text.
ALPHABET = "\n" + "".join(chr(code) for code in range(32, 127))

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>"
    "{% elif message['role'] == 'user' %}<|user|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% else %}{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(alphabet: str = ALPHABET, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """The character tokenizer: ids 0-3 are <pad> <bos> <eos> <unk>, then the role markers, then one
    id per character of `alphabet` (unknown characters map to <unk>). No special tokens are added
    on encode; the chat template writes <bos> and <eos> itself."""
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS.values()]
    chars = list(dict.fromkeys(alphabet))
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS.values()), model_max_length=model_max_length,
        clean_up_tokenization_spaces=False, padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
