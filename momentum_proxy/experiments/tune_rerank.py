"""Re-ranking search on a trained run's validation split with Optuna (`mproxy tune-rerank`), without retraining.

The run's selected checkpoint embeds its val split once (`evaluation.jobs.embed_split`, as `mproxy evaluate
--split val` does; optionally with test-time augmentation or in onnxruntime), kept in `OUT/val-embeddings.npz` for
a resumed study. Each trial then draws a re-ranking (`retrieval.rerank.Rerank`: a method and its parameters) from
the space and scores it with `evaluation.jobs.evaluate_arrays`, each query left out of the collection for its own
search, its database side included (leave-one-out): a trial's figures are exactly what `mproxy evaluate RUN
--split val --rerank ...` prints for it. The test split is never read. The objective is val MAP@R (or `metric`).

Trial 0 of a new study is no re-ranking (`none`), so best.json is `none` unless a trial is strictly better on val.
The study lives in `OUT/study.db` (SQLite) as `tune`'s do: the same command continues it (an interrupted trial is
tried again), and it refuses to continue with another run, checkpoint, runtime, tta, metric, space or seed.
Outputs: `best.json` (the re-ranking as `--rerank*` options: {"rerank": "dba+aqe", "rerank_k": 7, ...}),
`report.md` (the top trials, against no re-ranking, the `mproxy evaluate` line that reproduces the best val
figure and the one that uses it).
"""

from __future__ import annotations

import json
import re
import shlex
import warnings
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from momentum_proxy.config import RETRIEVAL_METRICS, read_mapping_file
from momentum_proxy.data.manifest import manifest_sha256, read_manifest, split_frame
from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.jobs import embed_split, evaluate_arrays
from momentum_proxy.experiments import tune
from momentum_proxy.experiments.tune import (
    FINISHED,
    check_spec,
    finished_trials,
    marked_trial,
    no_trial_beat,
    open_named_study,
    retry_interrupted_trials,
    study_lock,
    suggest_one,
)
from momentum_proxy.fileio import (
    atomic_path,
    check_writable_folder,
    file_sha256,
    write_json,
    write_text,
)
from momentum_proxy.paths import check_run
from momentum_proxy.retrieval.rerank import (
    DEFAULTS,
    FLAGS,
    MAX_ALPHA,
    MAX_K,
    METHODS,
    Rerank,
)
from momentum_proxy.runs import BEST, RunDir

STUDY_NAME = "mproxy-tune-rerank"
EMBEDDINGS = "val-embeddings.npz"  # the val split's features, labels and split names, and what embedded them
EMBEDDED_BY = ("run", "checkpoint_sha256", "data_manifest_sha256", "runtime", "tta")  # the identity's part they need
BASELINE = "no_rerank"  # user attribute of trial 0 (and of its retry): no re-ranking
DEFAULT_METRIC = "map@r"
PARAMS = ("k", "alpha", "k2", "lam")  # Rerank's parameters; a space file may also write lam as `lambda`
OPTIONS = {"k": "rerank_k", "alpha": "rerank_alpha", "k2": "rerank_k2", "lam": "rerank_lambda"}  # best.json keys
LIMITS = {"k": (int, 1, MAX_K), "alpha": (float, 0.0, MAX_ALPHA), "k2": (int, 1, MAX_K), "lam": (float, 0.0, 1.0)}

# The default space: every method; k (aqe and dba's neighbours, k1 of kreciprocal) on a log scale, alpha of aqe
# and dba, k2 and lambda of kreciprocal. A method draws only the parameters it takes (named `k[dba]`, ...).
DEFAULT_SPACE = {
    "method": {"type": "categorical", "choices": list(METHODS)},
    "k": {"type": "int", "low": 1, "high": 50, "log": True},
    "alpha": {"type": "float", "low": 0.0, "high": 10.0},
    "k2": {"type": "int", "low": 1, "high": 20},
    "lam": {"type": "float", "low": 0.0, "high": 1.0},
}


