"""Hyperparameter search on the validation split with Optuna (`mproxy tune`).

Every trial is an ordinary run folder `OUT/trials/<number>/`, selected on the class-disjoint val split by val
MAP@R and trained without the final test evaluation (`final_test=False`): no trial ever embeds the test split.
The objective is the best val MAP@R over the trained epochs (1..E): the pretrained start (epoch 0) still
competes for a run's best.pt, but would tie every configuration that does not beat it, so it is only reported.
The study lives in `OUT/study.db` (SQLite). Running the same command again continues it: a trial left running
by a killed process is marked failed and its parameters are tried again, and the study goes on until it holds
`trials` finished ones (complete, pruned, or failed on a bad option combination). Every trial starts from a recipe
(`--recipe`; auto: the one `mproxy train` picks for the dataset, `catalogue` for an images split), and trial 0 of
a new study is that recipe's values of the searched options, so the tuner never recommends a configuration that
scored below what `train` would run. At the end: `best.json` (a config for `mproxy train --config`), `report.md` and its
plots.
"""

from __future__ import annotations

import json
import shlex
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import optuna
from optuna.trial import TrialState

from momentum_proxy.config import read_mapping_file
from momentum_proxy.data.loading import load_datasets
from momentum_proxy.embedding.inference import resolve_device
from momentum_proxy.errors import UserError
from momentum_proxy.experiments.sweep import plot_curves
from momentum_proxy.fileio import check_writable_folder, folder_lock, write_json, write_text
from momentum_proxy.models.backbones import resolve_config
from momentum_proxy.plots import history_figure, importances_figure, params_figure
from momentum_proxy.runs import RunDir
from momentum_proxy.training import loop as training
from momentum_proxy.training.config import LOSS_NAMES, RECIPE_VALUES, RECIPES, TrainConfig, recipe_for, upgrade_options
from momentum_proxy.training.losses import HAS_MARGIN

OBJECTIVE = "val_map@r"  # maximised: the best trained epoch's val MAP@R
STUDY_NAME = "mproxy-tune"
DEFAULT_EPOCHS = 3
TUNER_OWNED = ("data", "out", "select", "select_metric", "test_every_epoch", "final_test")
NOT_RESULT_OPTIONS = ("loader_workers", "device", "log_every", "eval_batch_size")  # may change on a resume
FINISHED = "finished"  # user attribute of every trial that counts towards --trials
DEFAULT = "default_recipe"  # user attribute of trial 0 (and of its retry): {searched parameter: why it was drawn}
RECIPE = "recipe"  # user attribute of trial 0 (and of its retry): the recipe it ran

# The default search space: what measurably matters for proxy losses on a pretrained backbone (docs:
# Tune). Scale and margin ranges are per loss: their meaning differs (ArcFace's margin is in
# degrees, NormalizedSoftmax's scale is 1/temperature); a loss without a margin gets none.
DEFAULT_SPACE = {
    "lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "backbone_lr_mult": {"type": "float", "low": 0.01, "high": 1.0, "log": True},
    "warmup_epochs": {"type": "int", "low": 0, "high": 2},
    "schedule": {"type": "categorical", "choices": ["multistep", "cosine"]},
    "loss": {"type": "categorical", "choices": list(LOSS_NAMES)},
    "loss_scale": {
        "per_loss": {
            "proxy_nca": {"type": "float", "low": 1.0, "high": 32.0, "log": True},
            "normalized_softmax": {"type": "float", "low": 8.0, "high": 64.0, "log": True},
            "cos_face": {"type": "float", "low": 8.0, "high": 64.0, "log": True},
            "arc_face": {"type": "float", "low": 8.0, "high": 64.0, "log": True},
            "proxy_anchor": {"type": "float", "low": 8.0, "high": 64.0, "log": True},
        }
    },
    "margin": {
        "per_loss": {
            "cos_face": {"type": "float", "low": 0.1, "high": 0.5},
            "arc_face": {"type": "float", "low": 10.0, "high": 40.0},
            "proxy_anchor": {"type": "float", "low": 0.05, "high": 0.3},
        }
    },
    "proxy_momentum": {"type": "float", "low": 0.05, "high": 0.95},
    "momentum_target": {"type": "categorical", "choices": ["mean", "sum"]},
    "proxy_init": {"type": "categorical", "choices": ["class_mean", "random"]},
    "image_size": {"type": "categorical", "choices": [160, 192, 224]},
    "feature_dim": {"type": "categorical", "choices": [128, 256, 512]},
    "pooling": {"type": "categorical", "choices": ["max", "avgmax"]},
    "aug_scale_min": {"type": "float", "low": 0.08, "high": 0.6},
    "epochs": DEFAULT_EPOCHS,
}


