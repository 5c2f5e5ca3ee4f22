"""The one search path for every caller.

- `run_index` makes a run's own embeddings (or another embeddings file, or a split embedded now) an exact index
  in memory, so that searching a run and searching a saved index (`retrieval.build.open_index`) are the same code.
- `search_hits` searches an index with a query embedding, leaving the query's own item out (the service uses it);
  `search_image` embeds a query image first and builds the results; `retrieve` does both for a run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from momentum_proxy.config import check_tta
from momentum_proxy.data.manifest import read_manifest
from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.embedding.inference import embed_files
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import file_sha256
from momentum_proxy.retrieval.faiss_store import FaissStore
from momentum_proxy.retrieval.hits import Hit, judged
from momentum_proxy.retrieval.rerank import Rerank, rerank_store
from momentum_proxy.retrieval.store import IndexStore
from momentum_proxy.runs import EMBEDDINGS, RunDir, load_embeddings
from momentum_proxy.vectors import as_features, l2_normalize

SPLITS = ("test", "val", "train", "all")


@dataclass
class Retrieval:
    """A query's results and what was searched."""

    query: Path
    label: int | None
    label_name: str | None
    results: list[Hit]
    collection: str
    requested_k: int
    about: str = ""  # a saved index's kind and recall against exact search, in words


def check_database_tta(database, tta: str) -> None:
    """Refuse test-time augmentation over an embeddings file: it records none (training embeds without)."""
    if database is not None and tta != "none":
        raise UserError(
            f"--tta {tta} needs the searched images embedded the same way; the embeddings file "
            f"{database} was not (search the run's split, which is then embedded with --tta {tta})"
        )


COPY_COSINE = 0.99  # the same bytes embed to the same vector (up to rounding): copies are looked for above this
COPY_CANDIDATES = 10  # items a plain search looks at for copies of a query file whose content was not recorded


def content_of(path) -> tuple[str, int]:
    """An image file's content as searches compare it: (sha256 of its bytes, its size)."""
    return file_sha256(path), os.path.getsize(path)


def holds(path: str, content: tuple[str, int]) -> bool:
    """Whether the file at `path` holds exactly `content` (its size is compared first; a missing file does not)."""
    try:
        return os.path.getsize(path) == content[1] and file_sha256(path) == content[0]
    except OSError:
        return False


def copies_of(index: IndexStore, features: np.ndarray, content: tuple[str, int]) -> set[int]:
    """Ids of the items whose image file holds `content`: those recorded with its hash, and those among the plain
    search's nearest items (raw cosine at least COPY_COSINE) whose file holds it (indexes without hashes)."""
    found = set(index.content_ids([content[0]]).values())
    if not len(index):
        return found
    scores, ids = index.search(features, min(COPY_CANDIDATES, len(index)))
    for score, i in zip(scores[0], ids[0]):
        if i >= 0 and score >= COPY_COSINE and int(i) not in found and holds(index.item(int(i))["path"], content):
            found.add(int(i))
    return found


def raw_cosines(index: IndexStore, features: np.ndarray, ids) -> np.ndarray:
    """The query's cosine similarity with each item's stored vector (what re-ranking reorders but never changes)."""
    if not len(ids):
        return np.empty(0, np.float32)
    q = l2_normalize(as_features(features, "query features"))[0]
    return np.concatenate([index.vector(int(i)) for i in ids]).astype(np.float32) @ q


def search_hits(
    index: IndexStore,
    features: np.ndarray,
    k: int,
    *,
    query_path=None,
    query_id=None,
    query_content: tuple[str, int] | None = None,
    min_score: float | None = None,
    rerank: Rerank | None = None,
    timing: dict | None = None,
) -> tuple[dict | None, list[Hit]]:
    """Top-k of one query embedding: (the query's item when it is indexed, its hits). The query's own item (given
    by id, or by path: the same file, or any item whose file holds the same bytes) is not among its results, as in
    `mproxy retrieve`. `query_content` ((sha256, size), `content_of`) is that of a query image that is no item
    (an upload): its copies stay in the results, marked `same_image`. Each hit's `score` is its raw cosine;
    `rerank` re-ranks over every live item (`retrieval.rerank`; the query's own item is left out of its database
    side too), its scores then in `rerank_score`. `min_score` keeps the hits whose raw cosine reaches it; `timing`,
    when given, receives the milliseconds re-ranking took ("rerank")."""
    exclude = set() if query_id is None else {query_id}
    if query_path is not None:
        exclude |= index.file_ids(Path(query_path)) | copies_of(index, features, content_of(query_path))
    own = next((index.item(i) for i in sorted(exclude) if index.exists(i)), None)
    rerank = rerank.for_collection(len(index)) if rerank is not None else None
    if rerank is not None and rerank.active:
        start = time.perf_counter()
        scores, ids = rerank_store(index, features, k, rerank, exclude)
        hits = index.hits(scores, ids)[0]
        raw = raw_cosines(index, features, [h.id for h in hits])
        hits = [replace(h, score=float(c), rerank_score=h.score) for h, c in zip(hits, raw)]
        if timing is not None:
            timing["rerank"] = 1000 * (time.perf_counter() - start)
    else:
        hits = index.hits(*index.search(features, k, exclude=exclude))[0]
    if query_content is not None:
        recorded = set(index.content_ids([query_content[0]]).values())
        hits = [
            replace(h, same_image=h.id in recorded or h.score >= COPY_COSINE and holds(h.path, query_content))
            for h in hits
        ]
    if min_score is not None:
        hits = [replace(h, rank=rank) for rank, h in enumerate((h for h in hits if h.score >= min_score), 1)]
    return own, hits


