"""Vectors: turning arrays into L2-normalised float32 features, and exact cosine k-nearest neighbours.

Shared by evaluation (metrics), retrieval (index stores) and deploy (export checks). Search runs over chunks of
queries, so memory stays bounded by one chunk's lists, with one of two exact kernels that give the same lists:
faiss's inner-product kernel (`faiss.knn`: BLAS blocks, a heap per query) on the CPU, or torch matrix multiply +
top-k (`torch_knn`) on the device of torch tensors. The rule (`search_device`): CUDA searches in torch, the CPU in
faiss, which matched or beat torch's matmul + top-k at every k measured on the CPU (k = 10: equal; k = 100 and
1000: faiss 1.4-1.9x faster; docs/benchmarks.md, "Exact search").
"""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np

from momentum_proxy.errors import UserError

DEFAULT_CHUNK_SIZE = 4096
MAX_CHUNK_NEIGHBOURS = 1 << 24  # chunk rows x k: 16.8M neighbours = 200 MB of float32 sims + int64 ids
MAX_BLOCK_SIMS = 1 << 25  # torch kernel: chunk rows x gallery columns of one matmul block (128 MiB of float32)
TORCH_SEARCH_DEVICES = ("cuda",)  # device types searched by torch matmul + top-k; any other searches in faiss
_LOW32 = (1 << 32) - 1


