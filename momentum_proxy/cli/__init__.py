"""The `mproxy` command line: a thin layer over the Python API (one sub-command per job).

One option system, jsonargparse (`options.Parser`): the `mproxy` parser and every command's parser, each command's
options (`add_X`) next to its job (`run_X`) in the module of its concern (`data`, `train`, `evaluate`, `retrieval`,
`deploy`, `reports`). Each command imports its job inside its `run_*` function ("# job" marks them): parsing options
and refusing bad ones then takes a fraction of a second, with no torch, pandas or optional extra imported."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from momentum_proxy import __version__, paths
from momentum_proxy.cli.data import add_prepare, run_prepare
from momentum_proxy.cli.deploy import add_bench, add_export, run_bench, run_export
from momentum_proxy.cli.evaluate import add_evaluate, run_evaluate
from momentum_proxy.cli.options import Parser
from momentum_proxy.cli.reports import add_demo, add_plot, add_report, run_demo, run_plot, run_report
from momentum_proxy.cli.retrieval import add_index, add_retrieve, add_serve, run_index, run_retrieve, run_serve
from momentum_proxy.cli.train import (
    OptionParser,
    add_sweep,
    add_train,
    add_train_options,
    add_tune,
    add_tune_rerank,
    config_from_args,
    run_sweep,
    run_train,
    run_tune,
    run_tune_rerank,
)
from momentum_proxy.config import check_tta
from momentum_proxy.errors import UserError, require_extra
from momentum_proxy.perf import tune_allocator

__all__ = [  # what tests, the docs hook and `python -m momentum_proxy` use
    "COMMANDS",
    "OptionParser",
    "add_train_options",
    "check_paths",
    "config_from_args",
    "main",
    "needed_extras",
    "parser",
]

COMMANDS = {
    "prepare": (add_prepare, run_prepare),
    "train": (add_train, run_train),
    "evaluate": (add_evaluate, run_evaluate),
    "retrieve": (add_retrieve, run_retrieve),
    "index": (add_index, run_index),
    "demo": (add_demo, run_demo),
    "sweep": (add_sweep, run_sweep),
    "serve": (add_serve, run_serve),
    "export": (add_export, run_export),
    "tune": (add_tune, run_tune),
    "tune-rerank": (add_tune_rerank, run_tune_rerank),
    "plot": (add_plot, run_plot),
    "report": (add_report, run_report),
    "bench": (add_bench, run_bench),
}


class CommandLine(Parser):
    """The `mproxy` parser: its `parse_args` gives the chosen command's options as one flat namespace, with the
    command's name as `command` (and a nested command's, e.g. `prepare folder`, under its own dest: `kind`)."""

    def parse_args(self, args=None, namespace=None, **kwargs) -> argparse.Namespace:
        cfg = super().parse_args(args, namespace, **kwargs)
        names, parser = {}, self
        while parser._subcommands_action is not None:
            action = parser._subcommands_action
            names[action.dest] = cfg[action.dest]
            cfg, parser = cfg[names[action.dest]], action.choices[names[action.dest]]
        return argparse.Namespace(**names, **cfg.as_dict())


def parser() -> CommandLine:
    """The `mproxy` parser, with every command of `COMMANDS` as a sub-command."""
    p = CommandLine(prog="mproxy", description="Momentum-proxy fine-grained image retrieval toolkit")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}", help="Print the version and exit.")
    sub = p.add_subcommands(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return p


def check_paths(a) -> None:
    """Refuse a missing or wrong input path in one line before anything heavy is imported (see `paths`)."""
    run_dir = getattr(a, "run_dir", None)
    if a.command in ("evaluate", "retrieve", "index", "export", "tune-rerank") and run_dir:
        paths.check_run(run_dir)
    if a.command == "train" and not a.resume and a.data:
        paths.check_dataset(a.data)
    if a.command in ("tune", "sweep") or a.command == "bench" and a.data:
        paths.check_dataset(a.data)
    if a.command == "serve" or a.command in ("retrieve", "evaluate") and a.index:
        paths.check_index(a.index)
    if a.command == "retrieve":
        paths.check_file(a.query, "query image")
    if a.command == "index" and a.images:
        if not Path(a.images).exists():
            raise UserError(f"image folder not found: {a.images}")
    if a.command == "index" and a.list:
        paths.check_file(a.list, "image list")
    if a.command == "evaluate" and a.embeddings:
        paths.check_file(a.embeddings, "embeddings file")
    if a.command in ("tune", "tune-rerank") and a.space:
        paths.check_file(a.space, "search space file")
    if a.command in ("plot", "report"):
        paths.check_folder(a.folder, "run folder" if getattr(a, "what", None) == "curves" else "folder of runs")


def needed_extras(a) -> list[tuple[str, str]]:
    """(extra, what needs it) for each optional extra (pyproject.toml) the parsed command line needs."""
    needs = [(a.command, f"mproxy {a.command}")] if a.command in ("serve", "tune") else []
    if a.command == "tune-rerank":
        needs.append(("tune", "mproxy tune-rerank"))
    if a.command == "bench" and not a.exact_search or a.command == "export" and a.fmt != "torchscript":
        needs.append(("export", f"mproxy {a.command}"))
    if getattr(a, "runtime", None) == "onnx":
        needs.append(("export", f"mproxy {a.command} --runtime onnx"))
    if getattr(a, "log", None) == "tensorboard":  # train, sweep
        needs.append(("track", f"mproxy {a.command} --log tensorboard"))
    store = {"index": "out", "retrieve": "index", "serve": "index", "evaluate": "index"}.get(a.command)
    if store and paths.milvus_location(getattr(a, store) or ""):
        needs.append(("milvus", f"mproxy {a.command} with a Milvus index"))
    return needs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser().parse_args(argv)
    args.argv, args.on_interrupt = argv, None  # a command may say how to continue after Ctrl-C
    tune_allocator()
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    try:
        for extra, what in needed_extras(args):
            require_extra(extra, what)
        check_paths(args)
        check_tta(getattr(args, "tta", None))
        COMMANDS[args.command][1](args)
    except UserError as e:
        print(f"mproxy: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mproxy: interrupted" + (f"; {args.on_interrupt}" if args.on_interrupt else ""), file=sys.stderr)
        sys.exit(130)
