"""``.. cli-help:: module:function [subcommand ...]``: a command's ``--help`` text, from the code.

``module:function`` returns an :class:`argparse.ArgumentParser`; the optional words walk
down its subcommands. With the ``:recursive:`` flag every subcommand below follows, each
under a rubric naming it. The help is rendered at build time, so the page cannot fall
behind the options the code accepts.
"""

from __future__ import annotations

import argparse
import importlib
import os

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    raise ValueError(f"{parser.prog} has no subcommand {name!r}")


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _help(parser: argparse.ArgumentParser) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "92"  # argparse wraps to the terminal width
    try:
        return parser.format_help()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def _literal(text: str) -> nodes.literal_block:
    block = nodes.literal_block(text, text)
    block["language"] = "text"
    return block


class CliHelp(SphinxDirective):
    required_arguments = 1
    optional_arguments = 5
    option_spec = {"recursive": directives.flag}

    def run(self):
        module_name, _, function = self.arguments[0].partition(":")
        parser = getattr(importlib.import_module(module_name), function)()
        for word in self.arguments[1:]:
            parser = _subparser(parser, word)
        out = [_literal(_help(parser))]
        if "recursive" in self.options:
            pending = list(_subparsers(parser))
            while pending:
                name, sub = pending.pop(0)
                out += [nodes.rubric(text=sub.prog), _literal(_help(sub))]
                pending = list(_subparsers(sub)) + pending
        return out


def setup(app):
    app.add_directive("cli-help", CliHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
