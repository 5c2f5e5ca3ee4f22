"""Exact, memory-bounded retrieval metrics for metric learning (as in "A Metric Learning Reality Check").

Similarity is cosine: features are L2-normalised here and compared by inner product. Neighbours come
from faiss's exact inner-product search (`faiss.knn`, the same kernel as `IndexFlatIP.search`, without
copying the gallery into an index) run over chunks of queries, and every chunk is reduced to
per-query metric values at once, so nothing N x N or even N x k is ever held: memory is the
normalised features (N·d floats) plus one chunk's neighbour lists (at most `MAX_CHUNK_NEIGHBOURS`).

Each query asks for as many neighbours as its metrics need: max K of Recall@K and, for R-precision
and MAP@R, R = the number of other same-label items in the gallery. k is never capped, so every
metric is exact whatever the class sizes; queries are processed in order of their k, and when k is
large the chunk shrinks so that chunk x k stays within `MAX_CHUNK_NEIGHBOURS`.

Queries with no same-label item in the gallery ("lone" queries) are left out of all retrieval metrics,
as pytorch-metric-learning's AccuracyCalculator does. Within a neighbour list, ties in similarity are
ordered by gallery index, so results are deterministic and do not depend on the chunk size.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import faiss
import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from momentum_proxy.config import METRICS as ALL_METRICS
from momentum_proxy.config import RETRIEVAL_METRICS
from momentum_proxy.errors import UserError

DEFAULT_CHUNK_SIZE = 4096
MAX_CHUNK_NEIGHBOURS = 1 << 24  # chunk rows x k: 16.8M neighbours = 200 MB of float32 sims + int64 ids
KMEANS_ITERATIONS = 20


def as_features(x, name: str = "features") -> np.ndarray:
    """`x` (numpy array, torch tensor or nested list) as a C-contiguous float32 (n, d) array.

    Raises UserError when it is not 2-D, is empty or holds non-finite values.
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UserError(f"{name} must be a 2-D array (items x dimensions), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise UserError(f"{name} is empty (shape {x.shape})")
    if any(not np.isfinite(x[i:i + 65536]).all() for i in range(0, len(x), 65536)):  # bounded temporaries
        raise UserError(f"{name} contains NaN or infinite values")
    return x


def as_labels(y, n: int, name: str = "labels") -> np.ndarray:
    """`y` as a 1-D numpy array of `n` labels (UserError otherwise)."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        raise UserError(f"{name} must be 1-D, got shape {y.shape}")
    if len(y) != n:
        raise UserError(f"{name} has {len(y)} entries but there are {n} feature rows")
    return y


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """A row-wise L2-normalised float32 copy of `x`; all-zero rows stay zero."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # einsum: no (n, d) temporary
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _search_chunks(
    query: np.ndarray,
    gallery: np.ndarray,
    need: np.ndarray,
    exclude_self: bool,
    chunk_size: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (query positions, sims, gallery indices) chunk by chunk, the k of a chunk being its largest `need`.

    Inputs are normalised; queries whose `need` is 0 are skipped. With `exclude_self`, query i is gallery
    item i and is removed by index (not by similarity, so duplicates of it still count). Rows are sorted
    by (-similarity, gallery index).
    """
    if chunk_size < 1:
        raise UserError(f"chunk size must be at least 1, got {chunk_size}")
    order = np.argsort(need, kind="stable")
    start = int(np.count_nonzero(need == 0))
    while start < len(order):
        rows = min(chunk_size, len(order) - start)
        rows = max(1, min(rows, MAX_CHUNK_NEIGHBOURS // max(1, int(need[order[start + rows - 1]]))))
        pos = order[start:start + rows]
        start += rows
        k = int(need[pos[-1]])
        sims, idx = faiss.knn(query[pos], gallery, k + int(exclude_self), faiss.METRIC_INNER_PRODUCT)
        if exclude_self:
            is_self = idx == pos[:, None]
            is_self[~is_self.any(axis=1), -1] = True  # self fell outside the list: drop the last instead
            keep = ~is_self
            sims, idx = sims[keep].reshape(rows, k), idx[keep].reshape(rows, k)
        order_in_row = np.lexsort((idx, -sims), axis=1)
        yield pos, np.take_along_axis(sims, order_in_row, 1), np.take_along_axis(idx, order_in_row, 1)


def knn(
    query,
    gallery,
    k: int,
    *,
    exclude_self: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine k-nearest neighbours of each query row in `gallery`: (sims float32, indices int64), (n, k).

    With `exclude_self`, query i is gallery item i (the queries are the first rows of the gallery) and is
    left out of its own list; `gallery=None` searches the queries themselves. k is clipped to the number of
    gallery items available.
    """
    query = as_features(query, "query features")
    gallery = query if gallery is None else as_features(gallery, "gallery features")
    if query.shape[1] != gallery.shape[1]:
        raise UserError(f"query features have {query.shape[1]} dimensions, gallery features {gallery.shape[1]}")
    if exclude_self and len(query) > len(gallery):
        raise UserError("exclude_self needs the queries to be the first rows of the gallery")
    k = min(int(k), len(gallery) - int(exclude_self))
    if k < 1:
        raise UserError("k must be at least 1 and the gallery must hold an item to return")
    same = query is gallery
    query = l2_normalize(query)
    gallery = query if same else l2_normalize(gallery)
    sims = np.empty((len(query), k), dtype=np.float32)
    idx = np.empty((len(query), k), dtype=np.int64)
    for pos, s, i in _search_chunks(query, gallery, np.full(len(query), k), exclude_self, chunk_size):
        sims[pos], idx[pos] = s, i
    return sims, idx


def cluster_nmi(features: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> float:
    """NMI between `labels` and faiss k-means (as many clusters as labels, 20 iterations, `seed`) on `features`."""
    codes = np.unique(labels, return_inverse=True)[1].ravel()
    n_clusters = int(codes.max()) + 1
    x = np.ascontiguousarray(features, dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=KMEANS_ITERATIONS, seed=seed, min_points_per_centroid=1)
    kmeans.train(x)
    clusters = kmeans.index.search(x, 1)[1].ravel()
    return float(normalized_mutual_info_score(codes, clusters))


def _check_request(metrics: Sequence[str], recalls: Sequence[int]) -> tuple[list[str], list[int]]:
    metrics = list(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}; choose from {', '.join(ALL_METRICS)}")
    if not metrics:
        raise UserError("no metric requested")
    recalls = list(dict.fromkeys(int(r) for r in recalls)) if "recall" in metrics else []
    if "recall" in metrics and (not recalls or min(recalls) < 1):
        raise UserError(f"recall needs K values >= 1, got {list(recalls)}")
    return metrics, recalls


def evaluate_embeddings(
    features,
    labels,
    *,
    query_features=None,
    query_labels=None,
    recalls: Sequence[int] = (1, 2, 4, 8),
    metrics: Sequence[str] = ALL_METRICS,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    seed: int = 0,
) -> dict[str, float]:
    """Retrieval metrics of embeddings, as a flat dict of fractions in [0, 1].

    Without `query_features` every item queries all the others (self-retrieval, itself excluded);
    with them, the queries search `features` as the gallery (In-shop style). Keys, for the requested
    `metrics` only: `recall@K` for K in `recalls` (a same-label item among the top K), `precision@1`,
    `r_precision`, `map@r` and `nmi` (k-means on the query features, seeded by `seed`).
    """
    metrics, recalls = _check_request(metrics, recalls)
    gallery = as_features(features, "features")
    gallery_labels = as_labels(labels, len(gallery))
    self_retrieval = query_features is None
    if self_retrieval:
        if query_labels is not None:
            raise UserError("query labels given without query features")
        if len(gallery) < 2:
            raise UserError("self-retrieval needs at least 2 items")
        query, query_labels = gallery, gallery_labels
    else:
        if query_labels is None:
            raise UserError("query features given without query labels")
        query = as_features(query_features, "query features")
        query_labels = as_labels(query_labels, len(query), "query labels")
        if query.shape[1] != gallery.shape[1]:
            raise UserError(f"query features have {query.shape[1]} dimensions, gallery features {gallery.shape[1]}")

    query = l2_normalize(query)
    results: dict[str, float] = {}
    if any(m in RETRIEVAL_METRICS for m in metrics):
        gallery_n = query if self_retrieval else l2_normalize(gallery)
        results.update(_retrieval_metrics(query, query_labels, gallery_n, gallery_labels, self_retrieval,
                                          metrics, recalls, chunk_size))
    if "nmi" in metrics:
        results["nmi"] = cluster_nmi(query, query_labels, seed=seed)
    return results


def _retrieval_metrics(query, query_labels, gallery, gallery_labels, self_retrieval, metrics, recalls, chunk_size):
    """Recall@K, precision@1, R-precision and MAP@R over the non-lone queries (see the module docstring)."""
    try:
        codes = np.unique(np.concatenate([gallery_labels, query_labels]), return_inverse=True)[1].ravel()
    except TypeError as e:
        raise UserError(f"labels cannot be compared: {e}") from None
    gallery_codes, query_codes = codes[:len(gallery)], codes[len(gallery):]
    r = np.bincount(gallery_codes, minlength=codes.max() + 1)[query_codes] - int(self_retrieval)
    valid = r > 0
    if not valid.any():
        raise UserError("no query has a same-label item in the gallery: retrieval metrics are undefined")
    available = len(gallery) - int(self_retrieval)
    recalls_k = [min(k, available) for k in recalls]
    need = np.full(len(query), max(recalls_k, default=1))
    if "r_precision" in metrics or "map@r" in metrics:
        need = np.maximum(need, r)
    need[~valid] = 0
    per_query = {f"recall@{k}": np.zeros(len(query)) for k in recalls}
    per_query.update({m: np.zeros(len(query)) for m in ("precision@1", "r_precision", "map@r") if m in metrics})
    for pos, _, idx in _search_chunks(query, gallery, need, self_retrieval, chunk_size):
        hits = gallery_codes[idx] == query_codes[pos, None]
        for k, k_clipped in zip(recalls, recalls_k):
            per_query[f"recall@{k}"][pos] = hits[:, :k_clipped].any(axis=1)
        if "precision@1" in per_query:
            per_query["precision@1"][pos] = hits[:, 0]
        if "r_precision" in per_query or "map@r" in per_query:
            r_pos = r[pos]
            relevant = hits & (np.arange(idx.shape[1]) < r_pos[:, None])  # hits among the top R
            if "r_precision" in per_query:
                per_query["r_precision"][pos] = relevant.sum(axis=1) / r_pos
            if "map@r" in per_query:
                precision_at_hits = np.cumsum(relevant, axis=1) / np.arange(1, idx.shape[1] + 1) * relevant
                per_query["map@r"][pos] = precision_at_hits.sum(axis=1) / r_pos
    return {name: float(values[valid].mean()) for name, values in per_query.items()}
