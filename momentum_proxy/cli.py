"""The `mproxy` command line: a thin layer over the Python API (one sub-command per job).

Each command imports its job inside its `run_*` function ("# job" marks them): parsing options and
refusing bad ones then takes a fraction of a second, with no torch, pandas or optional extra imported."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import jsonargparse

from momentum_proxy import __version__, paths
from momentum_proxy.config import (
    DEFAULT_RERANK,
    DEFAULT_RERANK_MAX_ITEMS,
    DEFAULT_TTA,
    METRICS,
    RECIPES,
    TrainConfig,
    check_tta,
    parse_memory,
    read_config_file,
    run_folder_name,
)
from momentum_proxy.errors import UserError, require_extra
from momentum_proxy.fileio import check_writable_folder, read_json
from momentum_proxy.perf import passive_omp_wait, tune_allocator


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default (options whose default is None say theirs in their help text)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


DEVICE_HELP = "auto (cuda when available, else cpu) | cpu | cuda[:N]"


class OptionHelpFormatter(jsonargparse.DefaultHelpFormatter):
    """jsonargparse's help (each option's type and default) without "null": an option whose default is None
    says in its help what happens without it, and its type is shown without "| null"."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action)
        if action.default is None or action.default == [None]:  # [None]: a sweep grid of an open option
            text = text.replace(", default: %(default)s", "").replace(" (default: %(default)s)", "")
        return text

    def _get_type_str(self, action):
        type_str = super()._get_type_str(action)
        return type_str.replace(" | null", "") if type_str else type_str


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


# ----------------------------------------------------------------------------------------------- prepare
def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="make a prepared dataset (images + manifest.csv)")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    s = kinds.add_parser("synthetic", help="generate the embedded fine-grained default dataset")
    s.add_argument("--classes", type=int, default=40, help="species (classes) to draw")
    s.add_argument("--per-class", type=int, default=30, help="images of each class")
    s.add_argument("--size", type=int, default=128, help="side of the square images, in pixels")
    s.add_argument("--seed", type=int, default=0, help="drawing and the choice of val classes")
    add_output_options(s, val_default="0.2")
    for kind, text in [
        ("folder", "an ImageFolder tree (one sub-folder per class)"),
        ("car", "Stanford Cars (cars_annos.mat + car_ims/)"),
        ("cub", "CUB-200-2011 (images.txt, ... , images/)"),
        ("sop", "Stanford Online Products (Ebay_train.txt, Ebay_test.txt)"),
        ("isc", "In-shop Clothes (list_eval_partition.txt, img/)"),
    ]:
        k = kinds.add_parser(kind, help=text)
        k.add_argument("--src", required=True, help="the raw dataset folder")
        k.add_argument(
            "--max-side",
            "--short-side",
            dest="short_side",
            type=int,
            default=256,
            metavar="MAX_SIDE",
            help="resize once so the short side is at most this (0: keep originals' size)",
        )
        k.add_argument("--workers", type=int, default=1, help="processes for re-encoding (1 or 2)")
        if kind in ("car", "cub"):
            k.add_argument("--crop", action="store_true", help="cut each image to its annotated box")
        if kind == "folder":
            k.add_argument(
                "--split",
                choices=("classes", "images"),
                default="classes",
                help="classes: class-disjoint train/val/test classes (the benchmark protocol); images: "
                "every class in train, val and test, its photos divided (a model for your own "
                "catalogue; docs: Datasets)",
            )
            k.add_argument(
                "--val-fraction",
                type=float,
                default=0.2,
                help="--split images: share of each class's photos in val (0: none; so does --val-classes 0)",
            )
            k.add_argument(
                "--test-fraction", type=float, default=0.3, help="--split images: share of each class's photos in test"
            )
            k.add_argument("--split-file", help="CSV lines 'class_name,split' (train/val/test) instead of halves")
        k.add_argument(
            "--val-seed",
            type=int,
            default=0,
            help="seed of the choice of val classes (of each class's photos with --split images)",
        )
        add_output_options(k, val_default="0.2" if kind == "folder" else "0")


def add_output_options(p, val_default: str) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--val-classes",
        default=val_default,
        help="validation classes carved out of the train classes: a count (5) or a fraction (0.2); 0: none",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset already in --out")


