"""Re-ranking of a cosine search: query expansion, database-side augmentation and k-reciprocal re-ranking.

Numpy and scipy on L2-normalised vectors (similarity s = inner product, distance d = 1 - s); no method reads
labels. `Rerank` names a method and its parameters; `rerank_knn` re-ranks plain arrays, `rerank_store` searches an
`IndexStore`, and `Rerank.search_chunks` gives `evaluation.metrics` its neighbour lists. N_k(v) below is the k
items nearest v other than v, ties broken by position (id); k is clipped to the items there are.

- `aqe`: α-query expansion (Radenović et al. 2018; α = 0 is average query expansion, Chum et al. 2007):
  q' = normalise(q + Σ_{x ∈ N_k(q)} max(q·x, 0)^α x), and every item x is scored q'·x.
- `dba`: database-side augmentation (α-DBA; Arandjelović and Zisserman 2012, Gordo et al. 2017): every item is
  replaced by x' = normalise(x + Σ_{y ∈ N_k(x)} max(x·y, 0)^α y), N_k(x) over the collection; scores q·x'.
- `dba+aqe`: α-query expansion over the augmented items: q' from N_k(q) among the x', scores q'·x'.
- `kreciprocal`: k-reciprocal re-ranking (Zhong et al. 2017), parameters k1 (`k`), k2 and λ. With N(v, m) = v and
  its m - 1 nearest items: R(v, m) = {u ∈ N(v, m+1) : v ∈ N(u, m+1)}; R*(v) = R(v, k1) ∪ every R(c, h), h =
  round(k1/2) (half to even, as the authors' code), of a c ∈ R(v, k1) with |R(c, h) ∩ R(v, k1)| >= 2/3 |R(c, h)|;
  V_v has weights exp(-d(v, u)) on R*(v), normalised to sum 1; local expansion Ṽ_v = mean of V_u over N(v, k2);
  Jaccard distance d_J(q, x) = 1 - Σ min(Ṽ_q, Ṽ_x) / Σ max(Ṽ_q, Ṽ_x); the score is 1 - ((1 - λ) d_J + λ d).
  The collection's neighbourhoods (and so V_x) are the collection's own, computed once; the query q enters them
  only for its own sets: u is a reciprocal neighbour of q when q would be among u's k1 (h) nearest others (ties
  put q after the items). Two departures from the authors' code: d is 1 - s, not the squared distance divided by
  its row's maximum (a score then depends on the farthest item only through its own pair), and a query does not
  change the collection's V (each query costs one pass over the collection, not a recomputation of it).

Database side: a method's neighbour lists (`Neighbours`) are computed once per collection. This module owns them:
`store_neighbours` keeps an `IndexStore`'s lists in memory (per store object) and as the store's attachment
`neighbours` (`IndexStore.attach`: saved with the store by every kind of store, read back when it is opened, so
another process loads them instead of computing them), and brings them up to date when items were added or
removed (`Neighbours.synced`; its keeper, `store.register_keeper`, brings them up to date before a snapshot of
the store is saved). Items to leave out (`exclude`; in leave-one-out evaluation the query itself) are taken out of
the collection for that query entirely, from the database side too: the augmented items and the k-reciprocal
sets that involved them are recomputed without them, so a query's scores are those it would get from the
collection without it. Scores of excluded items are -inf; results are ordered by (score descending, position).
"""

from __future__ import annotations

import io
import sys
import weakref
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from momentum_proxy.config import DEFAULT_KEEP
from momentum_proxy.errors import UserError
from momentum_proxy.retrieval.store import register_keeper
from momentum_proxy.vectors import as_features, knn_request, l2_normalize

METHODS = ("none", "aqe", "dba", "dba+aqe", "kreciprocal")
DEFAULTS = {
    "none": {},
    "aqe": {"k": 5, "alpha": 3.0},
    "dba": {"k": 5, "alpha": 3.0},
    "dba+aqe": {"k": 10, "alpha": 0.0},
    "kreciprocal": {"k": 20, "k2": 6, "lam": 0.3},
}
# dba's (the default pipeline's, config.DEFAULT_RERANK) were chosen on the val species of birds50 and flowers12
# across collection regimes (docs: Choosing post-processing); dba+aqe's (the earlier default) on birds50's large
# classes (docs: Benchmarks).
FLAGS = {"k": "--rerank-k", "alpha": "--rerank-alpha", "k2": "--rerank-k2", "lam": "--rerank-lambda"}
MAX_K = 1000
MAX_ALPHA = 100.0
SCORE_CELLS = 1 << 24  # query rows x items scored at once (128 MB of float64)
SET_CELLS = 1 << 22  # candidate-pair comparisons of one chunk of k-reciprocal sets
ENGINES_KEPT = 4  # database sides kept per collection (a service's requests may ask for several settings)
NEIGHBOURS = "neighbours"  # the store attachment that keeps a store's lists (`store_neighbours`)
_lists: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> its `Neighbours` in this process