# ----------------------------------------------------------------------------------------------- the space
class Space:
    """Searched options (`{"type": float|int|categorical, ...}` or `{"per_loss": {LOSS: spec}}`) and fixed
    ones (plain values), keyed by TrainConfig field."""

    def __init__(self, entries: dict):
        known = {f.name for f in fields(TrainConfig)}
        for name, spec in entries.items():
            if name not in known:
                raise UserError(f"search space: unknown option {name!r}")
            if name in TUNER_OWNED:
                raise UserError(f"search space: {name!r} is set by the tuner")
            if isinstance(spec, dict):
                check_spec(name, spec)
        if isinstance(entries.get("epochs", DEFAULT_EPOCHS), dict):
            raise UserError("search space: epochs is the budget of every trial; give a number, not a range")
        self.entries = entries

    @property
    def fixed(self) -> dict:
        return {k: v for k, v in self.entries.items() if not isinstance(v, dict)}

    @property
    def searched(self) -> dict:
        return {k: v for k, v in self.entries.items() if isinstance(v, dict)}

    def suggest(self, trial: optuna.Trial) -> dict:
        """Draw one configuration: the chosen options by TrainConfig field (the loss first: others depend on it)."""
        searched = self.searched
        options = {}
        if "loss" in searched:
            options["loss"] = suggest_one(trial, "loss", searched["loss"])
        loss = options.get("loss", self.fixed.get("loss", TrainConfig.loss))
        for name, spec in searched.items():
            if name == "loss" or (name == "margin" and loss not in HAS_MARGIN):
                continue
            if "per_loss" in spec:
                if loss in spec["per_loss"]:
                    options[name] = suggest_one(trial, f"{name}[{loss}]", spec["per_loss"][loss])
            else:
                options[name] = suggest_one(trial, name, spec)
        return options


def check_spec(name: str, spec: dict, per_loss_allowed: bool = True) -> None:
    """UserError unless `spec` is a well-formed range, choice list, or per-loss table of them."""
    where = f"search space: {name}"
    if per_loss_allowed and set(spec) == {"per_loss"} and isinstance(spec["per_loss"], dict):
        for loss, sub in spec["per_loss"].items():
            if loss not in LOSS_NAMES:
                raise UserError(f"{where}: unknown loss {loss!r}; choose from {', '.join(LOSS_NAMES)}")
            if not isinstance(sub, dict):
                raise UserError(f"{where}[{loss}]: expected a range or choices, got {sub!r}")
            check_spec(f"{name}[{loss}]", sub, per_loss_allowed=False)
        return
    kind = spec.get("type")
    if kind == "categorical":
        choices = spec.get("choices")
        if set(spec) != {"type", "choices"} or not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: categorical needs exactly a non-empty list 'choices'")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise UserError(f"{where}: choices must be numbers, strings, booleans or null")
    elif kind in ("float", "int"):
        extra = set(spec) - {"type", "low", "high", "log", "step"}
        low, high = spec.get("low"), spec.get("high")
        number = int if kind == "int" else (int, float)
        if extra or not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)):
            raise UserError(f"{where}: {kind} needs numbers 'low' and 'high' (optional 'log', 'step')")
        if not low < high:
            raise UserError(f"{where}: low must be below high, got {low} and {high}")
        if spec.get("log") and low <= 0:
            raise UserError(f"{where}: a log range needs low > 0, got {low}")
    else:
        raise UserError(
            f"{where}: give a plain value, or a dict with 'type' float, int or categorical "
            "(or 'per_loss'), got {spec!r}"
        )


