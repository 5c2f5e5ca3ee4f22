"""Retrieval with a run's model, one search path for every caller.

- `build_index` embeds an image collection into a saved index (a faiss folder or a Milvus store: `retrieval.stores`),
  or extends or rebuilds one; `open_index` opens a saved index with the run whose model built it (refusing a stale
  one).
- `run_index` makes a run's own embeddings (or another embeddings file, or a split embedded now) an exact index
  in memory, so that searching a run and searching a saved index are the same code.
- `search_hits` searches an index with a query embedding, leaving the query's own item out (the service uses it);
  `search_image` embeds a query image first and builds the results; `retrieve_and_draw` is the `mproxy
  retrieve` job: the picture (`plots.draw_results`) and `results.json`.
"""
from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from momentum_proxy.config import DEFAULT_TTA, check_tta, parse_memory
from momentum_proxy.data.manifest import MANIFEST, read_manifest
from momentum_proxy.data.prepare import IMAGE_EXTS
from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.distributed import ends_process_group
from momentum_proxy.embedding.inference import embed_files
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import check_writable_folder, file_sha256, write_json
from momentum_proxy.paths import milvus_location
from momentum_proxy.plots import MAX_DRAWN, draw_results
from momentum_proxy.retrieval import shards
from momentum_proxy.retrieval.faiss_store import IVF_KINDS, KINDS, FaissStore, format_bytes, plan_index
from momentum_proxy.retrieval.hits import Hit, judged
from momentum_proxy.retrieval.rerank import Rerank, rerank_store, store_neighbours
from momentum_proxy.retrieval.shards import CHUNK_SIZE
from momentum_proxy.retrieval.store import UNKNOWN, IndexStore, check_mix, recall_text
from momentum_proxy.retrieval.stores import build_store, describe, local_folder, open_store, store_exists, writer_lock
from momentum_proxy.runs import EMBEDDINGS, RunDir, load_embeddings, model_identity

SPLITS = ("test", "val", "train", "all")
MODEL_KEYS = ("backbone", "feature_dim", "checkpoint_sha256")  # what must match; the run's path may differ


@dataclass
class Retrieval:
    """A query's results and what was searched."""

    query: Path
    label: int | None
    label_name: str | None
    results: list[Hit]
    collection: str
    requested_k: int
    copies: set[int] = field(default_factory=set)  # ids of results whose file holds the query's very bytes
    about: str = ""  # a saved index's kind and recall against exact search, in words

    def marks(self) -> list[str]:
        """Per result, what the printed list says of it beyond its class: a copy of the query, same or other class."""
        verdict = {True: "  same class", False: "  other class", None: ""}
        return [("  (the query image itself)" if h.id in self.copies else "") + verdict[h.same_class]
                for h in self.results]


def describe_change(built: dict, now: dict) -> str | None:
    """In words, why an index built with model `built` does not fit the model `now` (None when it does)."""
    if built.get("backbone") != now["backbone"]:
        return f"it was built with backbone {built.get('backbone')}, the run uses {now['backbone']}"
    if built.get("feature_dim") != now["feature_dim"]:
        return f"it holds {built.get('feature_dim')}-d features, the run makes {now['feature_dim']}-d"
    if built.get("checkpoint_sha256") != now["checkpoint_sha256"]:
        epochs = f"epoch {built.get('checkpoint_epoch', '?')} -> {now['checkpoint_epoch']}"
        if built.get("run") != now["run"]:
            return f"it was built with another run's model ({built.get('run')}, {epochs})"
        return f"the run's best checkpoint changed since this index was built ({epochs}; retrained?)"
    return None


def rebuild_hint(run_dir, index_dir, sources) -> str:
    images = f" --images {sources[0]}" if len(sources) == 1 else ""
    return f"mproxy index {run_dir} --out {index_dir}{images} --rebuild"


def check_model(index_dir, index: IndexStore, identity: dict, run_dir) -> None:
    """Refuse an index that the run's model did not build, saying what changed and how to rebuild."""
    change = describe_change({**index.model, "feature_dim": index.feature_dim}, identity)
    if change:
        raise UserError(f"the index {index_dir} is stale: {change}; rebuild it with "
                        f"`{rebuild_hint(run_dir, index_dir, index.sources)}`")


