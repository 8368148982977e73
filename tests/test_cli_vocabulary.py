"""One CLI vocabulary: the same option name means the same thing in every `cxrlt` subcommand,
every --help shows its defaults, old names keep working as hidden aliases, and docs/cli.md
is what the parser generates."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cxrlt.cli.main import COMMANDS, build_parser
from cxrlt.cli.options import ENGINES, HelpFormatter
from cxrlt.cli.reference import REGENERATE, hidden_aliases, render, subcommands, visible_actions, visible_options

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

# Names that meant different things in different commands (or the same thing under several
# names): none of them may show in any --help. They live on as hidden aliases.
RETIRED = ("--model-repository", "--timeout", "--request-timeout", "--duration", "--time-limit", "--port")


@pytest.fixture(scope="module")
def commands() -> dict[str, argparse.ArgumentParser]:
    return subcommands(build_parser())


def _visible(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in visible_actions(parser) for option in visible_options(action)}


def test_every_command_is_in_the_parser_with_the_shared_formatter(commands):
    assert list(commands) == list(COMMANDS)
    for name, parser in commands.items():
        assert parser.formatter_class is HelpFormatter, name


def test_help_shows_defaults(commands):
    text = " ".join(commands["serve"].format_help().split())
    for shown in ("--grpc-port GRPC_PORT gRPC port, what clients use (default: 8001)", "(default: 8000)",
                  "(default: 8002)", "(default: 600.0)"):
        assert shown in text
    assert "--model-repository" not in text and "--timeout " not in text
    for name, parser in commands.items():
        for action in visible_actions(parser):
            if action.option_strings and action.default not in (None, False, [], "", argparse.SUPPRESS):
                shown = parser._get_formatter()._format_action(action)  # the lines --help gives this option
                assert "default" in shown.lower(), f"cxrlt {name} {visible_options(action)[0]} hides its default"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_one_name_one_meaning(commands, name):
    options = _visible(commands[name])
    assert not [o for o in RETIRED if o in options], f"cxrlt {name} shows a retired option name"
    if "--json" in options:
        assert options["--json"].nargs != 0, f"cxrlt {name}: --json takes a PATH everywhere"
    if "--hints" in options or "--no-hints" in options:
        action = options.get("--hints") or options["--no-hints"]
        assert isinstance(action, argparse.BooleanOptionalAction) and action.dest == "hints", \
            f"cxrlt {name}: --hints/--no-hints is one BooleanOptionalAction"
    if "--engine" in options:
        assert tuple(options["--engine"].choices) == ENGINES, f"cxrlt {name}: --engine takes {ENGINES}"
    if "--repo" in options:
        assert options["--repo"].type is Path and options["--repo"].dest == "repo"
    if "--url" in options:
        assert options["--url"].dest == "url"


@pytest.mark.parametrize(("argv", "expected"), [
    (["serve", "--model-repository", "r", "--timeout", "5", "--watchdog-interval", "2"],
     {"repo": Path("r"), "ready_timeout_s": 5.0, "watchdog_interval_s": 2.0}),
    (["serve", "--repo", "r", "--ready-timeout-s", "5"], {"repo": Path("r"), "ready_timeout_s": 5.0}),
    (["local-cluster", "--model-repository", "r", "--port", "9"], {"repo": Path("r"), "grpc_port": 9}),
    (["build-repo", "--out", "r", "--engine", "torchscript"], {"repo": Path("r"), "engine": "torch"}),
    (["build-repo", "--repo", "r"], {"repo": Path("r"), "engine": "onnxruntime"}),
    (["health", "--json"], {"format": "json"}),
    (["health"], {"format": "text"}),
    (["demo", "--timeout", "9"], {"ready_timeout_s": 9.0}),
    (["evaluate", "--data", "d", "--hints"], {"hints": True, "engine": "torch"}),
    (["evaluate", "--data", "d"], {"hints": False}),
    (["tune-weights", "--repo", "r", "--data", "d", "--no-hints"], {"hints": False, "engine": "onnxruntime"}),
])
def test_old_names_still_work(argv, expected):
    args = build_parser().parse_args(argv)
    assert {key: getattr(args, key) for key in expected} == expected


def test_the_old_names_are_listed_as_aliases(commands):
    assert hidden_aliases(commands["serve"])["--model-repository"] == "--repo"
    assert hidden_aliases(commands["build-repo"]) == {"--out": "--repo"}
    assert hidden_aliases(commands["health"]) == {"--json": "--format json"}


def test_docs_cli_md_is_generated_from_the_parser():
    expected = render()
    assert DOC.is_file() and DOC.read_text() == expected, f"docs/cli.md is stale: regenerate it with `{REGENERATE}`"
