"""Retrieval for a query image: load a run's trained model, embed the query, search, draw the result grid."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from momentum_proxy.data.manifest import read_manifest
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation import knn
from momentum_proxy.fileio import atomic_path, write_json
from momentum_proxy.inference import embed_files, load_model
from momentum_proxy.runs import EMBEDDINGS, RunDir, load_embeddings


SPLITS = ("test", "val", "train", "all")
PER_ROW = 10  # pictures per row of the retrieval grid


@dataclass
class Result:
    rank: int
    path: str
    label: int | None
    similarity: float
    correct: bool | None
    class_name: str | None = None


@dataclass
class Database:
    """What a query is searched against: features, labels, paths, class names, and a description."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    class_names: np.ndarray | None
    collection: str


def is_query(query: Path, paths) -> np.ndarray:
    """Which database paths are the query's own file (a query from the database is not its own result)."""
    target = str(query.resolve())
    return np.array([str(Path(p).resolve()) == target for p in paths], dtype=bool)


def known_label(same: np.ndarray, labels) -> int | None:
    """The query's class when it is a database image, else None."""
    return int(np.asarray(labels)[same][0]) if labels is not None and same.any() else None


def run_database(run_dir: str | Path, embedder, split: str = "test", database: str | Path | None = None) -> Database:
    """The run's test embeddings (embeddings.npz, or another `database` .npz), plus, for `split` train, val or
    all, those images of the run's dataset embedded now by `embedder` (the run's model)."""
    cfg = RunDir(run_dir).config()
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; choose from {', '.join(SPLITS)}")
    if database is not None:
        db = load_embeddings(database)
        return Database(db["features"], db["labels"], db["paths"], db.get("class_names"), f"database {database}")
    parts = []
    if split in ("test", "all"):
        db = load_embeddings(RunDir(run_dir) / EMBEDDINGS)
        parts.append((db["features"], db["labels"], db["paths"], db.get("class_names")))
    if split != "test":
        df = read_manifest(cfg.data)
        df = df[df["split"].isin(["train", "val"] if split == "all" else [split])]
        if df.empty and split != "all":
            raise UserError(f"{cfg.data} has no {split} images to search")
        paths = [str(Path(cfg.data) / p) for p in df["path"]]
        feats, kept, skipped = embed_files(embedder, paths, embedder.image_size, embedder.device)
        keep = np.isin(paths, kept)
        parts.append((feats, df["label"].to_numpy()[keep], np.asarray(kept), df["class_name"].to_numpy()[keep]))
    features, labels, paths, names = (np.concatenate([p[i] for p in parts]) if all(p[i] is not None for p in parts)
                                      else None for i in range(4))
    what = {"test": "the test split", "val": "the val split", "train": "the train split",
            "all": "all splits"}[split]
    return Database(features, labels, paths, names, f"{what} of {Path(cfg.data).name} ({len(paths)} images)")


@dataclass
class Retrieval:
    """A query's results and what was searched."""

    query: Path
    label: int | None
    label_name: str | None
    results: list[Result]
    collection: str
    requested_k: int


def retrieve(run_dir: str | Path, query: str | Path, k: int = 8, *, database: str | Path | None = None,
             split: str = "test", device: str = "auto", runtime: str = "torch") -> Retrieval:
    """Top-k of `query` among the run's embeddings of `split` (or another `database` .npz); the query itself
    is excluded. `runtime` (torch | onnx) embeds (see `runtime.load_embedder`)."""
    from momentum_proxy.runtime import load_embedder

    query = Path(query)
    if not query.is_file():
        raise UserError(f"query image not found: {query}")
    if k < 1:
        raise UserError("-k must be at least 1")
    embedder = load_embedder(run_dir, runtime, device)
    db = run_database(run_dir, embedder, split, database)
    feats, _, skipped = embed_files(embedder, [query], embedder.image_size, embedder.device)
    if skipped:
        raise UserError(f"cannot read query image {query}: {skipped[0][1]}")
    if feats.shape[1] != db.features.shape[1]:
        raise UserError(f"the database holds {db.features.shape[1]}-d features, the model makes {feats.shape[1]}-d")
    same = is_query(query, db.paths)
    label = known_label(same, db.labels)
    label_name = None if label is None or db.class_names is None else str(db.class_names[same][0])
    sims, idx = knn(feats, db.features, min(k + int(same.any()), len(db.paths)))
    results = []
    for s, i in zip(sims[0], idx[0]):
        if same[i] or len(results) == k:
            continue
        y = int(db.labels[i])
        results.append(Result(len(results) + 1, str(db.paths[i]), y, float(s), None if label is None else y == label,
                              None if db.class_names is None else str(db.class_names[i])))
    return Retrieval(query, label, label_name, results, db.collection, k)


def draw_results(query: str | Path, results: list[Result], out_png: str | Path, label: int | None = None,
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


def save_retrieval(query, label: int | None, results: list[Result], out_dir, *, collection: str | None = None,
                   label_name: str | None = None, extra: dict | None = None) -> Path:
    """Write `out_dir/retrieval.png` (the picture) and `out_dir/results.json`; return the picture's path."""
    out_dir = Path(out_dir)
    png = draw_results(query, results, out_dir / "retrieval.png", label,
                       title=f"top {len(results)} in {collection}" if collection else None, label_name=label_name)
    write_json(out_dir / "results.json", {"query": str(query), "query_label": label, "query_class_name": label_name,
                                          "searched": collection, "k": len(results), **(extra or {}),
                                          "results": [r.__dict__ for r in results]})
    return png


def resolve_database(run_dir: str | None, data_base: str | None) -> tuple[str, Path | None]:
    """(run folder, database .npz or None) from a run folder and/or the original tool's `--data_base`
    (a run folder or its embeddings file)."""
    database = None
    if data_base:
        db = Path(data_base)
        if db.is_dir():
            run_dir = run_dir or str(db)
        else:
            database = db
            run_dir = run_dir or str(db.parent)
    if not run_dir:
        raise UserError("give a run folder (or --data_base, or --index)")
    return run_dir, database


def retrieve_and_draw(run_dir, query, k: int, out_dir, *, database=None, split: str = "test",
                      device: str = "auto", runtime: str = "torch") -> Path:
    """`retrieve` + `save_retrieval` (results.json also records the run that searched)."""
    r = retrieve(run_dir, query, k, database=database, split=split, device=device, runtime=runtime)
    return save_retrieval(r.query, r.label, r.results, out_dir, collection=r.collection, label_name=r.label_name,
                          extra={"run": str(Path(run_dir).resolve()), "requested_k": k})


def ranked_list(results: list[Result]) -> str:
    """The results as text lines: rank, similarity, class, path (and a mark when the query's class is known)."""
    mark = {True: "  same class", False: "  other class", None: ""}
    return "\n".join(f"#{r.rank:<3d} {r.similarity:.3f}  {r.class_name or r.label}  {r.path}{mark[r.correct]}"
                     for r in results)