def run_prepare(a) -> None:
    from momentum_proxy.data.manifest import parse_val_classes  # job
    from momentum_proxy.data.prepare import check_output  # job

    val = parse_val_classes(a.val_classes)
    check_output(Path(a.out), a.overwrite)
    if a.kind == "synthetic":
        from momentum_proxy.data.synthetic import generate_synthetic  # job

        out = generate_synthetic(
            a.out,
            classes=a.classes,
            per_class=a.per_class,
            size=a.size,
            seed=a.seed,
            val_classes=val,
            overwrite=a.overwrite,
        )
    else:
        from momentum_proxy.data.prepare import PREPARERS  # job

        kwargs = {
            "short_side": a.short_side or None,
            "workers": a.workers,
            "val_classes": val,
            "val_seed": a.val_seed,
            "overwrite": a.overwrite,
        }
        if a.kind in ("car", "cub"):
            kwargs["crop"] = a.crop
        if a.kind == "folder":
            kwargs.update(
                split_file=a.split_file, split=a.split, val_fraction=a.val_fraction, test_fraction=a.test_fraction
            )
        out = PREPARERS[a.kind](a.src, a.out, **kwargs)
    from momentum_proxy.data.manifest import describe_protocol, read_manifest, split_protocol  # job
    from momentum_proxy.data.prepare import split_counts  # job

    df = read_manifest(out)
    counts = split_counts(df)
    per_split = ", ".join(
        f"{s} {n} images / {counts['classes_per_split'][s]} classes" for s, n in counts["counts"].items()
    )
    print(f"prepared dataset: {out}: {counts['images']} images, {counts['classes']} classes ({per_split})")
    print(describe_protocol(split_protocol(df), "val" in counts["counts"]))


# ----------------------------------------------------------------------------------------------- train
# `train` and `sweep` take every TrainConfig field declared with `config.option` as an option (help and original
# spellings from the field's metadata), parsed by jsonargparse by the field's type; the other commands are plain
# argparse. --recipe and --config give the values that explicit options override.
OPTIONS = {f.name: f for f in fields(TrainConfig) if "help" in f.metadata}
SWEEP_GRIDS = ("backbone", "feature_dim", "proxy_momentum")  # comma-separated grids in `sweep`


class OptionParser(jsonargparse.ArgumentParser):
    """The parser of `train` and `sweep` (jsonargparse), a sub-command of the plain argparse `mproxy` parser.

    It parses twice: what --recipe, --data_path and --config give (`option_values`), found by the first pass, is
    the base of the second, so explicit options override it wherever they stand and a config file's values are
    type-checked like the command line's. `grids`: the options that take comma-separated grids (`sweep`)."""

    def __init__(self, *args, grids: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **{"formatter_class": OptionHelpFormatter, "allow_abbrev": False, **kwargs})
        self.grids = grids

    def parse_args(self, args=None):
        first = super().parse_args(args)
        settable = {action.dest for action in self._actions if not action.required}
        try:
            base = {k: v for k, v in option_values(first, self.grids).items() if k in settable}
        except UserError as e:
            self.error(str(e))
        return super().parse_args(args, namespace=jsonargparse.Namespace(**base))

    def parse_known_args(self, args=None, namespace=None):
        """As an argparse sub-command: every remaining argument is this parser's (an unknown one is an error)."""
        return self.parse_args(args), []

    def error(self, message: str, ex: Exception | None = None):
        """One line, `mproxy: error: ...`, and exit status 2 (jsonargparse words a bad value in several)."""
        bad = re.match(r'Parser key "(\w+)":.*?(?:Got|Given) value: ([^\n]*)', message, re.S)
        if bad and bad[1] in OPTIONS:
            message = f"--{bad[1].replace('_', '-')} takes {OPTIONS[bad[1]].type}, got {bad[2]!r}"
        self.exit(2, f"mproxy: error: {' '.join(message.split())}\n")


def option_values(a, grids: tuple[str, ...] = ()) -> dict:
    """What --recipe (original where --data_path implies it) and --config give: every option (the `grids` as
    one-value lists), and the file's data and out."""
    from_file = read_config_file(a.config) if a.config else {}
    recipe = a.recipe or ("original" if a.data_path and not a.data else "default")
    values = TrainConfig.from_recipe(recipe, **from_file).to_dict()
    return {k: [v] if k in grids else v for k, v in values.items() if k in OPTIONS or k in from_file}


def option_type(hint, grid: bool = False):
    """The parsing type of an option whose field is annotated `hint`: lists and grids are comma-separated."""
    if get_origin(hint) is list:
        return CommaList(get_args(hint)[0])
    if grid:  # the grid of an optional value (backbone: str | None) holds values
        return CommaList(next(t for t in get_args(hint) or [hint] if t is not type(None)))
    return hint


def option_flags(name: str) -> list[str]:
    """The flags of a training option: `--name-with-dashes`, the original tool's spellings, and the underscore
    spelling of every multi-word option (`--image_size` as the original's `--batch_size`)."""
    flags = ["--" + name.replace("_", "-"), *OPTIONS[name].metadata["aliases"]]
    return flags + ([f"--{name}"] if "_" in name and f"--{name}" not in flags else [])