def suggest_one(trial: optuna.Trial, param: str, spec: dict):
    if spec["type"] == "categorical":
        return trial.suggest_categorical(param, spec["choices"])
    suggest = trial.suggest_int if spec["type"] == "int" else trial.suggest_float
    kwargs = {"log": bool(spec.get("log", False))}
    if "step" in spec:
        kwargs["step"] = spec["step"]
    return suggest(param, spec["low"], spec["high"], **kwargs)


def load_space(space: str | Path | dict | None = None) -> Space:
    """The default space with the entries of `space` (a JSON/YAML file or a dict, in any spelling:
    `training.config.upgrade_options`) put over it."""
    entries = read_mapping_file(space, "space file") if isinstance(space, (str, Path)) else (space or {})
    return Space({**DEFAULT_SPACE, **upgrade_options(entries)})


# ----------------------------------------------------------------------------------------------- the study
def base_config(data: str | Path, space: Space, epochs: int, seed: int, recipe: str = "default") -> TrainConfig:
    """The fixed part of every trial: the `recipe` (`TrainConfig.from_recipe`) under the space's plain values, val
    selection on MAP@R, no test at all."""
    values = {**space.fixed, "epochs": epochs, "seed": seed}
    cfg = TrainConfig.from_recipe(recipe, data=str(Path(data).absolute()), out="", **values)
    cfg.select, cfg.select_metric, cfg.test_every_epoch, cfg.final_test = "val", "map@r", False, False
    cfg.metrics = list(dict.fromkeys([*cfg.metrics, "recall", "map@r"]))
    cfg.recalls = cfg.recalls if 1 in cfg.recalls else [1, *cfg.recalls]
    cfg.validate()
    return cfg


def native(cfg: TrainConfig) -> TrainConfig:
    """`cfg` as training will run it: backbone and image size decided (`resolve_config`) for its device."""
    return resolve_config(cfg, resolve_device(cfg.device).type)


def check_data(cfg: TrainConfig) -> None:
    """The dataset must load and have a val split (trials select on it; the test split is never used)."""
    if load_datasets(cfg.data, native(cfg).image_size).val is None:
        raise UserError(f"tune needs a val split in {cfg.data} (prepare it with --val-classes N)")


@contextmanager
def study_lock(out: Path, job: str = "mproxy tune") -> Iterator[None]:
    """One tuner per study folder (`tune` and `tune-rerank` alike); the lock dies with its process, so a killed
    tuner leaves none behind."""
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, ".tune.lock", "being tuned", job):
        yield


def open_study(out: Path, identity: dict) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create or reopen OUT/study.db; refuse a study made with another dataset, space, budget or seed (a study
    begun before the options were renamed continues)."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    return open_named_study(
        out,
        STUDY_NAME,
        identity,
        pruner,
        upgrade=lambda stored: {**stored, "space": upgrade_options(stored.get("space", {}))},
    )


def open_named_study(
    out: Path,
    name: str,
    identity: dict,
    pruner: optuna.pruners.BasePruner | None = None,
    upgrade: Callable[[dict], dict] = lambda stored: stored,
) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create or reopen the study `name` in OUT/study.db (`pruner` None: optuna's default); refuse a folder that
    holds the other kind of study, and a study whose stored `identity` (read through `upgrade`) differs."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'study.db').absolute()}")
    check_study_kind(storage, name, out)
    study = optuna.create_study(
        storage=storage, study_name=name, direction="maximize", pruner=pruner, load_if_exists=True
    )
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
    elif (stored := upgrade(stored)) != identity:
        raise UserError(
            f"{out} holds a study with {identity_changes(stored, identity)}; use another --out or the same settings"
        )
    return study, storage


STUDY_COMMANDS = {STUDY_NAME: "mproxy tune", "mproxy-tune-rerank": "mproxy tune-rerank"}  # study name: its command


