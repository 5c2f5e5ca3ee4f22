"""Exact, memory-bounded retrieval metrics for metric learning (as in "A Metric Learning Reality Check").

Similarity is cosine: features are L2-normalised here and compared by inner product. Neighbours come
from an exact inner-product search (`vectors.search_chunks`) run over chunks of queries, and every chunk is
reduced to per-query metric values at once, so nothing N x N or even N x k is ever held: memory is the
normalised features (N·d floats) plus one chunk's neighbour lists (at most `vectors.MAX_CHUNK_NEIGHBOURS`) and,
on a GPU, one block of similarities (`vectors.MAX_BLOCK_SIMS`). The kernel follows `device` (`vectors.search_device`):
on the CPU faiss's `faiss.knn` (the kernel of `IndexFlatIP.search`, without copying the gallery into an index),
on CUDA torch matrix multiply + top-k on the GPU; both give the same lists.

Each query asks for as many neighbours as its metrics need: max K of Recall@K and, for R-precision
and MAP@R, R = the number of other same-label items in the gallery. k is never capped, so every
metric is exact whatever the class sizes; queries are processed in order of their k, and when k is
large the chunk shrinks so that chunk x k stays within it.

With a re-ranking (`rerank`, e.g. `retrieval.rerank.Rerank`: any object with `active` and a `search_chunks` that
takes and yields what `vectors.search_chunks` does), the neighbour lists are its re-ranked ones; in self-retrieval
each query is left out of the collection for its own search, the re-ranking's database side included. NMI is not
affected.

Queries with no same-label item in the gallery ("lone" queries) are left out of all retrieval metrics,
as pytorch-metric-learning's AccuracyCalculator does. Within a neighbour list, ties in similarity are
ordered by gallery index, so results are deterministic and do not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from momentum_proxy.config import METRICS as ALL_METRICS
from momentum_proxy.config import RETRIEVAL_METRICS
from momentum_proxy.errors import UserError
from momentum_proxy.vectors import (
    DEFAULT_CHUNK_SIZE,
    as_features,
    as_labels,
    l2_normalize,
    on_device,
    search_chunks,
    search_device,
)

KMEANS_ITERATIONS = 20


def cluster_nmi(features: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> float:
    """NMI between `labels` and faiss k-means (as many clusters as labels, 20 iterations, `seed`) on `features`."""
    codes = np.unique(labels, return_inverse=True)[1].ravel()
    n_clusters = int(codes.max()) + 1
    x = np.ascontiguousarray(features, dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=KMEANS_ITERATIONS, seed=seed, min_points_per_centroid=1)
    kmeans.train(x)
    clusters = kmeans.index.search(x, 1)[1].ravel()
    from sklearn.metrics import normalized_mutual_info_score  # here: sklearn takes 1.5 s to import, NMI is opt-in

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
    rerank=None,
    device=None,
) -> dict[str, float]:
    """Retrieval metrics of embeddings, as a flat dict of fractions in [0, 1].

    Without `query_features` every item queries all the others (self-retrieval, itself excluded);
    with them, the queries search `features` as the gallery (In-shop style). Keys, for the requested
    `metrics` only: `recall@K` for K in `recalls` (a same-label item among the top K), `precision@1`,
    `r_precision`, `map@r` and `nmi` (k-means on the query features, seeded by `seed`). `rerank` re-ranks the
    neighbour lists (see the module). `device` is where the exact search runs: None, the features' own (a CUDA
    tensor's GPU; numpy arrays: the CPU), "auto" (CUDA when available), or a device name; CUDA searches in torch,
    the CPU in faiss (`vectors.search_device`). Re-ranking searches on the CPU.
    """
    metrics, recalls = _check_request(metrics, recalls)
    if device is None and hasattr(features, "detach"):
        device = features.device
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
        if rerank is not None and rerank.active:
            search, query_s, gallery_s = rerank.search_chunks, query, gallery_n
        else:  # the same normalised float32 vectors on either kernel
            where = search_device(device)
            search, query_s = search_chunks, on_device(query, where)
            gallery_s = query_s if self_retrieval else on_device(gallery_n, where)
        results.update(
            _retrieval_metrics(
                query_s, query_labels, gallery_s, gallery_labels, self_retrieval, metrics, recalls, chunk_size, search
            )
        )
    if "nmi" in metrics:
        results["nmi"] = cluster_nmi(query, query_labels, seed=seed)
    return results


def _retrieval_metrics(
    query, query_labels, gallery, gallery_labels, self_retrieval, metrics, recalls, chunk_size, search
):
    """Recall@K, precision@1, R-precision and MAP@R over the non-lone queries (see the module docstring)."""
    try:
        codes = np.unique(np.concatenate([gallery_labels, query_labels]), return_inverse=True)[1].ravel()
    except TypeError as e:
        raise UserError(f"labels cannot be compared: {e}") from None
    gallery_codes, query_codes = codes[: len(gallery)], codes[len(gallery) :]
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
    for pos, _, idx in search(query, gallery, need, self_retrieval, chunk_size):
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


def class_margin(features, labels, split=None, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Mean positive margin, a finer signal than retrieval metrics once they saturate (selection's last tie-break):
    per query, the cosine to the mean of its class's gallery items minus the highest cosine to another class's
    mean (means of unit vectors, normalised). `split` as `evaluation.jobs.evaluate_arrays` reads it: query rows
    against gallery rows when it names them, else self-retrieval over the rows (each query left out of its own
    class's mean). Lone queries are left out; NaN when every query is lone."""
    x, y = l2_normalize(as_features(features, "features")), np.asarray(labels)
    split = np.asarray(split) if split is not None else None
    if split is not None and {"query", "gallery"} <= set(split):
        q, g, self_retrieval = split == "query", split == "gallery", False
    else:
        q = g = split == "test" if split is not None and "test" in set(split) else np.ones(len(x), bool)
        self_retrieval = True
    classes, g_codes = np.unique(y[g], return_inverse=True)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, g_codes.ravel(), x[g])
    counts = np.bincount(g_codes.ravel(), minlength=len(classes)).astype(float)
    qx, qy = x[q], y[q]
    own = np.searchsorted(classes, qy)
    known = (own < len(classes)) & (classes[np.minimum(own, len(classes) - 1)] == qy)
    own = np.minimum(own, len(classes) - 1)
    own_count = counts[own] - int(self_retrieval)
    valid = known & (own_count > 0) & (len(classes) > 1)
    means, margins = sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(1e-12), []
    for start in range(0, len(qx), chunk_size):
        sl = slice(start, start + chunk_size)
        sims = qx[sl] @ means.T
        own_sum = sums[own[sl]] - (qx[sl] if self_retrieval else 0)
        own_mean = own_sum / np.linalg.norm(own_sum, axis=1, keepdims=True).clip(1e-12)
        positive = np.einsum("ij,ij->i", qx[sl], own_mean)
        sims[np.arange(len(sims)), own[sl]] = -np.inf
        margins.append(positive - sims.max(axis=1))
    margins = np.concatenate(margins) if margins else np.empty(0)
    return float(margins[valid].mean()) if valid.any() else float("nan")
