"""Experiments over many runs: a resumable grid sweep over seeds, the momentum figure with error bars, training
curves, and a Markdown report of test figures as mean ± 95 % confidence interval over seeds.

Every figure and table says how its models were selected (val, last epoch, or — only to reproduce published
tables — test) and over how many seeds.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd
from scipy import stats

from momentum_proxy.embedding.inference import resolve_device
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import write_text
from momentum_proxy.models.backbones import resolve_config
from momentum_proxy.plots import curves_figure, momentum_figure
from momentum_proxy.runs import RunDir
from momentum_proxy.training import loop as training
from momentum_proxy.training.config import TrainConfig

# Options that do not change what a run computes: a sweep re-run may differ in them and still resume.
NOT_RESULT_OPTIONS = ("out", "loader_workers", "device", "log_every", "eval_batch_size")
REPORTED = {"precision@1": "P@1", "recall@1": "R@1", "r_precision": "R-Precision", "map@r": "MAP@R"}


def run_name(cfg: TrainConfig) -> str:
    return (
        f"{cfg.backbone.replace(':', '-')}_{cfg.feature_dim}_{cfg.loss}_{cfg.optimizer_label}"
        f"_m{cfg.proxy_momentum:g}_s{cfg.seed}"
    )


def config_changes(run: RunDir, cfg: TrainConfig) -> list[str]:
    """The options in which the run's stored configuration differs from `cfg` (as 'name a -> b')."""
    stored, wanted = TrainConfig.from_dict(run.info()).to_dict(), cfg.to_dict()
    return [f"{k} {stored[k]} -> {wanted[k]}" for k in wanted if k not in NOT_RESULT_OPTIONS and stored[k] != wanted[k]]


def sweep(base: TrainConfig, out: str | Path, grid: dict[str, list]) -> list[Path]:
    """Train every combination of the `grid` values (e.g. {"proxy_momentum": [0, .5], "seed": [0, 1, 2]}) of `base`
    into `out/<name>`, and finish what an earlier sweep started.

    A finished run with the same configuration is skipped, a killed one resumes, and a run whose stored
    configuration differs (e.g. other --epochs) is trained again from scratch, saying what changed.
    """
    device_type = resolve_device(base.device).type
    cells = [
        resolve_config(base.with_(**dict(zip(grid, values))), device_type)
        for values in itertools.product(*grid.values())
    ]
    for cfg in cells:
        cfg.out = str(Path(out) / run_name(cfg))
        cfg.validate()  # every cell before the first is trained
    for cfg in cells:
        run = RunDir(cfg.out)
        changes = config_changes(run, cfg) if run.has_run() else []
        if run.has_run() and not changes and run.eval() is not None:
            print(f"skip (finished): {run.path}")
        elif run.has_run() and not changes:
            print(f"resume: {run.path}")
            training.resume(run.path)
        else:
            print(
                f"run: {run.path}"
                + (f" (configuration changed: {', '.join(changes)}; trained again)" if changes else "")
            )
            training.train(cfg, overwrite=True)
    return [Path(cfg.out) for cfg in cells]


def collect_runs(folder: str | Path) -> pd.DataFrame:
    """One row per finished run below `folder`: its configuration, how its checkpoint was selected, and the
    test figures of that checkpoint (eval.json)."""
    rows = []
    for cfg_path in sorted(Path(folder).rglob("config.json")):
        run = RunDir(cfg_path.parent)
        summary = run.eval()
        if summary is None:
            continue
        cfg = TrainConfig.from_dict(run.info())
        rows.append(
            {
                "run": str(run.path),
                "data": Path(cfg.data).name,
                "backbone": cfg.backbone,
                "feature_dim": cfg.feature_dim,
                "loss": cfg.loss,
                "optimizer": cfg.optimizer,
                "proxy_update": cfg.proxy_update,
                "proxy_momentum": cfg.proxy_momentum,
                "lr": cfg.lr,
                "epochs": cfg.epochs,
                "seed": cfg.seed,
                "selected_on": summary["selected_on"],
                "best_epoch": summary["epoch"],
                **summary["test"],
            }
        )
    if not rows:
        raise UserError(f"no finished run (with eval.json) found below {folder}")
    return pd.DataFrame(rows)


CONFIG_COLUMNS = [
    "data",
    "backbone",
    "feature_dim",
    "loss",
    "optimizer",
    "proxy_update",
    "proxy_momentum",
    "lr",
    "epochs",
    "selected_on",
]


def mean_ci(values: pd.Series) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t; NaN for a single value)."""
    n = len(values)
    if n < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: number of seeds and mean ± CI of each reported metric."""
    out = []
    for key, g in df.groupby(CONFIG_COLUMNS, sort=True):
        row = dict(zip(CONFIG_COLUMNS, key), seeds=len(g))
        for metric in REPORTED:
            if metric in g:
                row[metric], row[f"{metric}_ci"] = mean_ci(g[metric])
        out.append(row)
    return pd.DataFrame(out)


def _fmt(mean: float, ci: float) -> str:
    return f"{100 * mean:.1f}" if math.isnan(ci) else f"{100 * mean:.1f} ± {100 * ci:.1f}"


def report(folder: str | Path, out: str | Path | None = None) -> str:
    """The Markdown table of every configuration below `folder` (test figures, mean ± 95 % CI over seeds),
    written to `folder/benchmarks.md`."""
    table = summarize(collect_runs(folder))
    metrics = [m for m in REPORTED if m in table]
    header = ["data", "backbone", "dim", "loss", "optimizer", "proxies", "m", "lr", "epochs", "selected on", "seeds"]
    header += [REPORTED[m] for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        momentum = f"{r['proxy_momentum']:g}" if r["proxy_update"] == "momentum" else "-"
        cells = [
            r["data"],
            r["backbone"],
            r["feature_dim"],
            r["loss"],
            r["optimizer"],
            r["proxy_update"],
            momentum,
            f"{r['lr']:g}",
            r["epochs"],
            "**test** (optimistic)" if r["selected_on"] == "test" else r["selected_on"],
            r["seeds"],
        ] + [_fmt(r[m], r[f"{m}_ci"]) for m in metrics]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = "\n".join(lines) + (
        "\n\nTest split, values in %: mean ± half-width of the 95 % confidence interval (Student t) over the "
        "seeds; each run's checkpoint selected as the 'selected on' column says (val: class-disjoint "
        "validation split; last: the last epoch; test: chosen on the test split itself, optimistic).\n"
    )
    write_text(Path(out) if out else Path(folder) / "benchmarks.md", text)
    return text


def plot_momentum(folder: str | Path, out: str | Path | None = None) -> list[Path]:
    """Test R@1 (%) against proxy momentum over the sweep below `folder` (PNG and PDF; see `plots.momentum_figure`)."""
    table = summarize(collect_runs(folder))
    table = table[table["proxy_update"] == "momentum"]
    if table.empty:
        raise UserError(f"no runs with momentum proxies (--proxy-update momentum) below {folder}")
    return momentum_figure(table, Path(out) if out else Path(folder) / "momentum")


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Training loss and the per-epoch metrics of one run, the selected epoch marked (see `plots.curves_figure`)."""
    run = RunDir(run_dir)
    rows = run.metrics()
    if not rows:
        raise UserError(f"no metrics.csv in {run_dir}")
    return curves_figure(pd.DataFrame(rows), run.eval(), Path(out) if out else Path(run_dir) / "curves")
