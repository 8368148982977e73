"""docs/cli.md: every `cxrlt` command and its options, generated from the parser itself.

    python -m cxrlt.cli.reference > docs/cli.md

tests/test_cli_vocabulary.py regenerates it and fails when the checked-in file differs.
"""

from __future__ import annotations

import argparse
import copy
import sys

from cxrlt.cli.options import _shows_default, visible_options

REGENERATE = "python -m cxrlt.cli.reference > docs/cli.md"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of `cxrlt`, in the order of its help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def visible_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments --help shows (no -h, nothing suppressed)."""
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def hidden_aliases(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Old option name -> what it stands for now, for one subcommand."""
    out: dict[str, str] = {}
    visible = {a.dest: a for a in visible_actions(parser)}
    for action in parser._actions:
        for old in getattr(action, "hidden_aliases", ()):
            out[old] = visible_options(action)[0]
        if action.help is argparse.SUPPRESS and action.option_strings:
            current = visible.get(action.dest)
            target = visible_options(current)[0] if current is not None and current.option_strings else "(removed)"
            if isinstance(action, argparse._StoreConstAction) and current is not None:
                target = f"{target} {action.const}"
            for old in action.option_strings:
                out[old] = target
    return out


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("<", "\\<")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if action.nargs in (argparse.ZERO_OR_MORE, argparse.ONE_OR_MORE):
        return f"{metavar} ..."
    if action.nargs == argparse.OPTIONAL:
        return f"[{metavar}]"
    return str(metavar)


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse.BooleanOptionalAction) and action.default is not None:
        return visible_options(action)[0 if action.default else 1]
    return str(action.default) if _shows_default(action) else ""


def _meaning(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    text = text.removesuffix(" (default: %(default)s)")  # BooleanOptionalAction's: the default has its column
    if not text:
        return ""
    shown = copy.copy(action)
    shown.help = text
    return argparse.HelpFormatter(prog)._expand_help(shown)  # %(default)s and the like, no default appended


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The Markdown of docs/cli.md."""
    from cxrlt.cli.main import COMMANDS, build_parser
    from cxrlt.cli.options import VOCABULARY

    parser = parser or build_parser()
    lines = [
        "# The `cxrlt` command line",
        "",
        f"Generated from the parser by `{REGENERATE}`; do not edit by hand.",
        "`cxrlt COMMAND --help` shows the same, with each command's description.",
        "",
        "## One vocabulary",
        "",
        "The same option name means the same thing in every command that has it:",
        "",
        "| option | means |",
        "|---|---|",
        *(f"| `{_cell(name)}` | {_cell(meaning)} |" for name, meaning in VOCABULARY.items()),
        "",
        "Old names of renamed options are still accepted, for one release, as hidden aliases; each",
        "command's section lists them.",
        "",
        "## Commands",
        "",
        "| command | what it does |",
        "|---|---|",
        *(f"| [`{name}`](#cxrlt-{name}) | {_cell(help_text)} |" for name, (_, help_text) in COMMANDS.items()),
        "",
    ]
    for name, command in subcommands(parser).items():
        lines += [f"## cxrlt {name}", "", _cell(COMMANDS[name][1]) if name in COMMANDS else "", "",
                  "| option | value | default | meaning |", "|---|---|---|---|"]
        for action in visible_actions(command):
            option = " / ".join(f"`{o}`" for o in visible_options(action)) or f"`{action.dest}`"
            lines.append(f"| {option} | {_cell(_value(action))} | {_cell(_default(action))} | "
                         f"{_cell(_meaning(action, command.prog))} |")
        aliases = hidden_aliases(command)
        if aliases:
            lines += ["", "Old names, accepted for one release: " +
                      ", ".join(f"`{old}` (now `{new}`)" for old, new in sorted(aliases.items())) + "."]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
