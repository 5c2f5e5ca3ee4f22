"""The `mproxy` command line: a thin layer over the Python API (one sub-command per job).

Each command imports its job inside its `run_*` function ("# job" marks them): parsing options and
refusing bad ones then takes a fraction of a second, with no torch, pandas or optional extra imported."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from momentum_proxy import __version__
from momentum_proxy.config import METRICS, RECIPES, TrainConfig, read_config_file, run_folder_name
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import check_writable_folder
from momentum_proxy.perf import tune_allocator


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default (options whose default is None say theirs in their help text)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------- prepare
def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="make a prepared dataset (images + manifest.csv)")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    s = kinds.add_parser("synthetic", help="generate the embedded fine-grained default dataset")
    s.add_argument("--classes", type=int, default=40)
    s.add_argument("--per-class", type=int, default=30)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0, help="drawing and the choice of val classes")
    add_output_options(s, val_default="0.2")
    for kind, text in [("folder", "an ImageFolder tree (one sub-folder per class)"),
                       ("car", "Stanford Cars (cars_annos.mat + car_ims/)"),
                       ("cub", "CUB-200-2011 (images.txt, ... , images/)"),
                       ("sop", "Stanford Online Products (Ebay_train.txt, Ebay_test.txt)"),
                       ("isc", "In-shop Clothes (list_eval_partition.txt, img/)")]:
        k = kinds.add_parser(kind, help=text)
        k.add_argument("--src", required=True, help="the raw dataset folder")
        k.add_argument("--max-side", "--short-side", dest="short_side", type=int, default=256,
                       help="resize once so the short side is at most this (0: keep originals' size)")
        k.add_argument("--workers", type=int, default=1, help="processes for re-encoding (1 or 2)")
        if kind in ("car", "cub"):
            k.add_argument("--crop", action="store_true", help="cut each image to its annotated box")
        if kind == "folder":
            k.add_argument("--split-file", help="CSV lines 'class_name,split' (train/val/test) instead of halves")
        k.add_argument("--val-seed", type=int, default=0, help="seed of the choice of val classes")
        add_output_options(k, val_default="0.2" if kind == "folder" else "0")


def add_output_options(p, val_default: str) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val-classes", default=val_default,
                   help="validation classes carved out of the train classes: a count (5) or a fraction (0.2); "
                        "0: none")
    p.add_argument("--overwrite", action="store_true", help="replace a prepared dataset already in --out")


def run_prepare(a) -> None:
    from momentum_proxy.data.manifest import parse_val_classes  # job
    from momentum_proxy.data.prepare import check_output  # job

    val = parse_val_classes(a.val_classes)
    check_output(Path(a.out), a.overwrite)
    if a.kind == "synthetic":
        from momentum_proxy.data.synthetic import generate_synthetic  # job

        out = generate_synthetic(a.out, classes=a.classes, per_class=a.per_class, size=a.size, seed=a.seed,
                                 val_classes=val, overwrite=a.overwrite)
    else:
        from momentum_proxy.data.prepare import PREPARERS  # job

        kwargs = {"short_side": a.short_side or None, "workers": a.workers, "val_classes": val,
                  "val_seed": a.val_seed, "overwrite": a.overwrite}
        if a.kind in ("car", "cub"):
            kwargs["crop"] = a.crop
        if a.kind == "folder":
            kwargs["split_file"] = a.split_file
        out = PREPARERS[a.kind](a.src, a.out, **kwargs)
    from momentum_proxy.data.manifest import read_manifest  # job
    from momentum_proxy.data.prepare import split_counts  # job

    counts = split_counts(read_manifest(out))
    per_split = ", ".join(f"{s} {n} images / {counts['classes_per_split'][s]} classes"
                          for s, n in counts["counts"].items())
    print(f"prepared dataset: {out}: {counts['images']} images, {counts['classes']} classes ({per_split})")


# ----------------------------------------------------------------------------------------------- train
# The options are TrainConfig's fields declared with `config.option` (help and the original spellings in the
# field's metadata). The default shown in --help is the default recipe's (`--recipe original` changes some;
# explicit flags win).
OPTION_TYPES = {"bool": "flag", "list[int]": "int_list", "list[str]": "str_list", "int": int, "float": float,
                "str": str}


def train_options() -> list[tuple[str, list[str], object, str]]:
    """(field, flags, type, help) of every `TrainConfig` field that is an `mproxy train` option."""
    return [(f.name, ["--" + f.name.replace("_", "-"), *f.metadata["aliases"]],
             OPTION_TYPES[f.type.split(" | ")[0]], f.metadata["help"].replace("%", "%%"))
            for f in fields(TrainConfig) if "help" in f.metadata]


SWEEP_LISTS = ("backbone", "feature_dim", "momentum")  # comma-separated grids in `sweep`


def add_train_options(p, *, for_sweep: bool = False) -> None:
    """The training options, generated from `train_options()` (all default to None: "not given")."""
    d = TrainConfig(data="", out="")
    p.add_argument("--data", help="prepared dataset folder")
    p.add_argument("--data_path", "--data-path", help="(original) folder holding prepared datasets by name")
    p.add_argument("--data_name", "--data-name", default="car", help="(original) dataset name under --data_path")
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="default: the measured recipe; original: the original MP tool exactly (implied by "
                        "--data_path); explicit options override either")
    p.add_argument("--config", help="options from a JSON or YAML file (e.g. `mproxy tune`'s best.json, a run's "
                                    "config.json); command-line options override it")
    for name, flags, kind, text in train_options():
        shown = f"{text} (default: {getattr(d, name)})"
        if for_sweep and name in SWEEP_LISTS:
            p.add_argument(*flags, dest=name, type=str_list, default=None, help=f"comma-separated grid; {shown}")
        elif kind == "flag":
            p.add_argument(*flags, dest=name, action="store_true", default=None, help=text)
        else:
            types = {"int_list": int_list, "str_list": str_list}
            p.add_argument(*flags, dest=name, type=types.get(kind, kind), default=None, help=shown)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model into a run folder", formatter_class=HelpFormatter)
    add_train_options(p)
    p.add_argument("--out", help="run folder (default results/<data>_<backbone>_<loss>_<optimizer>_<momentum>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last finished epoch")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")


def config_from_args(a):
    """A validated TrainConfig from parsed `train` options (both spellings resolve to the same configuration).

    Needs no torch: bad options fail here, in a fraction of a second.
    """
    from_file = read_config_file(a.config) if getattr(a, "config", None) else {}
    if a.data:
        data = a.data
    elif a.data_path:
        data = str(Path(a.data_path) / a.data_name)
    elif from_file.get("data"):
        data = from_file["data"]
    else:
        raise UserError("give the prepared dataset with --data DIR (or --data_path DIR --data_name NAME)")
    data = str(Path(data).absolute())  # a resume from another folder still finds the data
    recipe = a.recipe or ("original" if a.data_path and not a.data else "default")
    given = {name: getattr(a, name) for name, *_ in train_options() if getattr(a, name, None) is not None}
    out = getattr(a, "out", None) or from_file.get("out") or ""
    cfg = TrainConfig.from_recipe(recipe, **{**from_file, **given, "data": data, "out": out})
    cfg.validate()
    if cfg.backbone == TrainConfig.backbone and "backbone" not in given and cfg.device != "cpu":
        from momentum_proxy.embedding.inference import resolve_device  # torch only when the device must be probed

        if resolve_device(cfg.device).type == "cuda":
            cfg.backbone = "resnet50"
    if not cfg.out:
        cfg.out = str(Path("results") / run_folder_name(data, cfg.backbone, cfg.loss, cfg.optimizer, cfg.momentum))
    return cfg


def run_train(a) -> None:
    if a.resume:
        from momentum_proxy.training import loop as training  # job

        training.resume(a.resume)
        out = a.resume
    else:
        cfg = config_from_args(a)
        check_writable_folder(Path(cfg.out), "the run folder")
        from momentum_proxy.training import loop as training  # job

        training.train(cfg, overwrite=a.overwrite)
        out = cfg.out
    print(f"run folder: {out}")


# ----------------------------------------------------------------------------------------------- evaluate
def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="all retrieval metrics of a run's best checkpoint or of an embeddings file")
    p.add_argument("run_dir", nargs="?", help="run folder")
    p.add_argument("--embeddings", help="evaluate a .npz (arrays features, labels, optional split) instead")
    p.add_argument("--metrics", type=str_list, default=None, help="recall,precision@1,r_precision,map@r,nmi")
    p.add_argument("--recalls", type=int_list, default=None)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")


def run_evaluate(a) -> None:
    if bool(a.run_dir) == bool(a.embeddings):
        raise UserError("give a run folder or --embeddings FILE.npz (one of them)")
    unknown = [m for m in a.metrics or [] if m not in METRICS]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if a.json and Path(a.json).is_dir():
        raise UserError(f"--json {a.json} is a folder; a file is expected there")
    from momentum_proxy.evaluation.jobs import describe, evaluate_file, evaluate_run, format_table  # job

    if a.embeddings:
        res = evaluate_file(a.embeddings, metrics=a.metrics, recalls=a.recalls, json_out=a.json)
    else:
        from momentum_proxy.deploy.runtimes import load_embedder  # job

        summary = evaluate_run(a.run_dir, metrics=a.metrics, recalls=a.recalls, json_out=a.json,
                               embedder=load_embedder(a.run_dir, a.runtime, a.device))
        print(describe(summary, a.run_dir))
        res = summary["test"]
    print(format_table(res))


# ----------------------------------------------------------------------------------------------- retrieve
def add_retrieve(sub) -> None:
    p = sub.add_parser("retrieve", help="top-K retrieval picture and ranked list for a query image")
    p.add_argument("run_dir", nargs="?", help="run folder")
    p.add_argument("--query", "--query_img_name", dest="query", required=True, help="query image file")
    p.add_argument("-k", "--retrieval_num", "--retrieval-num", dest="k", type=int, default=8)
    p.add_argument("--split", default="test", help="which images of the run's dataset to search: "
                                                    "test | val | train | all")
    p.add_argument("--data_base", "--data-base", dest="data_base",
                   help="(original) a run folder or its embeddings database (.npz)")
    p.add_argument("--index", help="search a saved index (mproxy index) instead of the run's database")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/retrieval)")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")


def run_retrieve(a) -> None:
    from momentum_proxy.retrieval.search import ranked_list, retrieve_and_draw  # job

    r, png = retrieve_and_draw(a.query, a.k, a.out, run_dir=a.run_dir, index_dir=a.index, data_base=a.data_base,
                               split=a.split, device=a.device, runtime=a.runtime)
    print(f"searched {r.collection}" + (f"; -k {a.k} capped to the {len(r.results)} images there"
                                         if len(r.results) < a.k else ""))
    print(ranked_list(r.results))
    print(f"retrieval picture: {png}")


# ----------------------------------------------------------------------------------------------- index
def add_index(sub) -> None:
    p = sub.add_parser("index", help="embed an image collection with a trained model into a faiss index")
    p.add_argument("run_dir")
    p.add_argument("--images", help="a folder of images or a prepared dataset (paths already indexed are skipped)")
    p.add_argument("--out", required=True, help="index folder (an existing one is extended)")
    p.add_argument("--rebuild", action="store_true",
                   help="make the index anew (from --images, or from its own images), replacing it atomically")
    p.add_argument("--kind", default="exact", help="exact | ivf | hnsw")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")


def run_index(a) -> None:
    from momentum_proxy.retrieval.search import build_index  # job

    summary = build_index(a.run_dir, a.images, a.out, kind=a.kind, batch_size=a.batch_size, device=a.device,
                          rebuild=a.rebuild, runtime=a.runtime)
    for k, v in summary.items():
        print(f"{k}: {v}")


# ----------------------------------------------------------------------------------------------- serve
def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="HTTP API and web page over a saved index (mproxy index)")
    p.add_argument("index", help="index folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback a --token is required)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=None, help="write token for POST/DELETE /items (default: $MPROXY_TOKEN)")
    p.add_argument("--run", default=None, help="the run that built the index (default: the one it records)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (width x height)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this origin (repeatable; off by default)")
    p.add_argument("--max-batch", type=int, default=32, help="queries embedded together at most")
    p.add_argument("--batch-wait-ms", type=float, default=50.0,
                   help="how long a batch waits for concurrent queries still being decoded (a lone query never waits)")
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", default="auto",
                   help="model processes beside the server's (CPU, torch): auto is 2 on a CPU with 2+ cores, else 0 "
                        "(the model runs in the server's process)")


def run_serve(a) -> None:
    from momentum_proxy.serving.app import TOKEN_ENV, serve  # job

    if a.max_upload_mb <= 0 or a.max_pixels < 1 or a.max_batch < 1 or a.batch_wait_ms < 0:
        raise UserError("--max-upload-mb, --max-pixels and --max-batch must be positive, --batch-wait-ms >= 0")
    serve(a.index, host=a.host, port=a.port, token=a.token or os.environ.get(TOKEN_ENV) or None, run_dir=a.run,
          device=a.device, max_upload_bytes=int(a.max_upload_mb * 2**20), max_pixels=a.max_pixels,
          cors_origins=a.cors_origin, max_batch=a.max_batch, batch_wait_ms=a.batch_wait_ms, runtime=a.runtime,
          workers=a.workers)


# ----------------------------------------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's best model to ONNX or TorchScript (verified, with a sidecar)")
    p.add_argument("run_dir")
    p.add_argument("--format", dest="fmt", default="onnx", help="onnx | torchscript")
    p.add_argument("--out", required=True, help="model file; its description goes to FILE.json")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the run's)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the output inside the model")
    p.add_argument("--int8", action="store_true", help="static int8 (QDQ) ONNX model, kept only if it pays off")
    p.add_argument("--calibration", metavar="DATA", help="prepared dataset whose training images calibrate --int8")


def run_export(a) -> None:
    from momentum_proxy.deploy.export import export_run, sidecar_path  # job

    info = export_run(a.run_dir, a.out, fmt=a.fmt, image_size=a.image_size, normalize=a.normalize, int8=a.int8,
                      calibration=a.calibration)
    check = info["check"]
    print(f"exported {info['backbone']} ({info['image_size']} px -> {info['feature_dim']}-d) to {a.out} "
          f"and {sidecar_path(a.out)}")
    print(f"check on {check['images']} test images: min cosine {check['min_cosine']:.6f}, "
          f"top-{check['k']} neighbours identical")
    if a.int8:
        q = info["int8"]
        print(f"int8 vs fp32 on {q['images']} images, split {q['split']}: mean cosine {q['mean_cosine_to_fp32']}, R@1 "
              f"{100 * q['recall@1']['int8']:.2f} ({100 * q['recall@1_change']:+.2f}), MAP@R "
              f"{100 * q['map@r']['int8']:.2f} ({100 * q['map@r_change']:+.2f}), "
              f"{q['images_per_second']['int8']} vs {q['images_per_second']['fp32']} img/s (x{q['speedup']})")


# ----------------------------------------------------------------------------------------------- demo
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthetic data -> train -> evaluate -> retrieve, in a few minutes on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="auto")


def run_demo(a) -> None:
    from momentum_proxy.demo import demo  # job

    demo(a.out, epochs=a.epochs, device=a.device)


# ----------------------------------------------------------------------------------------------- experiments
def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="train a grid of runs (resumable: finished runs are skipped)")
    add_train_options(p, for_sweep=True)
    p.add_argument("--seeds", type=int_list, default=None, help="comma-separated seeds; every cell runs each")
    p.add_argument("--out", required=True, help="folder for the grid's run folders")


def run_sweep(a) -> None:
    from momentum_proxy.experiments.sweep import sweep  # job

    grid = {}
    try:
        for name, convert in (("backbone", str), ("feature_dim", int), ("momentum", float)):
            if getattr(a, name):
                grid[name] = [convert(v) for v in getattr(a, name)]
    except ValueError as e:
        raise UserError(f"bad grid value: {e}") from None
    if a.seeds:
        grid["seed"] = a.seeds
    base = config_from_args(argparse.Namespace(**{**vars(a), **{k: None for k in grid}}))
    folders = sweep(base, a.out, grid)
    print(f"{len(folders)} runs in {a.out}")


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="figures: R@1 against momentum over a sweep, or one run's curves")
    p.add_argument("what", choices=("momentum", "curves"))
    p.add_argument("folder", help="a sweep folder (momentum) or a run folder (curves)")
    p.add_argument("--out", help="output path without extension (PNG and PDF are written)")


def run_plot(a) -> None:
    from momentum_proxy.experiments.sweep import plot_curves, plot_momentum  # job

    paths = (plot_momentum if a.what == "momentum" else plot_curves)(a.folder, a.out)
    print("\n".join(str(p) for p in paths))


def add_report(sub) -> None:
    p = sub.add_parser("report", help="Markdown Benchmarks table of all runs below a folder")
    p.add_argument("folder")
    p.add_argument("--out", help="Markdown file (default FOLDER/benchmarks.md)")


def run_report(a) -> None:
    from momentum_proxy.experiments.sweep import report  # job

    print(report(a.folder, a.out))


# ----------------------------------------------------------------------------------------------- tune
def add_tune(sub) -> None:
    p = sub.add_parser("tune", help="search training options on the validation split with Optuna (resumable)")
    p.add_argument("--data", required=True, help="prepared dataset folder with a val split")
    p.add_argument("--out", required=True, help="study folder: study.db, trials/N/, best.json, report.md, plots")
    p.add_argument("--trials", type=int, required=True,
                   help="finished trials wanted in total; running the command again continues the study")
    p.add_argument("--space", help="JSON or YAML search space put over the default one (README, 'Tune')")
    p.add_argument("--budget-epochs", type=int, default=None,
                   help="epochs of every trial and of best.json (default: the space's epochs, 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every trial's training")


def run_tune(a) -> None:
    from momentum_proxy.experiments.tune import tune  # job

    tune(a.data, a.out, a.trials, space=a.space, budget_epochs=a.budget_epochs, seed=a.seed)


# ----------------------------------------------------------------------------------------------- bench
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="images/s of the training and embedding pipelines vs the bare model, and of "
                                     "embedding in PyTorch vs onnxruntime (interleaved repeats)")
    p.add_argument("--data", help="prepared dataset (default: generate full-size JPEGs and prepare them)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repeats of every measurement")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", help="write the figures here")


def run_bench(a) -> None:
    from momentum_proxy.experiments.bench import bench  # job

    res = bench(data=a.data, backbone=a.backbone, image_size=a.image_size, batch_size=a.batch_size,
                steps=a.steps, rounds=a.rounds, device=a.device, workers=a.workers, compile=a.compile, amp=a.amp,
                json_out=a.json)
    print(f"img/s, median of {res['rounds']} interleaved rounds [min-max]")
    for name, (low, high) in res["spread"].items():
        print(f"{name:16s} {res[f'{name}_ips']:8.1f}  [{low:.1f}-{high:.1f}]")
    print(f"train efficiency {res['train_efficiency']:.3f}   embed efficiency {res['embed_efficiency']:.3f}   "
          f"onnxruntime fp32 / torch {res['onnx_speedup']:.3f}   int8 / torch {res['onnx_int8_speedup']:.3f}")


COMMANDS = {"prepare": (add_prepare, run_prepare), "train": (add_train, run_train),
            "evaluate": (add_evaluate, run_evaluate), "retrieve": (add_retrieve, run_retrieve),
            "index": (add_index, run_index), "demo": (add_demo, run_demo), "sweep": (add_sweep, run_sweep),
            "serve": (add_serve, run_serve), "export": (add_export, run_export), "tune": (add_tune, run_tune),
            "plot": (add_plot, run_plot), "report": (add_report, run_report), "bench": (add_bench, run_bench)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mproxy", description="Momentum-proxy fine-grained image retrieval toolkit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for add, _ in COMMANDS.values():
        add(sub)
    _show_defaults(p)
    return p


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """Give every (sub-)parser the formatter that prints defaults."""
    p.formatter_class = HelpFormatter
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _show_defaults(child)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    tune_allocator()
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    try:
        COMMANDS[args.command][1](args)
    except UserError as e:
        print(f"mproxy: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mproxy: interrupted", file=sys.stderr)
        sys.exit(130)