def add_train_options(p: OptionParser) -> None:
    """The data, recipe and config options, and one option per TrainConfig option field (`OPTIONS`)."""
    p.add_argument("--data", help="prepared dataset folder")
    p.add_argument("--data_path", "--data-path", help="(original) folder holding prepared datasets by name")
    p.add_argument("--data_name", "--data-name", default="car", help="(original) dataset name under --data_path")
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        default=None,
        help="default: the measured recipe; original: the original MP tool exactly (implied by "
        "--data_path); explicit options override either",
    )
    p.add_argument(
        "--config",
        help="options from a JSON or YAML file (e.g. `mproxy tune`'s best.json, a run's "
        "config.json); command-line options override it",
    )
    p.add_argument(
        "--optimizer_type",
        help="(original) adam* | sgd* (momentum proxies) | adam | sgd (learned "
        "proxies): sets --optimizer and --proxy-update",
    )
    defaults, hints = TrainConfig(data="", out=""), get_type_hints(TrainConfig)
    for name, f in OPTIONS.items():
        flags, text = option_flags(name), f.metadata["help"].replace("(None: ", "(default: ")
        default = getattr(defaults, name)
        if hints[name] is bool:
            p.add_argument(
                *flags, dest=name, action=jsonargparse.ActionYesNo(no_prefix="no-"), default=default, help=text
            )
        elif name in p.grids:
            p.add_argument(
                *flags,
                dest=name,
                type=option_type(hints[name], grid=True),
                default=[default],
                help=f"comma-separated grid of: {text}",
            )
        else:
            p.add_argument(*flags, dest=name, type=option_type(hints[name]), default=default, help=text)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model into a run folder", options=True)
    add_train_options(p)
    p.add_argument("--out", help="run folder (default: results/<data>_<backbone>_<loss>_<optimizer>[-momentum]_<m>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last finished epoch")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")


def config_from_args(a) -> TrainConfig:
    """A validated TrainConfig from parsed `train` options (every spelling resolves to the same configuration).

    Needs no torch, unless the device must be probed to name the run folder after its default backbone.
    """
    if a.data:
        data = a.data
    elif a.data_path:
        data = str(Path(a.data_path) / a.data_name)
    else:
        raise UserError("give the prepared dataset with --data DIR (or --data_path DIR --data_name NAME)")
    data = str(Path(data).absolute())  # a resume from another folder still finds the data
    cfg = TrainConfig.from_dict(
        {
            **{name: getattr(a, name) for name in OPTIONS},
            "optimizer_type": a.optimizer_type,
            "data": data,
            "out": a.out or "",
        }
    )
    cfg.validate()
    if not cfg.out:  # named after the backbone, which may depend on the device
        kind = cfg.device.split(":")[0]
        if cfg.backbone is None and kind == "auto":
            from momentum_proxy.embedding.inference import resolve_device  # torch only when the device must be probed

            kind = resolve_device(cfg.device).type
        cfg = cfg.for_device(kind)
        cfg.out = str(Path("results") / run_folder_name(cfg))
    return cfg


def given_options(argv: list[str]) -> set[str]:
    """The training options (TrainConfig field names, or data/config/recipe) named on the command line."""
    names = {
        "--data": "data",
        "--data_path": "data",
        "--data-path": "data",
        "--data_name": "data",
        "--data-name": "data",
        "--config": "config",
        "--recipe": "recipe",
        "--optimizer_type": "optimizer_type",
    }
    for name in OPTIONS:
        names.update({flag: name for flag in [*option_flags(name), f"--no-{name.replace('_', '-')}"]})
    return {names[arg.split("=")[0]] for arg in argv if arg.split("=")[0] in names}


RESUME_MAY_CHANGE = ("device", "loader_workers", "log")  # where and how a run trains and logs, not what it learns


def check_resume_options(a) -> tuple[int | None, dict]:
    """For `train --resume RUN`: the extended `--epochs` (if given) and the given `RESUME_MAY_CHANGE` options;
    any other option that differs from the run's config.json is refused, naming it (a resume continues the run
    as configured)."""
    if not (Path(a.resume) / "config.json").is_file():
        raise UserError(f"{a.resume} is not a run folder (no config.json)")
    stored = TrainConfig.from_dict(read_json(Path(a.resume) / "config.json"))
    given = given_options(a.argv)
    for name in sorted(given & {"data", "config", "recipe"}):
        raise UserError(f"--{name} cannot be given with --resume: the run keeps its own (config.json)")
    asked = TrainConfig.from_dict(
        {
            **{n: getattr(a, n) for n in OPTIONS},
            "optimizer_type": a.optimizer_type,
            "data": stored.data,
            "out": stored.out,
        }
    )
    fields_given = given - {"optimizer_type"}
    if "optimizer_type" in given:  # the original spelling sets both
        fields_given |= {"optimizer", "proxy_update"}
    may_change = ", ".join("--" + n.replace("_", "-") for n in RESUME_MAY_CHANGE)
    for name in sorted(fields_given - {"epochs", *RESUME_MAY_CHANGE}):
        if getattr(asked, name) != getattr(stored, name):
            raise UserError(
                f"--{name.replace('_', '-')} {getattr(asked, name)} differs from the run's "
                f"{getattr(stored, name)} (config.json); --resume continues the run as configured "
                f"(--epochs may extend it; {may_change} may change); start a new run for other options"
            )
    changes = {name: getattr(asked, name) for name in fields_given & set(RESUME_MAY_CHANGE)}
    return (a.epochs if "epochs" in given else None), changes


