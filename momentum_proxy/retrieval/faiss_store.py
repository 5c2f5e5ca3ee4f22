"""A saved retrieval index: faiss over L2-normalised embeddings (cosine), plus image paths, labels and model info.

On disk, a folder holds `index-<hash>.faiss` (faiss.write_index) and `meta.json` (kind, feature_dim, search
parameters, the caller's `model` dict, paths, labels, class names, deleted ids). A save writes the faiss file
under a new content-addressed name first, then replaces `meta.json` (the commit point, which names that file
and records its sha256), then removes the previous faiss file: a save killed at any moment leaves the previous
or the new index, never a mix. Nothing is pickled. Re-ranking's neighbour lists (`rerank.Neighbours`), once
computed for the index, are saved the same way beside it (`neighbours-<hash>.npz`, named in `meta.json`) and kept
up to date with its items.

Items are numbered in the order they were added (id = faiss position) and the numbers never change: a deleted
item becomes a tombstone (its id is listed in `deleted`; its vector stays in the faiss file until a rebuild), and
searches over-fetch k + number of tombstones and drop them. This works for every kind (hnsw cannot remove
vectors). Image paths are stored absolute, except images inside the index folder (e.g. uploads of
`mproxy serve`), stored relative to it; so an index works from any working directory, and the folder can move
with the images it holds. Indexes of format 1 (paths as typed, relative to the directory they were built from)
are read with their relative paths resolved against the current directory.

Kinds:
- `exact`: IndexFlatIP, exhaustive search;
- `ivf`: IndexIVFFlat with nlist = 4·sqrt(N) lists (at most N/39, so every list has ~39 training points),
  trained once at build on the build data (faiss subsamples 256 points per list when there are more);
  vectors added later go to the existing lists, so rebuild when the data change a lot. nprobe lists
  are scanned per query;
- `hnsw`: IndexHNSWFlat with M=32 (efConstruction 80); efSearch = max(ef_search, k) per query.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path, file_sha256, read_json, write_json
from momentum_proxy.paths import META_FILE
from momentum_proxy.retrieval.rerank import Neighbours, store_neighbours
from momentum_proxy.retrieval.store import UNKNOWN, IndexStore, checked_items
from momentum_proxy.vectors import as_features, knn, l2_normalize

KINDS = ("exact", "ivf", "hnsw")
LEGACY_INDEX_FILE = "index.faiss"  # format 1
WRITER_LOCK = ".writer.lock"  # held by the one process that may write the folder (`mproxy index`, `mproxy serve`)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 64
MIN_POINTS_PER_LIST = 39


def default_nlist(n: int) -> int:
    """IVF list count for n training vectors: ~4·sqrt(n), at most n/39, at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: an eighth of them, at least 16 (or all when fewer)."""
    return min(nlist, max(16, nlist // 8))


def _stored_path(path: str, inside: str) -> str:
    """How `meta.json` records a path: relative to the index folder (`inside` is its absolute path and a
    separator) when inside it, else absolute. String operations: a save records every path, and pathlib took
    23 ms of the event loop's time per add at 1,000 items."""
    path = os.path.abspath(path)
    return path[len(inside):] if path.startswith(inside) else path


@dataclass
class Snapshot:
    """An index's state, taken in memory, to be written by `write` (e.g. outside a lock)."""

    blob: np.ndarray
    meta: dict
    neighbours: bytes | None = None  # re-ranking's neighbour lists (`rerank.Neighbours.to_bytes`)

    def write(self, folder: str | Path) -> Path:
        """Write the faiss file (and the neighbour lists), then commit `meta.json`, then remove older files;
        return the folder."""
        folder = Path(folder).absolute()
        name, sha = _write_content(folder, "index-{}.faiss", self.blob.tobytes())
        inside = os.path.join(os.path.abspath(folder), "")
        meta = dict(self.meta, index_file=name, index_sha256=sha,
                    paths=[_stored_path(p, inside) for p in self.meta["paths"]])
        kept = {name}
        if self.neighbours is not None:
            neighbours_name, meta["neighbours_sha256"] = _write_content(folder, "neighbours-{}.npz", self.neighbours)
            meta["neighbours_file"] = neighbours_name
            kept.add(neighbours_name)
        write_json(folder / META_FILE, meta)
        for old in [*folder.glob("index*.faiss"), *folder.glob(".index*.tmp"), *folder.glob("neighbours-*.npz"),
                    *folder.glob(".neighbours-*.tmp")]:  # also those of killed saves
            if old.name not in kept:
                old.unlink(missing_ok=True)
        return folder