def as_features(x, name: str = "features") -> np.ndarray:
    """`x` (numpy array, torch tensor or nested list) as a C-contiguous float32 (n, d) array.

    Raises UserError when it is not 2-D, is empty or holds non-finite values.
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()  # float16 / bfloat16 (no numpy bfloat16) too
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise UserError(f"{name} must be a 2-D array (items x dimensions), got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise UserError(f"{name} is empty (shape {x.shape})")
    if any(not np.isfinite(x[i : i + 65536]).all() for i in range(0, len(x), 65536)):  # bounded temporaries
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
    query,
    gallery,
    need: np.ndarray,
    exclude_self: bool,
    chunk_size: int,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (query positions, sims, gallery indices) chunk by chunk, the k of a chunk being its largest `need`.

    Inputs are normalised: numpy arrays, searched by faiss on the CPU, or torch tensors on one device (`on_device`),
    searched there by `torch_knn`; the yielded arrays are numpy either way. Queries whose `need` is 0 are skipped.
    With `exclude_self`, query i is gallery item i and is removed by index (not by similarity, so duplicates of it
    still count). Rows are sorted by (-similarity, gallery index), and where items tie at the end of a list the
    lowest indices are kept, so both kernels give the same lists.
    """
    if chunk_size < 1:
        raise UserError(f"chunk size must be at least 1, got {chunk_size}")
    in_torch = not isinstance(query, np.ndarray)
    order = np.argsort(need, kind="stable")
    start = int(np.count_nonzero(need == 0))
    while start < len(order):
        rows = min(chunk_size, len(order) - start)
        rows = max(1, min(rows, MAX_CHUNK_NEIGHBOURS // max(1, int(need[order[start + rows - 1]]))))
        pos = order[start : start + rows]
        start += rows
        k = int(need[pos[-1]])
        if in_torch:
            sims, idx = torch_knn(query, gallery, pos, k, exclude_self)
            yield pos, sims.cpu().numpy(), idx.cpu().numpy()
            continue
        yield (pos, *_faiss_knn(query, gallery, pos, k, exclude_self))


def _faiss_knn(query: np.ndarray, gallery: np.ndarray, pos: np.ndarray, k: int, exclude_self: bool):
    """`torch_knn` in faiss: (sims, indices) numpy arrays (len(pos), k), rows sorted by (-similarity, index).

    faiss keeps an arbitrary item where several tie at the end of a list, so it is asked for one more: a row whose
    (k+1)-th value equals its k-th is searched again by `torch_knn`, which keeps the lowest indices (rare: exact
    duplicates, many equal similarities)."""
    rows = len(pos)
    spare = int(k + int(exclude_self) < len(gallery))  # an item past the k-th, to see a tie there
    sims, idx = faiss.knn(query[pos], gallery, k + int(exclude_self) + spare, faiss.METRIC_INNER_PRODUCT)
    if exclude_self:
        is_self = idx == pos[:, None]
        is_self[~is_self.any(axis=1), -1] = True  # self fell outside the list: drop the last instead
        keep = ~is_self
        sims, idx = sims[keep].reshape(rows, k + spare), idx[keep].reshape(rows, k + spare)
    order_in_row = np.lexsort((idx, -sims), axis=1)
    sims, idx = np.take_along_axis(sims, order_in_row, 1), np.take_along_axis(idx, order_in_row, 1)
    tied = np.flatnonzero(sims[:, k] == sims[:, k - 1]) if spare else []
    sims, idx = sims[:, :k], idx[:, :k]
    if len(tied):
        import torch  # lazy: only rows with a tie at the end of their list need torch

        redo_sims, redo_idx = torch_knn(torch.from_numpy(query), torch.from_numpy(gallery), pos[tied], k, exclude_self)
        sims[tied], idx[tied] = redo_sims.numpy(), redo_idx.numpy()
    return sims, idx


def search_device(device):
    """The torch device on which `search_chunks` should search for `device` (None, "auto": CUDA when available, a
    name or a torch.device), or None where faiss on the CPU is the faster exact kernel: the rule of the module
    docstring, a device type in `TORCH_SEARCH_DEVICES` searches in torch. None stays None without importing torch."""
    if device is None:
        return None
    import torch  # lazy: only a device name needs torch; numpy searches never import it

    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return device if device.type in TORCH_SEARCH_DEVICES else None


def on_device(x: np.ndarray, device):
    """`x` as `search_chunks` takes it for a `search_device` result: the array itself for None (faiss), else a
    float32 torch tensor on `device` (copied there once; a CPU tensor shares the array's memory)."""
    if device is None:
        return x
    import torch  # lazy: only the torch kernel needs torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def _order_keys(sims, idx):
    """int64 keys that sort as (similarity descending, index ascending) under a descending top-k: the float's bits
    made monotone (-0.0 counted as +0.0) in the high half, 2**32 - 1 - index in the low half. Indices < 2**32."""
    import torch  # lazy: only the torch kernel needs torch

    bits = (sims + 0.0).view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
    return (bits.to(torch.int64) << 32) | (_LOW32 - idx)


def _key_sims(keys):
    """The similarities of `_order_keys` keys (the high half back to float32)."""
    import torch  # lazy: only the torch kernel needs torch

    bits = (keys >> 32).to(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(torch.float32)


def torch_knn(query, gallery, pos: np.ndarray, k: int, exclude_self: bool):
    """Exact k nearest gallery items of the queries at `pos` by inner product, in torch on the tensors' device:
    (sims float32, indices int64) tensors (len(pos), k), each row sorted by (-similarity, index).

    The gallery is multiplied in blocks of at most `MAX_BLOCK_SIMS` similarities (the memory bound); each block's
    top k (one more to see a tie at its end, and where there is one the lowest indices among the tied) is merged
    into the running lists through `_order_keys`, so ties are broken by index exactly as in the faiss kernel. With
    `exclude_self`, gallery item pos[i] is left out of row i by index. Never synchronises with a GPU but to find
    rows with a tie at a block's end."""
    import torch  # lazy: only the torch kernel needs torch

    dev = gallery.device
    n = gallery.shape[0]
    if n > _LOW32:
        raise UserError(f"the torch search takes at most {_LOW32} gallery items, got {n}")
    rows_at = torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64)).to(dev)
    q = query[rows_at]
    rows = len(pos)
    cols = max(1, min(n, MAX_BLOCK_SIMS // rows))
    block_sims = torch.empty((rows, cols), dtype=torch.float32, device=dev)
    every_row = torch.arange(rows, device=dev)
    best = None  # keys of the running lists, (rows, <= k), descending
    for start in range(0, n, cols):
        block = gallery[start : start + cols]
        width = len(block)
        s = torch.mm(q, block.T, out=block_sims.view(-1)[: rows * width].view(rows, width))  # contiguous, reused
        if exclude_self:  # self to -inf where it lies in this block (no host sync)
            local = rows_at - start
            inside = (local >= 0) & (local < width)
            local = local.clamp(0, width - 1)
            s[every_row, local] = torch.where(inside, -torch.inf, s[every_row, local])
        kb = min(k, width)
        if width > kb:
            top, at = s.topk(kb + 1, dim=1)  # sorted: the (kb+1)-th shows a tie at the end
            tied = torch.nonzero(top[:, kb] == top[:, kb - 1]).squeeze(1)
            top, at = top[:, :kb], at[:, :kb]
            if len(tied):  # rows whose kb-th value has more items than places: the lowest indices among them
                tied_sims = s[tied]
                chosen = _order_keys(tied_sims, torch.arange(width, device=dev)).topk(kb, dim=1).indices
                at[tied], top[tied] = chosen, tied_sims.gather(1, chosen)
        else:
            top, at = s.clone(), torch.arange(width, device=dev).expand(rows, width)
        keys = _order_keys(top, at + start)
        if best is not None:
            keys = torch.cat([best, keys], dim=1)
        best = keys.topk(min(k, keys.shape[1]), dim=1).values  # sorted, descending: (-sim, index) order
    return _key_sims(best), _LOW32 - (best & _LOW32)


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