def run_train(a) -> None:
    if a.resume:
        epochs, changes = check_resume_options(a)
        from momentum_proxy.training import loop as training  # job

        a.on_interrupt = f"continue with: mproxy train --resume {a.resume}"
        summary = training.resume(a.resume, epochs=epochs, **changes)
        if "already_finished" in summary:
            print(
                f"{a.resume}: already finished at epoch {summary['already_finished']}; nothing changed "
                f"(its test result: {Path(a.resume) / 'eval.json'})"
            )
            return
        out = a.resume
    else:
        cfg = config_from_args(a)
        check_writable_folder(Path(cfg.out), "the run folder")
        from momentum_proxy.training import loop as training  # job

        a.on_interrupt = f"continue with: mproxy train --resume {cfg.out}"
        training.train(cfg, overwrite=a.overwrite)
        out = cfg.out
    print(f"run folder: {out}")


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


# ----------------------------------------------------------------------------------------------- evaluate
def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="all retrieval metrics of a run's best checkpoint or of an embeddings file")
    p.add_argument("run_dir", nargs="?", help="run folder")
    p.add_argument("--embeddings", help="evaluate a .npz (arrays features, labels, optional split) instead")
    p.add_argument("--metrics", type=CommaList(str), default=None, help="recall,precision@1,r_precision,map@r,nmi")
    p.add_argument(
        "--recalls",
        type=CommaList(int),
        default=None,
        help="K of Recall@K, comma-separated (default: the run's, else 1,2,4,8)",
    )
    p.add_argument(
        "--out",
        "--json",
        dest="out",
        help="write the results here (default: RUN_DIR/evaluate-RUNTIME[-TTA][-val][-RERANK].json, "
        f"e.g. evaluate-torch-{'-'.join(p for p in (DEFAULT_TTA, DEFAULT_RERANK) if p != 'none')}.json "
        "with the defaults; the run's "
        "eval.json, its test result from training, is never changed)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")
    p.add_argument(
        "--tta",
        default=None,
        help="test-time augmentation: none | flip (each image and its mirror "
        f"image, embeddings averaged; about twice the embedding time); default: "
        f"{DEFAULT_TTA} (an --embeddings file takes none only)",
    )
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="the run's split to evaluate: val to choose settings (e.g. --rerank), test once for the chosen one",
    )
    p.add_argument(
        "--index",
        help="search the run's test photos in this saved index (your real catalogue, built "
        "by `mproxy index`; classes matched by name) instead of the run's own gallery; "
        "writes RUN_DIR/evaluate-RUNTIME[-TTA][-RERANK]-index.json",
    )
    add_rerank_options(p)


