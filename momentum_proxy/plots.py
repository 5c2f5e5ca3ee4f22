"""Every figure of the toolkit, in one style: the retrieval picture (the query and its top-K framed green/red by
class, as the original tool drew it), R@1 against momentum, a run's curves, and a tuning study's plots.

Figures are drawn headless (matplotlib's Agg backend), selected in `pyplot()` when the first figure is drawn, not
when this module is imported, so importing the package never changes the backend of a notebook."""

from __future__ import annotations

import re
from pathlib import Path

import scienceplots  # noqa: F401  (registers the 'science' styles)
from matplotlib.ticker import MaxNLocator, NullFormatter, NullLocator
from PIL import Image

from momentum_proxy.fileio import atomic_path

PER_ROW = 10  # pictures per row of the retrieval grid
MAX_DRAWN = 49  # results drawn at most: with the query, 5 rows (about 2000 x 1250 px)
NAME_WIDTH = 26  # characters of a class name on one line of a cell's title


def wrapped(name: str, width: int = NAME_WIDTH, lines: int = 2) -> str:
    """A class name in at most `lines` lines of about `width` characters, broken after spaces, `_` and `-`
    (a word longer than a line is cut); an ellipsis ends a name that does not fit."""
    out = [""]
    for word in re.split(r"(?<=[\s_-])", name):
        if out[-1] and len(out[-1]) + len(word) > width:
            out.append("")
        out[-1] += word
    text = "\n".join(line.strip()[:width] for line in out[:lines])
    return text if len(out) <= lines and all(len(line.strip()) <= width for line in out) else text[:-1] + "…"


