"""A saved retrieval index: faiss over L2-normalised embeddings (cosine), plus image paths, labels and model info.

On disk, a folder holds `index.faiss` (faiss.write_index) and `meta.json` (kind, feature_dim, count,
search parameters, the caller's `model` dict, paths and labels); both are written atomically, nothing
is pickled. Kinds:
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from momentum_proxy.errors import UserError
from momentum_proxy.evaluation import as_features, as_labels, knn, l2_normalize
from momentum_proxy.fileio import atomic_path, read_json, write_json

KINDS = ("exact", "ivf", "hnsw")
INDEX_FILE = "index.faiss"
META_FILE = "meta.json"
FORMAT_VERSION = 1
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _items(paths, labels, n: int) -> tuple[list[str], list | None]:
    """Paths as strings and labels as JSON-ready values, each checked to number n."""
    paths = [str(p) for p in paths]
    if len(paths) != n:
        raise UserError(f"{len(paths)} paths for {n} feature rows")
    return paths, None if labels is None else as_labels(labels, n).tolist()


@dataclass
class Hit:
    """One search result."""

    rank: int
    index: int
    score: float
    path: str
    label: Any


class RetrievalIndex:
    """Cosine retrieval over a faiss index, item i having `paths[i]` and `labels[i]` (labels optional)."""

    def __init__(self, index: faiss.Index, kind: str, paths: list[str], labels: list | None, model: dict,
                 params: dict):
        self.index, self.kind, self.paths, self.labels, self.model, self.params = (
            index, kind, paths, labels, model, params)

    @property
    def feature_dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    @classmethod
    def build(cls, features, paths, labels=None, *, kind: str = "exact", model: dict | None = None,
              nlist: int | None = None, nprobe: int | None = None,
              ef_search: int = DEFAULT_EF_SEARCH, seed: int = 0) -> RetrievalIndex:
        """Index `features` (n, d) for items `paths` (and `labels`); `model` describes the embedding model."""
        if kind not in KINDS:
            raise UserError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
        x = l2_normalize(as_features(features))
        n, d = x.shape
        paths, labels = _items(paths, labels, n)
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
        built = cls(index, kind, [], [] if labels is not None else None, dict(model or {}), params)
        built._add(x, paths, labels)
        return built

    def add(self, features, paths, labels=None) -> None:
        """Append items without rebuilding (ivf: assigned to the lists trained at build)."""
        x = as_features(features)
        if x.shape[1] != self.feature_dim:
            raise UserError(f"features have {x.shape[1]} dimensions, the index {self.feature_dim}")
        self._add(l2_normalize(x), *_items(paths, labels, len(x)))

    def _add(self, x: np.ndarray, paths: list[str], labels: list | None) -> None:
        """Add normalised vectors with checked paths and labels."""
        if (labels is None) != (self.labels is None):
            raise UserError("labels must be given for every item or for none" if self.labels is not None
                            else "this index has no labels; add items without labels")
        self.index.add(x)
        self.paths.extend(paths)
        if labels is not None:
            self.labels.extend(labels)

    def _set_search_params(self, k: int) -> None:
        # Attributes, not faiss SearchParameters: importing pytorch-metric-learning (faiss.contrib.torch_utils)
        # replaces Index.search with a version that takes no `params`.
        if self.kind == "ivf":
            self.index.nprobe = self.params["nprobe"]
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.params["ef_search"], k)

    def search(self, query_features, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and item indices of the k best items per query, each (n_queries, k).

        k is clipped to the index size; an approximate index may return fewer, padded with index -1.
        """
        q = as_features(query_features, "query features")
        if q.shape[1] != self.feature_dim:
            raise UserError(f"query features have {q.shape[1]} dimensions, the index {self.feature_dim}")
        k = min(int(k), len(self))
        if k < 1:
            raise UserError("k must be at least 1 and the index must not be empty")
        self._set_search_params(k)
        return self.index.search(l2_normalize(q), k)

    def hits(self, sims: np.ndarray, idx: np.ndarray) -> list[list[Hit]]:
        """`search` results as lists of Hit (path, label, score), one list per query."""
        return [[Hit(rank, int(i), float(s), self.paths[i], self.labels[i] if self.labels is not None else None)
                 for rank, (s, i) in enumerate(zip(row_s, row_i)) if i >= 0]
                for row_s, row_i in zip(sims, idx)]

    def recall_vs_exact(self, k: int = 10, num_queries: int = 1000, seed: int = 0) -> float:
        """Fraction of the exact top-k found by this index's top-k, for up to `num_queries` stored items
        (sampled with `seed`) used as queries. 1.0 for an exact index."""
        k = min(int(k), len(self))
        vectors = self.index.reconstruct_n(0, len(self))
        rng = np.random.default_rng(seed)
        queries = vectors[np.sort(rng.choice(len(self), min(num_queries, len(self)), replace=False))]
        exact = knn(queries, vectors, k)[1]
        approx = self.search(queries, k)[1]
        found = [len(np.intersect1d(e, a)) for e, a in zip(exact, approx)]
        return float(np.sum(found) / exact.size)

    def save(self, folder: str | Path) -> Path:
        """Write `folder/index.faiss` then `folder/meta.json` (which records the former's sha256), each
        atomically; return the folder."""
        folder = Path(folder)
        with atomic_path(folder / INDEX_FILE) as tmp:
            faiss.write_index(self.index, str(tmp))
            index_sha256 = file_sha256(tmp)
        write_json(folder / META_FILE, {
            "format_version": FORMAT_VERSION, "kind": self.kind, "metric": "cosine",
            "feature_dim": self.feature_dim, "count": len(self), "params": self.params, "model": self.model,
            "index_sha256": index_sha256, "paths": self.paths, "labels": self.labels,
        })
        return folder

    @classmethod
    def load(cls, folder: str | Path, expect_model: dict | None = None) -> RetrievalIndex:
        """Read an index saved by `save`; refuse it when a key of `expect_model` (e.g. backbone, checkpoint
        hash, feature_dim) differs from what it was built with."""
        folder = Path(folder)
        if not (folder / META_FILE).is_file() or not (folder / INDEX_FILE).is_file():
            raise UserError(f"no retrieval index in {folder} (needs {INDEX_FILE} and {META_FILE})")
        meta = read_json(folder / META_FILE)
        if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") not in KINDS:
            raise UserError(f"{folder / META_FILE} is not a retrieval index of format {FORMAT_VERSION}")
        built_with = {**meta["model"], "feature_dim": meta["feature_dim"]}
        for key, value in (expect_model or {}).items():
            if key not in built_with or built_with[key] != value:
                raise UserError(f"index in {folder} was built with {key}={built_with.get(key)!r}, "
                                f"not {value!r}; rebuild it for this model")
        if file_sha256(folder / INDEX_FILE) != meta["index_sha256"]:
            raise UserError(f"{INDEX_FILE} in {folder} does not match {META_FILE} (interrupted save?); rebuild it")
        index = faiss.read_index(str(folder / INDEX_FILE))
        if index.ntotal != meta["count"] or len(meta["paths"]) != meta["count"] or index.d != meta["feature_dim"]:
            raise UserError(f"{INDEX_FILE} and {META_FILE} in {folder} disagree; rebuild the index")
        return cls(index, meta["kind"], meta["paths"], meta["labels"], meta["model"], meta["params"])