def run_evaluate(a) -> None:
    if bool(a.run_dir) == bool(a.embeddings):
        raise UserError("give a run folder or --embeddings FILE.npz (one of them)")
    if a.index and (a.embeddings or a.split != "test"):
        raise UserError(
            "--index scores a run's test photos against the index; give a run folder, without "
            "--embeddings or --split val"
        )
    if a.embeddings and a.split != "test":
        raise UserError("--split applies to a run; an --embeddings file is evaluated on its own rows (its split array)")
    rerank = rerank_of(a)
    if a.embeddings and a.tta not in (None, "none"):
        raise UserError("--tta applies where a run's model embeds images; an --embeddings file is already embedded")
    unknown = [m for m in a.metrics or [] if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if a.out and Path(a.out).is_dir():
        raise UserError(f"--out {a.out} is a folder; a file is expected there")
    from momentum_proxy.evaluation.jobs import (  # job
        describe,
        evaluate_file,
        evaluate_run,
        evaluation_file,
        format_table,
    )

    out = a.out
    if a.index:
        from momentum_proxy.retrieval.catalogue import evaluate_index  # job

        summary = evaluate_index(
            a.run_dir,
            a.index,
            metrics=a.metrics,
            recalls=a.recalls,
            device=a.device,
            runtime=a.runtime,
            tta=a.tta,
            rerank=rerank,
            out=a.out,
        )
        print(describe(summary, a.run_dir))
        res = summary["test"]
        out = a.out or evaluation_file(a.run_dir, summary["runtime"], summary["tta"], rerank=rerank, index=True)
    elif a.embeddings:
        res = evaluate_file(a.embeddings, metrics=a.metrics, recalls=a.recalls, json_out=a.out, rerank=rerank)
        print(f"{a.embeddings}: rerank {rerank}")
    else:
        from momentum_proxy.deploy.runtimes import load_embedder  # job

        tta = a.tta or DEFAULT_TTA
        embedder = load_embedder(a.run_dir, a.runtime, a.device, tta)
        out = a.out or evaluation_file(a.run_dir, embedder.runtime, tta, split=a.split, rerank=rerank)
        summary = evaluate_run(
            a.run_dir, metrics=a.metrics, recalls=a.recalls, out=out, embedder=embedder, split=a.split, rerank=rerank
        )
        print(describe(summary, a.run_dir))
        res = summary[a.split]
    print(format_table(res))
    if out:
        print(f"written: {out}")


# ----------------------------------------------------------------------------------------------- retrieve
def add_retrieve(sub) -> None:
    p = sub.add_parser("retrieve", help="top-K retrieval picture and ranked list for a query image")
    p.add_argument("run_dir", nargs="?", help="run folder")
    p.add_argument("--query", "--query_img_name", dest="query", required=True, help="query image file")
    p.add_argument(
        "-k", "--retrieval_num", "--retrieval-num", dest="k", type=int, default=8, help="how many results to show"
    )
    p.add_argument(
        "--split", default="test", help="which images of the run's dataset to search: test | val | train | all"
    )
    p.add_argument(
        "--data_base", "--data-base", dest="data_base", help="(original) a run folder or its embeddings database (.npz)"
    )
    p.add_argument(
        "--index",
        help="search a saved index (mproxy index: a folder, milvus:PATH.db or "
        "milvus://HOST:PORT/COLLECTION) instead of the run's database",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder of the picture and results.json (default: ./retrieval "
        "with --index, else RUN_DIR/retrieval); earlier ones are kept: the next are numbered "
        "(retrieval-2.png, results-2.json)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")
    p.add_argument(
        "--tta",
        default=None,
        help="test-time augmentation: none | flip (each image and its mirror image, "
        "embeddings averaged; about twice the embedding time); default: the "
        "index's own, else none",
    )
    add_rerank_options(p)


def run_retrieve(a) -> None:
    rerank = rerank_of(a)
    from momentum_proxy.retrieval.present import ranked_list, retrieve_and_draw  # job

    r, png = retrieve_and_draw(
        a.query,
        a.k,
        a.out,
        run_dir=a.run_dir,
        index_dir=a.index,
        data_base=a.data_base,
        split=a.split,
        device=a.device,
        runtime=a.runtime,
        tta=a.tta,
        rerank=rerank,
    )
    print(
        f"searched {r.collection}"
        + (f" ({r.about})" if r.about else "")
        + (f", re-ranked by {rerank}" if rerank.active else "")
        + (f"; -k {a.k} capped to the {len(r.results)} images there" if len(r.results) < a.k else "")
    )
    print(ranked_list(r))
    print(f"retrieval picture: {png}")


# ----------------------------------------------------------------------------------------------- index
def add_index(sub) -> None:
    p = sub.add_parser("index", help="embed an image collection with a trained model into an index (faiss or Milvus)")
    p.add_argument("run_dir", help="run folder whose selected checkpoint embeds the images")
    p.add_argument(
        "--images",
        help="a folder of images or a prepared dataset (images already indexed, by path or by content, are skipped)",
    )
    p.add_argument(
        "--list",
        default=None,
        help="instead of --images: a text or CSV file of image paths, one a line, "
        "each optionally followed by ',class_name' (read and embedded a chunk at a time)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="index folder (faiss), milvus:PATH.db (Milvus Lite) or "
        "milvus://HOST:PORT/COLLECTION (a Milvus server, token from $MPROXY_MILVUS_TOKEN); an existing "
        "index is extended",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="make the index anew (from --images, or from its own images), replacing it atomically",
    )
    add_index_kind_options(p)
    p.add_argument(
        "--labels",
        default="auto",
        help="class names: auto (a prepared dataset's, or the sub-folder names of a folder of class "
        "folders) | folders | none | a CSV file of 'path,class_name' lines",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images embedded together")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")
    p.add_argument(
        "--tta",
        default=None,
        help="test-time augmentation: none | flip (each image and its mirror image, "
        "embeddings averaged; about twice the embedding time); default: the "
        f"index's own, else {DEFAULT_TTA}",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=4096,
        help="under torchrun (`torchrun --nproc-per-node N -m momentum_proxy index ...`), every rank "
        "embeds its share of the images, this many to a chunk file (a rerun of a killed build "
        "reuses them), and rank 0 fills the index",
    )
    add_rerank_options(p, "The index keeps this re-ranking's neighbour lists (saved with it, kept up to date)")


def add_index_kind_options(p) -> None:
    """The faiss index kind of a new or rebuilt index: --kind, or --max-memory to choose it."""
    p.add_argument(
        "--kind",
        default=None,
        help="faiss index of a new or rebuilt index: exact | ivf | hnsw | ivfpq (default: exact, or the one "
        "--max-memory chooses)",
    )
    p.add_argument(
        "--max-memory",
        type=memory_size,
        default=None,
        metavar="SIZE",
        help="memory the faiss index may take (e.g. 512MB, 2GB, 1.5GiB): chooses exact, hnsw, ivf or ivfpq "
        "as autofaiss does, or, with --kind, sizes that kind; recall@10 against exact search is "
        "measured and saved with the index",
    )


def memory_size(text: str) -> int:
    """A size such as 2GB or 1.5GiB in bytes (an argparse type: a bad one is argparse's one-line error)."""
    try:
        return parse_memory(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--max-memory ")) from None


def run_index(a) -> None:
    rerank = rerank_of(a)
    from momentum_proxy.retrieval.build import build_index  # job

    a.on_interrupt = "the index is as it was before; run the same command again"
    summary = build_index(
        a.run_dir,
        a.images,
        a.out,
        kind=a.kind,
        batch_size=a.batch_size,
        device=a.device,
        rebuild=a.rebuild,
        runtime=a.runtime,
        labels=a.labels,
        tta=a.tta,
        rerank=rerank,
        image_list=a.list,
        chunk_size=a.chunk_size,
        max_memory=a.max_memory,
    )
    for k, v in (summary or {}).items():  # None on torchrun ranks other than 0
        print(f"{k}: {v}")


# ----------------------------------------------------------------------------------------------- serve
def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API and web page over a saved index (mproxy index)")
    p.add_argument("index", help="index folder, milvus:PATH.db or milvus://HOST:PORT/COLLECTION")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback a --token is required)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--token", default=None, help="write token for POST/DELETE /items (default: $MPROXY_TOKEN)")
    p.add_argument("--run", default=None, help="the run that built the index (default: the one it records)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (width x height)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this origin (repeatable; off by default)")
    p.add_argument("--max-batch", type=int, default=32, help="queries embedded together at most")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=50.0,
        help="how long a batch waits for concurrent queries still being decoded (a lone query never waits)",
    )
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")
    p.add_argument(
        "--tta",
        default=None,
        help="test-time augmentation: none | flip (each image and its mirror image, "
        "embeddings averaged; about twice the embedding time); default: the "
        "index's own, else none",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--mmap",
        action="store_true",
        help="map an ivf or ivfpq index's inverted lists from its file instead of reading them into memory "
        "(starts without loading the whole index; adds are refused, deletes work)",
    )
    p.add_argument(
        "--model-processes",
        default="auto",
        help="model processes beside the server's (CPU, torch): auto is 2 on a CPU with 2+ cores, else 0 "
        "(the model runs in the server's process)",
    )
    add_rerank_options(
        p,
        "It applies to the searches that name none; a request may name another, within the "
        "neighbour lists the index keeps",
    )


def run_serve(a) -> None:
    rerank = rerank_of(a)
    passive_omp_wait()  # before torch loads (serving.app imports it)
    from momentum_proxy.serving.app import TOKEN_ENV, serve  # job

    if a.max_upload_mb <= 0 or a.max_pixels < 1 or a.max_batch < 1 or a.batch_wait_ms < 0:
        raise UserError("--max-upload-mb, --max-pixels and --max-batch must be positive, --batch-wait-ms >= 0")
    serve(
        a.index,
        host=a.host,
        port=a.port,
        token=a.token or os.environ.get(TOKEN_ENV) or None,
        run_dir=a.run,
        device=a.device,
        max_upload_bytes=int(a.max_upload_mb * 2**20),
        max_pixels=a.max_pixels,
        cors_origins=a.cors_origin,
        max_batch=a.max_batch,
        batch_wait_ms=a.batch_wait_ms,
        runtime=a.runtime,
        model_processes=a.model_processes,
        tta=a.tta,
        rerank=rerank,
        mmap=a.mmap,
    )


# ----------------------------------------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's best model to ONNX or TorchScript (verified, with a sidecar)")
    p.add_argument("run_dir", help="run folder whose selected checkpoint is exported")
    p.add_argument("--format", dest="fmt", default="onnx", metavar="FORMAT", help="onnx | torchscript")
    p.add_argument("--out", required=True, help="model file; its description goes to FILE.json")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the run's)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the output inside the model")
    p.add_argument("--int8", action="store_true", help="static int8 (QDQ) ONNX model, kept only if it pays off")
    p.add_argument("--calibration", metavar="DATA", help="prepared dataset whose training images calibrate --int8")
    p.add_argument(
        "--tta",
        default="none",
        help="test-time augmentation in the exported graph: none | flip (each "
        "image and its mirror image, embeddings averaged; the output is then "
        "L2-normalised)",
    )


def run_export(a) -> None:
    from momentum_proxy.deploy.export import export_run, sidecar_path  # job

    info = export_run(
        a.run_dir,
        a.out,
        fmt=a.fmt,
        image_size=a.image_size,
        normalize=a.normalize,
        int8=a.int8,
        calibration=a.calibration,
        tta=a.tta,
    )
    check = info["check"]
    tta = "" if info["tta"] == "none" else f", test-time augmentation {info['tta']} in the graph"
    print(
        f"exported {info['backbone']} ({info['image_size']} px -> {info['feature_dim']}-d{tta}) to {a.out} "
        f"and {sidecar_path(a.out)}"
    )
    print(
        f"check on {check['images']} test images: min cosine {check['min_cosine']:.6f}, "
        f"top-{check['k']} neighbours identical"
    )
    if a.int8:
        q = info["int8"]
        print(
            f"int8 vs fp32 on {q['images']} images, split {q['split']}: mean cosine {q['mean_cosine_to_fp32']}, R@1 "
            f"{100 * q['recall@1']['int8']:.2f} ({100 * q['recall@1_change']:+.2f}), MAP@R "
            f"{100 * q['map@r']['int8']:.2f} ({100 * q['map@r_change']:+.2f}), "
            f"{q['images_per_second']['int8']} vs {q['images_per_second']['fp32']} img/s (x{q['speedup']})"
        )


# ----------------------------------------------------------------------------------------------- demo
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthetic data -> train -> evaluate -> retrieve, in a few minutes on CPU")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's dataset, run and pictures")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def run_demo(a) -> None:
    from momentum_proxy.demo import demo  # job

    demo(a.out, epochs=a.epochs, device=a.device)


