"""The index-store interface: what every store of embedded images offers the search code. Implementations:
`faiss_store.FaissStore` (a folder, the embedded default) and `milvus_store.MilvusStore` (Milvus Lite or a Milvus
server); `stores` opens the one a location names.

Items are numbered in the order they were added (id = position) and ids never change: a removed item becomes a
tombstone. Each item has a path, an optional label and class name. Scores are cosine similarities. A store
records the `model` that embedded its items (checkpoint sha256, backbone, runtime), so a stale store is refused.

Attachments: a layer above may keep named, opaque bytes with a store (`attach`, `attachment`; re-ranking's
neighbour lists are one). Each store saves them with its snapshot (the same commit point as its items) and reads
them back when it is opened; what they mean is the attaching layer's business, and so is keeping them right across
adds and removes: it may register a keeper (`register_keeper`), which every snapshot asks for the bytes to save.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

from momentum_proxy.errors import UserError
from momentum_proxy.retrieval.hits import Hit
from momentum_proxy.vectors import as_features, as_labels, l2_normalize

UNKNOWN = -1  # label of an item whose class is not known, in a labelled index
RECALL_K, RECALL_QUERIES = 10, 1000  # recall@k against exact search, measured on this many indexed vectors
ATTACHMENT_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_keepers: dict[str, Callable[[IndexStore], bytes]] = {}


def register_keeper(name: str, keeper: Callable[[IndexStore], bytes]) -> None:
    """Let `keeper(store)` give the bytes that a snapshot saves for the attachment `name` of any store that has
    one (e.g. brought up to date with the items added or removed since it was attached)."""
    _keepers[name] = keeper


def checked_items(paths, labels, n: int) -> tuple[list[str], list | None]:
    """Paths as strings and labels as JSON-ready values, each checked to number n."""
    paths = [str(p) for p in paths]
    if len(paths) != n:
        raise UserError(f"{len(paths)} paths for {n} feature rows")
    return paths, None if labels is None else as_labels(labels, n).tolist()


class StoreUnavailable(UserError):
    """The store cannot be reached now (a Milvus server down or unreachable); the next call tries again."""


class IndexStore(ABC):
    """Cosine search over embedded items, with their metadata."""

    model: dict  # what embedded the items (see `runs.model_identity` and the embedder's identity)
    kind: str  # exact | ivf | hnsw | ivfpq
    params: dict  # the kind's search parameters
    recall: dict | None = None  # recall against exact search as last measured (`faiss_store`); see `recall_info`
    classes: dict[int, str]  # class names by label
    sources: list[str]  # the image folders indexed
    remote = False  # True when calls go over the network (never made in an event loop's thread)
    writes_through = False  # True when every add is persisted as it is made (Milvus); else `save` persists it

    @property
    @abstractmethod
    def feature_dim(self) -> int: ...

    @property
    @abstractmethod
    def ntotal(self) -> int:
        """Items ever added, tombstones included (the next id)."""

    @abstractmethod
    def __len__(self) -> int:
        """Live items."""

    @property
    @abstractmethod
    def labelled(self) -> bool:
        """Whether items carry labels (those of unknown class: UNKNOWN)."""

    def add(self, features, paths: list[str], labels: list | None = None) -> list[int]:
        """Add items (features are L2-normalised here); return their new ids."""
        x = as_features(features)
        if x.shape[1] != self.feature_dim:
            raise UserError(f"features have {x.shape[1]} dimensions, the index {self.feature_dim}")
        return self._add(l2_normalize(x), *checked_items(paths, labels, len(x)))

    def record_hashes(self, by_id: dict[int, str]) -> None:
        """Record items' content (the sha256 of each image file, by id) for `content_ids`; saved with the store."""

    def content_ids(self, hashes) -> dict[str, int]:
        """The live item whose image has each of the sha256 `hashes`, by hash (items whose content was never
        recorded, as in indexes from before it was, are not found)."""
        return {}

    def check_add(self) -> None:
        """Refuse adds (UserError) when this store cannot take them now; checked before anything is written."""

    def recall_info(self) -> dict | None:
        """Recall@k against exact search: {"k", "recall", "queries", "items", ...} as measured on a sample of the
        indexed vectors (an approximate index), {"k": 10, "recall": 1.0, "exact": True} for exact search (by
        definition, not measured), None when unknown (an index from before the measurement was recorded)."""
        if self.kind == "exact":
            return {"k": 10, "recall": 1.0, "exact": True}
        return self.recall

    def measure_recall(
        self, vectors=None, *, tune: bool = False, k: int = RECALL_K, num_queries: int = RECALL_QUERIES, seed: int = 0
    ) -> dict | None:
        """Measure recall@k against exact search on `num_queries` of the indexed vectors (`vectors`: those vectors,
        where the store keeps only codes) sampled with `seed`, tuning the search parameters first with `tune`;
        record it and return it (`recall_info`). Here: an exact store's recall is 1 by definition."""
        return self.recall_info()

    def tune(self, queries, query_ids, truth, *, target: float | None = None) -> dict | None:
        """Recall@k of this store for `queries` (items `query_ids`) against `truth`, their exact top-k ids, after
        tuning the search parameters towards `target`. Here: exact search, nothing to tune (`recall_info`)."""
        return self.recall_info()

    def memory_info(self) -> dict | None:
        """This process's memory for the index (`estimated_bytes`; `max_memory` and `reason` when a budget chose
        it), or None when the store's memory is not this process's (a Milvus server, Milvus Lite's engine)."""
        return None

    # ------------------------------------------------------------------------------------------- attachments
    @property
    def _attachments(self) -> dict[str, bytes | Callable[[], bytes]]:
        """name -> bytes, or a function giving them (made on first use: stores need not call an __init__ here)."""
        return self.__dict__.setdefault("_attached", {})

    def attach(self, name: str, data: bytes | Callable[[], bytes] | None) -> None:
        """Keep `data` under `name` with the store, saved by the next `save` (None: drop it). A function is called
        when a snapshot is taken (under the caller's lock), so that what is saved belongs to the items saved."""
        if not ATTACHMENT_NAME.fullmatch(name):
            raise ValueError(f"attachment names are lower-case words, not {name!r}")
        if data is None:
            self._attachments.pop(name, None)
        else:
            self._attachments[name] = data

    def attachment(self, name: str) -> bytes | None:
        """The bytes kept under `name` (those read when the store was opened, or attached since), or None."""
        data = self._attachments.get(name)
        return data() if callable(data) else data

    def attachments(self) -> dict[str, bytes]:
        """Every attachment's bytes now, by name, from its keeper when one is registered (what a snapshot saves)."""
        return {
            name: _keepers[name](self) if name in _keepers else data() if callable(data) else data
            for name, data in sorted(self._attachments.items())
        }

    @abstractmethod
    def _add(self, x: np.ndarray, paths: list[str], labels: list | None) -> list[int]:
        """Add unit vectors with checked paths and labels; return their new ids."""

    @abstractmethod
    def remove(self, item_id: int) -> None:
        """Delete an item (UserError for an unknown id)."""

    @abstractmethod
    def exists(self, item_id: int) -> bool: ...

    @abstractmethod
    def item(self, item_id: int) -> dict:
        """id, path, label, class_name of a live item (UserError otherwise)."""

    @abstractmethod
    def vector(self, item_id: int) -> np.ndarray:
        """The item's stored unit embedding, shape (1, feature_dim)."""

    @abstractmethod
    def ids_of(self, paths: list[str]) -> dict[str, int]:
        """The live ids of those of `paths` (absolute) that are indexed."""

    @abstractmethod
    def file_ids(self, path: Path) -> set[int]:
        """Ids of the items whose image is the file `path` (links resolved)."""

    @abstractmethod
    def live_items(self) -> list[dict]:
        """Every live item (as `item` gives it), in id order."""

    @abstractmethod
    def label_for(self, class_name: str) -> int:
        """The label of `class_name`, a new one when the store does not know it."""

    @abstractmethod
    def search(self, query_features, k: int, exclude=()) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n_queries, k), of the best live items not in `exclude`; ids -1 pad short rows."""

    @abstractmethod
    def snapshot(self):
        """The state to persist, taken under the caller's lock; its `.write(location)` persists it atomically."""

    def save(self, location: str | Path):
        """Persist the store (crash-safe: a save killed at any moment leaves the previous or the new state)."""
        return self.snapshot().write(location)

    def close(self) -> None:
        """Release connections (nothing for an in-memory store)."""

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors (n, feature_dim)) of the live items, in id order (for exact re-ranking)."""
        ids = np.array([it["id"] for it in self.live_items()], np.int64)
        if not len(ids):
            return ids, np.empty((0, self.feature_dim), np.float32)
        return ids, np.concatenate([self.vector(int(i)) for i in ids]).astype(np.float32)

    def items(self, ids) -> dict[int, dict]:
        """`item` of each live one of `ids`, by id."""
        return {int(i): self.item(int(i)) for i in ids if self.exists(int(i))}

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """`search` results as lists of `Hit` (rank from 1), one list per query."""
        out, found = [], self.items({int(i) for i in ids.ravel() if i >= 0})
        for row_s, row_i in zip(scores, ids):
            items = [found[int(i)] for i in row_i if int(i) in found]
            out.append(
                [
                    Hit(rank, it["id"], float(s), it["path"], it["label"], it["class_name"])
                    for rank, (s, it) in enumerate(zip(row_s, items), start=1)
                ]
            )
        return out


def recall_text(info: dict | None, live: int | None = None) -> str:
    """A `recall_info` in words: `recall@10 against exact search 0.962 (1,000 queries among 5,000 items)`."""
    if info is None:
        return "recall against exact search not measured (rebuild the index to measure it)"
    head = f"recall@{info['k']} against exact search {info['recall']:.4g}"
    if info.get("exact"):
        return f"{head} (exact search, by definition)"
    when = f"{info['items']:,} items" + (f"; {live:,} now" if live is not None and live != info["items"] else "")
    return f"{head} ({info['queries']:,} queries among {when})"


def check_mix(built_with: dict, identity: dict) -> str:
    """Whether embeddings of `identity` (an embedder's) may join those recorded in `built_with` (a store's
    model dict); returns the combined runtime record ("onnx,torch"), or raises UserError.

    Runtimes mix only for the same checkpoint and when every runtime involved is verified (torch is the
    reference; an exported runtime passed its agreement check against it for that checkpoint)."""
    had = set(str(built_with.get("runtime", "torch")).split(","))
    runtime = identity["runtime"]
    if had == {runtime}:
        return runtime
    if built_with.get("checkpoint_sha256") != identity["checkpoint_sha256"]:
        raise UserError("the index was built from another checkpoint; rebuild it for this model")
    if not (built_with.get("verified", True) and identity["verified"]):
        raise UserError(
            f"refusing to mix runtimes {','.join(sorted(had))} and {runtime}: an export of this "
            "checkpoint did not pass its check against PyTorch"
        )
    return ",".join(sorted(had | {runtime}))
