"""`tah <command> --help` describes a command with the docstring of the library function it calls, so
the help a user reads and the contract a Python caller reads are one text."""

from __future__ import annotations

import argparse
import inspect
from importlib import import_module

import pytest

from tah._help import docstring_in_source, help_text
from tah.cli import build_parser


def commands() -> dict[str, argparse.ArgumentParser]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def called_function(target: str):
    module, _, qualname = target.partition(":")
    value = import_module(module)
    for name in qualname.split("."):
        value = getattr(value, name)
    return value


@pytest.mark.parametrize("name", sorted(commands()))
def test_a_commands_description_is_its_functions_docstring(name):
    command = commands()[name]
    assert command.calls, f"tah {name} names no library function (add_parser(..., calls='module:function'))"
    function = called_function(command.calls)
    summary = help_text(inspect.getdoc(function))
    assert len(summary) > 100, f"{command.calls}'s docstring says too little for `tah {name} --help`"
    assert command.describe() == summary
    assert summary in command.format_help()
    # the command runs that function (its handler names it), not a copy of its work
    assert function.__name__ in inspect.getsource(command.get_default("run"))


def test_every_command_is_listed():
    assert {"demo", "generate", "label", "prune", "train", "eval", "grade", "serve"} <= set(commands())


def test_help_stops_at_the_python_contract():
    doc = "Do the thing.\n\nMore about it, for the user.\n\nArgs:\n    x: a number.\nReturns:\n    y."
    assert help_text(doc) == "Do the thing.\n\nMore about it, for the user."
    assert help_text("Only prose.") == "Only prose."
    as_written = "Do the thing,\n    over two lines.\n\n    Returns:\n        y."  # a docstring's source indent
    assert help_text(as_written) == "Do the thing,\nover two lines."


def test_parsing_arguments_reads_no_docstring(monkeypatch):
    """Only help needs the text: a command's own run never pays for reading a source file."""
    monkeypatch.setattr("tah._help.docstring_in_source", lambda target: pytest.fail(f"read {target}"))
    args = build_parser().parse_args(["train", "--config", "recipe.yaml"])
    assert args.command == "train"


def test_a_missing_function_is_named():
    with pytest.raises(LookupError, match="no_such_function"):
        docstring_in_source("tah.train.run:no_such_function")
