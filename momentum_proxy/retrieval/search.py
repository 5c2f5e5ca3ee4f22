"""Retrieval with a run's model, one search path for every caller.

- `build_index` embeds an image collection into a saved faiss index (`retrieval.faiss_store.FaissStore`), or extends or
  rebuilds one; `open_index` opens a saved index with the run whose model built it (refusing a stale one).
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from momentum_proxy.data.manifest import MANIFEST, read_manifest
from momentum_proxy.data.prepare import IMAGE_EXTS
from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.embedding.inference import embed_files
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import check_writable_folder, file_sha256, folder_lock, write_json
from momentum_proxy.plots import MAX_DRAWN, draw_results
from momentum_proxy.retrieval.faiss_store import KINDS, META_FILE, UNKNOWN, WRITER_LOCK, FaissStore, read_meta
from momentum_proxy.retrieval.hits import Hit, judged
from momentum_proxy.retrieval.store import check_mix
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

    def marks(self) -> list[str]:
        """Per result, what the printed list says of it beyond its class: a copy of the query, same or other class."""
        verdict = {True: "  same class", False: "  other class", None: ""}
        return [("  (the query image itself)" if h.id in self.copies else "") + verdict[h.same_class]
                for h in self.results]


def is_query(query: Path, paths) -> np.ndarray:
    """Which database paths are the query's own file (a query from the database is not its own result)."""
    target = str(query.resolve())
    return np.array([str(Path(p).resolve()) == target for p in paths], dtype=bool)


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


def check_model(index_dir, meta: dict, identity: dict, run_dir) -> None:
    """Refuse an index that the run's model did not build, saying what changed and how to rebuild."""
    built = {**meta["model"], "feature_dim": meta["feature_dim"]}
    change = describe_change(built, identity)
    if change:
        raise UserError(f"the index {index_dir} is stale: {change}; rebuild it with "
                        f"`{rebuild_hint(run_dir, index_dir, meta.get('sources', []))}`")


def open_index(index_dir: str | Path, run_dir: str | Path | None = None) -> tuple[FaissStore, str]:
    """A saved index and the run whose model built it (`run_dir`, else the run recorded in the index),
    refused with a worded reason when that model changed since."""
    meta = read_meta(index_dir)
    run_dir = str(run_dir or meta["model"].get("run") or "")
    if not run_dir or not RunDir(run_dir).has_model():
        raise UserError(f"the run that built {index_dir} ({run_dir or 'unknown'}) is not available; "
                        "give it explicitly")
    check_model(index_dir, meta, model_identity(run_dir), run_dir)
    return FaissStore.load(index_dir), run_dir


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


def _labels_for(index: FaissStore, labels, classes: dict[int, str], n: int) -> list | None:
    """Labels of new items in the index's numbering: by class name, UNKNOWN for unlabelled images."""
    if labels is None:
        return None if index.labels is None else [UNKNOWN] * n
    mapping = {y: index.label_for(name) for y, name in classes.items()}
    return [mapping.get(y, UNKNOWN) for y in labels]


@dataclass
class Collection:
    """Images to index: absolute paths, labels (or None) named by `classes`, and the folders they came from."""

    paths: list[str]
    labels: list[int] | None
    classes: dict[int, str]
    sources: list[str]


def images_to_index(images: str | Path | None, out: Path, rebuild: bool, labels: str = "auto") -> Collection:
    """What `build_index` embeds: the images below `images` (classes as `collect_images`'s `labels` says), or,
    for a rebuild without them, the index's own live items."""
    if images is not None:
        return Collection(*collect_images(images, labels), [str(Path(images).absolute())])
    if not (rebuild and (out / META_FILE).exists()):
        raise UserError("give the images to index with --images (only --rebuild of an existing index may omit them)")
    old = FaissStore.load(out)
    live = [i for i in range(old.ntotal) if old.exists(i)]
    if not live:
        raise UserError(f"the index {out} has no items to rebuild from; give --images")
    labels = None if old.labels is None else [old.labels[i] for i in live]
    return Collection([old.paths[i] for i in live], labels, old.classes, list(old.sources))


def build_index(run_dir: str | Path, images: str | Path | None, out: str | Path, *, kind: str = "exact",
                batch_size: int = 64, device: str = "auto", rebuild: bool = False, runtime: str = "torch",
                labels: str = "auto") -> dict:
    """Embed `images` with the run's best model (in `runtime`) into the index at `out`: created, extended when
    present (paths already indexed are skipped; runtimes mix only as `retrieval.store.check_mix` allows), or, with
    `rebuild`, made anew (from `images`, or from the index's own items when `images` is None) and replacing the
    old one atomically. `labels` says where class names come from (see `collect_images`)."""
    if kind not in KINDS:
        raise UserError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    out = Path(out)
    check_writable_folder(out, "the index folder")  # before any expensive work
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, WRITER_LOCK, "being written", "mproxy index"):
        return _build_index(run_dir, images, out, kind, batch_size, device, rebuild, runtime, labels)


