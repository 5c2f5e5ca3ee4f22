"""Figures of retrieval: the query and its top-K in a grid, framed green/red by class (the original tool's picture)."""
from __future__ import annotations

from pathlib import Path

from momentum_proxy.fileio import atomic_path

PER_ROW = 10  # pictures per row of the retrieval grid


def draw_results(query: str | Path, results: list, out_png: str | Path, label: int | None = None,
                 title: str | None = None, label_name: str | None = None) -> Path:
    """One PNG: the query, then the results in rank order with their similarity and class, in rows of
    PER_ROW; green/red borders when the query's class is known. A missing image is drawn as a grey cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(results) + 1
    cols = min(n, PER_ROW)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.5 * rows), squeeze=False)
    query_text = "query" if label is None else f"query: {label_name or f'class {label}'}"
    entries = [(query, query_text, "black")]
    for r in results:
        colour = "gray" if r.correct is None else ("#1a9850" if r.correct else "#d73027")
        name = r.class_name or ("" if r.label is None else f"class {r.label}")
        entries.append((r.path, f"#{r.rank} {r.similarity:.3f}\n{name}", colour))
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
        ax.set_title(text[:60], fontsize=8)
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