def _write_content(folder: Path, pattern: str, data: bytes) -> tuple[str, str]:
    """Write `data` durably under a name made from its hash (`pattern` with one {}); return (name, sha256)."""
    sha = hashlib.sha256(data).hexdigest()
    name = pattern.format(sha[:16])
    with atomic_path(folder / name) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return name, sha


class FaissStore(IndexStore):
    """Cosine retrieval over a faiss index; item `i` (its id) has `paths[i]`, `labels[i]` (labels optional) and
    class name `classes[labels[i]]` when known; ids in `deleted` are tombstones."""

    def __init__(self, index: faiss.Index, kind: str, paths: list[str], labels: list | None, model: dict,
                 params: dict, classes: dict[int, str] | None = None, deleted=(), sources=()):
        self.index, self.kind, self.paths, self.labels, self.model, self.params = (
            index, kind, paths, labels, model, params)
        self.classes = dict(classes or {})
        self.deleted = set(int(i) for i in deleted)
        self.sources = list(sources)
        self.path_ids = {p: i for i, p in enumerate(paths) if i not in self.deleted}
        if kind == "ivf":
            index.make_direct_map()  # `vector(id)` for queries by id

    @property
    def feature_dim(self) -> int:
        return self.index.d

    @property
    def ntotal(self) -> int:
        """Items ever added, tombstones included (the next id)."""
        return self.index.ntotal

    def __len__(self) -> int:
        """Live items."""
        return self.index.ntotal - len(self.deleted)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    @classmethod
    def build(cls, features, paths, labels=None, *, kind: str = "exact", model: dict | None = None,
              classes: dict[int, str] | None = None, nlist: int | None = None, nprobe: int | None = None,
              ef_search: int = DEFAULT_EF_SEARCH, seed: int = 0) -> FaissStore:
        """Index `features` (n, d) for items `paths` (and `labels`, named by `classes`); `model` describes the
        embedding model."""
        if kind not in KINDS:
            raise UserError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
        x = l2_normalize(as_features(features))
        n, d = x.shape
        paths, labels = checked_items(paths, labels, n)
        params: dict = {}
        if kind == "exact":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = default_nlist(n) if nlist is None else int(nlist)
            if not 1 <= nlist <= n:
                raise UserError(f"ivf needs 1 <= nlist <= number of vectors ({n}), got {nlist}")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            index.cp.min_points_per_centroid = 1  # small nlist/n ratios are deliberate, no warning
            index.train(x)
            nprobe = default_nprobe(nlist) if nprobe is None else int(nprobe)
            if nprobe < 1:
                raise UserError(f"nprobe must be at least 1, got {nprobe}")
            params = {"nlist": nlist, "nprobe": min(nlist, nprobe)}
        else:
            if ef_search < 1:
                raise UserError(f"ef_search must be at least 1, got {ef_search}")
            index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": int(ef_search)}
        built = cls(index, kind, [], [] if labels is not None else None, dict(model or {}), params, classes)
        built._add(x, paths, labels)
        return built

    def _add(self, x: np.ndarray, paths: list[str], labels: list | None) -> list[int]:
        """Add normalised vectors with checked paths and labels (ivf: into the lists trained at build, no rebuild)."""
        if (labels is None) != (self.labels is None):
            raise UserError("labels must be given for every item or for none" if self.labels is not None
                            else "this index has no labels; add items without labels")
        first = self.ntotal
        self.index.add(x)
        self.paths.extend(paths)
        if labels is not None:
            self.labels.extend(labels)
        ids = list(range(first, self.ntotal))
        self.path_ids.update(zip(paths, ids))
        return ids

    def ids_of(self, paths: list[str]) -> dict[str, int]:
        return {p: self.path_ids[p] for p in paths if p in self.path_ids}

    def file_ids(self, path: Path) -> set[int]:
        target = str(Path(path).resolve())
        return {i for i, p in enumerate(self.paths) if str(Path(p).resolve()) == target}

    def live_items(self) -> list[dict]:
        return [self.item(i) for i in range(self.ntotal) if i not in self.deleted]

    def label_for(self, class_name: str) -> int:
        """The label of `class_name`, a new one when the index does not know it (an unlabelled index becomes
        labelled, its items of unknown class)."""
        if self.labels is None:
            self.labels = [UNKNOWN] * self.ntotal
        for label, name in self.classes.items():
            if name == class_name:
                return label
        label = max([*self.classes, *self.labels, UNKNOWN]) + 1
        self.classes[label] = class_name
        return label

    def remove(self, item_id: int) -> None:
        """Delete an item (a tombstone: its id is never reused)."""
        self.item(item_id)
        self.deleted.add(int(item_id))
        if self.path_ids.get(self.paths[item_id]) == item_id:
            del self.path_ids[self.paths[item_id]]

    def exists(self, item_id: int) -> bool:
        return 0 <= item_id < self.ntotal and item_id not in self.deleted

    def item(self, item_id: int) -> dict:
        """An item's metadata: id, path, label, class_name (UserError for an unknown or deleted id)."""
        if not self.exists(item_id):
            raise UserError(f"no item with id {item_id}")
        label = int(self.labels[item_id]) if self.labels is not None else None
        return {"id": int(item_id), "path": self.paths[item_id], "label": None if label == UNKNOWN else label,
                "class_name": self.classes.get(label)}

    def vector(self, item_id: int) -> np.ndarray:
        """An item's stored (normalised) embedding, shape (1, d). (numpy even once pytorch-metric-learning has
        imported faiss.contrib.torch_utils, whose `reconstruct` returns torch tensors.)"""
        self.item(item_id)
        return np.asarray(self.index.reconstruct(int(item_id)))[None]

    def _set_search_params(self, k: int) -> None:
        # Attributes, not faiss SearchParameters: importing pytorch-metric-learning (faiss.contrib.torch_utils)
        # replaces Index.search with a version that takes no `params`.
        if self.kind == "ivf":
            self.index.nprobe = self.params["nprobe"]
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.params["ef_search"], k)

    def search(self, query_features, k: int, exclude=()) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and ids of the k best live items per query, each (n_queries, k); ids in
        `exclude` are left out too.

        k is clipped to the number of live items; an approximate index may return fewer, padded with id -1.
        """
        q = as_features(query_features, "query features")
        if q.shape[1] != self.feature_dim:
            raise UserError(f"query features have {q.shape[1]} dimensions, the index {self.feature_dim}")
        hidden = self.deleted | {int(i) for i in exclude if self.exists(int(i))}
        k = min(int(k), self.ntotal - len(hidden))
        if k < 1:
            raise UserError("k must be at least 1 and the index must not be empty")
        fetch = min(self.ntotal, k + len(hidden))
        self._set_search_params(fetch)
        sims, idx = self.index.search(l2_normalize(q), fetch)
        if not hidden:
            return sims, idx
        keep = (idx >= 0) & ~np.isin(idx, np.fromiter(hidden, np.int64, len(hidden)))
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        for row in range(len(q)):
            cols = np.flatnonzero(keep[row])[:k]
            out_s[row, :len(cols)], out_i[row, :len(cols)] = sims[row, cols], idx[row, cols]
        return out_s, out_i

    def recall_vs_exact(self, k: int = 10, num_queries: int = 1000, seed: int = 0) -> float:
        """Fraction of the exact top-k found by this index's top-k, for up to `num_queries` live items
        (sampled with `seed`) used as queries. 1.0 for an exact index."""
        live = np.array([i for i in range(self.ntotal) if i not in self.deleted])
        k = min(int(k), len(live))
        vectors = np.asarray(self.index.reconstruct_n(0, self.ntotal))[live]
        rng = np.random.default_rng(seed)
        queries = vectors[np.sort(rng.choice(len(live), min(num_queries, len(live)), replace=False))]
        exact = live[knn(queries, vectors, k)[1]]
        approx = self.search(queries, k)[1]
        found = [len(np.intersect1d(e, a)) for e, a in zip(exact, approx)]
        return float(np.sum(found) / exact.size)

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors) of the live items, in id order."""
        live = np.array([i for i in range(self.ntotal) if i not in self.deleted], np.int64)
        return live, np.asarray(self.index.reconstruct_n(0, self.ntotal))[live]

    def snapshot(self) -> Snapshot:
        """The state to save, copied (cheap next to embedding: one memory copy of the vectors); neighbour lists,
        when the index has them, brought up to date first."""
        neighbours = None
        if self.neighbours is not None and self.neighbours.size:
            neighbours = store_neighbours(self, self.neighbours.size).to_bytes()
        return Snapshot(faiss.serialize_index(self.index), neighbours=neighbours, meta={
            "format_version": FORMAT_VERSION, "kind": self.kind, "metric": "cosine",
            "feature_dim": self.feature_dim, "count": self.ntotal, "live": len(self), "params": self.params,
            "model": self.model, "sources": list(self.sources), "paths": list(self.paths),
            "labels": None if self.labels is None else list(self.labels),
            "classes": {str(k): v for k, v in sorted(self.classes.items())}, "deleted": sorted(self.deleted),
        })

    @classmethod
    def load(cls, folder: str | Path, expect_model: dict | None = None) -> FaissStore:
        """Read an index saved by `save`; refuse it when a key of `expect_model` (e.g. backbone, checkpoint
        hash, feature_dim) differs from what it was built with."""
        folder = Path(folder).absolute()
        meta = read_meta(folder)
        built_with = {**meta["model"], "feature_dim": meta["feature_dim"]}
        for key, value in (expect_model or {}).items():
            if key not in built_with or built_with[key] != value:
                raise UserError(f"index in {folder} was built with {key}={built_with.get(key)!r}, "
                                f"not {value!r}; rebuild it for this model")
        index_file = folder / meta.get("index_file", LEGACY_INDEX_FILE)
        if not index_file.is_file() or file_sha256(index_file) != meta["index_sha256"]:
            raise UserError(f"{index_file.name} in {folder} does not match {META_FILE} (interrupted save?); "
                            "rebuild it")
        index = faiss.read_index(str(index_file))
        if index.ntotal != meta["count"] or len(meta["paths"]) != meta["count"] or index.d != meta["feature_dim"]:
            raise UserError(f"{index_file.name} and {META_FILE} in {folder} disagree; rebuild the index")
        base = folder if meta["format_version"] >= 2 else Path.cwd()
        paths = [os.path.normpath(base / p) for p in meta["paths"]]
        classes = {int(k): v for k, v in meta.get("classes", {}).items()}
        store = cls(index, meta["kind"], paths, meta["labels"], meta["model"], meta["params"], classes,
                    meta.get("deleted", ()), meta.get("sources", ()))
        neighbours = folder / meta.get("neighbours_file", "-")
        if neighbours.is_file() and file_sha256(neighbours) == meta.get("neighbours_sha256"):
            store.neighbours = Neighbours.from_bytes(neighbours.read_bytes())  # else recomputed when needed
        return store


def read_meta(folder: str | Path) -> dict:
    """`meta.json` of an index folder, checked to be of a format this version reads."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise UserError(f"no retrieval index in {folder} (no {META_FILE})")
    meta = read_json(folder / META_FILE)
    if meta.get("format_version") not in READABLE_VERSIONS or meta.get("kind") not in KINDS:
        raise UserError(f"{folder / META_FILE} is not a retrieval index of format "
                        f"{' or '.join(map(str, READABLE_VERSIONS))}; rebuild it with "
                        f"`mproxy index RUN --images DIR --out {folder} --rebuild`")
    return meta