# ----------------------------------------------------------------------------------------------- the space
class RerankSpace:
    """The searched (`{"type": ...}`, or `{"per_method": {METHOD: range or value}}`) and fixed (plain values)
    re-ranking settings: `method` and the parameters `k`, `alpha`, `k2`, `lam`."""

    def __init__(self, entries: dict):
        for name, spec in entries.items():
            if name == "method":
                check_method(spec)
            elif name in PARAMS:
                if isinstance(spec, dict) and set(spec) == {"per_method"} and isinstance(spec["per_method"], dict):
                    for method, sub in spec["per_method"].items():
                        if method not in METHODS:
                            raise UserError(
                                f"search space: {name}: unknown method {method!r}; choose from {', '.join(METHODS)}"
                            )
                        if name not in DEFAULTS[method]:
                            raise UserError(f"search space: {name}[{method}]: {method} takes no {name}")
                        check_param(f"{name}[{method}]", name, sub)
                else:
                    check_param(name, name, spec)
            else:
                raise UserError(f"search space: unknown entry {name!r}; choose from method, {', '.join(PARAMS)}")
        self.entries = entries

    @property
    def methods(self) -> list[str]:
        method = self.entries["method"]
        return list(method["choices"]) if isinstance(method, dict) else [method]

    def suggest(self, trial: optuna.Trial) -> dict:
        """Draw one re-ranking: {"method": ..., and the parameters it takes} (those the space leaves out take the
        method's defaults)."""
        spec = self.entries["method"]
        method = suggest_one(trial, "method", spec) if isinstance(spec, dict) else spec
        drawn = {"method": method}
        for name in DEFAULTS[method]:
            entry = self.entries.get(name)
            if isinstance(entry, dict) and "per_method" in entry:
                entry = entry["per_method"].get(method)
            if isinstance(entry, dict):
                drawn[name] = suggest_one(trial, f"{name}[{method}]", entry)
            elif entry is not None:
                drawn[name] = entry
        return drawn

    def baseline(self, trial: optuna.Trial) -> dict:
        """Trial 0: no re-ranking (its method drawn from the enqueued value when the space searches `none`)."""
        spec = self.entries["method"]
        if isinstance(spec, dict) and "none" in spec["choices"]:
            suggest_one(trial, "method", spec)
        return {"method": "none"}

    def baseline_params(self) -> dict:
        spec = self.entries["method"]
        return {"method": "none"} if isinstance(spec, dict) and "none" in spec["choices"] else {}


def check_method(spec) -> None:
    if isinstance(spec, dict):
        check_spec("method", spec, per_loss_allowed=False)
        if spec["type"] != "categorical":
            raise UserError("search space: method takes {type: categorical, choices: [...]} or one method")
        unknown = [c for c in spec["choices"] if c not in METHODS]
        if unknown:
            raise UserError(f"search space: method: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    elif spec not in METHODS:
        raise UserError(f"search space: method: unknown method {spec!r}; choose from {', '.join(METHODS)}")


def check_param(where: str, name: str, spec) -> None:
    """UserError unless `spec` is a value, range or choice list of `name` within its limits (`LIMITS`)."""
    kind, low, high = LIMITS[name]
    what = "a whole number" if kind is int else "a number"

    def check_value(value) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and value != int(value))
            or not low <= value <= high
        ):
            raise UserError(f"search space: {where}: {what} from {low:g} to {high:g} expected, got {value!r}")

    if not isinstance(spec, dict):
        check_value(spec)
        return
    check_spec(where, spec, per_loss_allowed=False)
    if spec["type"] == "categorical":
        for choice in spec["choices"]:
            check_value(choice)
        return
    if kind is int and spec["type"] != "int":
        raise UserError(f"search space: {where}: {name} takes whole numbers: {{type: int, low: .., high: ..}}")
    check_value(spec["low"])
    check_value(spec["high"])


def load_space(space: str | Path | dict | None = None) -> RerankSpace:
    """The default space with the entries of `space` (a JSON/YAML file or a dict; `lambda` means `lam`) put over
    it."""
    entries = read_mapping_file(space, "space file") if isinstance(space, (str, Path)) else dict(space or {})
    if "lambda" in entries:
        if "lam" in entries:
            raise UserError("search space: give lam or lambda, not both")
        entries["lam"] = entries.pop("lambda")
    return RerankSpace({**DEFAULT_SPACE, **entries})


def check_metric(metric: str) -> int | None:
    """UserError unless `metric` is one a re-ranking changes; returns K of recall@K (else None)."""
    found = re.fullmatch(r"recall@([1-9][0-9]*)", metric)
    if found:
        return int(found[1])
    if metric not in RETRIEVAL_METRICS or metric == "recall":
        raise UserError(f"unknown --metric {metric!r}; choose from map@r, r_precision, precision@1, recall@K")
    return None


# ----------------------------------------------------------------------------------------------- options
def rerank_options(rerank: Rerank) -> dict:
    """best.json: the re-ranking as `--rerank*` option names, {"rerank": "dba", "rerank_k": 5, "rerank_alpha": 3.0}."""
    return {"rerank": rerank.method, **{OPTIONS[name]: getattr(rerank, name) for name in DEFAULTS[rerank.method]}}


