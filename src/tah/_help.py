"""`tah <command> --help` shows the docstring of the library function the command calls (litgpt's
rule: docstrings double as help), so the two cannot drift apart.

The docstring is read from the function's source file with `ast` when help is formatted: help never
imports the function's module (which may load torch and transformers: seconds), and parsing
arguments reads no source at all. The standard library only, here."""

from __future__ import annotations

import argparse

# A docstring's Python contract starts at its first section line; --help shows what comes before.
CONTRACT_SECTIONS = ("Args:", "Arguments:", "Returns:", "Yields:", "Raises:", "Example:", "Examples:")


def help_text(docstring: str) -> str:
    """The part of a cleaned docstring (`inspect.getdoc`, `ast.get_docstring`) that a command's help
    shows: every paragraph before the first section line (Args:, Returns:, Raises: ...)."""
    lines = docstring.strip().splitlines()
    end = next((i for i, line in enumerate(lines) if line.strip() in CONTRACT_SECTIONS), len(lines))
    return "\n".join(lines[:end]).strip()


def docstring_in_source(target: str) -> str:
    """The docstring of `target` ("tah.train.run:train", or "module:Class.method"), read from its source
    file under src/tah without importing it. Raises LookupError if the file has no such function."""
    import ast  # here, not at the top: only help pays for it
    from pathlib import Path

    module, _, qualname = target.partition(":")
    path = Path(__file__).resolve().parent.joinpath(*module.split(".")[1:])  # src/tah/...
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    node = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for name in qualname.split("."):
        found = [child for child in node.body if getattr(child, "name", None) == name
                 and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        if not found:
            raise LookupError(f"{path} defines no {qualname} (the function behind a `tah` command)")
        node = found[0]
    return ast.get_docstring(node) or ""


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose description, when none is given, is the help text of the docstring of
    `calls` ("module:function", the library function the command runs), kept as written."""

    def __init__(self, *args, calls: str | None = None, **kwargs) -> None:
        if calls is not None:
            kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.calls = calls

    def describe(self) -> str | None:
        """The description, read from `calls`' docstring the first time it is asked for."""
        if self.description is None and self.calls is not None:
            self.description = help_text(docstring_in_source(self.calls))
        return self.description

    def format_help(self) -> str:
        self.describe()
        return super().format_help()