def check_study_kind(storage: optuna.storages.BaseStorage, name: str, out: Path) -> None:
    """Refuse a study folder that holds another kind of study (`tune` and `tune-rerank` write the same files)."""
    other = [n for n in optuna.get_all_study_names(storage) if n != name]
    if other:
        raise UserError(
            f"{out} holds a study of {STUDY_COMMANDS.get(other[0], other[0])!r}, not of "
            f"{STUDY_COMMANDS.get(name, name)!r}; use another --out"
        )


def identity_changes(stored: dict, identity: dict) -> str:
    """What differs, with both values: "epochs 3, not 5" (the space entry by entry)."""

    def show(entries: dict, key: str) -> str:
        value = entries.get(key, "(unset)")
        return json.dumps(value) if isinstance(value, (dict, list)) else str(value)

    changes = []
    for key in identity:
        if key == "space":
            old, new = stored.get("space", {}), identity["space"]
            changes += [
                f"space entry {name} {show(old, name)}, not {show(new, name)}"
                for name in dict.fromkeys([*old, *new])
                if name not in old or name not in new or old[name] != new[name]
            ]
        elif stored.get(key) != identity[key]:
            changes.append(f"{key} {show(stored, key)}, not {show(identity, key)}")
    return " and ".join(changes)


def identity_of(cfg: TrainConfig, space: Space) -> dict:
    """What a resumed study must share with the one it continues (JSON-normalised for comparison)."""
    entries = {k: v for k, v in space.entries.items() if k not in NOT_RESULT_OPTIONS}
    recipe = {} if cfg.recipe == "default" else {"recipe": cfg.recipe}  # studies begun before --recipe: default
    return json.loads(
        json.dumps({"data": cfg.data, "space": entries, "epochs": cfg.epochs, "seed": cfg.seed, **recipe})
    )


def retry_interrupted_trials(
    study: optuna.Study, storage: optuna.storages.RDBStorage, marks_kept: tuple[str, ...] = (DEFAULT, RECIPE)
) -> list[int]:
    """Queue again the parameters of every trial that was interrupted (left running by a killed tuner, which
    is marked failed and interrupted here, or failed by Ctrl-C) and not yet queued again; the retry keeps the
    user attributes `marks_kept` (trial 0's mark)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("retry_of") for t in trials}
    interrupted = [
        t
        for t in trials
        if t.state in (TrialState.RUNNING, TrialState.FAIL)
        and not t.user_attrs.get(FINISHED)
        and t.number not in queued
    ]
    for t in interrupted:
        if t.state == TrialState.RUNNING:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        marks = {k: t.user_attrs[k] for k in marks_kept if k in t.user_attrs}  # a retried default stays the default
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, **marks})
    return [t.number for t in interrupted]


def default_params(space: Space, base: TrainConfig) -> tuple[dict, dict]:
    """The recipe in the space: (Optuna parameter: the base config's value, i.e. the recipe's under the space's
    fixed options; parameter: why it is left to the sampler). A default outside its searched
    range, step or choices is not forced into the trial (Optuna would refuse a choice and only warn on a range);
    a loss parameter the library defaults (None) has no value to give; a per-loss entry follows a drawn loss."""
    searched = space.searched
    scale, margin = base.loss_params
    resolved = {"loss_scale": scale, "margin": margin, "image_size": native(base).image_size}
    params, drawn = {}, {}
    loss_drawn = "loss" in searched and outside(base.loss, searched["loss"])
    for name, spec in searched.items():
        if loss_drawn and (name == "margin" or "per_loss" in spec):
            drawn[name] = "follows the drawn loss"
            continue
        if name == "margin" and base.loss not in HAS_MARGIN:
            continue
        param = name
        if "per_loss" in spec:
            if base.loss not in spec["per_loss"]:
                continue
            param, spec = f"{name}[{base.loss}]", spec["per_loss"][base.loss]
        value = resolved.get(name, getattr(base, name))
        why = outside(value, spec, "the default" if base.recipe == "default" else f"the {base.recipe} recipe's")
        if why:
            drawn[param] = why
        else:
            params[param] = value
    return params, drawn


def outside(value, spec: dict, whose: str = "the default") -> str | None:
    """Why `value` (`whose` it is: "the default", "the catalogue recipe's") is not a value of the range or
    choices `spec` (None: it is one)."""
    if spec["type"] == "categorical":
        return None if value in spec["choices"] else f"{whose} {value} is not among the choices {spec['choices']}"
    if value is None:
        return f"{whose} value is the library's own"
    if isinstance(value, bool) or not isinstance(value, int if spec["type"] == "int" else (int, float)):
        return f"{whose} {value!r} is not {'an integer' if spec['type'] == 'int' else 'a number'}"
    low, high, step = spec["low"], spec["high"], spec.get("step")
    if not low <= value <= high:
        return f"{whose} {value:g} is outside {low:g}..{high:g}"
    if step and abs((value - low) / step - round((value - low) / step)) > 1e-8:
        return f"{whose} {value:g} is off the grid {low:g} + k * {step:g}"
    return None


def enqueue_default(study: optuna.Study, space: Space, base: TrainConfig) -> dict:
    """Queue the base's recipe as the next trial (trial 0 of a new study); returns the parameters left drawn."""
    params, drawn = default_params(space, base)
    study.enqueue_trial(params, user_attrs={DEFAULT: drawn, RECIPE: base.recipe})
    return drawn