# ----------------------------------------------------------------------------------------------- experiments
def add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="train a grid of runs (resumable: finished runs are skipped)", options=True, grids=SWEEP_GRIDS
    )
    add_train_options(p)
    p.add_argument("--seeds", type=CommaList(int), default=None, help="comma-separated seeds; every cell runs each")
    p.add_argument("--out", required=True, help="folder for the grid's run folders")


def run_sweep(a) -> None:
    from momentum_proxy.experiments.sweep import sweep  # job

    a.on_interrupt = "the same command continues the sweep (finished runs are skipped, the killed one resumes)"
    grid = {name: getattr(a, name) for name in SWEEP_GRIDS}  # one value each unless swept
    base = config_from_args(argparse.Namespace(**{**vars(a), **{name: values[0] for name, values in grid.items()}}))
    if a.seeds:
        grid["seed"] = a.seeds
    folders = sweep(base, a.out, grid)
    print(f"{len(folders)} runs in {a.out}")


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="figures: R@1 against momentum over a sweep, or one run's curves")
    p.add_argument(
        "what",
        choices=("momentum", "curves"),
        help="momentum: R@1 against the proxy momentum over a sweep; curves: one run's metrics by epoch",
    )
    p.add_argument("folder", help="a sweep folder (momentum) or a run folder (curves)")
    p.add_argument("--out", help="output path without extension (PNG and PDF are written)")


