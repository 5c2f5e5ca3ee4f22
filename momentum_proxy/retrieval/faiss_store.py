"""A saved retrieval index: faiss over L2-normalised embeddings (cosine), plus image paths, labels and model info.

On disk, a folder holds `index-<hash>.faiss` (faiss.write_index) and `meta.json` (kind, feature_dim, search
parameters, the caller's `model` dict, paths, labels, class names, deleted ids, `sha256`: each item's image file
content where recorded, see `IndexStore.record_hashes`). A save writes the faiss file
under a new content-addressed name first, then replaces `meta.json` (the commit point, which names that file
and records its sha256), then removes the previous faiss file: a save killed at any moment leaves the previous
or the new index, never a mix. Nothing is pickled. Attachments (`IndexStore.attach`, e.g. re-ranking's neighbour
lists) are saved the same way beside it (`attachment-<name>-<hash>.bin`, named in `meta.json`'s `attachments`);
one whose file does not match its recorded sha256 is not loaded (its layer computes it again).

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
- `hnsw`: IndexHNSWFlat with M=32 (efConstruction 80); efSearch = max(ef_search, k) per query;
- `ivfpq`: IndexIVFPQ, the same lists, each vector stored as m one-byte product-quantizer codes (m = 256 at most,
  a divisor of d) of its residual: m + 8 bytes a vector instead of 4·d. Scores are approximate cosines.

Memory budget (`plan_index`, autofaiss's rules): the most accurate kind whose estimated size (`estimate_bytes`)
fits in HEADROOM of the budget: exact below 10,000 vectors, else HNSW with the largest M up to 32 (at least 8),
else IVF-Flat below 1M vectors, else IVF-PQ with the largest code that fits.

Recall: after a build (and, for flat-storage kinds, whenever `measure_recall` is called), nprobe or efSearch is
raised in doubling steps until recall@10 against exact search reaches RECALL_TARGET on a sample of the indexed
vectors used as queries (each leaving itself out), or stops improving; the chosen value is in `params` and the
measurement in `recall` (saved in meta.json). An exact index has recall 1 by definition and is not measured.

Memory-mapped (`load(..., mmap=True)`, `mproxy serve --mmap`): an ivf or ivfpq index's inverted lists are mapped
from its (content-addressed, never rewritten) file instead of read into memory; only the centroids, ids map and
metadata are loaded. Searches equal those of the loaded index. Deletes work (tombstones live in meta.json, and a
save keeps the same faiss file); adds are refused (they would rewrite the lists).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from momentum_proxy.config import parse_memory
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path, file_sha256, read_json, write_json
from momentum_proxy.paths import META_FILE
from momentum_proxy.retrieval.store import RECALL_K, RECALL_QUERIES, UNKNOWN, IndexStore, checked_items
from momentum_proxy.vectors import as_features, l2_normalize

KINDS = ("exact", "ivf", "hnsw", "ivfpq")
IVF_KINDS = ("ivf", "ivfpq")
LEGACY_INDEX_FILE = "index.faiss"  # format 1
WRITER_LOCK = ".writer.lock"  # held by the one process that may write the folder (`mproxy index`, `mproxy serve`)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 64
MIN_POINTS_PER_LIST = 39
# recall against exact search, measured after a build on a sample of the indexed vectors (RECALL_K, RECALL_QUERIES)
RECALL_TARGET = 0.95
MIN_GAIN = 0.002  # a doubling of nprobe / efSearch that gains less than this stops the tuning
MAX_EF_SEARCH = 1024
# the memory budget's choice (autofaiss's rules; see plan_index)
HEADROOM = 0.8  # the index may take this fraction of --max-memory; the rest is the searching process's own
EXACT_BELOW = 10_000  # autofaiss's quantization threshold: below it, exhaustive search (recall 1, about 1 ms)
IVF_FLAT_BELOW = 1_000_000  # autofaiss's ivf_flat_threshold: from here on, IVF-PQ rather than IVF-Flat
HNSW_MIN_M = 8
PQ_CODE_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # autofaiss's, largest first (bytes a vector, 8-bit codes)
PQ_BITS = 8
MIN_PQ_POINTS = 2**PQ_BITS  # a product quantizer trains 256 centroids per sub-vector


def default_nlist(n: int) -> int:
    """IVF list count for n training vectors: ~4·sqrt(n), at most n/39, at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: an eighth of them, at least 16 (or all when fewer)."""
    return min(nlist, max(16, nlist // 8))


def format_bytes(size: float) -> str:
    """A size as people read it: 1.5 GiB, 300 MiB, 12 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def estimate_bytes(kind: str, n: int, d: int, params: dict | None = None) -> int:
    """Memory of a loaded index of n d-dimensional vectors (faiss's structures; meta.json's paths not counted):
    exact 4·d a vector; hnsw 4·d + 8·M + 16 (level-0 links are 2·M int32, upper levels ~M/(M-1) more, offsets and
    levels); ivf 4·d + 16 (id and direct-map entry) plus the nlist centroids; ivfpq m + 16 plus the centroids and
    the quantizer's 256 centroids per sub-vector."""
    params = params or {}
    if kind == "exact":
        return 4 * d * n
    if kind == "hnsw":
        return n * (4 * d + 8 * params.get("M", HNSW_M) + 16)
    nlist = params.get("nlist") or default_nlist(n)
    if kind == "ivf":
        return n * (4 * d + 16) + 4 * d * nlist
    if kind == "ivfpq":
        return n * (params["m"] + 16) + 4 * d * nlist + 4 * d * 2**PQ_BITS
    raise UserError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")


