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
    """The part of a docstring that a command's help shows: every paragraph before the first section
    line (Args:, Returns:, Raises: ...), dedented as `inspect.cleandoc` does (so a docstring as written
    and `inspect.getdoc`'s give the same text)."""
    lines = docstring.expandtabs().splitlines() or [""]
    indent = min((len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()), default=0)
    lines = [lines[0].strip()] + [line[indent:].rstrip() for line in lines[1:]]
    end = next((i for i, line in enumerate(lines) if line.strip() in CONTRACT_SECTIONS), len(lines))
    return "\n".join(lines[:end]).strip()


def docstring_in_source(target: str) -> str:
    """The docstring of `target` ("tah.train.run:train", or "module:Class.method"), read from its source
    file under src/tah without importing it. Raises LookupError if the file has no such function."""
    import ast  # here, not at the top: only help pays for it
    import os.path

    module, _, qualname = target.partition(":")
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), *module.split(".")[1:])  # src/tah/...
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    with open(path, encoding="utf-8") as source:
        node = ast.parse(source.read(), filename=path)
    for name in qualname.split("."):
        found = [child for child in node.body if getattr(child, "name", None) == name
                 and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        if not found:
            raise LookupError(f"{path} defines no {qualname} (the function behind a `tah` command)")
        node = found[0]
    return ast.get_docstring(node, clean=False) or ""  # help_text cleans it (inspect, ~4 ms, stays unloaded)


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