def marked_trial(study: optuna.Study, mark: str = DEFAULT) -> optuna.trial.FrozenTrial | None:
    """The finished trial that carries `mark` (trial 0, or its retry after an interruption): the recipe's here,
    no re-ranking in `tune_rerank`."""
    return next((t for t in finished_trials(study) if mark in t.user_attrs), None)


def default_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The finished trial of the study's recipe (trial 0, or its retry after an interruption)."""
    return marked_trial(study, DEFAULT)


def recipe_words(trial: optuna.trial.FrozenTrial | None) -> str:
    """ "the NAME recipe" that `trial` (trial 0) ran; "default" for a study begun before --recipe."""
    return f"the {trial.user_attrs.get(RECIPE, 'default') if trial else 'default'} recipe"


def recommended(study: optuna.Study, mark: str = DEFAULT) -> optuna.trial.FrozenTrial | None:
    """The trial best.json holds: the best complete one (the first on ties), but the `mark`ed trial (the recipe)
    unless another trial beats it on val."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best, default = max(complete, key=lambda t: t.value), marked_trial(study, mark)
    if default is not None and default.state == TrialState.COMPLETE and best.value <= default.value:
        return default
    return best


def best_other(study: optuna.Study, default: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial | None:
    """The best complete trial other than `default` (trial 0: the recipe's; None: there is none)."""
    others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.number != default.number]
    return max(others, key=lambda t: t.value) if others else None


def no_trial_beat(
    study: optuna.Study,
    reference: optuna.trial.FrozenTrial,
    what: str,
    metric: str,
    kept: str,
    label: Callable[[optuna.trial.FrozenTrial], str] = lambda trial: "",
) -> str:
    """One sentence when no trial beat the `reference` trial (`what` it is) on val `metric`: its figure, the best
    other trial's (`label(trial)`: words after its number) and the difference; best.json is `kept`."""
    top = best_other(study, reference)
    versus = (
        f"; the best other, trial {top.number}{label(top)}, {100 * top.value:.2f}, difference "
        f"{100 * (top.value - reference.value):+.2f}"
        if top
        else ""
    )
    return (
        f"no trial beat {what} (trial {reference.number}, val {metric} {100 * reference.value:.2f}{versus}): "
        f"best.json is {kept}"
    )


def against_default(study: optuna.Study) -> str:
    """One sentence: the recommended trial's val MAP@R against the recipe's (trial 0), and the difference."""
    default, best = default_trial(study), recommended(study)
    if default is None:
        return "this study has no trial of the default recipe (it began before tune tried the default first)"
    recipe = recipe_words(default)
    if default.state != TrialState.COMPLETE:
        return f"{recipe} (trial {default.number}) did not complete: nothing to compare with"
    if best.number == default.number:
        return no_trial_beat(study, default, recipe, "MAP@R", recipe)
    return (
        f"trial {best.number} val MAP@R {100 * best.value:.2f} against {recipe} (trial "
        f"{default.number}) {100 * default.value:.2f}, difference {100 * (best.value - default.value):+.2f}"
    )


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(FINISHED)]


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / str(number)


