"""The one option system of `mproxy`: jsonargparse parsers for the root and every command, with one help
formatter and one one-line error path, and the option types and option groups that several commands share."""

from __future__ import annotations

import argparse
import inspect
import re

import jsonargparse

from momentum_proxy.config import DEFAULT_RERANK, DEFAULT_RERANK_MAX_ITEMS

DEVICE_HELP = "auto (cuda when available, else cpu) | cpu | cuda[:N]"
RUNTIME_HELP = "torch | onnx (the run's verified ONNX export in onnxruntime)"
# --tta of the commands that embed queries for an index, which follow the index's own (retrieve, serve)
INDEX_TTA_HELP = (
    "test-time augmentation: none | flip (each image and its mirror image, embeddings averaged; about twice the "
    "embedding time); default: the index's own, else none"
)


def add_runtime_options(p) -> None:
    """--device and --runtime: where and with what a run's model embeds images."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--runtime", default="torch", help=RUNTIME_HELP)


class HelpFormatter(jsonargparse.DefaultHelpFormatter):
    """jsonargparse's help (each option's type and default) without "null": an option whose default is None
    says in its help what happens without it, and its type is shown without "| null". An option whose type is
    a function (`memory_size`) shows its metavar (SIZE) only."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._SubParsersAction):  # the list of commands: no "(required)"
            return action.help or ""
        text = super()._get_help_string(action)
        if action.default is None or action.default == [None]:  # [None]: a sweep grid of an open option
            text = text.replace(", default: %(default)s", "").replace(" (default: %(default)s)", "")
        return text

    def _get_type_str(self, action):
        if inspect.isfunction(action.type):
            return None
        type_str = super()._get_type_str(action)
        return type_str.replace(" | null", "") if type_str else type_str


class Parser(jsonargparse.ArgumentParser):
    """The parser of `mproxy` and of each of its commands: no option abbreviations (`--split` is never
    `--split-file`), no environment variables or --print_config, and every error one line,
    `mproxy: error: ...`, exit status 2 (jsonargparse words a bad value in several lines, with the usage)."""

    def __init__(self, *args, **kwargs):
        defaults = {"formatter_class": HelpFormatter, "allow_abbrev": False, "print_config": None, "env_prefix": False}
        super().__init__(*args, **{**defaults, **kwargs})

    def error(self, message: str, ex: Exception | None = None):
        self.exit(2, f"mproxy: error: {' '.join(self.reword(message).split())}\n")

    def reword(self, message: str) -> str:
        """jsonargparse's messages about a value or a missing argument, in the options' own spellings."""
        bad = re.match(r'Parser key "([\w.]+)":.*?(?:Got|Given) value: ([^\n]*)', message, re.S)
        if bad:
            parser, action = self.find(bad[1])
            if action:
                return f"{flag(action)} takes {parser.type_name(action)}, got {bad[2]!r}"
        missing = re.match(r"the following arguments are required: (.*)", message)
        if missing:
            names = [flag(self.find(key)[1]) or key for key in missing[1].split(", ")]
            return f"the following arguments are required: {', '.join(names)}"
        command = re.match(r'expected "([\w.]+)" to be one of', message)
        if command:
            parser = self.find(command[1] + ".x")[0]
            sub = parser._subcommands_action
            return f"the following arguments are required: {sub.metavar} (one of {', '.join(sub.choices)})"
        return message

    def find(self, key: str) -> tuple[Parser, argparse.Action | None]:
        """The (sub-)parser of a jsonargparse key (`index.out`, `prepare.folder.src`) and its action."""
        parser, *path = self, *key.split(".")
        while len(path) > 1 and parser._subcommands_action and path[0] in parser._subcommands_action.choices:
            parser = parser._subcommands_action.choices[path.pop(0)]
        return parser, next((a for a in parser._actions if a.dest == path[-1]), None)

    def type_name(self, action: argparse.Action) -> str:
        """How an error names the type an option takes."""
        hint = getattr(action, "_typehint", action.type)
        return getattr(hint, "__name__", str(hint))


def add_command(sub, name: str, help: str, parser: Parser | None = None) -> Parser:
    """Add `parser` (a plain `Parser` if None) as the command `name` of the sub-commands action `sub`."""
    child = sub.add_subcommand(name, parser or Parser(), help=help)
    child.prog = f"{sub.parent_parser.prog} {name}"  # jsonargparse writes "PROG [options] NAME"
    return child


def flag(action: argparse.Action | None) -> str | None:
    """The name an error gives an argument: its first flag, or a positional's name."""
    return action and (action.option_strings[0] if action.option_strings else action.metavar or action.dest)


class CommaList:
    """An option type: comma-separated `item`s ("1,2,4"); a list (a default, a config file's value) passes."""

    def __init__(self, item: type):
        self.item = item

    def __call__(self, value) -> list:
        items = value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
        try:
            values = [self.item(v) if isinstance(v, str) else v for v in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {self.item.__name__} values, got {value!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one {self.item.__name__} value")
        return values

    def __repr__(self) -> str:  # the type that --help shows
        return f"{self.item.__name__},..."


# ----------------------------------------------------------------------------------------------- re-ranking
def add_rerank_options(p, what: str = "") -> None:
    """--rerank and its parameters (`retrieval.rerank.Rerank`, checked by `rerank_of` before any model loads)."""
    p.add_argument(
        "--rerank",
        default=None,
        help="re-ranking: none | aqe (alpha-query expansion) | dba (database-side augmentation) | "
        f"dba+aqe | kreciprocal (k-reciprocal, Zhong et al. 2017); default: {DEFAULT_RERANK} (chosen "
        f"on validation) for collections of up to {DEFAULT_RERANK_MAX_ITEMS:,} items, none above "
        f"(docs: Re-ranking){'. ' + what if what else ''}",
    )
    p.add_argument(
        "--rerank-k",
        type=int,
        default=None,
        help="neighbours: k of aqe and dba, k1 of kreciprocal (default: 5 for aqe and dba, 10 for dba+aqe, "
        "20 for kreciprocal)",
    )
    p.add_argument(
        "--rerank-alpha",
        type=float,
        default=None,
        help="aqe and dba: a neighbour weighs its similarity to the power alpha (default: 3; 0, a plain "
        "average, for dba+aqe)",
    )
    p.add_argument("--rerank-k2", type=int, default=None, help="kreciprocal: local query expansion size (default: 6)")
    p.add_argument(
        "--rerank-lambda",
        type=float,
        default=None,
        help="kreciprocal: weight of the original distance beside the Jaccard distance (default: 0.3)",
    )
    p.add_argument(
        "--rerank-keep",
        type=int,
        default=None,
        help="the first N hits of the plain cosine search stay first and the re-ranking orders the rest, "
        "so a duplicate or an item just added is never buried (default: 1; 0: the method alone)",
    )


def rerank_of(a):
    """The parsed --rerank options as a `Rerank` (UserError for a bad one)."""
    from momentum_proxy.retrieval.rerank import Rerank  # job: numpy and scipy, for the commands that search

    if a.rerank is None:  # the default pipeline's, up to the collection size it is cheap for
        return Rerank(
            DEFAULT_RERANK,
            a.rerank_k,
            a.rerank_alpha,
            a.rerank_k2,
            a.rerank_lambda,
            a.rerank_keep,
            up_to=DEFAULT_RERANK_MAX_ITEMS,
        )
    return Rerank(a.rerank, a.rerank_k, a.rerank_alpha, a.rerank_k2, a.rerank_lambda, a.rerank_keep)
