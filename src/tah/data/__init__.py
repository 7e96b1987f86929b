"""Data: conversation rows, chat-template tokenisation, hard-token labelling, the collator.

    load_rows(path, strict)                       -> (messages per row, DataReport)
    tokenize_conversations(conversations, tok, max_length, report, strict) -> {input_ids, labels}
    build_dataset(path, tok, max_length, strict)  -> Dataset(input_ids, labels)
    label_dataset(reference, dataset, out_dir, batch_size=, shard_size=, max_iter=, deep_ce=, ...) -> stats
    load_labeled(out_dir)                         -> Dataset(input_ids, labels, iter_labels)
    TaHCollator(pad_token_id, pad_to_multiple_of) -> padded LongTensor batches
"""

from typing import TYPE_CHECKING

from tah._lazy import lazy_exports

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from tah.data.chat import build_dataset, tokenize_chat, tokenize_conversations
    from tah.data.collator import TaHCollator
    from tah.data.label import check_rule, label_batch, label_dataset, load_labeled, pass_counts
    from tah.data.rows import DataReport, load_rows

__all__ = ["DataReport", "TaHCollator", "build_dataset", "check_rule", "label_batch", "label_dataset",
           "load_labeled", "load_rows", "pass_counts", "tokenize_chat", "tokenize_conversations"]

# Loaded on first use, so `tah label --help` (tah.data.cli) never imports torch.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["build_dataset", "tokenize_chat", "tokenize_conversations"], "tah.data.chat"),
    "TaHCollator": "tah.data.collator",
    **dict.fromkeys(["check_rule", "label_batch", "label_dataset", "load_labeled", "pass_counts"], "tah.data.label"),
    **dict.fromkeys(["DataReport", "load_rows"], "tah.data.rows")})
