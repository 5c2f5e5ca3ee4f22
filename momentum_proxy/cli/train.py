"""`mproxy train`, `sweep`, `tune` and `tune-rerank`: training runs and the searches over them.

`train` and `sweep` take every TrainConfig field declared with `config.option` as an option (help and original
spellings from the field's metadata), typed by the field's annotation; --recipe and --config give the values that
explicit options override."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import jsonargparse

from momentum_proxy import paths
from momentum_proxy.cli.options import CommaList, Parser, add_command, add_runtime_options
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import check_writable_folder, read_json
from momentum_proxy.training.config import RECIPES, TrainConfig, read_config_file, recipe_for, run_folder_name

OPTIONS = {f.name: f for f in fields(TrainConfig) if "help" in f.metadata}
SWEEP_GRIDS = ("backbone", "feature_dim", "proxy_momentum")  # comma-separated grids in `sweep`


class OptionParser(Parser):
    """The parser of `train` and `sweep`.

    It parses twice: what --recipe, --data_path and --config give (`option_values`), found by the first pass, is
    the base of the second, so explicit options override it wherever they stand and a config file's values are
    type-checked like the command line's; `recipe` then names the recipe chosen (`chosen_recipe`: never `auto`).
    `grids`: the options that take comma-separated grids (`sweep`)."""

    def __init__(self, *args, grids: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.grids = grids

    def parse_args(self, args=None, namespace=None, **kwargs):
        first = super().parse_args(args, namespace, **kwargs)
        settable = {action.dest for action in self._actions if not action.required}
        try:
            recipe, values = option_values(first, self.grids)
            base = {k: v for k, v in values.items() if k in settable}
        except UserError as e:
            self.error(str(e))
        parsed = super().parse_args(args, jsonargparse.Namespace(**base), **kwargs)
        parsed.recipe = recipe
        return parsed

    def type_name(self, action) -> str:
        """A training option's type as its TrainConfig field declares it ("int | None")."""
        return OPTIONS[action.dest].type if action.dest in OPTIONS else super().type_name(action)


def option_values(a, grids: tuple[str, ...] = ()) -> tuple[str, dict]:
    """The recipe (`chosen_recipe`), and what it and --config give: every option (the `grids` as one-value
    lists), and the file's data and out."""
    from_file = read_config_file(a.config) if a.config else {}
    recipe = chosen_recipe(a, a.data or from_file.get("data"))
    values = TrainConfig.from_recipe(recipe, **from_file).to_dict()
    return recipe, {k: [v] if k in grids else v for k, v in values.items() if k in OPTIONS or k in from_file}


def chosen_recipe(a, data: str | None) -> str:
    """--recipe, where `auto` (the default) means `original` for the original spelling --data_path, `catalogue`
    for an images split in `data` (`recipe_for`), else `default`."""
    if a.recipe != "auto":
        return a.recipe
    if a.data_path and not a.data:
        return "original"
    if not data:
        return "default"
    try:
        paths.check_dataset(data)  # without pandas: a missing dataset is named by `cli.check_paths`
        return recipe_for(data)
    except UserError:  # no usable dataset: the command refuses it in one line once parsed
        return "default"


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
        choices=("auto", *RECIPES),
        default="auto",
        help="auto: catalogue for an images split (prepare --split images), else default; default: the "
        "benchmark recipe; catalogue: the images protocol's; original: the original MP tool exactly (implied by "
        "--data_path); explicit options override any",
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
    p = add_command(sub, "train", help="train a model into a run folder", parser=OptionParser())
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
            "recipe": a.recipe,
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


def add_sweep(sub) -> None:
    p = add_command(
        sub,
        "sweep",
        help="train a grid of runs (resumable: finished runs are skipped)",
        parser=OptionParser(grids=SWEEP_GRIDS),
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


def add_tune(sub) -> None:
    p = add_command(sub, "tune", help="search training options on the validation split with Optuna (resumable)")
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
    p.add_argument(
        "--recipe",
        default="auto",
        help=f"recipe every trial starts from, and trial 0 runs: auto | {' | '.join(RECIPES)} (auto: the one "
        "train picks for the dataset, catalogue for an images split)",
    )


def run_tune(a) -> None:
    from momentum_proxy.experiments.tune import tune  # job

    a.on_interrupt = "the same command continues the study"
    tune(a.data, a.out, a.trials, space=a.space, budget_epochs=a.budget_epochs, seed=a.seed, recipe=a.recipe)


def add_tune_rerank(sub) -> None:
    p = add_command(
        sub,
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
    add_runtime_options(p)
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
