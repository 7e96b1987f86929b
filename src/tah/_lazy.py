"""Lazy package attributes: `tah.TaHForCausalLM` imports torch and transformers on first use, so
`import tah.errors` or `tah --help` (whose subcommands live in `tah.<package>.cli`) stays fast."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for `package`'s __init__: each name in `exports` ({name: module that
    defines it}) is imported from its module the first time it is read, then kept in the package's
    namespace. Unknown names raise AttributeError as usual."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
