"""docs/cli.md, the command reference, written from the argparse definitions in cli.py:

    python -m tidal_ray.cli_reference > docs/cli.md

Every command and subcommand, every argument with its help, choices and default, so the
reference cannot drift from the parser; ``tests/test_docs.py`` fails when docs/cli.md
differs from what this prints. Not a command of ``tidal-ray``: a tool for the docs.
"""
from __future__ import annotations

import argparse
import sys

from tidal_ray.cli import build_parser

REGENERATE = "python -m tidal_ray.cli_reference > docs/cli.md"

HEADER = f"""# Command-line reference

<!-- Generated from tidal_ray/cli.py by `{REGENERATE}`; do not edit by hand.
     tests/test_docs.py fails when this file is out of date. -->

Every command, subcommand and argument of `tidal-ray`, as its parser defines them.
Exit codes: 0 success, 2 bad usage or bad input (one readable line), 1 anything else
(`--debug` shows the traceback). Object storage is configured the AWS way: the credential
chain, `AWS_REGION`, and `AWS_ENDPOINT_URL` for S3-compatible endpoints.
"""


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, help, parser)`` of each subcommand, in the order they were added."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            found += [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]
    return found


def _usage(parser: argparse.ArgumentParser) -> str:
    # A fixed, huge width: the same text on any terminal, one line per command.
    formatter = argparse.HelpFormatter(parser.prog, width=10_000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _metavar(action: argparse.Action) -> str:
    """As argparse's usage line writes it: the metavar, else the choices, else the dest."""
    if action.metavar:
        return action.metavar
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _name(action: argparse.Action) -> str:
    metavar = _metavar(action)
    if not action.option_strings:
        return f"`{metavar}`"
    takes_value = action.nargs != 0
    names = ", ".join(f"{o} {metavar}" if takes_value else o for o in action.option_strings)
    return f"`{names}`"


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0:  # a switch: store_true, --x/--no-x and friends
        return "on" if action.default is True else "off"
    if action.default is None or action.default == argparse.SUPPRESS:
        return "—"
    if isinstance(action.default, list):
        return "none" if not action.default else f"`{' '.join(map(str, action.default))}`"
    return f"`{action.default}`"


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:  # argparse's own expansion: %(default)s, %(choices)s, ...
        params = {**vars(action), "prog": prog}
        if action.choices is not None:
            params["choices"] = ", ".join(map(str, action.choices))
        text = text % params
    if action.choices is not None and action.metavar:  # else the name shows them
        text = f"{text} (one of: {', '.join(map(str, action.choices))})".lstrip()
    return text


def _arguments(parser: argparse.ArgumentParser) -> list[str]:
    rows = [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    if not rows:
        return []
    lines = ["| argument | default | description |", "| --- | --- | --- |"]
    lines += [f"| {_cell(_name(a))} | {_cell(_default(a))} | {_cell(_help(a, parser.prog))} |" for a in rows]
    return lines + [""]


def _section(parser: argparse.ArgumentParser, help_text: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{parser.prog}`", ""]
    for text in (help_text, parser.description):
        if text:
            lines += [" ".join(text.split()), ""]
    lines += ["```", _usage(parser), "```", ""]
    lines += _arguments(parser)
    for name, sub_help, sub in _subcommands(parser):
        lines += _section(sub, sub_help, min(level + 1, 4))
    return lines


def reference() -> str:
    """The whole of docs/cli.md."""
    lines = [HEADER]
    lines += _section(build_parser(), "", 2)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