def run_plot(a) -> None:
    from momentum_proxy.experiments.sweep import plot_curves, plot_momentum  # job

    paths = (plot_momentum if a.what == "momentum" else plot_curves)(a.folder, a.out)
    print("\n".join(str(p) for p in paths))


def add_report(sub) -> None:
    p = sub.add_parser("report", help="Markdown Benchmarks table of all runs below a folder")
    p.add_argument("folder", help="folder searched for run folders (at any depth)")
    p.add_argument("--out", help="Markdown file (default: FOLDER/benchmarks.md)")


def run_report(a) -> None:
    from momentum_proxy.experiments.sweep import report  # job

    print(report(a.folder, a.out))


# ----------------------------------------------------------------------------------------------- tune
def add_tune(sub) -> None:
    p = sub.add_parser("tune", help="search training options on the validation split with Optuna (resumable)")
    p.add_argument("--data", required=True, help="prepared dataset folder with a val split")
    p.add_argument("--out", required=True, help="study folder: study.db, trials/N/, best.json, report.md, plots")
    p.add_argument(
        "--trials",
        type=int,
        required=True,
        help="finished trials wanted in total; running the command again continues the study",
    )
    p.add_argument("--space", help="JSON or YAML search space put over the default one (docs: Tune)")
    p.add_argument(
        "--budget-epochs",
        type=int,
        default=None,
        help="epochs of every trial and of best.json (default: the space's epochs, 3)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every trial's training")


def run_tune(a) -> None:
    from momentum_proxy.experiments.tune import tune  # job

    a.on_interrupt = "the same command continues the study"
    tune(a.data, a.out, a.trials, space=a.space, budget_epochs=a.budget_epochs, seed=a.seed)


def add_tune_rerank(sub) -> None:
    p = sub.add_parser(
        "tune-rerank",
        help="search re-ranking settings (--rerank) on a trained run's validation "
        "split with Optuna, without retraining (resumable)",
    )
    p.add_argument("run_dir", help="run folder (its selected checkpoint embeds the val split once)")
    p.add_argument("--out", required=True, help="study folder: study.db, val-embeddings.npz, best.json, report.md")
    p.add_argument(
        "--trials",
        type=int,
        required=True,
        help="finished trials wanted in total (trial 0 is no re-ranking); running the command again "
        "continues the study",
    )
    p.add_argument(
        "--space", help="JSON or YAML search space put over the default one: method, k, alpha, k2, lam (docs: Tune)"
    )
    p.add_argument(
        "--metric", default="map@r", help="val metric to maximise: map@r | r_precision | precision@1 | recall@K"
    )
    p.add_argument("--tta", default="none", help="test-time augmentation of the val embeddings: none | flip")
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")


