"""Every error tah raises on purpose derives from `TaHError` and says what to change."""


class TaHError(Exception):
    """Base class of tah's errors: catch this to handle any of them."""


class ConfigError(TaHError, ValueError):
    """A configuration field holds a value outside what it allows."""


class CheckpointError(TaHError):
    """A checkpoint directory is missing a file, or a file does not match the model."""


class InputError(TaHError, ValueError):
    """A call received tensors or arguments of the wrong shape or range."""