@dataclass(frozen=True)
class Rerank:
    """A re-ranking method (`none`, `aqe`, `dba`, `dba+aqe`, `kreciprocal`) and its parameters: `k` (neighbours;
    k1 of `kreciprocal`), `alpha` (weight exponent of `aqe` and `dba`), `k2` and `lam` (λ) of `kreciprocal`.
    A parameter left None takes the method's default (`DEFAULTS`); one the method does not take is refused.
    `up_to` (the default pipeline's, `config.DEFAULT_RERANK_MAX_ITEMS`): larger collections are searched without
    re-ranking (`for_collection`, said in one line), since the database side costs O(N²) to compute; an explicit
    `--rerank` has no such limit. `keep` (default `DEFAULT_KEEP` for a method, 0 for none): the first `keep` hits
    of the plain cosine search stay first, in their order, and the re-ranking orders the rest, so that a duplicate,
    an item just added or the one photo of a small class is never buried (docs: Choosing post-processing)."""

    method: str = "none"
    k: int | None = None
    alpha: float | None = None
    k2: int | None = None
    lam: float | None = None
    keep: int | None = None
    up_to: int | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown re-ranking {self.method!r}; choose from {', '.join(METHODS)}")
        defaults = DEFAULTS[self.method]
        for name, flag in FLAGS.items():
            value = getattr(self, name)
            if value is not None and name not in defaults:
                takes = [m for m, params in DEFAULTS.items() if name in params]
                raise UserError(f"{flag} does not apply to --rerank {self.method} (only to {', '.join(takes)})")
            object.__setattr__(self, name, defaults.get(name) if value is None else value)
        for name in ("k", "k2"):
            value = getattr(self, name)
            if value is not None:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, np.integer, float))
                    or value != int(value)
                    or not 1 <= value <= MAX_K
                ):
                    raise UserError(f"{FLAGS[name]} must be a whole number from 1 to {MAX_K}, got {value!r}")
                object.__setattr__(self, name, int(value))
        keep = (DEFAULT_KEEP if self.active else 0) if self.keep is None else self.keep
        if (
            isinstance(keep, bool)
            or not isinstance(keep, (int, np.integer, float))
            or keep != int(keep)
            or not 0 <= keep <= MAX_K
        ):
            raise UserError(f"--rerank-keep must be a whole number from 0 to {MAX_K}, got {keep!r}")
        object.__setattr__(self, "keep", int(keep))
        for name, high in (("alpha", MAX_ALPHA), ("lam", 1.0)):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value <= high:
                    raise UserError(f"{FLAGS[name]} must be a number from 0 to {high:g}, got {value!r}")
                object.__setattr__(self, name, float(value))

    def for_collection(self, items: int, *, building: bool = False) -> Rerank:
        """This re-ranking for a collection of `items`, or none above `up_to`, said in one line on stderr: that
        the index is built without its neighbour lists (`building`: `mproxy index`), else that this search is
        plain cosine."""
        if self.up_to is None or items <= self.up_to or not self.active:
            return self
        why = (
            f"{items:,} items, more than the {self.up_to:,} that the default re-ranking ({self.method}) is used "
            "for (its neighbour lists cost O(N²) to compute)"
        )
        print(
            f"mproxy: note: re-ranking is off for this index: {why}; searches are plain cosine unless they ask "
            f"for --rerank {self.method}"
            if building
            else f"mproxy: note: searching without re-ranking: {why}; --rerank {self.method} asks for it anyway",
            file=sys.stderr,
        )
        return Rerank()

    @property
    def active(self) -> bool:
        return self.method != "none"

    @property
    def list_size(self) -> int:
        """Neighbours per item that the database side needs (0: none)."""
        k, k2 = self.k or 0, self.k2 or 0  # set for the methods that take them (`__post_init__`)
        if self.method in ("dba", "dba+aqe"):
            return k
        return max(k, k2 - 1) if self.method == "kreciprocal" else 0

    def to_dict(self) -> dict:
        """The method and its parameters, e.g. {"method": "dba", "k": 5, "alpha": 3.0}."""
        names = {"k": "k", "alpha": "alpha", "k2": "k2", "lam": "lambda"}
        return {
            "method": self.method,
            **{names[n]: getattr(self, n) for n in DEFAULTS[self.method]},
            **({"keep": self.keep} if self.active else {}),
        }

    def __str__(self) -> str:
        params = ", ".join(f"{k} {v:g}" for k, v in self.to_dict().items() if k != "method")
        return self.method + (f" ({params})" if params else "")

    def search_chunks(self, query, gallery, need, exclude_self: bool, chunk_size: int):
        """`vectors.search_chunks` with this re-ranking: (query positions, scores, gallery indices) chunk by chunk,
        each row's k its chunk's largest `need`. With `exclude_self`, query i is gallery item i and is left out of
        the collection for its own search (leave-one-out), its database side included."""
        query, gallery = l2_normalize(as_features(query, "query features")), l2_normalize(as_features(gallery))
        size = self.list_size + int(exclude_self) if self.list_size else 0  # one spare for the query's own item
        engine = Neighbours.compute(np.arange(len(gallery)), gallery, size).engine(gallery, self)
        order = np.argsort(need, kind="stable")
        start = int(np.count_nonzero(need == 0))
        rows = max(1, min(chunk_size, SCORE_CELLS // len(gallery)))
        while start < len(order):
            pos = order[start : start + rows]
            start += len(pos)
            k = int(need[pos[-1]])
            scores = engine.scores(query[pos], [[p] for p in pos] if exclude_self else None)
            raw = None
            if self.keep:
                raw = query[pos] @ gallery.T
                if exclude_self:
                    raw[np.arange(len(pos)), pos] = -np.inf
            idx = _ranked(scores, raw, k, self.keep or 0)
            yield pos, np.take_along_axis(scores, idx, 1), idx


def rerank_knn(query, gallery, k: int, rerank: Rerank, *, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The k best gallery items of each query row under `rerank`: (scores, indices), each (n_queries, k), as
    `vectors.knn` returns them (k clipped to the items available). With `exclude_self`, the queries are the first
    rows of the gallery and query i is left out of the collection for its own search (leave-one-out)."""
    query, gallery, k = knn_request(query, gallery, k, exclude_self)
    chunks = list(rerank.search_chunks(query, gallery, np.full(len(query), k), exclude_self, len(query)))
    return np.concatenate([c[1] for c in chunks]), np.concatenate([c[2] for c in chunks])  # in query order


def rerank_store(store, features, k: int, rerank: Rerank, exclude=()) -> tuple[np.ndarray, np.ndarray]:
    """`IndexStore.search` under `rerank` (exact, over every live item): (scores, ids), each (n_queries, k), of the
    k best live items not in `exclude`, which also leaves the collection's database side (see the module)."""
    q = as_features(features, "query features")
    if q.shape[1] != store.feature_dim:
        raise UserError(f"query features have {q.shape[1]} dimensions, the index {store.feature_dim}")
    nb = store_neighbours(store, rerank.list_size + 1 if rerank.list_size else 0)  # one spare for a query's own item
    ids = nb.ids
    hidden = np.flatnonzero(np.isin(ids, np.fromiter((int(i) for i in exclude), np.int64)))
    k = min(int(k), len(ids) - len(hidden))
    if k < 1:
        raise UserError("k must be at least 1 and the index must not be empty")
    q = l2_normalize(q)
    vectors = nb.vectors
    assert vectors is not None, "store_neighbours gives lists checked against the store's live vectors"
    scores = nb.engine(vectors, rerank).scores(q, [hidden] * len(q))
    raw = None
    if rerank.keep:
        raw = q @ np.asarray(vectors, np.float32).T
        raw[:, hidden] = -np.inf
    top = _ranked(scores, raw, k, rerank.keep or 0)
    return np.take_along_axis(scores, top, 1).astype(np.float32), ids[top]


def prepare_store(store, rerank: Rerank) -> Rerank:
    """At build time (`mproxy index`): `rerank` for the store's size (`for_collection`, which says when it is
    off), its neighbour lists computed or brought up to date, to be saved with the store."""
    rerank = rerank.for_collection(len(store), building=True)
    size = rerank.list_size + 1 if rerank.list_size else 0  # one spare for a query's own item
    if size or kept_neighbours(store) is not None:  # lists it keeps are kept right, whatever this build asks
        store_neighbours(store, size)
    return rerank


def kept_neighbours(store) -> Neighbours | None:
    """The store's neighbour lists as this process last had them, else as saved with the store (its attachment),
    not yet checked against its items (see `store_neighbours`); None when it has none."""
    nb = _lists.get(store)
    if nb is None:
        data = store.attachment(NEIGHBOURS)
        if data:
            nb = _lists[store] = Neighbours.from_bytes(data)
    return nb


def kept_size(store) -> int:
    """Neighbours per item of the lists the store keeps (0: none)."""
    nb = kept_neighbours(store)
    return 0 if nb is None else nb.size


def store_neighbours(store, size: int) -> Neighbours:
    """The store's neighbour lists with at least `size` entries, brought up to date with its live items: computed
    when it has none or shorter ones, else updated for the items added or removed since. Lists of at least one
    entry are attached to the store (`NEIGHBOURS`), brought up to date again when it is saved."""
    nb = kept_neighbours(store)
    stamp = (store.ntotal, len(store))  # ids are never reused: this pair changes with every add or remove
    if nb is not None and nb.stamp == stamp and nb.size >= size:
        return nb
    ids, x = store.live_vectors()
    nb = Neighbours.compute(ids, x, size) if nb is None or nb.size < size else nb.synced(ids, x)
    nb.stamp, nb.vectors = stamp, x
    _lists[store] = nb
    if nb.size:
        store.attach(NEIGHBOURS, nb.to_bytes)  # made when saved (by `_saved_lists`)
    return nb


def _saved_lists(store) -> bytes:
    """The lists a snapshot of `store` saves: brought up to date with its items."""
    return store_neighbours(store, 0).to_bytes()


register_keeper(NEIGHBOURS, _saved_lists)


class Neighbours:
    """Exact neighbour lists of a collection's live items, the database side of `dba` and `kreciprocal`: row r
    holds item `ids[r]`'s `size` nearest other items (ids; -1 where there are fewer) and their similarities,
    ordered by (similarity descending, id). `synced` updates them for items added or removed; `to_bytes` is what
    an index saves."""

    def __init__(self, ids: np.ndarray, lists: np.ndarray, sims: np.ndarray):
        self.ids, self.lists, self.sims = ids, lists, sims
        # the store state (ntotal, live items) and the live vectors they were last checked against
        self.stamp: tuple[int, int] | None = None
        self.vectors: np.ndarray | None = None
        self._engines: dict = {}
        self._x64: np.ndarray | None = None
        self._bytes: bytes | None = None

    @property
    def size(self) -> int:
        return self.lists.shape[1]

    @classmethod
    def compute(cls, ids: np.ndarray, x: np.ndarray, size: int) -> Neighbours:
        """The lists of items `ids` (ascending) with unit vectors `x`."""
        pos, sims = _neighbour_lists(np.asarray(x, np.float64), size, np.arange(len(x)))
        return cls(np.asarray(ids, np.int64), _ids_of(ids, pos), sims)

    def synced(self, ids: np.ndarray, x: np.ndarray) -> Neighbours:
        """The lists of the live items `ids` (vectors `x`), from these lists: rows of removed items dropped,
        removed items dropped from the lists (a full list that lost one is searched again), added items searched
        and merged into the others' lists."""
        if np.array_equal(ids, self.ids):
            return self
        if not self.size:
            return Neighbours(
                np.asarray(ids, np.int64), np.empty((len(ids), 0), np.int64), np.empty((len(ids), 0), np.float32)
            )
        x = np.asarray(x, np.float64)
        kept = np.isin(self.ids, ids)
        lists, sims = self.lists[kept], self.sims[kept]
        lost = np.isin(lists, self.ids[~kept])
        again = lost.any(axis=1) & (lists >= 0).all(axis=1)
        lists, sims = _compact(np.where(lost, -1, lists), np.where(lost, -np.inf, sims))
        rows = np.searchsorted(ids, self.ids[kept])  # kept items' positions now
        out_pos = np.full((len(ids), self.size), -1, np.int64)
        out_sims = np.full((len(ids), self.size), -np.inf, np.float32)
        added = np.flatnonzero(~np.isin(ids, self.ids))
        merge = rows[~again]
        step = max(1, SCORE_CELLS // max(1, len(added) + self.size))
        for start in range(0, len(merge), step):  # a kept list takes the added items nearer than its last
            r, old = merge[start : start + step], np.flatnonzero(~again)[start : start + step]
            pos = np.concatenate([_positions(ids, lists[old]), np.broadcast_to(added, (len(r), len(added)))], 1)
            s = np.concatenate([sims[old], (x[r] @ x[added].T).astype(np.float32)], 1)
            order = np.lexsort((pos, -s), axis=1)[:, : self.size]
            out_pos[r], out_sims[r] = np.take_along_axis(pos, order, 1), np.take_along_axis(s, order, 1)
        fresh = np.concatenate([rows[again], added])
        out_pos[fresh], out_sims[fresh] = _neighbour_lists(x, self.size, fresh)
        return Neighbours(np.asarray(ids, np.int64), _ids_of(ids, out_pos), out_sims)

    def to_bytes(self) -> bytes:
        """The lists as an npz file's bytes (what a store keeps; made once)."""
        if self._bytes is None:
            buffer = io.BytesIO()
            np.savez(buffer, ids=self.ids, lists=self.lists, sims=self.sims)
            self._bytes = buffer.getvalue()
        return self._bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Neighbours:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            ids, lists, sims = f["ids"], f["lists"], f["sims"]
        if lists.shape != sims.shape or lists.ndim != 2 or len(lists) != len(ids):
            raise UserError("the saved neighbour lists are of inconsistent shapes; rebuild the index")
        nb = cls(ids.astype(np.int64), lists.astype(np.int64), sims.astype(np.float32))
        nb._bytes = data  # saved again unchanged while they are (an npz made anew differs in its zip dates)
        return nb

    def engine(self, x: np.ndarray, rerank: Rerank) -> _Engine:
        """The database side of `rerank` over these items (vectors `x`), computed once per setting (the last
        `ENGINES_KEPT` settings are kept)."""
        key = (rerank.method, rerank.k, rerank.alpha, rerank.k2)  # λ only weighs the query side
        if key not in self._engines:
            if self._x64 is None:
                self._x64 = np.asarray(x, np.float64)
            if len(self._engines) >= ENGINES_KEPT:
                del self._engines[next(iter(self._engines))]
            self._engines[key] = _Engine(self._x64, _positions(self.ids, self.lists), self.sims, rerank)
        return self._engines[key]


class _Engine:
    """One method's database side over unit vectors `x` (float64, positions 0..n-1) with neighbour lists `lists`
    (positions, -1 padding) and their `sims`, and the scoring of queries.

    Products are computed in float64 and every similarity or score is rounded to float32 before it is compared:
    values that are equal but for rounding (e.g. of two augmented items) then compare equal, and ties fall to the
    position rule."""

    def __init__(self, x: np.ndarray, lists: np.ndarray, sims: np.ndarray, rerank: Rerank):
        self.x, self.lists, self.sims, self.r = x, lists, sims, rerank
        # the method's parameters (`Rerank.__post_init__` sets those it takes; 0 for the others, never read)
        self.k, self.k2, self.alpha, self.lam = rerank.k or 0, rerank.k2 or 0, rerank.alpha or 0.0, rerank.lam or 0.0
        n = len(x)
        if rerank.method in ("dba", "dba+aqe"):
            self.y = _augment(x, lists[:, : self.k], sims[:, : self.k], self.alpha)
        elif rerank.method == "kreciprocal":
            self.h = int(np.around(self.k / 2))
            self.v = _kr_vectors(x, lists, np.arange(n), self.k, self.h)
            vqe = _expansion_matrix(lists, np.arange(n), self.k2, n) @ self.v
            self.vqe, self.vqe_sums = vqe.tocsc(), np.asarray(vqe.sum(axis=1)).ravel()

    def scores(self, q: np.ndarray, exclude: list | None) -> np.ndarray:
        """Scores (n_queries, n) of unit query rows `q`; `exclude[j]`: positions left out for query j."""
        method, k, alpha = self.r.method, self.k, self.alpha
        augmented = method in ("dba", "dba+aqe")
        q = np.asarray(q, np.float64)
        out = (q @ (self.y if augmented else self.x).T).astype(np.float32)
        for j, s in enumerate(out):  # rows of `out`, changed in place
            hidden = np.unique(np.asarray(exclude[j] if exclude is not None else [], np.int64))
            if augmented:  # items whose augmentation used a hidden item, augmented without it
                rows, lists, sims = self._repaired(hidden, k)
                y_rows = _augment(self.x, lists, sims, alpha, rows)
                s[rows] = y_rows @ q[j]
            s[hidden] = -np.inf
            if method == "aqe":
                top = _top(s, k)
                s[:] = self.x @ _expand(q[j], self.x[top], s[top], alpha)
            elif method == "dba+aqe":
                top = _top(s, k)
                y_top = self.y[top]
                moved = np.isin(top, rows)
                y_top[moved] = y_rows[np.searchsorted(rows, top[moved])]
                expanded = _expand(q[j], y_top, s[top], alpha)
                s[:] = self.y @ expanded
                s[rows] = y_rows @ expanded
            elif method == "kreciprocal":
                s[:] = self._kreciprocal(q[j], s, hidden)
            s[hidden] = -np.inf
        return out

    def _repaired(self, hidden: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows (not hidden, ascending) whose first m neighbours include a hidden item, with their first m
        neighbours among the items left: (rows, lists (rows, m), sims), searched again where the stored lists
        fall short."""
        if not len(hidden) or m == 0:
            return np.empty(0, np.int64), np.empty((0, m), np.int64), np.empty((0, m), np.float32)
        rows = np.setdiff1d(_listing(self.lists, hidden, m), hidden)
        lost = np.isin(self.lists[rows], hidden)
        lists, sims = _compact(np.where(lost, -1, self.lists[rows]), np.where(lost, -np.inf, self.sims[rows]))
        lists, sims = lists[:, :m], sims[:, :m]
        need = min(m, len(self.x) - 1 - len(hidden))
        short = (lists[:, :need] < 0).any(axis=1)
        if short.any():
            lists[short], sims[short] = _neighbour_lists(self.x, m, rows[short], hidden)
        return rows, lists, sims

    def _kreciprocal(self, q: np.ndarray, s: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """k-reciprocal scores of query q (similarities s to the items, -inf for the hidden ones)."""
        k1, h, k2, n = self.k, self.h, self.k2, len(self.x)
        lists, sims = self.lists, self.sims
        if len(hidden):  # the collection without the hidden items: their lists repaired
            width = self.r.list_size
            rows, fixed, fixed_sims = self._repaired(hidden, width)
            lists, sims = self.lists[:, :width].copy(), self.sims[:, :width].copy()
            lists[rows], sims[rows] = fixed, fixed_sims
            lists[hidden], sims[hidden] = -1, -np.inf
        near = _top(s, max(k1, k2 - 1))
        top1, top_h = near[:k1], near[:h]
        probe = n  # the query's own column
        r_k = np.concatenate([[probe], top1[sims[top1, k1 - 1] < s[top1]]])  # q among their k1 nearest
        r_h = np.concatenate([[probe], top_h[sims[top_h, h - 1] < s[top_h]] if h else []]).astype(np.int64)
        sets = np.concatenate([_pad(r_h[None], h + 1), _reciprocal(lists, r_k[1:], h)])
        members = np.unique(np.concatenate([r_k, *_qualifying(sets, r_k)]))
        weights = np.exp(np.where(members == probe, 0.0, s[np.minimum(members, n - 1)].astype(np.float64) - 1))
        v_q = np.zeros(n + 1)
        v_q[members] = weights / weights.sum()
        qe = near[: k2 - 1]
        vqe_q = (v_q + np.asarray(_kr_vectors(self.x, lists, qe, k1, h).sum(axis=0)).ravel()) / (1 + len(qe))
        cols = np.flatnonzero(vqe_q[:n])
        block = self.vqe[:, cols]
        mins = np.bincount(
            block.indices, np.minimum(block.data, np.repeat(vqe_q[cols], np.diff(block.indptr))), minlength=n
        )
        sums = self.vqe_sums.copy()
        if len(hidden):  # the items whose Ṽ may change without the hidden ones
            a1 = np.union1d(np.union1d(rows, hidden), _listing(self.lists, np.union1d(rows, hidden), k1))
            a2 = np.setdiff1d(np.union1d(a1, _listing(self.lists, a1, k1)), hidden)
            cone = np.setdiff1d(np.union1d(a2, _listing(self.lists, a2, k2 - 1)), hidden)
            v = self._expanded_without(lists, cone, a2)
            of_row = np.repeat(np.arange(len(cone)), np.diff(v.indptr))
            mins[cone] = np.bincount(of_row, np.minimum(v.data, vqe_q[v.indices]), minlength=len(cone))
            sums[cone] = np.asarray(v.sum(axis=1)).ravel()
        jaccard = 1 - mins / (vqe_q.sum() + sums - mins)
        return (1 - self.lam) * (1 - jaccard) + self.lam * s

    def _expanded_without(self, lists: np.ndarray, cone: np.ndarray, changed: np.ndarray) -> sparse.csr_matrix:
        """Ṽ of the `cone` items over repaired `lists`: V recomputed for the `changed` items, stored elsewhere."""
        expand = _expansion_matrix(lists, cone, self.k2, len(self.x))
        used = np.unique(expand.indices)
        fresh = used[np.isin(used, changed)]
        keep = sparse.diags((~np.isin(used, changed)).astype(float))
        place = sparse.csr_matrix(
            (np.ones(len(fresh)), (np.searchsorted(used, fresh), np.arange(len(fresh)))), shape=(len(used), len(fresh))
        )
        v_used = keep @ self.v[used] + place @ _kr_vectors(self.x, lists, fresh, self.k, self.h)
        return (expand[:, used] @ v_used).tocsr()


def _ranked(scores: np.ndarray, raw: np.ndarray | None, k: int, keep: int) -> np.ndarray:
    """Per row, the positions of the k best `scores` (`_top`), except that the `keep` best of `raw` (the plain
    cosine; None when `keep` is 0) come first, in their own order."""
    if raw is None or not keep:
        return np.stack([_top(row, k) for row in scores])
    rows = []
    for s_row, r_row in zip(scores, raw):
        first = _top(r_row, min(keep, k))
        others = s_row.copy()
        others[first] = -np.inf  # the kept hits are not ranked again
        rest = _top(others, k - len(first))
        rows.append(np.concatenate([first, rest]))
    return np.stack(rows)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest finite-or-not-minus-infinity `scores`, ordered by (score descending, position)."""
    alive = np.flatnonzero(scores > -np.inf)
    k = min(int(k), len(alive))
    if k <= 0:
        return np.empty(0, np.int64)
    s = scores[alive]
    if k < len(alive):
        cut = np.partition(s, len(s) - k)[len(s) - k]
        above = np.flatnonzero(s > cut)
        alive = np.concatenate([alive[above], alive[np.flatnonzero(s == cut)[: k - len(above)]]])
        s = scores[alive]
    return alive[np.lexsort((alive, -s))]


def _neighbour_lists(x: np.ndarray, size: int, rows: np.ndarray, hidden=()) -> tuple[np.ndarray, np.ndarray]:
    """Each of `rows`' `size` nearest other items (positions, -1 padding; `hidden` never listed) and their
    similarities, ordered by (similarity descending, position)."""
    lists = np.full((len(rows), size), -1, np.int64)
    sims = np.full((len(rows), size), -np.inf, np.float32)
    step = max(1, SCORE_CELLS // max(1, len(x)))
    for start in range(0, len(rows) if size else 0, step):
        r = rows[start : start + step]
        s = (x[r] @ x.T).astype(np.float32)
        s[np.arange(len(r)), r] = -np.inf
        s[:, hidden] = -np.inf
        for j, row in enumerate(s):
            top = _top(row, size)
            lists[start + j, : len(top)], sims[start + j, : len(top)] = top, row[top]
    return lists, sims


def _compact(lists: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with their -1 entries moved to the end, order otherwise kept."""
    order = np.argsort(lists < 0, axis=1, kind="stable")
    return np.take_along_axis(lists, order, 1), np.take_along_axis(sims, order, 1)


def _positions(ids: np.ndarray, lists: np.ndarray) -> np.ndarray:
    return np.where(lists >= 0, np.searchsorted(ids, lists), -1)


def _ids_of(ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return np.where(pos >= 0, np.asarray(ids, np.int64)[np.maximum(pos, 0)], -1)


def _augment(x: np.ndarray, lists: np.ndarray, sims: np.ndarray, alpha: float, rows=None) -> np.ndarray:
    """normalise(x_r + Σ max(s, 0)^α x_j) over each row's list (`rows`: the items the lists belong to)."""
    out = x.copy() if rows is None else x[rows]
    for j in range(lists.shape[1]):
        w = np.where(lists[:, j] >= 0, np.maximum(sims[:, j].astype(np.float64), 0) ** alpha, 0)
        out += w[:, None] * x[np.maximum(lists[:, j], 0)]
    return _unit(out)


def _expand(q: np.ndarray, near: np.ndarray, s: np.ndarray, alpha: float) -> np.ndarray:
    """α-query expansion of q by its nearest items `near` (similarities s)."""
    return _unit((q + (np.maximum(s.astype(np.float64), 0) ** alpha) @ near)[None])[0]


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64; zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _listing(lists: np.ndarray, items: np.ndarray, m: int) -> np.ndarray:
    """The rows whose first m neighbours include one of `items`."""
    return np.flatnonzero(np.isin(lists[:, :m], items).any(axis=1)) if m > 0 else np.empty(0, np.int64)


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([a, np.full((len(a), width - a.shape[1]), -1, a.dtype)], 1) if a.shape[1] < width else a


def _reciprocal(lists: np.ndarray, rows: np.ndarray, m: int) -> np.ndarray:
    """R(v, m) of each of `rows`: the row itself, then those of its first m neighbours that list it among their
    first m (-1 elsewhere); shape (len(rows), m + 1)."""
    near = lists[rows, :m]
    back = lists[np.maximum(near, 0)][:, :, :m]
    mutual = (near >= 0) & (back == np.asarray(rows)[:, None, None]).any(axis=2)
    return np.concatenate([np.asarray(rows)[:, None], np.where(mutual, near, -1)], 1)


def _qualifying(sets: np.ndarray, r_k: np.ndarray) -> list[np.ndarray]:
    """The R(c, h) of `sets` (rows, -1 padding) that share at least 2/3 of their members with R(v, k1) = `r_k`."""
    valid = sets >= 0
    shared = (np.isin(sets, r_k) & valid).sum(axis=1)
    return [row[row >= 0] for row in sets[3 * shared >= 2 * valid.sum(axis=1)]]


def _kr_vectors(x: np.ndarray, lists: np.ndarray, rows: np.ndarray, k1: int, h: int) -> sparse.csr_matrix:
    """V of the items `rows` (sparse, len(rows) x (n + 1)): weights exp(s - 1) on R*(v), summing to 1."""
    n = len(x)
    parts = []
    step = max(1, min(SET_CELLS // ((k1 + 1) ** 2 * (h + 1)), SCORE_CELLS // max(1, n)))
    for start in range(0, len(rows), step):
        r = np.asarray(rows[start : start + step], np.int64)
        r_k = _reciprocal(lists, r, k1)  # (c, k1 + 1)
        valid = r_k >= 0
        r_h = np.where(
            valid[:, :, None], _reciprocal(lists, np.maximum(r_k, 0).ravel(), h).reshape(len(r), k1 + 1, h + 1), -1
        )
        in_h = r_h >= 0
        shared = ((r_h[:, :, :, None] == r_k[:, None, None, :]) & in_h[:, :, :, None]).any(axis=3).sum(axis=2)
        ok = valid & (3 * shared >= 2 * in_h.sum(axis=2))
        members = np.sort(np.concatenate([r_k, np.where(ok[:, :, None], r_h, -1).reshape(len(r), -1)], 1), axis=1)
        members[:, 1:][members[:, 1:] == members[:, :-1]] = -1
        present = members >= 0
        s = np.take_along_axis((x[r] @ x.T).astype(np.float32), np.maximum(members, 0), 1).astype(np.float64)
        w = np.where(present, np.exp(s - 1), 0)
        w /= w.sum(axis=1, keepdims=True)
        row_of = np.broadcast_to(np.arange(len(r))[:, None], members.shape)
        parts.append(sparse.csr_matrix((w[present], (row_of[present], members[present])), shape=(len(r), n + 1)))
    return sparse.vstack(parts, format="csr") if parts else sparse.csr_matrix((0, n + 1))


def _expansion_matrix(lists: np.ndarray, rows: np.ndarray, k2: int, n: int) -> sparse.csr_matrix:
    """The local query expansion of `rows` (len(rows) x n): the mean over each row's N(v, k2)."""
    members = np.concatenate([np.asarray(rows, np.int64)[:, None], lists[rows, : k2 - 1]], 1)
    present = members >= 0
    weight = np.broadcast_to((1 / present.sum(axis=1))[:, None], members.shape)
    row_of = np.broadcast_to(np.arange(len(rows))[:, None], members.shape)
    return sparse.csr_matrix((weight[present], (row_of[present], members[present])), shape=(len(rows), n))