def _build_index(run_dir, images, out: Path, kind, batch_size, device, rebuild, runtime, labels) -> dict:
    identity = model_identity(run_dir)
    existing = None
    if (out / META_FILE).exists() and not rebuild:
        check_model(out, read_meta(out), identity, run_dir)
        existing = FaissStore.load(out)
    todo = images_to_index(images, out, rebuild, labels)
    if not todo.paths:
        raise UserError(f"no images to index in {images}")
    new = [i for i, p in enumerate(todo.paths) if existing is None or p not in existing.path_ids]
    embedder = load_embedder(run_dir, runtime, device)
    mixed = check_mix(existing.model, embedder.identity) if existing is not None else runtime
    feats, kept, skipped = embed_files(embedder, [todo.paths[i] for i in new], embedder.image_size,
                                       embedder.device, batch_size) if new else (None, [], [])
    if new and not kept:
        raise UserError(f"none of the {len(new)} images in {images} could be read")
    by_path = dict(zip(todo.paths, todo.labels or []))
    labels = None if todo.labels is None else [by_path[p] for p in kept]
    if existing is None:
        index = FaissStore.build(feats, kept, labels, kind=kind, classes=todo.classes,
                                     model={**identity, "runtime": runtime, "verified": embedder.identity["verified"]})
    else:
        index = existing
        index.model["runtime"] = mixed
        if kept:
            index.add(feats, kept, _labels_for(index, labels, todo.classes, len(kept)))
    index.sources += [s for s in todo.sources if s not in index.sources]
    index.save(out)
    if skipped:
        write_json(out / "skipped.json", [{"path": p, "reason": r} for p, r in skipped])
    summary = {"index": str(out), "kind": index.kind, "added": len(kept),
               "already_indexed": len(todo.paths) - len(new), "total": len(index), "skipped": len(skipped),
               "classes": len(index.classes)}
    if index.kind != "exact":
        summary["recall@10_vs_exact"] = round(index.recall_vs_exact(10), 4)
    return summary


def search_hits(index: FaissStore, features: np.ndarray, k: int, *, query_path=None, query_id=None,
                min_score: float | None = None) -> tuple[dict | None, list[Hit]]:
    """Top-k of one query embedding: (the query's item when it is indexed, its hits). The query's own item
    (given by id, or by path) is not among its results, as in `mproxy retrieve`."""
    exclude = set() if query_id is None else {query_id}
    if query_path is not None:
        exclude |= {int(i) for i in np.flatnonzero(is_query(Path(query_path), index.paths))}
    own = next((index.item(i) for i in sorted(exclude) if index.exists(i)), None)
    hits = index.hits(*index.search(features, k, exclude=exclude))[0]
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return own, hits


def run_index(run_dir: str | Path, embedder, split: str = "test",
              database: str | Path | None = None) -> tuple[FaissStore, str]:
    """(an exact in-memory index, its description) of the run's test embeddings (embeddings.npz, or another
    `database` .npz), plus, for `split` train, val or all, those images of the run's dataset embedded now by
    `embedder` (the run's model)."""
    cfg = RunDir(run_dir).config()
    if split not in SPLITS:
        raise UserError(f"unknown --split {split!r}; choose from {', '.join(SPLITS)}")
    if database is not None:
        parts, what = [load_embeddings(database)], f"database {database}"
    else:
        parts = [load_embeddings(RunDir(run_dir) / EMBEDDINGS)] if split in ("test", "all") else []
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


def search_image(index: FaissStore, embedder, query: str | Path, k: int, collection: str) -> Retrieval:
    """Top-k of a query image in `index`, embedded by `embedder`; the query's own item is left out. (Its callers
    `check_query` first, before a model is loaded.)"""
    query = Path(query)
    feats, _, skipped = embed_files(embedder, [query], embedder.image_size, embedder.device)
    if skipped:
        raise UserError(f"cannot read query image {query}: {skipped[0][1]}")
    own, hits = search_hits(index, feats, k, query_path=query)
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
             split: str = "test", device: str = "auto", runtime: str = "torch") -> Retrieval:
    """Top-k of `query` among the run's embeddings of `split` (or another `database` .npz); the query itself
    is excluded. `runtime` (torch | onnx) embeds (see `deploy.runtimes.load_embedder`)."""
    check_query(query, k)
    embedder = load_embedder(run_dir, runtime, device)
    index, collection = run_index(run_dir, embedder, split, database)
    return search_image(index, embedder, query, k, collection)


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
                      device: str = "auto", runtime: str = "torch") -> tuple[Retrieval, Path]:
    """`mproxy retrieve`: search a saved index (`index_dir`, with the run that built it, or `run_dir`), else the
    run's embeddings of `split` (`data_base`: the original tool's run folder or embeddings file), and write
    `out_dir` (default: INDEX/retrieval or RUN/retrieval) /retrieval.png + results.json."""
    check_query(query, k)
    if index_dir:
        index, run_dir = open_index(index_dir, run_dir)
        identity = index.model  # open_index checked that it is the run's current checkpoint
        collection = f"the index {index_dir}"
        extra = {"index": {"path": str(Path(index_dir).absolute()), "kind": index.kind, "items": len(index)}}
    else:
        run_dir, database = resolve_database(run_dir, data_base)
        identity, extra = model_identity(run_dir), {}
    out_dir = Path(out_dir or Path(index_dir or run_dir) / "retrieval")
    check_writable_folder(out_dir, "the output folder")
    embedder = load_embedder(run_dir, runtime, device)
    if index_dir:
        check_mix(index.model, embedder.identity)
    else:
        index, collection = run_index(run_dir, embedder, split, database)
    r = search_image(index, embedder, query, k, collection)
    model = {"run": str(Path(run_dir).resolve()), "runtime": runtime,
             **{key: identity.get(key) for key in ("backbone", "checkpoint_sha256", "checkpoint_epoch")}}
    return r, save_retrieval(r, out_dir, {"model": model, **extra})


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