class Objective:
    """Train one trial's run folder; report each epoch's val MAP@R to the pruner."""

    def __init__(self, base: TrainConfig, space: Space, out: Path):
        self.base, self.space, self.out = base, space, out

    def __call__(self, trial: optuna.Trial) -> float:
        options = self.space.suggest(trial)
        trial.set_user_attr("options", options)
        cfg = self.base.with_(**options, out=str(trial_dir(self.out, trial.number)))
        try:
            training.train(cfg, overwrite=True, on_epoch=lambda row: self.on_epoch(trial, cfg, row))
        except optuna.TrialPruned:
            trial.set_user_attr(FINISHED, True)
            raise
        except training.TrainingDiverged as e:
            trial.set_user_attr(FINISHED, True)
            trial.set_user_attr("diverged", str(e))
            raise optuna.TrialPruned(str(e)) from None
        except UserError as e:  # a bad combination of options: this trial fails, the study goes on
            trial.set_user_attr(FINISHED, True)
            trial.set_user_attr("error", str(e))
            raise
        finally:
            record_val_figures(trial, cfg.out)
        trial.set_user_attr(FINISHED, True)
        return trial.user_attrs[OBJECTIVE]

    @staticmethod
    def on_epoch(trial: optuna.Trial, cfg: TrainConfig, row: dict) -> None:
        trial.report(row[OBJECTIVE], row["epoch"])
        if row["epoch"] < cfg.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {row['epoch']}")


def record_val_figures(trial: optuna.Trial, run_dir: str) -> None:
    """User attributes of the trial: the val figures of its best trained epoch (the first on ties) and its
    pretrained start's val MAP@R."""
    rows = RunDir(run_dir).metrics()
    if rows:
        trial.set_user_attr("start_map@r", rows[0][OBJECTIVE])
    trained = [r for r in rows if r["epoch"] >= 1]
    if trained:
        best = max(trained, key=lambda r: (r[OBJECTIVE], -r["epoch"]))
        trial.set_user_attr("best_epoch", best["epoch"])
        for key in (OBJECTIVE, "val_recall@1"):
            trial.set_user_attr(key, best[key])


def trial_line(study: optuna.Study, t: optuna.trial.FrozenTrial) -> str:
    """One progress line: the trial's outcome, its val figures and options, and the best so far."""
    attrs = t.user_attrs
    if attrs.get("diverged"):
        outcome = f"diverged ({attrs['diverged'].split(';')[0]})"
    elif attrs.get("error"):
        outcome = f"failed: {attrs['error']}"
    elif t.state == TrialState.PRUNED:
        outcome = f"pruned after epoch {t.last_step}"
    else:
        outcome = "complete"
    figures = (
        f" val MAP@R {100 * attrs[OBJECTIVE]:.2f} R@1 {100 * attrs['val_recall@1']:.2f} (epoch {attrs['best_epoch']})"
        if attrs.get(OBJECTIVE) is not None
        else ""
    )
    top = recommended(study)
    best = f"; best: trial {top.number} val MAP@R {100 * top.value:.2f}" if top else ""
    return f"{trial_name(t)} {outcome}:{figures}{best} | {format_options(attrs.get('options', {}))}"


def trial_name(t) -> str:
    """How lines and the report name a trial: "trial N", and for the recipe's (trial 0) what it left drawn."""
    if DEFAULT not in t.user_attrs:
        return f"trial {t.number}"
    drawn = t.user_attrs[DEFAULT]
    recipe = recipe_words(t).removeprefix("the ")
    return f"trial {t.number} ({recipe}" + (f"; drawn: {', '.join(drawn)})" if drawn else ")")