def run_index(
    run_dir: str | Path, embedder, split: str = "test", database: str | Path | None = None
) -> tuple[FaissStore, str]:
    """(an exact in-memory index, its description) of the run's test embeddings (embeddings.npz, or another
    `database` .npz), plus, for `split` train, val or all, those images of the run's dataset embedded now by
    `embedder` (the run's model). An embedder with test-time augmentation embeds the test split now too
    (embeddings.npz was embedded without), and cannot search a `database` file."""
    cfg = RunDir(run_dir).config()
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; choose from {', '.join(SPLITS)}")
    tta = embedder.identity.get("tta", "none")
    check_database_tta(database, tta)
    if database is not None:
        parts, what = [load_embeddings(database)], f"database {database}"
    else:
        parts = []
        if split in ("test", "all"):
            parts.append(
                load_embeddings(RunDir(run_dir) / EMBEDDINGS)
                if tta == "none"
                else _embed_splits(cfg.data, embedder, ["test"])
            )
        if split != "test":
            parts.append(_embed_splits(cfg.data, embedder, ["train", "val"] if split == "all" else [split]))
        names = {"test": "the test split", "val": "the val split", "train": "the train split", "all": "all splits"}
        what = f"{names[split]} of {Path(cfg.data).name} ({sum(len(p['paths']) for p in parts)} images)"
    features = np.concatenate([p["features"] for p in parts])
    if features.shape[1] != embedder.feature_dim:
        raise UserError(f"the database holds {features.shape[1]}-d features, the model makes {embedder.feature_dim}-d")
    labels = [int(y) for p in parts for y in p["labels"]]
    paths = [str(x) for p in parts for x in p["paths"]]
    named = all(p.get("class_names") is not None for p in parts)
    classes = {int(y): str(n) for p in parts for y, n in zip(p["labels"], p["class_names"])} if named else None
    return FaissStore.build(features, paths, labels, classes=classes), what


def _embed_splits(data: str | Path, embedder, splits: list[str]) -> dict:
    """Embeddings of a dataset's `splits`, as `load_embeddings` returns them (unreadable images left out)."""
    df = read_manifest(data)
    df = df[df["split"].isin(splits)]
    if df.empty and len(splits) == 1:
        raise UserError(f"{data} has no {splits[0]} images to search")
    paths = [str(Path(data) / p) for p in df["path"]]
    feats, kept, _ = embed_files(embedder, paths)
    keep = np.isin(paths, kept)
    return {
        "features": feats,
        "labels": df["label"].to_numpy()[keep],
        "paths": np.asarray(kept),
        "class_names": df["class_name"].to_numpy()[keep],
    }


def search_image(
    index: IndexStore, embedder, query: str | Path, k: int, collection: str, rerank: Rerank | None = None
) -> Retrieval:
    """Top-k of a query image in `index`, embedded by `embedder`, re-ranked by `rerank`; the query's own item is
    left out. (Its callers `check_query` first, before a model is loaded.)"""
    query = Path(query)
    feats, _, skipped = embed_files(embedder, [query])
    if skipped:
        raise UserError(f"cannot read query image {query}: {skipped[0][1]}")
    own, hits = search_hits(index, feats, k, query_path=query, rerank=rerank)
    label = own["label"] if own else None
    results = judged(hits, label)
    return Retrieval(query, label, own["class_name"] if own else None, results, collection, k)


def retrieve(
    run_dir: str | Path,
    query: str | Path,
    k: int = 8,
    *,
    database: str | Path | None = None,
    split: str = "test",
    device: str = "auto",
    runtime: str = "torch",
    tta: str = "none",
    rerank: Rerank | None = None,
) -> Retrieval:
    """Top-k of `query` among the run's embeddings of `split` (or another `database` .npz), re-ranked by
    `rerank`; the query itself is excluded. `runtime` (torch | onnx) embeds with `tta` (see
    `deploy.runtimes.load_embedder`)."""
    check_query(query, k)
    check_tta(tta)
    check_database_tta(database, tta)
    embedder = load_embedder(run_dir, runtime, device, tta)
    index, collection = run_index(run_dir, embedder, split, database)
    return search_image(index, embedder, query, k, collection, rerank)


def check_query(query: str | Path, k: int) -> None:
    """Refuse a missing query image or a k below 1 before any model is loaded."""
    if Path(query).is_dir():
        raise UserError(f"--query {query} is a folder; give one image file")
    if not Path(query).is_file():
        raise UserError(f"query image not found: {query}")
    if k < 1:
        raise UserError("-k must be at least 1")
