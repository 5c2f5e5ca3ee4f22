"""MkDocs hook: the CLI reference page is rendered from `momentum_proxy.cli.parser()` at build time.

`docs/cli.md` holds the marker `<!-- cli-reference -->`; this hook replaces it with a table of the sub-commands
and every sub-command's `--help` text (nested ones such as `prepare folder` too), so the page cannot drift from
the parser. It imports the CLI module only: option parsing never loads torch, and the build checks that.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

MARKER = "<!-- cli-reference -->"
PAGE = "cli.md"
WIDTH = "100"  # argparse wraps --help to $COLUMNS; a fixed width keeps the page the same on every machine
ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("mkdocs.hooks.cli_reference")


def load_cli():
    """`momentum_proxy.cli` from this checkout (not from whatever copy happens to be installed)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from momentum_proxy import cli
    except Exception as e:  # a broken CLI must fail the build with the reason, not a traceback from inside MkDocs
        raise PluginError(f"cannot import momentum_proxy.cli for the CLI reference: {type(e).__name__}: {e}") from e
    if "torch" in sys.modules:
        log.warning("importing momentum_proxy.cli imported torch; option parsing must stay torch-free")
    return cli


def sub_commands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """{name: (sub-parser, one-line help)} of a parser's sub-commands, in the order they were added."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, child in action.choices.items():
                found.setdefault(name, (child, helps.get(name, "")))
    return found


def help_text(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return parser.format_help().rstrip()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def section(name: str, parser: argparse.ArgumentParser, summary: str, level: int) -> list[str]:
    anchor = name.replace(" ", "-")
    lines = [f"{'#' * level} `mproxy {name}` {{ #{anchor} }}", ""]
    if summary:
        lines += [summary[0].upper() + summary[1:] + ".", ""]
    lines += ["```text", help_text(parser), "```", ""]
    for child_name, (child, child_summary) in sub_commands(parser).items():
        lines += section(f"{name} {child_name}", child, child_summary, level + 1)
    return lines


def render() -> str:
    """The generated part of the CLI reference, as Markdown."""
    cli = load_cli()
    top = cli.parser()
    commands = sub_commands(top)
    missing = [name for name in cli.COMMANDS if name not in commands]
    if missing:
        raise PluginError(f"cli.parser() has no sub-command {', '.join(missing)} of cli.COMMANDS")
    lines = ["| command | what it does |", "|---|---|"]
    for name in cli.COMMANDS:
        summary = commands[name][1].replace("|", r"\|")
        lines.append(f"| [`mproxy {name}`](#{name}) | {summary} |")
    lines += ["", "## `mproxy` { #mproxy }", "", "```text", help_text(top), "```", ""]
    for name in cli.COMMANDS:
        lines += section(name, *commands[name], level=2)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lost its marker {MARKER}")
    return markdown.replace(MARKER, render())