def draw_results(
    query: str | Path,
    results: list,
    out_png: str | Path,
    label: int | None = None,
    title: str | None = None,
    label_name: str | None = None,
) -> Path:
    """One PNG: the query, then the results in rank order with their raw cosine similarity (and, when a
    re-ranking ordered them, its score: `rr`) and class, in rows of PER_ROW; green/red borders when the query's
    class is known. A missing image is drawn as a grey cell."""
    plt = pyplot()
    n = len(results) + 1
    cols = min(n, PER_ROW)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.5 * rows), squeeze=False)
    query_text = "query" if label is None else f"query:\n{wrapped(label_name or f'class {label}')}"
    entries = [(query, query_text, "black")]
    for r in results:
        colour = "gray" if r.same_class is None else ("#1a9850" if r.same_class else "#d73027")
        name = wrapped(r.class_name or ("" if r.label is None else f"class {r.label}"))
        reranked = getattr(r, "rerank_score", None)
        score = f"{r.score:.3f}" + ("" if reranked is None else f" (rr {reranked:.3f})")
        entries.append((r.path, f"#{r.rank} {score}\n{name}", colour))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (path, text, colour) in zip(axes.ravel(), entries):
        ax.axis("on")
        try:
            with Image.open(path) as im:
                ax.imshow(im.convert("RGB"))
        except OSError:
            ax.text(0.5, 0.5, "image missing", ha="center", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(text, fontsize=8)
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(5 if colour != "black" else 1.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out_png


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib  # lazy: the backend is chosen when a figure is drawn, not on import (see above)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after the backend is chosen

    return plt


def style():
    """pyplot in the project's one style (SciencePlots 'science' + grid, no LaTeX), headless."""
    plt = pyplot()
    plt.style.use(["science", "no-latex", "grid"])
    return plt


def save(fig, out: Path, formats=("png", "pdf")) -> list[Path]:
    """Write the figure atomically in each format, then close it."""
    plt = pyplot()
    paths = []
    for fmt in formats:
        path = out.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=200)
        paths.append(path)
    plt.close(fig)
    return paths


def momentum_figure(table, out: Path) -> list[Path]:
    """Test R@1 (%) against proxy momentum, one line per backbone/feature size, mean ± 95 % CI over seeds, from
    `experiments.sweep.summarize`'s table; the title says how checkpoints were selected and how many seeds."""
    plt = style()
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    for (backbone, dim), g in table.groupby(["backbone", "feature_dim"]):
        g = g.sort_values("proxy_momentum")
        ax.errorbar(
            g["proxy_momentum"],
            100 * g["recall@1"],
            yerr=100 * g["recall@1_ci"].fillna(0),
            marker="o",
            capsize=2,
            label=f"{backbone} ({dim})",
        )
    seeds = sorted(set(table["seeds"]))
    selected = ", ".join(sorted(set(table["selected_on"])))
    ax.set_xlabel("proxy momentum $m$")
    ax.set_ylabel("test R@1 (%)")
    ax.set_title(f"selected on {selected}; {'/'.join(map(str, seeds))} seed(s), mean ± 95% CI", fontsize=6)
    ax.legend(fontsize=6)
    return save(fig, out)


def curves_figure(df, summary: dict | None, out: Path) -> list[Path]:
    """Training loss and the per-epoch metrics (`metrics.csv` as a DataFrame) of one run, with the selected epoch
    of `summary` (eval.json) marked."""
    plt = style()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.0, 2.8))
    trained = df[df["epoch"] > 0]
    ax1.plot(trained["epoch"], trained["train_loss"], marker="o")
    ax1.set_ylabel("train loss")
    for col in [c for c in df.columns if c.startswith(("val_", "test_"))]:
        ax2.plot(df["epoch"], 100 * df[col], marker=".", label=col, linestyle="-" if col.startswith("val_") else ":")
    ax2.set_ylabel("metric (%)")
    if summary is not None:
        ax2.axvline(
            summary["epoch"],
            color="gray",
            linestyle="--",
            linewidth=0.8,
            label=f"selected (on {summary['selected_on']})",
        )
    ax2.legend(fontsize=5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    for ax, label in ((ax1, "epoch"), (ax2, "epoch (0 = pretrained start)")):
        ax.set_xlabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_minor_locator(NullLocator())
    fig.tight_layout()
    return save(fig, out)


def history_figure(x: list[int], y: list[float], path: Path) -> None:
    """val MAP@R (%) `y` of the complete trials numbered `x`, with the best so far (a tuning study)."""
    plt = style()
    fig, ax = plt.subplots(figsize=(4.0, 3.0))
    ax.plot(x, y, "o", label="complete trial")
    ax.step(x, [max(y[: i + 1]) for i in range(len(y))], where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are numbered, never 0.2
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("val MAP@R (%)")
    ax.legend(fontsize=6)
    save(fig, path)


def importances_figure(imp: dict[str, float], path: Path) -> None:
    """Each searched parameter's fANOVA importance, as horizontal bars."""
    plt = style()
    fig, ax = plt.subplots(figsize=(4.0, 0.4 + 0.25 * len(imp)))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel("importance (fANOVA)")
    save(fig, path)


def params_figure(complete: list, names: list[str], path: Path, top: int = 4) -> None:
    """val MAP@R of complete Optuna trials against each of the `top` first parameters (log axis for log ranges)."""
    names = names[:top]
    plt = style()
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(2.2 * max(1, len(names)), 2.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [(t.params[name], 100 * t.value, t.distributions[name]) for t in complete if name in t.params]
        dist = points[0][2]
        if hasattr(dist, "choices"):  # categorical
            ax.scatter([dist.choices.index(p) for p, _, _ in points], [v for _, v, _ in points])
            ax.set_xticks(range(len(dist.choices)), [str(c) for c in dist.choices], rotation=45, fontsize=5)
            ax.set_xlim(-0.5, len(dist.choices) - 0.5)
        else:  # the axis spans the searched range, labelled at its ends
            ax.scatter([p for p, _, _ in points], [v for _, v, _ in points])
            if dist.log:
                ax.set_xscale("log")
            ax.set_xlim(dist.low, dist.high)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks([dist.low, dist.high], [f"{dist.low:.3g}", f"{dist.high:.3g}"], fontsize=5)
        ax.set_xlabel(name)
    axes[0][0].set_ylabel("val MAP@R (%)")
    fig.tight_layout()
    save(fig, path)