def pq_code_sizes(d: int) -> list[int]:
    """autofaiss's code sizes (bytes a vector) that a d-dimensional IVF-PQ can use: below d and dividing it (no OPQ
    rotation here, so sub-vectors are d/m consecutive dimensions), largest first."""
    return [m for m in PQ_CODE_SIZES if m < d and d % m == 0] or [d]


@dataclass
class IndexPlan:
    """What `plan_index` chose: a kind, its build parameters, the estimated memory and why."""

    kind: str
    params: dict
    estimated_bytes: int
    max_memory: int
    reason: str

    def to_dict(self) -> dict:
        return {"max_memory": self.max_memory, "estimated_bytes": self.estimated_bytes, "reason": self.reason}


def plan_index(n: int, d: int, max_memory: int, kind: str | None = None) -> IndexPlan:
    """The index for n d-dimensional vectors within `max_memory` bytes, by autofaiss's rules
    (`get_optimal_index_keys_v2`): exact below EXACT_BELOW vectors; else HNSW when M >= 8 fits (M as large as
    fits, at most 32); else IVF-Flat below IVF_FLAT_BELOW vectors; else IVF-PQ with the largest code that fits.
    "Fits": `estimate_bytes` at most HEADROOM of the budget. With `kind`, only that kind is sized (hnsw's M,
    ivfpq's code size). A one-line UserError when nothing fits."""
    if n < 1 or d < 1:
        raise UserError("nothing to index")
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    room = HEADROOM * max_memory
    budget = f"--max-memory {format_bytes(max_memory)}"

    nlist = default_nlist(n)
    candidates: list[tuple[str, dict, str]] = []  # (kind, params, why), most accurate first
    if kind in (None, "exact"):
        why = "exhaustive search, recall 1" if kind else f"fewer than {EXACT_BELOW:,} vectors: exhaustive search"
        if kind or n < EXACT_BELOW:
            candidates.append(("exact", {}, why))
    links = min(HNSW_M, int((room / n - 4 * d - 16) // 8))
    if kind in (None, "hnsw") and links >= HNSW_MIN_M:
        candidates.append(("hnsw", {"M": links}, f"HNSW with M={links} fits"))
    if kind == "ivf" or kind is None and n < IVF_FLAT_BELOW:
        candidates.append(("ivf", {"nlist": nlist}, "IVF-Flat fits (HNSW does not)" if kind is None else "IVF-Flat"))
    if kind in (None, "ivfpq") and n >= MIN_PQ_POINTS:
        candidates += [
            (
                "ivfpq",
                {"nlist": nlist, "m": m},
                f"IVF-PQ with {m}-byte codes fits" + ("" if kind else " (no unquantized index does)"),
            )
            for m in pq_code_sizes(d)
        ]
    for k, params, why in candidates:
        size = estimate_bytes(k, n, d, params)
        if size <= room:
            return IndexPlan(k, params, size, max_memory, why)
    if kind == "ivfpq" and n < MIN_PQ_POINTS:
        raise UserError(f"ivfpq needs at least {MIN_PQ_POINTS} vectors to train its quantizer, got {n}")
    smallest = kind or ("ivfpq" if n >= MIN_PQ_POINTS else "exact")
    params = {"M": HNSW_MIN_M, "nlist": nlist, "m": pq_code_sizes(d)[-1]}
    need = estimate_bytes(smallest, n, d, params) / HEADROOM
    raise UserError(
        f"{n:,} vectors of {d} dimensions do not fit in {budget}: the smallest {smallest} index needs "
        f"about {format_bytes(need)} (the index may take {HEADROOM:.0%} of the budget)"
    )


def _stored_path(path: str, inside: str) -> str:
    """How `meta.json` records a path: relative to the index folder (`inside` is its absolute path and a
    separator) when inside it, else absolute. String operations: a save records every path, and pathlib took
    23 ms of the event loop's time per add at 1,000 items."""
    path = os.path.abspath(path)
    return path[len(inside) :] if path.startswith(inside) else path


@dataclass
class Snapshot:
    """An index's state, taken in memory, to be written by `write` (e.g. outside a lock)."""

    blob: np.ndarray | None  # faiss.serialize_index, or None: the faiss file is `source`'s, unchanged
    meta: dict
    attachments: dict[str, bytes] = field(default_factory=dict)  # `IndexStore.attachments`
    source: tuple[Path, str] | None = None  # (faiss file, its sha256) of a memory-mapped index

    def write(self, folder: str | Path) -> Path:
        """Write the faiss file (and the attachments), then commit `meta.json`, then remove older files;
        return the folder. A memory-mapped index's file is kept as it is (copied when saved elsewhere)."""
        folder = Path(folder).absolute()
        if self.blob is not None:
            name, sha = _write_content(folder, "index-{}.faiss", self.blob.tobytes())
        else:
            assert self.source is not None, "a snapshot without the index's bytes names its memory-mapped file"
            (source, sha), name = self.source, self.source[0].name
            if source.parent.resolve() != folder.resolve():
                with atomic_path(folder / name) as tmp:
                    shutil.copyfile(source, tmp)
                    with open(tmp, "rb+") as f:
                        os.fsync(f.fileno())
        inside = os.path.join(os.path.abspath(folder), "")
        meta = dict(
            self.meta, index_file=name, index_sha256=sha, paths=[_stored_path(p, inside) for p in self.meta["paths"]]
        )
        kept, meta["attachments"] = {name}, {}
        for key, data in self.attachments.items():
            file, sha = _write_content(folder, f"attachment-{key}-{{}}.bin", data)
            meta["attachments"][key] = {"file": file, "sha256": sha}
            kept.add(file)
        write_json(folder / META_FILE, meta)
        for old in [
            *folder.glob("index*.faiss"),
            *folder.glob(".index*.tmp"),
            *folder.glob("attachment-*.bin"),
            *folder.glob(".attachment-*.tmp"),
            *folder.glob("neighbours-*.npz"),
            *folder.glob(".neighbours-*.tmp"),
        ]:  # also those of killed saves (and of lists saved before)
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


def _trained_ivf(
    kind: str, x: np.ndarray, nlist: int | None, nprobe: int | None, pq_m: int | None, seed: int, train_size: int | None
) -> tuple[faiss.Index, dict]:
    """An ivf or ivfpq index (`FaissStore.build`'s arguments) with its lists trained on `x` (or on a seeded sample
    of `train_size` of them), empty, and its parameters."""
    n, d = x.shape
    nlist = default_nlist(n) if nlist is None else int(nlist)
    if not 1 <= nlist <= n:
        raise UserError(f"{kind} needs 1 <= nlist <= number of vectors ({n}), got {nlist}")
    if nprobe is not None and int(nprobe) < 1:
        raise UserError(f"nprobe must be at least 1, got {nprobe}")
    index: faiss.IndexIVF
    if kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        params: dict = {"nlist": nlist}
    else:
        m = pq_code_sizes(d)[0] if pq_m is None else int(pq_m)
        if m < 1 or d % m:
            raise UserError(f"ivfpq's code size must divide the {d} dimensions, got {m}")
        if n < MIN_PQ_POINTS:
            raise UserError(f"ivfpq needs at least {MIN_PQ_POINTS} vectors to train its quantizer, got {n}")
        pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        pq.pq.cp.min_points_per_centroid = 1  # no warning for small collections (ivfpq is for big ones)
        index, params = pq, {"nlist": nlist, "m": m, "nbits": PQ_BITS}
    index.cp.seed = seed
    index.cp.min_points_per_centroid = 1  # small nlist/n ratios are deliberate, no warning
    train = x
    if train_size is not None and train_size < n:
        train = x[np.sort(np.random.default_rng(seed).choice(n, max(nlist, int(train_size)), replace=False))]
    index.train(train)
    params["nprobe"] = min(nlist, int(nprobe) if nprobe is not None else default_nprobe(nlist))
    return index, params


def _empty_hnsw(d: int, hnsw_m: int | None, ef_search: int | None) -> tuple[faiss.Index, dict]:
    """An empty hnsw index of `d` dimensions (`FaissStore.build`'s arguments) and its parameters."""
    if ef_search is not None and ef_search < 1:
        raise UserError(f"ef_search must be at least 1, got {ef_search}")
    m = HNSW_M if hnsw_m is None else int(hnsw_m)
    if m < 2:
        raise UserError(f"hnsw needs M >= 2, got {m}")
    index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index, {
        "M": m,
        "ef_construction": HNSW_EF_CONSTRUCTION,
        "ef_search": DEFAULT_EF_SEARCH if ef_search is None else int(ef_search),
    }


class FaissStore(IndexStore):
    """Cosine retrieval over a faiss index; item `i` (its id) has `paths[i]`, `labels[i]` (labels optional) and
    class name `classes[labels[i]]` when known; ids in `deleted` are tombstones."""

    def __init__(
        self,
        index: faiss.Index,
        kind: str,
        paths: list[str],
        labels: list | None,
        model: dict,
        params: dict,
        classes: dict[int, str] | None = None,
        deleted=(),
        sources=(),
        recall: dict | None = None,
        memory: dict | None = None,
        mapped: tuple[Path, str] | None = None,
    ):
        """`recall`: the last recall measurement (see `measure_recall`); `memory`: the budget's choice
        (`IndexPlan.to_dict`); `mapped`: (file, sha256) when `index`'s lists are memory-mapped from that file."""
        self.index, self.kind, self.paths, self.labels, self.model, self.params = (
            index,
            kind,
            paths,
            labels,
            model,
            params,
        )
        self.classes = dict(classes or {})
        self.deleted = set(int(i) for i in deleted)
        self.sources = list(sources)
        self.path_ids = {p: i for i, p in enumerate(paths) if i not in self.deleted}
        self.hashes: dict[int, str] = {}  # item id -> sha256 of its image file, where recorded (`record_hashes`)
        self.hash_ids: dict[str, int] = {}  # the live ones, by hash
        self.recall, self.memory, self.mapped = recall, dict(memory or {}), mapped
        if kind in IVF_KINDS:
            # `vector(id)` for queries by id (ivfpq: the decoded, approximate vector)
            faiss.extract_index_ivf(index).make_direct_map()

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
    def build(
        cls,
        features,
        paths,
        labels=None,
        *,
        kind: str | None = "exact",
        model: dict | None = None,
        classes: dict[int, str] | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        hnsw_m: int | None = None,
        pq_m: int | None = None,
        max_memory: int | str | None = None,
        plan: IndexPlan | None = None,
        seed: int = 0,
        recall_queries: int = RECALL_QUERIES,
        train_size: int | None = None,
    ) -> FaissStore:
        """Index `features` (n, d) for items `paths` (and `labels`, named by `classes`); `model` describes the
        embedding model.

        `max_memory` (bytes, or a size such as "2GB") lets `plan_index` choose the kind (`kind` None) or size
        the one given (hnsw's M, ivfpq's code size); `plan` is such a choice made beforehand (`plan_index` for
        the whole collection, when `features` are its first part). An approximate index's nprobe / efSearch,
        unless given, is tuned to reach recall@10 RECALL_TARGET against exact search on `recall_queries` of the
        vectors, and the recall is recorded (`recall`). `train_size` caps the vectors an ivf/ivfpq index trains
        on (a seeded sample; default: all, faiss subsampling 256 per list)."""
        x = l2_normalize(as_features(features))
        n, d = x.shape
        memory = None
        if plan is None and max_memory is not None:
            plan = plan_index(n, d, parse_memory(max_memory), kind)
        if plan is not None:
            kind, memory, nlist = plan.kind, plan.to_dict(), plan.params.get("nlist", nlist)
            hnsw_m, pq_m = plan.params.get("M", hnsw_m), plan.params.get("m", pq_m)
        kind = kind or "exact"
        if kind not in KINDS:
            raise UserError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
        paths, labels = checked_items(paths, labels, n)
        index: faiss.Index
        params: dict
        if kind == "exact":
            index, params = faiss.IndexFlatIP(d), {}
        elif kind in IVF_KINDS:
            index, params = _trained_ivf(kind, x, nlist, nprobe, pq_m, seed, train_size)
        else:
            index, params = _empty_hnsw(d, hnsw_m, ef_search)
        built = cls(
            index, kind, [], [] if labels is not None else None, dict(model or {}), params, classes, memory=memory
        )
        built._add(x, paths, labels)
        tune = kind in IVF_KINDS and nprobe is None or kind == "hnsw" and ef_search is None
        if recall_queries > 0:  # 0: measured (and tuned) by the caller, e.g. once the whole collection is in
            built.measure_recall(x, tune=tune, num_queries=recall_queries, seed=seed)
        return built

    def _add(self, x: np.ndarray, paths: list[str], labels: list | None) -> list[int]:
        """Add normalised vectors with checked paths and labels (ivf: into the lists trained at build, no rebuild)."""
        self.check_add()
        if (labels is None) != (self.labels is None):
            raise UserError(
                "labels must be given for every item or for none"
                if self.labels is not None
                else "this index has no labels; add items without labels"
            )
        first = self.ntotal
        self.index.add(x)
        self.paths.extend(paths)
        if self.labels is not None and labels is not None:  # both or neither, checked above
            self.labels.extend(labels)
        ids = list(range(first, self.ntotal))
        self.path_ids.update(zip(paths, ids))
        return ids

    def check_add(self) -> None:
        """Refuse adds to a memory-mapped index (they would rewrite the lists mapped from its file)."""
        if self.mapped is not None:
            raise UserError(
                "this index is memory-mapped (mproxy serve --mmap) and takes no new items; add them "
                "with mproxy index while it is not served, or serve it without --mmap"
            )

    def ids_of(self, paths: list[str]) -> dict[str, int]:
        return {p: self.path_ids[p] for p in paths if p in self.path_ids}

    def record_hashes(self, by_id: dict[int, str]) -> None:
        self.hashes.update({int(i): h for i, h in by_id.items() if h})
        self.hash_ids.update({h: int(i) for i, h in by_id.items() if h and self.exists(int(i))})

    def content_ids(self, hashes) -> dict[str, int]:
        return {h: self.hash_ids[h] for h in hashes if h in self.hash_ids}

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
        sha = self.hashes.get(item_id)
        if sha is not None and self.hash_ids.get(sha) == item_id:
            del self.hash_ids[sha]

    def exists(self, item_id: int) -> bool:
        return 0 <= item_id < self.ntotal and item_id not in self.deleted

    def item(self, item_id: int) -> dict:
        """An item's metadata: id, path, label, class_name (UserError for an unknown or deleted id)."""
        if not self.exists(item_id):
            raise UserError(f"no item with id {item_id}")
        label = int(self.labels[item_id]) if self.labels is not None else None
        return {
            "id": int(item_id),
            "path": self.paths[item_id],
            "label": None if label == UNKNOWN else label,
            "class_name": None if label is None else self.classes.get(label),
        }

    def vector(self, item_id: int) -> np.ndarray:
        """An item's stored (normalised) embedding, shape (1, d). (numpy even once pytorch-metric-learning has
        imported faiss.contrib.torch_utils, whose `reconstruct` returns torch tensors.)"""
        self.item(item_id)
        return np.asarray(self.index.reconstruct(int(item_id)))[None]

    def _set_search_params(self, k: int) -> None:
        # Attributes, not faiss SearchParameters: importing pytorch-metric-learning (faiss.contrib.torch_utils)
        # replaces Index.search with a version that takes no `params`.
        if self.kind in IVF_KINDS:
            faiss.extract_index_ivf(self.index).nprobe = self.params["nprobe"]
        elif self.kind == "hnsw":
            assert isinstance(self.index, faiss.IndexHNSW), "an hnsw store holds a faiss IndexHNSW"
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
            out_s[row, : len(cols)], out_i[row, : len(cols)] = sims[row, cols], idx[row, cols]
        return out_s, out_i

    def recall_vs_exact(
        self, k: int = RECALL_K, num_queries: int = RECALL_QUERIES, seed: int = 0, vectors=None
    ) -> float:
        """Fraction of the exact top-k found by this index's top-k, for up to `num_queries` live items (sampled
        with `seed`) used as queries, each leaving itself out of both lists (`search_hits` leaves a query's own
        item out too). 1.0 for an exact index, by definition (not measured). `vectors`: the live items' unit
        vectors in id order, compared with exactly (default: the stored ones; an ivfpq index stores only codes,
        so it needs them). Changes nothing (see `measure_recall`)."""
        if self.kind == "exact":
            return 1.0
        sample = self._recall_sample(vectors, k, num_queries, seed)
        return 1.0 if sample is None else self._recall_of(*sample)

    def measure_recall(
        self, vectors=None, *, tune: bool = False, k: int = RECALL_K, num_queries: int = RECALL_QUERIES, seed: int = 0
    ) -> dict | None:
        """Measure recall@k against exact search as `recall_vs_exact` does, after tuning nprobe / efSearch
        (`tune`, see `tune`), and record it in `recall` (saved in meta.json), which is returned. An exact index
        records recall 1 by definition; an ivfpq index without `vectors` keeps its last measurement."""
        if self.kind == "exact":
            self.recall = {"k": k, "recall": 1.0, "exact": True}
        elif vectors is not None or self.kind != "ivfpq":
            sample = self._recall_sample(vectors, k, num_queries, seed)
            self.recall = None if sample is None else self.tune(*sample, target=RECALL_TARGET if tune else None)
        return self.recall

    def _recall_sample(self, vectors, k: int, num_queries: int, seed: int):
        """(queries, their ids, their exact top-k ids without themselves) for a seeded sample of the live items
        (None when fewer than 2 are live). Without `vectors`, the stored ones are read a chunk at a time."""
        live = np.array([i for i in range(self.ntotal) if i not in self.deleted], np.int64)
        if len(live) < 2:
            return None
        if vectors is None and self.kind == "ivfpq":
            raise UserError("an ivfpq index stores codes, not vectors: give the vectors to compare with")
        if vectors is not None:
            vectors = as_features(vectors)
            if len(vectors) != len(live):
                raise UserError(f"{len(vectors)} vectors for the {len(live)} live items")
        k = min(int(k), len(live) - 1)
        pos = np.sort(np.random.default_rng(seed).choice(len(live), min(num_queries, len(live)), replace=False))
        if vectors is not None:
            queries, chunks = vectors[pos], [(live, vectors)]
        else:
            queries = np.concatenate([self.vector(int(i)) for i in live[pos]])
            chunks = self._stored_chunks()
        return queries, live[pos], exact_neighbours(queries, live[pos], chunks, k)

    def _stored_chunks(self, size: int = 65_536):
        """(ids, unit vectors) of the live items, `size` ids at a time (flat-storage kinds)."""
        deleted = np.fromiter(self.deleted, np.int64, len(self.deleted))
        for first in range(0, self.ntotal, size):
            ids = np.arange(first, min(self.ntotal, first + size))
            keep = ~np.isin(ids, deleted)
            yield ids[keep], np.asarray(self.index.reconstruct_n(first, len(ids)))[keep]

    def tune(self, queries, query_ids, truth, *, target: float | None = RECALL_TARGET) -> dict:
        """Recall@k (k: `truth`'s width) of this index for `queries` (the unit vectors of the items `query_ids`),
        each leaving its own item out, against `truth`, their exact top-k ids (each leaving itself out). With a
        `target`, nprobe (ivf, ivfpq) or efSearch (hnsw) is first set by doubling from a small value until the
        recall reaches the target, gains less than MIN_GAIN (the cheaper value kept) or the parameter is at its
        limit (nlist; MAX_EF_SEARCH). Records and returns `recall`: k, recall, queries, items (live then), and for
        a tuning the target, parameter and the (value, recall) pairs tried."""
        truth = np.asarray(truth, np.int64)
        tried, extra = [], {}
        if target is not None and self.kind != "exact":
            name, start, limit = (
                ("nprobe", 8, self.params["nlist"]) if self.kind in IVF_KINDS else ("ef_search", 16, MAX_EF_SEARCH)
            )
            value, best = min(start, limit), None
            while True:
                self.params[name] = value
                found = self._recall_of(queries, query_ids, truth)
                tried.append([value, round(found, 4)])
                if best is not None and found - best[1] < MIN_GAIN:
                    value, found = best
                    self.params[name] = value
                    break
                best = (value, found)
                if found >= target or value >= limit:
                    break
                value = min(limit, 2 * value)
            extra = {"target": target, "tuned": name, "tried": tried}
        else:
            found = self._recall_of(queries, query_ids, truth)
        self.recall = {
            "k": int(truth.shape[1]),
            "recall": round(found, 4),
            "queries": len(queries),
            "items": len(self),
            **extra,
        }
        return self.recall

    def _recall_of(self, queries, query_ids, truth) -> float:
        k = truth.shape[1]
        found = drop_own(self.search(queries, k + 1)[1], np.asarray(query_ids), k)
        hits = sum(len(np.intersect1d(t[t >= 0], f[f >= 0])) for t, f in zip(truth, found))
        return hits / max(1, int(np.count_nonzero(truth >= 0)))

    def live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, unit vectors) of the live items, in id order."""
        live = np.array([i for i in range(self.ntotal) if i not in self.deleted], np.int64)
        return live, np.asarray(self.index.reconstruct_n(0, self.ntotal))[live]

    def memory_info(self) -> dict:
        """The estimated memory of the loaded index (`estimate_bytes`), and the budget it was chosen for and why
        (`max_memory`, `reason`) when it was."""
        return {**self.memory, "estimated_bytes": estimate_bytes(self.kind, self.ntotal, self.feature_dim, self.params)}

    def snapshot(self) -> Snapshot:
        """The state to save, copied (cheap next to embedding: one memory copy of the vectors), with the
        attachments as they are now."""
        blob = None if self.mapped is not None else faiss.serialize_index(self.index)
        return Snapshot(
            blob,
            source=self.mapped,
            attachments=self.attachments(),
            meta={
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "metric": "cosine",
                "feature_dim": self.feature_dim,
                "count": self.ntotal,
                "live": len(self),
                "params": self.params,
                "recall": self.recall,
                "memory": self.memory_info(),
                "model": self.model,
                "sources": list(self.sources),
                "paths": list(self.paths),
                "labels": None if self.labels is None else list(self.labels),
                "classes": {str(k): v for k, v in sorted(self.classes.items())},
                "deleted": sorted(self.deleted),
                "sha256": {str(i): h for i, h in sorted(self.hashes.items())},
            },
        )

    @classmethod
    def load(cls, folder: str | Path, expect_model: dict | None = None, mmap: bool = False) -> FaissStore:
        """Read an index saved by `save`; refuse it when a key of `expect_model` (e.g. backbone, checkpoint
        hash, feature_dim) differs from what it was built with. With `mmap`, an ivf or ivfpq index's inverted
        lists stay in its file, mapped into memory (faiss.IO_FLAG_MMAP), instead of being read (see `check_add`)."""
        folder = Path(folder).absolute()
        meta = read_meta(folder)
        built_with = {**meta["model"], "feature_dim": meta["feature_dim"]}
        for key, value in (expect_model or {}).items():
            if key not in built_with or built_with[key] != value:
                raise UserError(
                    f"index in {folder} was built with {key}={built_with.get(key)!r}, "
                    f"not {value!r}; rebuild it for this model"
                )
        index_file = folder / meta.get("index_file", LEGACY_INDEX_FILE)
        if not index_file.is_file() or file_sha256(index_file) != meta["index_sha256"]:
            raise UserError(f"{index_file.name} in {folder} does not match {META_FILE} (interrupted save?); rebuild it")
        if mmap and meta["kind"] not in IVF_KINDS:
            raise UserError(
                f"--mmap maps the inverted lists of an ivf or ivfpq index; {folder} is {meta['kind']} "
                "(rebuild it with --kind ivf or ivfpq, or with a --max-memory that chooses one)"
            )
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(index_file), flags)
        if mmap:  # OnDiskInvertedLists: no prefetch threads (32 started per search: 9 ms instead of 0.2)
            lists = faiss.extract_index_ivf(index).invlists
            assert lists is not None, "an ivf index read from a file holds its inverted lists"
            on_disk = faiss.downcast_InvertedLists(lists)
            assert isinstance(on_disk, faiss.OnDiskInvertedLists), "faiss.IO_FLAG_MMAP maps the lists on disk"
            on_disk.prefetch_nthread = 0
        if index.ntotal != meta["count"] or len(meta["paths"]) != meta["count"] or index.d != meta["feature_dim"]:
            raise UserError(f"{index_file.name} and {META_FILE} in {folder} disagree; rebuild the index")
        base = folder if meta["format_version"] >= 2 else Path.cwd()
        paths = [os.path.normpath(base / p) for p in meta["paths"]]
        classes = {int(k): v for k, v in meta.get("classes", {}).items()}
        memory = {k: v for k, v in meta.get("memory", {}).items() if k != "estimated_bytes"}
        store = cls(
            index,
            meta["kind"],
            paths,
            meta["labels"],
            meta["model"],
            meta["params"],
            classes,
            meta.get("deleted", ()),
            meta.get("sources", ()),
            recall=meta.get("recall"),
            memory=memory,
            mapped=(index_file, meta["index_sha256"]) if mmap else None,
        )
        store.record_hashes({int(i): h for i, h in meta.get("sha256", {}).items()})  # none in older indexes
        for name, data in read_attachments(folder, meta).items():
            store.attach(name, data)
        return store


def exact_neighbours(queries, query_ids, chunks, k: int) -> np.ndarray:
    """The exact top-k ids (by inner product; ties by id) of each of `queries` among the vectors that `chunks`
    yields as (ids, unit vectors) pairs, each query's own id (`query_ids`) left out: (n_queries, k), -1 where
    fewer. Memory: the queries' lists and one chunk (the vectors can be streamed)."""
    q = np.ascontiguousarray(queries, np.float32)
    best_s = np.full((len(q), k + 1), -np.inf, np.float32)
    best_i = np.full((len(q), k + 1), -1, np.int64)
    for ids, x in chunks:
        if not len(ids):
            continue
        s, j = faiss.knn(q, np.ascontiguousarray(x, np.float32), min(k + 1, len(ids)), faiss.METRIC_INNER_PRODUCT)
        all_s, all_i = np.hstack([best_s, s]), np.hstack([best_i, np.asarray(ids, np.int64)[j]])
        order = np.lexsort((all_i, -all_s), axis=1)[:, : k + 1]
        best_s, best_i = np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)
    return drop_own(best_i, np.asarray(query_ids, np.int64), k)


