"""Every command's --help shows an example, and every command that reports accepts --json.

The parser is walked, not listed: a new command or subcommand is checked without being named
here, and must be sorted into REPORTING or NOT_REPORTING (a command that is in neither fails).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from fos_host.cli import _parser

# Commands (as argv words) that report something: they must accept --json.
REPORTING = {
    ("doctor",),
    ("exec",),
    ("seccomp", "dump"),
    ("bench",),
    ("top",),
    ("demo",),
    *(("ctl", name) for name in ("open", "navigate", "reload", "activate", "close", "list",
                                 "status", "screenshot", "snapshot", "freeze", "hibernate",
                                 "discard", "kill", "pin", "events")),
}  # fmt: skip
# The daemon serves; it reports nothing on stdout.
NOT_REPORTING = {("run",)}


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser below `parser` with the words that reach it; the leaves and the groups."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    """A value for each positional argument, so that the command line parses."""
    values = []
    for action in parser._actions:
        if action.option_strings or isinstance(action, argparse._SubParsersAction):
            continue
        if action.choices:
            values.append(str(next(iter(action.choices))))
        else:
            values.append("1" if action.type is int else "true")
    return values


def leaves() -> list[tuple[str, ...]]:
    return [
        path
        for path, p in commands(_parser())
        if path and not any(isinstance(a, argparse._SubParsersAction) for a in p._actions)
    ]


@pytest.mark.parametrize(("path", "parser"), list(commands(_parser())), ids=lambda v: str(v))
def test_every_help_has_an_example(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    assert "example" in text, f"fos-host {' '.join(path)} --help shows no example"
    # the examples are laid out as written, not re-wrapped into one paragraph
    assert "\n  fos-host " in text, text


def test_every_command_is_sorted_into_reporting_or_not() -> None:
    found = set(leaves())
    assert found == REPORTING | NOT_REPORTING, (
        f"new: {sorted(found - REPORTING - NOT_REPORTING)}, gone: {sorted(REPORTING - found)}"
    )


@pytest.mark.parametrize("path", sorted(REPORTING), ids=" ".join)
def test_every_reporting_command_accepts_json(path: tuple[str, ...]) -> None:
    parser = dict(commands(_parser()))[path]
    a = _parser().parse_args([*path, "--json", *positionals(parser)])
    assert a.json is True


def test_version_says_where_it_runs_from(capsys: pytest.CaptureFixture[str]) -> None:
    import fos_host

    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fos-host {fos_host.__version__} (")
    assert fos_host.__path__[0] in out
