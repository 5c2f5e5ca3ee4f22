"""Every help page of every command (`mproxy X --help`, and so docs/cli.md, rendered from the same parser): no
argparse escapes or "null", a help line for every argument, metavars named after their option, and no option
abbreviations (`--split` is never `--split-file`). Generic over the parser tree, so new options are checked too."""

import argparse

import pytest

from momentum_proxy.cli import main, parser


def commands(p: argparse.ArgumentParser, name: str = "mproxy") -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of `p` and of every sub-command below it (`prepare folder` too)."""
    found = [(name, p)]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child_name, child in action.choices.items():
                found += commands(child, f"{name} {child_name}")
    return found


COMMANDS = commands(parser())
ARGUMENTS = [
    (name, a)
    for name, p in COMMANDS
    for a in p._actions
    if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction))
]


def test_the_parser_tree_is_walked():
    names = {name for name, _ in COMMANDS}
    assert {"mproxy train", "mproxy serve", "mproxy demo", "mproxy prepare folder", "mproxy sweep"} <= names


@pytest.mark.parametrize("name, p", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_help_pages_show_no_escapes_and_no_null(name, p, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = p.format_help()
    for bad in ("%%", "default: null", "| null", "[None]"):
        assert bad not in text, f"{name} --help shows {bad!r}"


@pytest.mark.parametrize(
    "name, action", ARGUMENTS, ids=[f"{n} {(a.option_strings or [a.dest])[0]}" for n, a in ARGUMENTS]
)
def test_every_argument_has_help_and_a_metavar_named_after_it(name, action):
    assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest} has no help line"
    if action.option_strings and action.nargs != 0 and action.metavar is None:  # argparse shows DEST
        first = action.option_strings[0].lstrip("-").replace("-", "_")
        assert action.dest == first, f"{name} {action.option_strings[0]} would show the metavar {action.dest.upper()}"


def abbreviation_case(p: argparse.ArgumentParser) -> tuple[list[str], list[str]] | None:
    """A command line that `p` accepts with one of its flags spelled out, and the same with that flag cut by a
    letter to a prefix no other option starts with (which argparse's default allow_abbrev would take)."""
    given = []
    for action in p._actions:  # the positionals and the required options, each given a value it accepts
        if isinstance(action, argparse._SubParsersAction):
            continue
        value = str(list(action.choices)[0]) if action.choices else "x"
        if not action.option_strings:
            given.append(value)
        elif action.required:
            given += [action.option_strings[0], value]
    options = [o for a in p._actions for o in a.option_strings]
    for action in p._actions:
        if action.nargs != 0 or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        for flag in action.option_strings:
            prefix = flag[:-1]
            if flag.startswith("--") and len(prefix) > 3 and sum(o.startswith(prefix) for o in options) == 1:
                return given + [flag], given + [prefix]
    return None


CASES = [(name, p, abbreviation_case(p)) for name, p in COMMANDS if abbreviation_case(p)]


def test_every_command_with_a_flag_has_an_abbreviation_case():
    with_flags = {
        name
        for name, p in COMMANDS
        if any(a.nargs == 0 and a.option_strings for a in p._actions[1:]) and name != "mproxy"
    }
    assert with_flags <= {name for name, _, _ in CASES} and len(CASES) >= 10


@pytest.mark.parametrize("name, p, case", CASES, ids=[name for name, _, _ in CASES])
def test_an_option_prefix_is_refused(name, p, case, capsys):
    spelled_out, cut = case
    p.parse_args(spelled_out)  # accepted in full
    with pytest.raises(SystemExit) as e:
        p.parse_args(cut)
    assert e.value.code == 2 and f"unrecognized arguments: {cut[-1]}" in capsys.readouterr().err


def test_split_is_not_taken_for_split_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "folder", "--src", str(tmp_path), "--out", str(tmp_path / "out"), "--split-f", "a.csv"])
    assert e.value.code == 2 and "unrecognized arguments: --split-f a.csv" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