def drop_own(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row of `ids` (k + 1 wide) without the query's own id (`own`, one a row; when absent, the row's last
    is dropped instead), cut to k."""
    is_own = ids == own[:, None]
    is_own[~is_own.any(axis=1), -1] = True
    return ids[~is_own].reshape(len(ids), -1)[:, :k]


def read_attachments(folder: Path, meta: dict) -> dict[str, bytes]:
    """The attachments `meta` names whose files match their sha256 (re-ranking's lists of an index saved before
    attachments, `neighbours_file`, as "neighbours")."""
    named = dict(meta.get("attachments") or {})
    if "neighbours_file" in meta:
        named.setdefault("neighbours", {"file": meta["neighbours_file"], "sha256": meta.get("neighbours_sha256")})
    found = {}
    for name, record in named.items():
        file = folder / record["file"]
        if file.is_file():
            data = file.read_bytes()
            if hashlib.sha256(data).hexdigest() == record["sha256"]:
                found[name] = data
    return found


def read_meta(folder: str | Path) -> dict:
    """`meta.json` of an index folder, checked to be of a format this version reads."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise UserError(f"no retrieval index in {folder} (no {META_FILE})")
    meta = read_json(folder / META_FILE)
    if meta.get("format_version") not in READABLE_VERSIONS or meta.get("kind") not in KINDS:
        raise UserError(
            f"{folder / META_FILE} is not a retrieval index of format "
            f"{' or '.join(map(str, READABLE_VERSIONS))}; rebuild it with "
            f"`mproxy index RUN --images DIR --out {folder} --rebuild`"
        )
    return meta