def index_tta(index_dir, built_with: dict, asked: str | None) -> str:
    """The test-time augmentation to embed with for the index whose model dict is `built_with`: the one it was
    built with (`asked` None), refused in one line when `asked` is another (its vectors would not compare)."""
    check_tta(asked)
    built = built_with.get("tta", "none")  # indexes from before --tta: none
    if asked not in (None, built):
        raise UserError(f"the index {index_dir} was built with --tta {built}; search or extend it with --tta {built} "
                        f"(the default), or rebuild it with --tta {asked} --rebuild")
    return built


def check_database_tta(database, tta: str) -> None:
    """Refuse test-time augmentation over an embeddings file: it records none (training embeds without)."""
    if database is not None and tta != "none":
        raise UserError(f"--tta {tta} needs the searched images embedded the same way; the embeddings file "
                        f"{database} was not (search the run's split, which is then embedded with --tta {tta})")


def open_index(index_dir: str | Path, run_dir: str | Path | None = None,
               mmap: bool = False) -> tuple[IndexStore, str]:
    """A saved index (a folder or a Milvus location) and the run whose model built it (`run_dir`, else the run
    recorded in the index), refused with a worded reason when that model changed since. `mmap`: a faiss ivf or
    ivfpq index's lists stay in its file, mapped (`faiss_store.FaissStore.load`)."""
    index = open_store(index_dir, mmap=mmap)
    try:
        run_dir = str(run_dir or index.model.get("run") or "")
        if not run_dir or not RunDir(run_dir).has_model():
            raise UserError(f"the run that built {index_dir} ({run_dir or 'unknown'}) is not available; "
                            "give it explicitly")
        check_model(index_dir, index, model_identity(run_dir), run_dir)
    except BaseException:
        index.close()
        raise
    return index, run_dir


LABEL_SOURCES = ("auto", "none", "folders")  # or the path of a CSV file


def collect_images(source: str | Path, labels: str = "auto") -> tuple[list[str], list[int] | None, dict[int, str]]:
    """Absolute image paths, their labels (or None) and class names, of a prepared dataset or of every image file
    below a folder.

    `labels`: `auto` takes a prepared dataset's classes, or the sub-folder names of a folder of class folders
    (every image one level down); `folders` the first sub-folder below `source` (images directly in it: unknown
    class); `none` no classes; anything else is a CSV file of `path,class_name` lines (paths relative to `source`
    or absolute; a header line `path,class_name` is allowed; unlisted images: unknown class)."""
    source = Path(source).absolute()
    if labels not in LABEL_SOURCES and not Path(labels).is_file():
        raise UserError(f"--labels must be auto, none, folders or a CSV file; not found: {labels}")
    if (source / MANIFEST).exists():
        df = read_manifest(source).drop_duplicates("path")
        paths = [os.path.normpath(source / p) for p in df["path"]]
        if labels in ("auto", "folders"):
            classes = dict(zip(df["label"].astype(int), df["class_name"]))
            return paths, df["label"].astype(int).tolist(), classes
    else:
        if not source.is_dir():
            raise UserError(f"image folder not found: {source}")
        paths = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not paths:
            raise UserError(f"no images found in {source}")
    if labels == "none":
        return paths, None, {}
    if labels in ("auto", "folders"):
        parts = [Path(p).relative_to(source).parts for p in paths]
        if labels == "auto" and not all(len(p) == 2 for p in parts):
            return paths, None, {}
        names = [p[0] if len(p) > 1 else None for p in parts]
    else:
        names = _csv_classes(Path(labels), source, paths)
    classes = {i: name for i, name in enumerate(sorted({n for n in names if n is not None}))}
    label_of = {name: i for i, name in classes.items()}
    return paths, [label_of.get(n, UNKNOWN) for n in names], classes