def best_rerank(best: str | Path | dict) -> Rerank:
    """The `Rerank` of a best.json (a path or its content) written by `tune_rerank`."""
    options = read_mapping_file(best, "best.json") if isinstance(best, (str, Path)) else best
    unknown = sorted(set(options) - {"rerank", *OPTIONS.values()})
    if unknown or "rerank" not in options:
        raise UserError(f"not a tune-rerank best.json: expected rerank and {', '.join(OPTIONS.values())}")
    return Rerank(options["rerank"], **{name: options.get(key) for name, key in OPTIONS.items()})


def rerank_flags(rerank: Rerank) -> list[str]:
    """The `--rerank` options that give `rerank` exactly (floats written as Python reads them back)."""
    flags = ["--rerank", rerank.method]
    for name in DEFAULTS[rerank.method]:
        flags += [FLAGS[name], repr(getattr(rerank, name))]
    return flags


def describe(options: dict) -> str:
    """ "dba+aqe (k 7, alpha 2.1)" from a stored {"method": ..., parameters}."""
    params = ", ".join(f"{'lambda' if k == 'lam' else k} {v:.3g}" for k, v in options.items() if k != "method")
    return options["method"] + (f" ({params})" if params else "")


def metric_name(metric: str) -> str:
    return {"map@r": "MAP@R", "precision@1": "P@1", "r_precision": "R-Precision"}.get(
        metric, metric.replace("recall@", "R@")
    )


# ----------------------------------------------------------------------------------------------- the study
class Objective:
    """Score one drawn re-ranking on the val features (leave-one-out, as `mproxy evaluate --split val`)."""

    def __init__(
        self,
        space: RerankSpace,
        features: np.ndarray,
        labels: np.ndarray,
        split: np.ndarray,
        metric: str,
        recalls: list[int],
    ):
        self.space, self.features, self.labels, self.split = space, features, labels, split
        self.metric, self.recalls = metric, recalls

    def __call__(self, trial: optuna.Trial) -> float:
        drawn = self.space.baseline(trial) if BASELINE in trial.user_attrs else self.space.suggest(trial)
        trial.set_user_attr("rerank", drawn)
        try:
            rerank = Rerank(**drawn)
            trial.set_user_attr("rerank", resolved(rerank))  # with the defaults of what the space left out
            figures = evaluate_arrays(
                self.features, self.labels, self.split, metrics=RETRIEVAL_METRICS, recalls=self.recalls, rerank=rerank
            )
        except UserError as e:
            trial.set_user_attr(FINISHED, True)
            trial.set_user_attr("error", str(e))
            raise
        trial.set_user_attr("figures", figures)
        trial.set_user_attr(FINISHED, True)
        return figures[self.metric]


def open_study(out: Path, identity: dict) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create or reopen OUT/study.db; refuse a study made with another run, checkpoint, embedding, space, metric
    or seed, and a folder holding a `tune` study."""
    return open_named_study(out, STUDY_NAME, identity)


def val_features(
    out: Path, run_dir: Path, identity: dict, runtime: str, device: str, tta: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, split names) of the run's val split: from OUT/val-embeddings.npz when the same run,
    checkpoint, dataset, runtime and tta made it, else embedded (on `device`) and saved there."""
    path = out / EMBEDDINGS
    stamp = json.dumps({k: identity[k] for k in EMBEDDED_BY}, sort_keys=True)
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if str(z["identity"]) == stamp:
                return z["features"], z["labels"], z["split"]
    embedder = load_embedder(run_dir, runtime, device, tta)
    rows, features = embed_split(run_dir, "val", embedder)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, features=features, labels=rows.labels, split=rows.split.astype(str), identity=np.array(stamp))
    return features, rows.labels, rows.split.astype(str)