def run_tune_rerank(a) -> None:
    from momentum_proxy.experiments.tune_rerank import tune_rerank  # job

    a.on_interrupt = "the same command continues the study"
    tune_rerank(
        a.run_dir,
        a.out,
        a.trials,
        space=a.space,
        metric=a.metric,
        tta=a.tta,
        runtime=a.runtime,
        device=a.device,
        seed=a.seed,
    )


# ----------------------------------------------------------------------------------------------- bench
def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="images/s of the training and embedding pipelines vs the bare model, and of "
        "embedding in PyTorch vs onnxruntime (interleaved repeats)",
    )
    p.add_argument("--data", help="prepared dataset (default: generate full-size JPEGs and prepare them)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone to measure (as train's --backbone)")
    p.add_argument("--image-size", type=int, default=224, help="input size in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (embedding batches are twice it)")
    p.add_argument("--steps", type=int, default=10, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repeats of every measurement")
    p.add_argument("--loader-workers", type=int, default=None, help="data-loader processes (default: as train's)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--amp", default="none", help="none | bf16 | fp16 (CUDA) mixed precision, as train's")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as train's")
    p.add_argument("--json", help="write the figures here")
    p.add_argument(
        "--exact-search",
        type=search_shape,
        metavar="QxNxD",
        help="instead: GFLOP/s of evaluation's exact k-NN, Q queries x N gallery items x D dimensions "
        "(e.g. 4096x100000x512), against a bare torch.mm of the same products",
    )
    p.add_argument("--top-k", type=int, default=10, help="neighbours per query of --exact-search")


def search_shape(text: str) -> tuple[int, int, int]:
    """QUERIESxGALLERYxDIM as three positive ints (an argparse type)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"takes QUERIESxGALLERYxDIM, e.g. 4096x100000x512, not {text!r}")
    return tuple(int(p) for p in parts)


def run_bench(a) -> None:
    if a.exact_search:
        return run_search_bench(a)
    from momentum_proxy.experiments.bench import bench  # job

    res = bench(
        data=a.data,
        backbone=a.backbone,
        image_size=a.image_size,
        batch_size=a.batch_size,
        steps=a.steps,
        rounds=a.rounds,
        device=a.device,
        loader_workers=a.loader_workers,
        compile=a.compile,
        amp=a.amp,
        json_out=a.json,
    )
    print(f"img/s, median of {res['rounds']} interleaved rounds [min-max]")
    for name, (low, high) in res["spread"].items():
        print(f"{name:16s} {res[f'{name}_ips']:8.1f}  [{low:.1f}-{high:.1f}]")
    print(
        f"train efficiency {res['train_efficiency']:.3f}   embed efficiency {res['embed_efficiency']:.3f}   "
        f"onnxruntime fp32 / torch {res['onnx_speedup']:.3f}   int8 / torch {res['onnx_int8_speedup']:.3f}"
    )


def run_search_bench(a) -> None:
    from momentum_proxy.experiments.bench import bench_search  # job

    q, n, d = a.exact_search
    res = bench_search(q, n, d, a.top_k, rounds=a.rounds, device=a.device, json_out=a.json)
    print(
        f"exact search {q} x {n} x {d}, top {res['k']}, {res['device']} ({res['kernel']} kernel), "
        f"{res['threads']} threads: GFLOP/s, median of {res['rounds']} interleaved rounds [min-max]"
    )
    for name, (low, high) in res["spread"].items():
        print(f"{name:16s} {res[f'{name}_gflops']:8.1f}  [{low:.1f}-{high:.1f}]")
    other = f"   torch kernel / mm {res['torch_knn_ratio']:.3f}" if "torch_knn_ratio" in res else ""
    print(f"search / mm {res['ratio']:.3f} (goal >= 0.8){other}")


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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `mproxy: error: ...`, exit status 2 (argparse prints the usage too),
    and which takes no abbreviation of an option (`--split` is never `--split-file`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str):
        self.exit(2, f"mproxy: error: {message} (`{self.prog} --help` lists the options)\n")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mproxy", description="Momentum-proxy fine-grained image retrieval toolkit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=command_parser)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for add, _ in COMMANDS.values():
        add(sub)
    _show_defaults(p)
    return p


def command_parser(*, options: bool = False, grids: tuple[str, ...] = (), **kwargs) -> argparse.ArgumentParser:
    """A sub-command's parser: an `OptionParser` for the training options (`options`), else plain argparse."""
    return OptionParser(grids=grids, **kwargs) if options else OneLineParser(**kwargs)


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Give every plain argparse (sub-)parser the formatter that prints defaults (an OptionParser prints its own)."""
    if isinstance(p, OptionParser):
        return
    p.formatter_class = HelpFormatter
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


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