def _csv_classes(csv_file: Path, source: Path, paths: list[str]) -> list[str | None]:
    """The class name of each of `paths` from a `path,class_name` CSV file (None where not listed)."""
    named = {}
    with open(csv_file, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if number == 1 and [c.strip() for c in row] == ["path", "class_name"] or not row:
                continue
            if len(row) != 2 or not row[1].strip():
                raise UserError(f"{csv_file}:{number}: expected 'path,class_name', got {','.join(row)!r}")
            named[os.path.normpath(source / row[0].strip())] = row[1].strip()
    if not named.keys() & set(paths):
        raise UserError(f"{csv_file} names none of the images below {source}")
    return [named.get(p) for p in paths]


def _labels_for(index: IndexStore, labels, classes: dict[int, str], n: int) -> list | None:
    """Labels of new items in the index's numbering: by class name, UNKNOWN for unlabelled images."""
    if labels is None:
        return [UNKNOWN] * n if index.labelled else None
    mapping = {y: index.label_for(name) for y, name in classes.items()}
    return [mapping.get(y, UNKNOWN) for y in labels]


@dataclass
class Collection:
    """Images to index: absolute paths, labels (or None) named by `classes`, and the folders they came from."""

    paths: list[str]
    labels: list[int] | None
    classes: dict[int, str]
    sources: list[str]


def images_to_index(images: str | Path | None, out, rebuild: bool, labels: str = "auto") -> Collection:
    """What `build_index` embeds: the images below `images` (classes as `collect_images`'s `labels` says), or,
    for a rebuild without them, the index's own live items."""
    if images is not None:
        return Collection(*collect_images(images, labels), [str(Path(images).absolute())])
    if not (rebuild and store_exists(out)):
        raise UserError("give the images to index with --images or --list (only --rebuild of an existing index may "
                        "omit them)")
    old = open_store(out)
    try:
        live = old.live_items()
    finally:
        old.close()
    if not live:
        raise UserError(f"the index {out} has no items to rebuild from; give --images")
    labels = [UNKNOWN if it["label"] is None else it["label"] for it in live] if old.labelled else None
    return Collection([it["path"] for it in live], labels, old.classes, list(old.sources))


LIST_CHUNK = 4096  # lines of an image list embedded and added at a time


def read_image_list(list_file: str | Path, chunk: int = LIST_CHUNK):
    """The images of a list file, `chunk` lines at a time, as `Collection`s, and the lines that name no image, as
    (line, reason) pairs in the last place of each yielded pair. A line is `path` or `path,class_name` (CSV; a
    header line `path` or `path,class_name` is allowed; paths relative to the file's folder or absolute; an empty
    class name: unknown class). Read as it is used: memory does not grow with the list."""
    list_file = Path(list_file).absolute()
    base, source = list_file.parent, [str(list_file)]
    with open(list_file, newline="", encoding="utf-8") as f:
        rows, bad = [], []
        for number, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            if not any(cells) or number == 1 and cells in (["path"], ["path", "class_name"]):
                continue
            if len(cells) > 2 or not cells[0]:
                bad.append((f"{list_file}:{number}", "expected 'path' or 'path,class_name'"))
            else:
                rows.append((os.path.normpath(base / cells[0]), cells[1] if len(cells) == 2 and cells[1] else None))
            if len(rows) == chunk:
                yield _listed(rows, source), bad
                rows, bad = [], []
        if rows or bad:
            yield _listed(rows, source), bad


def _listed(rows: list[tuple[str, str | None]], source: list[str]) -> Collection:
    """A chunk of a list file's (path, class name) rows as a Collection (labels None when no row names a class)."""
    classes = {i: name for i, name in enumerate(sorted({n for _, n in rows if n is not None}))}
    label_of = {name: i for i, name in classes.items()}
    labels = [label_of.get(n, UNKNOWN) for _, n in rows] if classes else None
    return Collection([p for p, _ in rows], labels, classes, source)


def build_index(run_dir: str | Path, images: str | Path | None, out: str | Path, *, kind: str | None = None,
                batch_size: int = 64, device: str = "auto", rebuild: bool = False, runtime: str = "torch",
                labels: str = "auto", tta: str | None = None, rerank: Rerank | None = None,
                image_list: str | Path | None = None, chunk_size: int = CHUNK_SIZE,
                max_memory: int | str | None = None) -> dict | None:
    """Embed `images` with the run's best model (in `runtime`) into the index at `out`: created, extended when
    present (paths already indexed are skipped; runtimes mix only as `retrieval.store.check_mix` allows), or, with
    `rebuild`, made anew (from `images`, or from the index's own items when `images` is None) and replacing the
    old one atomically. `labels` says where class names come from (see `collect_images`). `tta` (none | flip,
    `embedding.tta`) is recorded in the index's model; an index is extended with its own (None), a new or rebuilt
    one made with `tta` (None: `config.DEFAULT_TTA`). With `rerank`, the neighbour lists it needs are computed and
    saved with the index (`retrieval.rerank`), and later saves keep them up to date. `image_list` (instead of `images`) is a list
    file (see `read_image_list`), embedded and added a chunk at a time. Images that cannot be read, and list lines
    that name none, are listed in `skipped.json` (`stores.local_folder`).

    `kind` (exact | ivf | hnsw | ivfpq; None: exact) is the faiss index a new or rebuilt index gets; `max_memory`
    (bytes, or a size such as "2GB") lets `faiss_store.plan_index` choose it for the number of images and the
    model's feature size (or size the `kind` given), before anything is embedded. Either applies when the index is
    made, not when it is extended. An approximate index's recall@10 against exact search is measured (its search
    parameter tuned to reach `faiss_store.RECALL_TARGET`) and saved with it.

    Under torchrun (WORLD_SIZE > 1) the images are embedded by every rank, `chunk_size` to a resumable chunk file,
    and rank 0 fills the store (`retrieval.shards`); the other ranks return None."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    if image_list is not None and (images is not None or kind in IVF_KINDS):
        raise UserError("--list takes the place of --images" if images is not None else
                        "--list makes exact or hnsw indexes (ivf and ivfpq train their lists on every vector at "
                        "once)")
    if max_memory is not None:
        max_memory = parse_memory(max_memory)
        if milvus_location(out) is not None:
            raise UserError("--max-memory chooses a faiss index; a Milvus index searches exactly (FLAT) in "
                            "Milvus's own memory")
    if chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    info = shards.start()
    if info.enabled:
        return _build_sharded(info, chunk_size, run_dir, images, out, kind, batch_size, device, rebuild, runtime,
                              labels, tta, rerank, image_list, max_memory=max_memory)
    with writer_lock(out, "mproxy index", create=True):  # the folder checked before any expensive work
        return _build_index(run_dir, images, out, kind, batch_size, device, rebuild, runtime, labels, tta, rerank,
                            image_list, max_memory=max_memory)


@ends_process_group
def _build_sharded(info, chunk_size, run_dir, images, out, kind, batch_size, device, rebuild, runtime, labels, tta,
                   rerank, image_list, max_memory=None) -> dict | None:
    """`build_index` on a torchrun rank: rank 0 plans, embeds its share and fills the store, holding its lock; the
    other ranks embed theirs (`retrieval.shards`)."""
    device = shards.rank_device(device, info)
    folder = shards.work_folder(out)
    if not info.is_main:
        return shards.follow(info, run_dir, runtime, device, folder, batch_size)
    sharding = shards.Sharding(info, folder, chunk_size, batch_size)
    try:
        with writer_lock(out, f"mproxy index (rank 0 of {info.world_size})", create=True):
            return _build_index(run_dir, images, out, kind, batch_size, device, rebuild, runtime, labels, tta,
                                rerank, image_list, sharding, max_memory=max_memory)
    except Exception:
        sharding.abandon()
        raise


def _new_paths(index: IndexStore | None, steps) -> list[str]:
    """The images a build embeds, in order, each once: those of `steps` that `index` (None: a new one) lacks."""
    seen, todo = set(), []
    for step, _ in steps:
        indexed = index.ids_of(step.paths) if index is not None else {}
        for p in step.paths:
            if p not in indexed and p not in seen:
                seen.add(p)
                todo.append(p)
    return todo


def _build_index(run_dir, images, out, kind, batch_size, device, rebuild, runtime, labels, tta, rerank,
                 image_list, sharding: shards.Sharding | None = None, max_memory: int | None = None) -> dict:
    identity = model_identity(run_dir)
    existing = None
    if not rebuild and store_exists(out):
        existing = open_store(out)
        check_model(out, existing, identity, run_dir)
    if existing is not None:
        tta = index_tta(out, existing.model, tta)
    else:
        check_tta(tta)
        tta = tta or DEFAULT_TTA
    collection = None if image_list is not None else [(images_to_index(images, out, rebuild, labels), [])]

    def steps():  # (images, unlisted lines) a step at a time; a list file is read again on each call
        return read_image_list(image_list) if collection is None else collection

    plan = None
    if max_memory is not None and existing is None:  # chosen for the whole collection, before embedding it
        plan = plan_index(max(1, len(_new_paths(None, steps()))), identity["feature_dim"], max_memory, kind)
        if image_list is not None and plan.kind in IVF_KINDS:
            raise UserError(f"--max-memory {format_bytes(max_memory)} needs an {plan.kind} index here, which --list "
                            "cannot make (it trains its lists on every vector at once); index the images with "
                            "--images, or raise --max-memory")
    embedder = load_embedder(run_dir, runtime, device, tta)
    if existing is not None:
        existing.model["runtime"] = check_mix(existing.model, embedder.identity)
    if sharding is None:
        def embed(paths):
            return embed_files(embedder, paths, embedder.image_size, embedder.device, batch_size)

        def add(index, feats, paths, labels):
            index.add(feats, paths, labels)
    else:
        embed, add = sharding.embed(embedder, _new_paths(existing, steps())).take, sharding.add
    index, listed, new, added, skipped = existing, 0, 0, 0, []
    for todo, unlisted in steps():
        listed, skipped = listed + len(todo.paths), skipped + unlisted
        indexed = index.ids_of(todo.paths) if index is not None else {}
        todo_new = []
        for i, p in enumerate(todo.paths):
            if p not in indexed:
                indexed[p] = UNKNOWN  # a path listed twice is embedded once
                todo_new.append(i)
        feats, kept, bad = embed([todo.paths[i] for i in todo_new]) if todo_new else (None, [], [])
        new, added, skipped = new + len(todo_new), added + len(kept), skipped + bad
        by_path = dict(zip(todo.paths, todo.labels or []))
        labels = None if todo.labels is None else [by_path[p] for p in kept]
        if index is None and kept:
            index = build_store(out, feats, kept, labels, kind=kind or "exact", classes=todo.classes, plan=plan,
                                model={**identity, "runtime": runtime, "verified": embedder.identity["verified"],
                                       "tta": tta})
        elif kept:
            add(index, feats, kept, _labels_for(index, labels, todo.classes, len(kept)))
        if index is not None:
            index.sources += [s for s in todo.sources if s not in index.sources]
    if not listed:
        raise UserError(f"no images to index in {image_list or images}")
    if index is None:  # a new index, and not one image could be read (else those are reported, not fatal)
        raise UserError(f"none of the {new} images in {image_list or images} could be read")
    rerank = rerank.for_collection(len(index)) if rerank is not None else None
    if rerank is not None and rerank.list_size:
        store_neighbours(index, rerank.list_size + 1)  # one spare for a query's own item
    if isinstance(index, FaissStore) and index.kind in ("ivf", "hnsw") and added and (
            existing is not None or image_list is not None):  # measured at build on its first part only
        index.measure_recall(tune=True)
    index.save(out)
    if skipped:
        local_folder(out).mkdir(parents=True, exist_ok=True)
        write_json(local_folder(out) / "skipped.json", [{"path": p, "reason": r} for p, r in skipped])
    if sharding is not None:
        sharding.finish()  # the chunk files, once the store holds them
    summary = {"index": str(out), "kind": index.kind, "added": added,
               "already_indexed": listed - new, "total": len(index), "skipped": len(skipped),
               "classes": len(index.classes)}
    if index.kind != "exact":
        summary["params"] = index.params
    info = index.recall_info()
    summary["recall@10_vs_exact"] = None if info is None else info["recall"]
    summary["recall"] = recall_text(info, len(index))
    if isinstance(index, FaissStore):
        memory = index.memory_info()
        summary["memory"] = f"{format_bytes(memory['estimated_bytes'])} estimated" + (
            f" (--max-memory {format_bytes(memory['max_memory'])}: {memory['reason']})" if "reason" in memory else "")
    index.close()
    return summary


def search_hits(index: IndexStore, features: np.ndarray, k: int, *, query_path=None, query_id=None,
                min_score: float | None = None, rerank: Rerank | None = None,
                timing: dict | None = None) -> tuple[dict | None, list[Hit]]:
    """Top-k of one query embedding: (the query's item when it is indexed, its hits). The query's own item
    (given by id, or by path) is not among its results, as in `mproxy retrieve`. `rerank` re-ranks over every
    live item (`retrieval.rerank`; the query's own item is left out of its database side too); `timing`, when
    given, receives the milliseconds it took ("rerank")."""
    exclude = set() if query_id is None else {query_id}
    if query_path is not None:
        exclude |= index.file_ids(Path(query_path))
    own = next((index.item(i) for i in sorted(exclude) if index.exists(i)), None)
    rerank = rerank.for_collection(len(index)) if rerank is not None else None
    if rerank is not None and rerank.active:
        start = time.perf_counter()
        found = rerank_store(index, features, k, rerank, exclude)
        if timing is not None:
            timing["rerank"] = 1000 * (time.perf_counter() - start)
    else:
        found = index.search(features, k, exclude=exclude)
    hits = index.hits(*found)[0]
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return own, hits


def run_index(run_dir: str | Path, embedder, split: str = "test",
              database: str | Path | None = None) -> tuple[FaissStore, str]:
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
            parts.append(load_embeddings(RunDir(run_dir) / EMBEDDINGS) if tta == "none"
                         else _embed_splits(cfg.data, embedder, ["test"]))
        if split != "test":
            parts.append(_embed_splits(cfg.data, embedder, ["train", "val"] if split == "all" else [split]))
        names = {"test": "the test split", "val": "the val split", "train": "the train split", "all": "all splits"}
        what = f"{names[split]} of {Path(cfg.data).name} ({sum(len(p['paths']) for p in parts)} images)"
    features = np.concatenate([p["features"] for p in parts])
    if features.shape[1] != embedder.feature_dim:
        raise UserError(f"the database holds {features.shape[1]}-d features, the model makes "
                        f"{embedder.feature_dim}-d")
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
    feats, kept, _ = embed_files(embedder, paths, embedder.image_size, embedder.device)
    keep = np.isin(paths, kept)
    return {"features": feats, "labels": df["label"].to_numpy()[keep], "paths": np.asarray(kept),
            "class_names": df["class_name"].to_numpy()[keep]}


def search_image(index: IndexStore, embedder, query: str | Path, k: int, collection: str,
                 rerank: Rerank | None = None) -> Retrieval:
    """Top-k of a query image in `index`, embedded by `embedder`, re-ranked by `rerank`; the query's own item is
    left out. (Its callers `check_query` first, before a model is loaded.)"""
    query = Path(query)
    feats, _, skipped = embed_files(embedder, [query], embedder.image_size, embedder.device)
    if skipped:
        raise UserError(f"cannot read query image {query}: {skipped[0][1]}")
    own, hits = search_hits(index, feats, k, query_path=query, rerank=rerank)
    label = own["label"] if own else None
    results = judged(hits, label)
    return Retrieval(query, label, own["class_name"] if own else None, results, collection, k, copies(query, hits))


def copies(query: Path, hits: list[Hit]) -> set[int]:
    """Ids of the hits whose image file is a byte-for-byte copy of `query` (only near-1 scores are read)."""
    size, digest = query.stat().st_size, None
    found = set()
    for h in hits:
        if h.score > 0.999 and os.path.isfile(h.path) and os.path.getsize(h.path) == size:
            digest = digest or file_sha256(query)
            if file_sha256(h.path) == digest:
                found.add(h.id)
    return found


def retrieve(run_dir: str | Path, query: str | Path, k: int = 8, *, database: str | Path | None = None,
             split: str = "test", device: str = "auto", runtime: str = "torch", tta: str = "none",
             rerank: Rerank | None = None) -> Retrieval:
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


def retrieve_and_draw(query: str | Path, k: int, out_dir: str | Path | None = None, *, run_dir: str | None = None,
                      index_dir: str | None = None, data_base: str | None = None, split: str = "test",
                      device: str = "auto", runtime: str = "torch", tta: str | None = None,
                      rerank: Rerank | None = None) -> tuple[Retrieval, Path]:
    """`mproxy retrieve`: search a saved index (`index_dir`, with the run that built it, or `run_dir`), else the
    run's embeddings of `split` (`data_base`: the original tool's run folder or embeddings file), and write
    `out_dir` (default: INDEX/retrieval or RUN/retrieval) /retrieval.png + results.json. The query is embedded
    with `tta` (None: the index's own, else none; see `index_tta`); `rerank` re-ranks the results (an index's saved
    neighbour lists are used, else computed in memory)."""
    check_query(query, k)
    check_tta(tta)
    if index_dir:
        index, run_dir = open_index(index_dir, run_dir)
        tta = index_tta(index_dir, index.model, tta)
        identity = index.model  # open_index checked that it is the run's current checkpoint
        collection = f"the index {index_dir}"
        extra = {"index": {"path": describe(index_dir), "kind": index.kind, "items": len(index),
                           "params": index.params, "recall": index.recall_info()}}
        about = f"{index.kind} index, {recall_text(index.recall_info(), len(index))}"
    else:
        run_dir, database = resolve_database(run_dir, data_base)
        identity, extra, tta = model_identity(run_dir), {}, tta or "none"
        check_database_tta(database, tta)
        about = ""
    out_dir = Path(out_dir or (local_folder(index_dir) if index_dir else Path(run_dir)) / "retrieval")
    check_writable_folder(out_dir, "the output folder")
    embedder = load_embedder(run_dir, runtime, device, tta)
    if index_dir:
        check_mix(index.model, embedder.identity)
    else:
        index, collection = run_index(run_dir, embedder, split, database)
    r = search_image(index, embedder, query, k, collection, rerank)
    r.about = about
    model = {"run": str(Path(run_dir).resolve()), "runtime": runtime, "tta": tta,
             **{key: identity.get(key) for key in ("backbone", "checkpoint_sha256", "checkpoint_epoch")}}
    rerank_dict = rerank.to_dict() if rerank is not None else {"method": "none"}
    return r, save_retrieval(r, out_dir, {"model": model, "rerank": rerank_dict, **extra})


def save_retrieval(r: Retrieval, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `out_dir/retrieval.png` and `out_dir/results.json`; return the picture's path. The picture shows the
    first `plots.MAX_DRAWN` results (results.json and the printed list hold all). Results whose image file is
    missing are kept in results.json (`missing`), left out of the picture, and reported on stderr."""
    rows = [{**res.to_dict(), "query_itself": res.id in r.copies, "missing": not os.path.isfile(res.path)}
            for res in r.results]
    missing = [row["path"] for row in rows if row["missing"]]
    if missing:
        print(f"mproxy: warning: {len(missing)} of {len(rows)} result images are missing (moved or deleted?), "
              f"e.g. {missing[0]}; they are listed in results.json, not drawn", file=sys.stderr)
    out_dir = Path(out_dir)
    shown = [res for res, row in zip(r.results, rows) if not row["missing"]][:MAX_DRAWN]
    title = f"top {len(rows)} in {r.collection}" + (f" (first {len(shown)} drawn)" if len(shown) < len(rows) else "")
    png = draw_results(r.query, shown, out_dir / "retrieval.png", r.label, title=title, label_name=r.label_name)
    write_json(out_dir / "results.json", {"query": str(r.query), "query_label": r.label,
                                          "query_class_name": r.label_name, "searched": r.collection,
                                          "k": len(rows), "requested_k": r.requested_k, **(extra or {}),
                                          "results": rows})
    return png


def resolve_database(run_dir: str | None, data_base: str | None) -> tuple[str, Path | None]:
    """(run folder, database .npz or None) from a run folder and/or the original tool's `--data_base`
    (a run folder or its embeddings file)."""
    database = None
    if data_base:
        db = Path(data_base)
        if db.is_dir():
            run_dir = run_dir or str(db)
        else:
            database = db
            run_dir = run_dir or str(db.parent)
    if not run_dir:
        raise UserError("give a run folder (or --data_base, or --index)")
    return run_dir, database


def ranked_list(r: Retrieval) -> str:
    """The results as text lines: rank, similarity, class, path, and marks (a copy of the query; same or other
    class when the query's class is known)."""
    return "\n".join(f"#{h.rank:<3d} {h.score:.3f}  {class_text(h)}  {h.path}{mark}"
                     for h, mark in zip(r.results, r.marks()))


def class_text(hit: Hit) -> str:
    """How printed lists show a hit's class: its name, else its label, else `-` (unknown)."""
    return hit.class_name or ("-" if hit.label is None else f"class {hit.label}")
