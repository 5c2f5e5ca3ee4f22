"""Vectors: turning arrays into L2-normalised float32 features, and exact cosine k-nearest neighbours.

Shared by evaluation (metrics), retrieval (index stores) and deploy (export checks). Search runs faiss's exact
inner-product kernel (`faiss.knn`) over chunks of queries, so memory stays bounded by one chunk's lists.
"""
from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np

from momentum_proxy.errors import UserError

DEFAULT_CHUNK_SIZE = 4096
MAX_CHUNK_NEIGHBOURS = 1 << 24  # chunk rows x k: 16.8M neighbours = 200 MB of float32 sims + int64 ids


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


def search_chunks(
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


def knn_request(query, gallery, k: int, exclude_self: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """A k-nearest-neighbour request checked: (query, gallery, k clipped to the items available) as float32
    arrays (`gallery=None`: the queries themselves), or a one-line UserError."""
    query = as_features(query, "query features")
    gallery = query if gallery is None else as_features(gallery, "gallery features")
    if query.shape[1] != gallery.shape[1]:
        raise UserError(f"query features have {query.shape[1]} dimensions, gallery features {gallery.shape[1]}")
    if exclude_self and len(query) > len(gallery):
        raise UserError("exclude_self needs the queries to be the first rows of the gallery")
    k = min(int(k), len(gallery) - int(exclude_self))
    if k < 1:
        raise UserError("k must be at least 1 and the gallery must hold an item to return")
    return query, gallery, k


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
    query, gallery, k = knn_request(query, gallery, k, exclude_self)
    same = query is gallery
    query = l2_normalize(query)
    gallery = query if same else l2_normalize(gallery)
    sims = np.empty((len(query), k), dtype=np.float32)
    idx = np.empty((len(query), k), dtype=np.int64)
    for pos, s, i in search_chunks(query, gallery, np.full(len(query), k), exclude_self, chunk_size):
        sims[pos], idx[pos] = s, i
    return sims, idx