def tune_rerank(
    run_dir: str | Path,
    out: str | Path,
    trials: int,
    *,
    space: str | Path | dict | None = None,
    metric: str = DEFAULT_METRIC,
    tta: str = "none",
    runtime: str = "torch",
    device: str = "auto",
    seed: int = 0,
) -> dict:
    """Run (or continue) a study of `trials` finished re-ranking trials on the val split of the run in `run_dir`,
    in `out`; returns best.json's content (the re-ranking as `--rerank*` options)."""
    if trials < 1:
        raise UserError(f"--trials must be >= 1, got {trials}")
    recall_k = check_metric(metric)
    space = load_space(space)
    run_dir, out = Path(run_dir), Path(out)
    check_run(run_dir)
    check_writable_folder(out, "the study folder")
    cfg = RunDir(run_dir).config()
    if split_frame(read_manifest(cfg.data), "val").empty:
        raise UserError(
            f"tune-rerank needs a val split in {cfg.data} (the run's dataset; prepare it with --val-classes N)"
        )
    recalls = sorted({1, *cfg.recalls, *([recall_k] if recall_k else [])})
    identity = json.loads(
        json.dumps(
            {
                "run": str(run_dir.absolute()),
                "checkpoint_sha256": file_sha256(run_dir / BEST),
                "data_manifest_sha256": manifest_sha256(cfg.data),
                "runtime": runtime,
                "tta": tta,
                "metric": metric,
                "space": space.entries,
                "seed": seed,
            }
        )
    )
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with study_lock(out, "mproxy tune-rerank"):
        study, storage = open_study(out, identity)
        features, labels, split = val_features(out, run_dir, identity, runtime, device, tta)
        for number in retry_interrupted_trials(study, storage, marks_kept=(BASELINE,)):
            print(f"trial {number} was interrupted: marked failed, its parameters queued again")
        if not study.trials:
            study.enqueue_trial(space.baseline_params(), user_attrs={BASELINE: True})
        objective = Objective(space, features, labels, split, metric, recalls)
        while len(finished_trials(study)) < trials:
            # seeded per trial: a restarted tuner must not replay the draws its predecessor made
            study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
            study.optimize(
                objective,
                n_trials=1,
                catch=(UserError,),
                callbacks=[lambda s, t: print(trial_line(s, t, metric), flush=True)],
            )
        command = Command(run_dir, runtime, device, tta, recalls if recalls != sorted(set(cfg.recalls)) else None)
        return write_outputs(study, out, metric, command, len(labels))


# ----------------------------------------------------------------------------------------------- results
def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The finished trial 0 (no re-ranking), or its retry after an interruption."""
    return marked_trial(study, BASELINE)


def recommended(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial (the first on ties), but no re-ranking unless a trial beats it on val."""
    return tune.recommended(study, BASELINE)


def resolved(rerank: Rerank) -> dict:
    """{"method": ..., every parameter it takes} (`Rerank`'s argument names)."""
    return {"method": rerank.method, **{name: getattr(rerank, name) for name in DEFAULTS[rerank.method]}}


def trial_rerank(t: optuna.trial.FrozenTrial) -> Rerank:
    return Rerank(**t.user_attrs["rerank"])


def trial_line(study: optuna.Study, t: optuna.trial.FrozenTrial, metric: str) -> str:
    """One progress line: the trial's val figures and re-ranking, and the best so far."""
    attrs = t.user_attrs
    name = f"trial {t.number}" + (" (no re-ranking)" if BASELINE in attrs else "")
    if attrs.get("error"):
        return f"{name} failed: {attrs['error']} | {describe(attrs.get('rerank', {'method': '?'}))}"
    figures = attrs.get("figures")
    if figures is None:
        return f"{name} {t.state.name.lower()}"
    top = recommended(study)
    best = f"; best: trial {top.number} val {metric_name(metric)} {100 * top.value:.2f}" if top else ""
    return (
        f"{name}: val {metric_name(metric)} {100 * figures[metric]:.2f}"
        + ("" if metric == "map@r" else f" MAP@R {100 * figures['map@r']:.2f}")
        + f" R@1 {100 * figures['recall@1']:.2f}{best} | {describe(attrs['rerank'])}"
    )


class Command:
    """The `mproxy evaluate` line of a re-ranking on the run: `--split val` reproduces a trial's figures."""

    def __init__(self, run_dir: Path, runtime: str, device: str, tta: str, recalls: list[int] | None):
        self.run_dir, self.runtime, self.device, self.tta, self.recalls = run_dir, runtime, device, tta, recalls

    def evaluate(self, rerank: Rerank, split: str) -> list[str]:
        args = ["mproxy", "evaluate", str(self.run_dir), *(["--split", split] if split != "test" else [])]
        args += ["--runtime", self.runtime] if self.runtime != "torch" else []
        args += ["--device", self.device] if self.device != "auto" else []
        args += ["--tta", self.tta]  # both always named: the commands' defaults are the default pipeline's
        args += ["--recalls", ",".join(map(str, self.recalls))] if self.recalls else []
        return args + rerank_flags(rerank)

    def line(self, rerank: Rerank, split: str) -> str:
        return shlex.join(self.evaluate(rerank, split))


