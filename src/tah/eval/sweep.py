"""The compute-accuracy trade-off: sweep the MLP decider's threshold."""

from __future__ import annotations

from tah.errors import InputError
from tah.eval.answers import answer_accuracy
from tah.eval.tokens import next_token_accuracy
from tah.model.decider import MLPDecider

DEFAULT_THRESHOLDS = tuple(i / 10 for i in range(11))


def threshold_sweep(model, data, thresholds=DEFAULT_THRESHOLDS, batch_size: int = 16, pad_token_id: int = 0,
                    tokenizer=None, problems=None, max_new_tokens: int | None = None,
                    progress: bool | None = None) -> list[dict]:
    """For each threshold (a token continues iff the decider's probability > threshold, so 0 iterates
    ~every token and 1 none): {"threshold", "accuracy" (teacher-forced next-token, on `data`),
    "iterated_share" (of those tokens)}, plus "answer_accuracy" and "answer_iterated_share" when
    `tokenizer` and `problems` are given (greedy generation: costs a decode per threshold).
    The model's threshold is restored afterwards. Raises `InputError` unless the model has an MLP
    decider and max_iter >= 2, or if a threshold is outside [0, 1]."""
    if not isinstance(model.decider, MLPDecider) or model.tah_config.max_iter < 2:
        raise InputError(f"a threshold sweep needs a model with an MLP decider and max_iter >= 2; this one has "
                         f"decider {model.tah_config.decider!r}, max_iter {model.tah_config.max_iter}")
    thresholds = [float(t) for t in thresholds]
    if not thresholds or any(not 0.0 <= t <= 1.0 for t in thresholds):
        raise InputError(f"thresholds must be a non-empty list of numbers in [0, 1]; got {thresholds!r}")
    if (tokenizer is None) != (problems is None):
        raise InputError("answer accuracy in the sweep needs both tokenizer= and problems=")
    old = model.tah_config.threshold
    points = []
    try:
        for threshold in thresholds:
            model.set_threshold(threshold)
            tokens = next_token_accuracy(model, data, "model", batch_size, pad_token_id, progress)
            point = {"threshold": threshold, "accuracy": tokens["accuracy"], "iterated_share": tokens["iterated_share"]}
            if problems is not None:
                answers = answer_accuracy(model, tokenizer, problems, max_new_tokens, progress=progress)
                point["answer_accuracy"] = answers["accuracy"]
                point["answer_iterated_share"] = answers["iterated_share"]
            points.append(point)
    finally:
        model.set_threshold(old)
    return points
