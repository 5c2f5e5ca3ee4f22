"""Retrieval for a query image: load a run's trained model, embed the query, search, draw the result grid."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from momentum_proxy.errors import UserError
from momentum_proxy.evaluation import knn
from momentum_proxy.fileio import atomic_path, write_json
from momentum_proxy.inference import embed_files, resolve_device
from momentum_proxy.models import EmbeddingNet
from momentum_proxy.runs import BEST, EMBEDDINGS, RunDir, TrainConfig, load_embeddings


def load_model(run_dir: str | Path, device: str = "auto") -> tuple[EmbeddingNet, TrainConfig, str]:
    """A run's best model in eval mode on `device`, its config, and a fingerprint of the checkpoint."""
    run = RunDir(run_dir)
    cfg = run.config()
    state = run.load_checkpoint(BEST)
    model = EmbeddingNet(cfg.backbone, cfg.feature_dim, weights=None, pooling=cfg.pooling)
    model.load_state_dict(state["model"])
    fingerprint = f"{Path(run.path).resolve()}#epoch{state['epoch']}"
    return model.to(resolve_device(device)).eval(), cfg, fingerprint


@dataclass
class Result:
    rank: int
    path: str
    label: int | None
    similarity: float
    correct: bool | None


def is_query(query: Path, paths) -> np.ndarray:
    """Which database paths are the query's own file (a query from the database is not its own result)."""
    target = str(query.resolve())
    return np.array([str(Path(p).resolve()) == target for p in paths], dtype=bool)


def known_label(same: np.ndarray, labels) -> int | None:
    """The query's class when it is a database image, else None."""
    return int(np.asarray(labels)[same][0]) if labels is not None and same.any() else None


def retrieve(run_dir: str | Path, query: str | Path, k: int = 8, *, database: str | Path | None = None,
             device: str = "auto", runtime: str = "torch") -> tuple[int | None, list[Result]]:
    """Top-k of `query` in the run's embeddings database (or another `database` .npz); the query is excluded.
    `runtime` (torch | onnx) embeds the query (see `runtime.load_embedder`)."""
    from momentum_proxy.runtime import load_embedder

    query = Path(query)
    if not query.is_file():
        raise UserError(f"query image not found: {query}")
    embedder = load_embedder(run_dir, runtime, device)
    db = load_embeddings(database or RunDir(run_dir) / EMBEDDINGS)
    feats, _, skipped = embed_files(embedder, [query], embedder.image_size, embedder.device)
    if skipped:
        raise UserError(f"cannot read query image {query}: {skipped[0][1]}")
    paths, labels = db["paths"], db["labels"]
    if feats.shape[1] != db["features"].shape[1]:
        raise UserError(f"the database holds {db['features'].shape[1]}-d features, the model makes {feats.shape[1]}-d")
    same = is_query(query, paths)
    label = known_label(same, labels)
    sims, idx = knn(feats, db["features"], min(k + int(same.any()), len(paths)))
    results = []
    for s, i in zip(sims[0], idx[0]):
        if same[i] or len(results) == k:
            continue
        y = int(labels[i])
        results.append(Result(len(results) + 1, str(paths[i]), y, float(s), None if label is None else y == label))
    return label, results


def draw_results(query: str | Path, results: list[Result], out_png: str | Path, label: int | None = None,
                 title: str | None = None) -> Path:
    """One PNG: the query, then the results in rank order with their similarity; green/red borders when the
    query's class is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n = len(results) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.0 * n, 2.5), squeeze=False)
    entries = [(query, "query" if label is None else f"query (class {label})", "black")]
    for r in results:
        colour = "gray" if r.correct is None else ("#1a9850" if r.correct else "#d73027")
        entries.append((r.path, f"#{r.rank}  {r.similarity:.3f}", colour))
    for ax, (path, text, colour) in zip(axes[0], entries):
        with Image.open(path) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(text, fontsize=9)
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


def save_retrieval(query, label: int | None, results: list[Result], out_dir) -> Path:
    """Write `out_dir/retrieval.png` (the picture) and `out_dir/results.json`; return the picture's path."""
    out_dir = Path(out_dir)
    png = draw_results(query, results, out_dir / "retrieval.png", label)
    write_json(out_dir / "results.json", {"query": str(query), "query_label": label, "k": len(results),
                                          "results": [r.__dict__ for r in results]})
    return png


def retrieve_and_draw(run_dir, query, k: int, out_dir, *, database=None, device: str = "auto",
                      runtime: str = "torch") -> Path:
    """`retrieve` + `save_retrieval`."""
    label, results = retrieve(run_dir, query, k, database=database, device=device, runtime=runtime)
    return save_retrieval(query, label, results, out_dir)