def write_outputs(study: optuna.Study, out: Path, metric: str, command: Command, images: int) -> dict:
    """best.json and report.md; UserError (after the report) when no trial completed."""
    best = recommended(study)
    options = rerank_options(trial_rerank(best)) if best is not None else None
    if options is not None:
        write_json(out / "best.json", options)
    write_text(out / "report.md", report(study, out, metric, command, images))
    if best is None:
        raise UserError(f"no trial completed; see {out / 'report.md'}")
    rerank = trial_rerank(best)
    print(f"best: {against_baseline(study, metric)}; {out / 'report.md'}")
    print(f"its val figures: {command.line(rerank, 'val')}")
    if rerank.active:
        print(f"use it (test once, then retrieve, index, serve): {command.line(rerank, 'test')}")
    return options


def against_baseline(study: optuna.Study, metric: str) -> str:
    """One sentence: the recommended trial against no re-ranking on val, and the difference."""
    baseline, best, name = baseline_trial(study), recommended(study), metric_name(metric)
    if baseline is None or baseline.state != TrialState.COMPLETE:
        return f"no re-ranking (trial 0) did not complete: nothing to compare with; best trial {best.number}"
    if best.number == baseline.number:
        return no_trial_beat(
            study,
            baseline,
            "no re-ranking",
            name,
            "none",
            label=lambda trial: f", {describe(trial.user_attrs['rerank'])}",
        )
    return (
        f"trial {best.number}, {describe(best.user_attrs['rerank'])}, val {name} {100 * best.value:.2f} against "
        f"no re-ranking (trial {baseline.number}) {100 * baseline.value:.2f}, difference "
        f"{100 * (best.value - baseline.value):+.2f}"
    )


def report(study: optuna.Study, out: Path, metric: str, command: Command, images: int) -> str:
    """report.md: the top trials, the best against no re-ranking, the command lines, failed trials."""
    trials = finished_trials(study)
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    name = metric_name(metric)
    lines = [
        f"# Re-ranking study: {command.run_dir.name}",
        "",
        f"{len(trials)} trials ({len(complete)} complete) on the val split of `{command.run_dir}` ({images} "
        f"images; runtime {command.runtime}, tta {command.tta}); objective: val {name}, each query left out of "
        "the collection and of its database side (leave-one-out, as `mproxy evaluate --split val`). The test "
        "split was never embedded. Trial 0 is no re-ranking; best.json is it unless a trial beats it. "
        "Values in %.",
        "",
    ]
    if complete:
        best = recommended(study)
        rerank = trial_rerank(best)
        columns = [name] + (["MAP@R"] if metric != "map@r" else []) + (["R@1"] if metric != "recall@1" else [])
        keys = [metric] + (["map@r"] if metric != "map@r" else []) + (["recall@1"] if metric != "recall@1" else [])
        lines += [
            "## Top trials",
            "",
            "| trial | " + " | ".join(f"val {c}" for c in columns) + " | method | k | alpha | k2 | lambda |",
            "|" + "---|" * (len(columns) + 6),
        ]
        for t in complete[:10]:
            r = t.user_attrs["rerank"]
            cells = [f"{t.number} (none)" if BASELINE in t.user_attrs else str(t.number)]
            cells += [f"{100 * t.user_attrs['figures'][k]:.2f}" for k in keys] + [r["method"]]
            cells += [f"{r[p]:.3g}" if p in r else "" for p in PARAMS]
            lines.append("| " + " | ".join(cells) + " |")
        sentence = against_baseline(study, metric)
        lines += [
            "",
            "## Best",
            "",
            sentence[0].upper() + sentence[1:] + ".",
            "",
            f"`best.json`: `{json.dumps(rerank_options(rerank))}`. Its val figures, reproduced:",
            "",
            "```bash",
            command.line(rerank, "val"),
            "```",
            "",
        ]
        if rerank.active:
            lines += [
                "Use it: the test split once, then the same `--rerank` options on `retrieve`, `index` and `serve`:",
                "",
                "```bash",
                command.line(rerank, "test"),
                "```",
                "",
            ]
    return "\n".join(lines + failed_lines(trials))


def failed_lines(trials) -> list[str]:
    """report.md's list of the trials that did not complete, with their errors (nothing when all did)."""
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    if not others:
        return []
    return (
        ["## Failed trials", ""]
        + [f"- trial {t.number}: {t.user_attrs.get('error', t.state.name.lower())}" for t in others]
        + [""]
    )
