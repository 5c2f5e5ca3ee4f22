"""Experiments over many runs: a resumable grid sweep, the momentum figure, training curves, a Markdown report."""
from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pandas as pd

from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path, write_text
from momentum_proxy.runs import EMBEDDINGS, LAST, RunDir, TrainConfig


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.backbone.replace(':', '-')}_{cfg.feature_dim}_{cfg.loss}_{cfg.optimizer}_m{cfg.momentum:g}"


def is_finished(run: RunDir, cfg: TrainConfig) -> bool:
    rows = run.metrics()
    return bool(rows) and rows[-1]["epoch"] >= cfg.epochs and (run / EMBEDDINGS).exists()


def sweep(base: TrainConfig, out: str | Path, *, momentums, backbones, feature_dims) -> list[Path]:
    """Train every (backbone, feature_dim, momentum) combination of `base` into `out/<name>`.

    Resumable: finished runs are skipped, a killed run resumes from its last checkpoint.
    """
    from momentum_proxy import training

    out = Path(out)
    folders = []
    for backbone, dim, m in itertools.product(backbones, feature_dims, momentums):
        cfg = replace(base, backbone=backbone, feature_dim=int(dim), momentum=float(m))
        cfg.out = str(out / run_name(cfg))
        run = RunDir(cfg.out)
        folders.append(run.path)
        if run.has_run() and is_finished(run, cfg):
            print(f"skip (finished): {run.path}")
            continue
        print(f"run: {run.path}")
        if run.has_run() and (run / LAST).exists():
            training.resume(run.path)
        else:
            training.train(cfg, overwrite=True)
    return folders


def collect_runs(folder: str | Path) -> pd.DataFrame:
    """One row per run folder below `folder`: its configuration and its best epoch's metrics."""
    rows = []
    for cfg_path in sorted(Path(folder).rglob("config.json")):
        run = RunDir(cfg_path.parent)
        metrics = run.metrics()
        if not metrics:
            continue
        cfg = run.config()
        key = f"recall@{min(cfg.recalls)}"
        best = max(metrics, key=lambda r: r[key])
        rows.append({"run": str(run.path), "data": Path(cfg.data).name, "backbone": cfg.backbone,
                     "feature_dim": cfg.feature_dim, "loss": cfg.loss, "optimizer": cfg.optimizer,
                     "momentum": cfg.momentum, "epochs": metrics[-1]["epoch"], "best_epoch": best["epoch"],
                     "start_recall@1": metrics[0].get("recall@1"),
                     **{k: v for k, v in best.items() if k.startswith(("recall@", "map@r", "precision", "r_prec",
                                                                        "nmi"))}})
    if not rows:
        raise UserError(f"no finished epochs of any run found below {folder}")
    return pd.DataFrame(rows)


def _style():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scienceplots  # noqa: F401  (registers the 'science' styles)

    plt.style.use(["science", "no-latex", "grid"])
    return plt


def _save(fig, out: Path, formats=("png", "pdf")) -> list[Path]:
    """Write the figure atomically in each format, then close it."""
    import matplotlib.pyplot as plt

    paths = []
    for fmt in formats:
        path = out.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=200)
        paths.append(path)
    plt.close(fig)
    return paths


def plot_momentum(folder: str | Path, out: str | Path | None = None) -> list[Path]:
    """R@1 (best epoch, %) against proxy momentum, one line per backbone/feature dimension (PNG and PDF)."""
    df = collect_runs(folder)
    df = df[df["optimizer"].str.endswith("*")]
    if df.empty:
        raise UserError(f"no momentum-mode runs (adam*, sgd*) below {folder}")
    plt = _style()
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    for (backbone, dim), g in df.groupby(["backbone", "feature_dim"]):
        g = g.sort_values("momentum")
        ax.plot(g["momentum"], 100 * g["recall@1"], marker="o", label=f"{backbone} ({dim})")
    ax.set_xlabel("proxy momentum $m$")
    ax.set_ylabel("R@1 (%)")
    ax.legend(fontsize=6)
    return _save(fig, Path(out) if out else Path(folder) / "momentum")


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Training loss and R@K per epoch of one run (PNG and PDF)."""
    rows = RunDir(run_dir).metrics()
    if not rows:
        raise UserError(f"no metrics.csv in {run_dir}")
    df = pd.DataFrame(rows)
    plt = _style()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(6.5, 2.6))
    trained = df[df["epoch"] > 0]
    ax1.plot(trained["epoch"], trained["train_loss"], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    for col in [c for c in df.columns if c.startswith("recall@")] + (["map@r"] if "map@r" in df else []):
        ax2.plot(df["epoch"], 100 * df[col], marker=".", label=col)
    ax2.set_xlabel("epoch (0 = pretrained)")
    ax2.set_ylabel("metric (%)")
    ax2.legend(fontsize=6)
    return _save(fig, Path(out) if out else Path(run_dir) / "curves")


def report(folder: str | Path, out: str | Path | None = None) -> str:
    """The Benchmarks table (Markdown) of every run below `folder`, written to `folder/benchmarks.md`."""
    df = collect_runs(folder)
    metric_cols = [c for c in df.columns if c.startswith(("recall@", "map@r", "precision", "r_prec", "nmi"))]
    header = ["data", "backbone", "dim", "loss", "optimizer", "m", "epochs", "best", "R@1 at start"] + metric_cols
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in df.sort_values(["data", "backbone", "feature_dim", "loss", "optimizer", "momentum"]).iterrows():
        cells = [r["data"], r["backbone"], r["feature_dim"], r["loss"], r["optimizer"], f"{r['momentum']:g}",
                 r["epochs"], r["best_epoch"], f"{100 * r['start_recall@1']:.1f}"]
        cells += [f"{100 * r[c]:.1f}" for c in metric_cols]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n\nValues in %, best epoch of each run (epoch 0 = the pretrained start).\n"
    write_text(Path(out) if out else Path(folder) / "benchmarks.md", text)
    return text