def format_options(options: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def tune(
    data: str | Path,
    out: str | Path,
    trials: int,
    space: str | Path | dict | None = None,
    budget_epochs: int | None = None,
    seed: int = 0,
    recipe: str = "auto",
) -> dict:
    """Run (or continue) a study of `trials` finished trials in `out`, every trial starting from `recipe` (auto:
    `training.config.recipe_for` the dataset); returns best.json's content."""
    if recipe not in ("auto", *RECIPES):
        raise UserError(f"--recipe must be one of auto, {', '.join(RECIPES)}; got {recipe!r}")
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    if budget_epochs is not None and budget_epochs < 1:
        raise UserError(f"--budget-epochs must be >= 1, got {budget_epochs}")
    space = load_space(space)
    epochs = budget_epochs or space.fixed.get("epochs", DEFAULT_EPOCHS)
    base = base_config(data, space, epochs, seed, recipe_for(data) if recipe == "auto" else recipe)
    out = Path(out)
    check_writable_folder(out, "the study folder")
    check_data(base)
    print(f"recipe: {base.recipe} (trial 0's values, and those of every option the space neither searches nor fixes)")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with study_lock(out):
        study, storage = open_study(out, identity_of(base, space))
        for number in retry_interrupted_trials(study, storage):
            print(f"trial {number} was interrupted: marked failed, its parameters queued again")
        if not study.trials:  # a new study (a resumed one holds its default trial already, or began without one)
            for param, why in enqueue_default(study, space, base).items():
                print(f"trial 0 is the {base.recipe} recipe but for {param}, drawn: {why}")
        objective = Objective(base, space, out)
        while len(finished_trials(study)) < trials:
            # seeded per trial: a restarted tuner must not replay the draws its predecessor made
            study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
            study.optimize(
                objective,
                n_trials=1,
                catch=(UserError,),
                gc_after_trial=True,
                callbacks=[lambda s, t: print(trial_line(s, t), flush=True)],
            )
        return write_outputs(study, out, base, space)


# ----------------------------------------------------------------------------------------------- outputs
def best_config(study: optuna.Study, base: TrainConfig, space: Space) -> dict:
    """best.json: the dataset, the fixed options, the recommended trial's options and the budget's epochs."""
    best = recommended(study)
    return {
        "data": base.data,
        **{k: v for k, v in RECIPE_VALUES[base.recipe].items() if k not in TUNER_OWNED},  # train may start elsewhere
        **{k: v for k, v in space.fixed.items() if k != "epochs"},
        **best.user_attrs["options"],
        "epochs": base.epochs,
        "seed": base.seed,
    }


def write_outputs(study: optuna.Study, out: Path, base: TrainConfig, space: Space) -> dict:
    """best.json, report.md and the plots; UserError (after the report) when no trial completed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = best_config(study, base, space) if complete else None
    imp = importances(study, base.seed)
    if best is not None:
        write_json(out / "best.json", best)
        plots(study, out, imp, recommended(study))
    write_text(out / "report.md", report(study, out, base, imp))
    if best is None:
        raise UserError(f"no trial completed; see {out / 'report.md'}")
    print(
        f"best: {against_default(study)}; {out / 'report.md'}; "
        f"train it with: mproxy train --config {shlex.quote(str(out / 'best.json'))}"
    )
    return best


def importances(study: optuna.Study, seed: int) -> dict[str, float]:
    """fANOVA importances of the parameters every complete trial has (empty below 2 complete trials)."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        return optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError):  # e.g. no parameter varies across the complete trials
        return {}


def report(study: optuna.Study, out: Path, base: TrainConfig, imp: dict[str, float]) -> str:
    """report.md: the top trials, the other trials' outcomes, importances, and the plots."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(FINISHED)]
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    states = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [
        f"# Tuning study: {Path(base.data).name}",
        "",
        f"{len(trials)} trials of {base.epochs} epoch(s) ({states[TrialState.COMPLETE]} complete, "
        f"{states[TrialState.PRUNED]} pruned or diverged, {states[TrialState.FAIL]} failed); objective: "
        "val MAP@R of each trial's best trained epoch (class-disjoint validation split; the test split "
        "was never evaluated); 'start' is the pretrained start's (epoch 0), which a run keeps when training "
        "does not beat it. Values in %.",
        "",
    ]
    if complete:
        lines += (
            top_table(complete[:10])
            + [""]
            + default_section(study)
            + [
                (
                    f"Best: {trial_name(recommended(study))}; train it with "
                    f"`mproxy train --config {shlex.quote(str(out / 'best.json'))}`."
                ),
                "",
                "![validation curve of the best trial](best_curves.png)",
                "",
            ]
        )
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    if others:
        lines += ["## Pruned and failed trials", ""] + [f"- {trial_line_short(t)}" for t in others] + [""]
    if imp:
        lines += [
            "## Parameter importances (fANOVA, over the complete trials)",
            "",
            f"From {states[TrialState.COMPLETE]} complete trials: rough with few trials.",
            "",
            "| parameter | importance |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.3f} |" for k, v in imp.items()] + ["", "![importances](importances.png)", ""]
    if complete:
        lines += [
            "## Plots",
            "",
            "![optimisation history](history.png)",
            "",
            "![val MAP@R against the top parameters](params.png)",
            "",
        ]
    return "\n".join(lines)


def default_section(study: optuna.Study) -> list[str]:
    """The recommended trial against the recipe (trial 0): both val MAP@R, the difference, and what trial 0 drew."""
    default, best = default_trial(study), recommended(study)
    recipe = recipe_words(default)
    lines = [f"## Against {recipe}", ""]
    if default is not None and default.state == TrialState.COMPLETE:
        won = best.number == default.number
        top = best_other(study, default) if won else best
        lines += [
            "| | trial | val MAP@R |",
            "|---|---|---|",
            f"| {recipe.removeprefix('the ')} | {default.number} | {100 * default.value:.2f} |",
        ]
        if top is not None:
            lines += [
                f"| {'best other' if won else 'best'} | {top.number} | {100 * top.value:.2f} |",
                f"| difference | | {100 * (top.value - default.value):+.2f} |",
            ]
        lines.append("")
    sentence = against_default(study)
    lines += [sentence[0].upper() + sentence[1:] + ".", ""]
    if default is not None and default.user_attrs[DEFAULT]:
        lines += [
            f"Trial {default.number} ran {recipe} except for these parameters, drawn by the sampler: "
            + "; ".join(f"{k} ({why})" for k, why in default.user_attrs[DEFAULT].items())
            + ".",
            "",
        ]
    return lines


def top_table(complete: list) -> list[str]:
    names = list(dict.fromkeys(k for t in complete for k in t.user_attrs["options"]))
    lines = [
        "## Top trials",
        "",
        "| trial | val MAP@R | val R@1 | epoch | start | " + " | ".join(names) + " |",
        "|" + "---|" * (5 + len(names)),
    ]
    for t in complete:
        a, opts = t.user_attrs, t.user_attrs["options"]
        cells = [
            f"{t.number} (default)" if DEFAULT in a else t.number,
            f"{100 * t.value:.2f}",
            f"{100 * a['val_recall@1']:.2f}",
            a["best_epoch"],
            f"{100 * a['start_map@r']:.2f}",
        ]
        cells += [format_options({k: opts[k]}).split("=", 1)[1] if k in opts else "" for k in names]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def trial_line_short(t) -> str:
    a = t.user_attrs
    why = a.get("diverged") or a.get("error") or f"pruned after epoch {t.last_step}"
    return f"trial {t.number} ({t.state.name.lower()}): {why} | {format_options(a.get('options', {}))}"


# ----------------------------------------------------------------------------------------------- plots
def plots(study: optuna.Study, out: Path, imp: dict[str, float], best) -> None:
    """history, importances (when computed), params and the best trial's validation curve (PNG + PDF)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    history_figure([t.number for t in complete], [100 * t.value for t in complete], out / "history")
    if imp:
        importances_figure(imp, out / "importances")
    params_figure(complete, list(imp) or list(best.params), out / "params")
    plot_curves(trial_dir(out, best.number), out / "best_curves")
