"""Index jobs: `build_index` embeds a collection (`retrieval.collect`) into a saved index (a faiss folder or a
Milvus store: `retrieval.stores`), or extends or rebuilds one, sharded under torchrun (`retrieval.shards`);
`open_index` opens a saved index with the run whose model built it, refusing a stale one in one worded line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from momentum_proxy.config import DEFAULT_TTA, check_tta, parse_memory
from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.distributed import ends_process_group
from momentum_proxy.embedding.inference import embed_files
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import file_sha256, write_json
from momentum_proxy.paths import milvus_location
from momentum_proxy.retrieval import shards
from momentum_proxy.retrieval.calibrate import calibrate_store, close_match_text, stored_close_match
from momentum_proxy.retrieval.collect import Collection, Unlisted, images_to_index, read_image_list
from momentum_proxy.retrieval.faiss_store import IVF_KINDS, KINDS, IndexPlan, format_bytes, plan_index
from momentum_proxy.retrieval.rerank import Rerank, prepare_store
from momentum_proxy.retrieval.shards import CHUNK_SIZE
from momentum_proxy.retrieval.store import UNKNOWN, IndexStore, check_mix, recall_text
from momentum_proxy.retrieval.stores import build_store, local_folder, open_store, store_exists, writer_lock
from momentum_proxy.runs import RunDir, model_identity


def describe_change(built: dict, now: dict) -> str | None:
    """In words, why an index built with model `built` does not fit the model `now` (None when it does)."""
    if built.get("backbone") != now["backbone"]:
        return f"it was built with backbone {built.get('backbone')}, the run uses {now['backbone']}"
    if built.get("feature_dim") != now["feature_dim"]:
        return f"it holds {built.get('feature_dim')}-d features, the run makes {now['feature_dim']}-d"
    if built.get("checkpoint_sha256") != now["checkpoint_sha256"]:
        was, epoch = f"epoch {built.get('checkpoint_epoch', '?')} of {built.get('run')}", now["checkpoint_epoch"]
        if built.get("run") != now["run"]:
            return f"it was built from {was}, not by {now['run']} (epoch {epoch})"
        again = " (another checkpoint of that epoch: retrained?)" if built.get("checkpoint_epoch") == epoch else ""
        return f"it was built from {was}, whose best checkpoint is now epoch {epoch}{again}"
    return None


def stale_fix(run_dir, index_dir, sources, built_by) -> str:
    """How to fix a stale index without losing anything: the run that built it, else (its own run, retrained:
    the old model is gone) a rebuild."""
    images = f" --images {sources[0] if len(sources) == 1 else 'DIR'}"
    if built_by and str(Path(run_dir).resolve()) != built_by:
        return (
            f"search or extend it with the run that built it ({built_by}: the run argument, or serve's --run), "
            f"or index with this run into a new folder: `mproxy index {run_dir} --out NEW_FOLDER{images}`"
        )
    return f"rebuild it with `mproxy index {run_dir} --out {index_dir}{images} --rebuild`"


def check_model(index_dir, index: IndexStore, identity: dict, run_dir) -> None:
    """Refuse an index that the run's model did not build, saying what changed and how to fix it."""
    change = describe_change({**index.model, "feature_dim": index.feature_dim}, identity)
    if change:
        raise UserError(
            f"the index {index_dir} is stale: {change}; "
            f"{stale_fix(run_dir, index_dir, index.sources, index.model.get('run'))}"
        )


def index_tta(index_dir, built_with: dict, asked: str | None) -> str:
    """The test-time augmentation to embed with for the index whose model dict is `built_with`: the one it was
    built with (`asked` None), refused in one line when `asked` is another (its vectors would not compare)."""
    check_tta(asked)
    built = built_with.get("tta", "none")  # indexes from before --tta: none
    if asked not in (None, built):
        raise UserError(
            f"the index {index_dir} was built with --tta {built}; search or extend it with --tta {built} "
            f"(the default), or rebuild it with --tta {asked} --rebuild"
        )
    return built


def open_index(index_dir: str | Path, run_dir: str | Path | None = None, mmap: bool = False) -> tuple[IndexStore, str]:
    """A saved index (a folder or a Milvus location) and the run whose model built it (`run_dir`, else the run
    recorded in the index), refused with a worded reason when that model changed since. `mmap`: a faiss ivf or
    ivfpq index's lists stay in its file, mapped (`faiss_store.FaissStore.load`)."""
    index = open_store(index_dir, mmap=mmap)
    try:
        run_dir = str(run_dir or index.model.get("run") or "")
        if not run_dir or not RunDir(run_dir).has_model():
            raise UserError(
                f"the run that built {index_dir} ({run_dir or 'unknown'}) is not available; give it explicitly"
            )
        check_model(index_dir, index, model_identity(run_dir), run_dir)
    except BaseException:
        index.close()
        raise
    return index, run_dir


def build_index(
    run_dir: str | Path,
    images: str | Path | None,
    out: str | Path,
    *,
    kind: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    rebuild: bool = False,
    runtime: str = "torch",
    labels: str = "auto",
    tta: str | None = None,
    rerank: Rerank | None = None,
    image_list: str | Path | None = None,
    chunk_size: int = CHUNK_SIZE,
    max_memory: int | str | None = None,
) -> dict | None:
    """Embed `images` with the run's best model (in `runtime`) into the index at `out`: created, extended when
    present (paths already indexed are skipped; runtimes mix only as `retrieval.store.check_mix` allows), or, with
    `rebuild`, made anew (from `images`, or from the index's own items when `images` is None) and replacing the
    old one atomically. `labels` says where class names come from (see `collect.collect_images`). `tta` (none |
    flip, `embedding.tta`) is recorded in the index's model; an index is extended with its own (None), a new or
    rebuilt one made with `tta` (None: `config.DEFAULT_TTA`). With `rerank`, the neighbour lists it needs are
    computed and saved with the index (`retrieval.rerank`), and later saves keep them up to date. `image_list`
    (instead of `images`) is a list file (see `collect.read_image_list`), embedded and added a chunk at a time.
    Images that cannot be read, and list lines that name none, are listed in `skipped.json`
    (`stores.local_folder`).

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
        raise UserError(
            "--list takes the place of --images"
            if images is not None
            else "--list makes exact or hnsw indexes (ivf and ivfpq train their lists on every vector at once)"
        )
    if max_memory is not None:
        max_memory = parse_memory(max_memory)
        if milvus_location(out) is not None:
            raise UserError(
                "--max-memory chooses a faiss index; a Milvus index searches exactly (FLAT) in Milvus's own memory"
            )
    if chunk_size < 1:
        raise UserError("--chunk-size must be at least 1")
    job: dict[str, Any] = dict(  # _build_index's arguments
        run_dir=run_dir,
        images=images,
        out=out,
        kind=kind,
        batch_size=batch_size,
        device=device,
        rebuild=rebuild,
        runtime=runtime,
        labels=labels,
        tta=tta,
        rerank=rerank,
        image_list=image_list,
        max_memory=max_memory,
    )
    info = shards.start()
    if info.enabled:
        return _build_sharded(info, chunk_size, job)
    with writer_lock(out, "mproxy index", create=True):  # the folder checked before any expensive work
        return _build_index(**job)


@ends_process_group
def _build_sharded(info, chunk_size: int, job: dict[str, Any]) -> dict | None:
    """`build_index` on a torchrun rank: rank 0 plans, embeds its share and fills the store, holding its lock; the
    other ranks embed theirs (`retrieval.shards`). `job`: `_build_index`'s arguments."""
    job = {**job, "device": shards.rank_device(job["device"], info)}
    folder = shards.work_folder(job["out"])
    if not info.is_main:
        shards.follow(info, job["run_dir"], job["runtime"], job["device"], folder, job["batch_size"])
        return None
    sharding = shards.Sharding(info, folder, chunk_size, job["batch_size"])
    try:
        with writer_lock(job["out"], f"mproxy index (rank 0 of {info.world_size})", create=True):
            return _build_index(**job, sharding=sharding)
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


def new_content(index: IndexStore | None, paths: list[str], seen: set[str]) -> dict[str, str | None]:
    """The sha256 of each of `paths` (None: unreadable, left to the embedding to report) whose content is neither
    in `index` nor in `seen` (the contents met so far, updated): a copy of an indexed image is not indexed again,
    nor is the second of two files with the same bytes."""
    hashes: dict[str, str | None] = {}
    for p in paths:
        try:
            hashes[p] = file_sha256(p)
        except OSError:
            hashes[p] = None
    known = index.content_ids({h for h in hashes.values() if h}) if index is not None else {}
    fresh: dict[str, str | None] = {}
    for p, h in hashes.items():
        if h is None:
            fresh[p] = h
        elif h not in known and h not in seen:
            fresh[p] = h
            seen.add(h)
    return fresh


Steps = Callable[[], Iterable[tuple[Collection, Unlisted]]]  # a build's images and unlisted lines, a step at a time


def _build_index(
    *,
    run_dir,
    images,
    out,
    kind,
    batch_size,
    device,
    rebuild,
    runtime,
    labels,
    tta,
    rerank,
    image_list,
    sharding: shards.Sharding | None = None,
    max_memory: int | None = None,
) -> dict:
    """`build_index`'s work under the store's writer lock: the index to extend (its model checked) or a plan for a
    new one, then each step of the collection embedded and added, the index saved and summed up."""
    identity = model_identity(run_dir)
    existing = None if rebuild or not store_exists(out) else open_store(out)
    if existing is not None:
        check_model(out, existing, identity, run_dir)
        tta = index_tta(out, existing.model, tta)
    else:
        check_tta(tta)
        tta = tta or DEFAULT_TTA
    collection: list[tuple[Collection, Unlisted]] | None = None
    if image_list is None:
        collection = [(images_to_index(images, out, rebuild, labels), [])]

    def steps() -> Iterable[tuple[Collection, Unlisted]]:  # a list file is read again on each call
        return read_image_list(image_list) if collection is None else collection

    plan = None
    if max_memory is not None and existing is None:
        plan = _plan(steps, identity["feature_dim"], max_memory, kind, listed=image_list is not None)
    embedder = load_embedder(run_dir, runtime, device, tta)
    if existing is not None:
        existing.model["runtime"] = check_mix(existing.model, embedder.identity)
    model = {**identity, "runtime": runtime, "verified": embedder.identity["verified"], "tta": tta}

    def make(features, paths, item_labels, classes):
        return build_store(
            out, features, paths, item_labels, kind=kind or "exact", classes=classes, plan=plan, model=model
        )

    if sharding is None:
        filler = _Filler(existing, make, lambda paths: embed_files(embedder, paths, batch_size), _add)
    else:
        filler = _Filler(existing, make, sharding.embed(embedder, _new_paths(existing, steps())).take, sharding.add)
    for todo, unlisted in steps():
        filler.step(todo, unlisted)
    index = _finished(filler, image_list or images, rerank, in_parts=existing is not None or image_list is not None)
    index.save(out)
    _report_skipped(out, filler.skipped)
    if sharding is not None:
        sharding.finish()  # the chunk files, once the store holds them
    summary = _summary(index, out, filler)
    index.close()
    return summary


def _plan(steps: Steps, feature_dim: int, max_memory: int, kind: str | None, listed: bool) -> IndexPlan:
    """The index that `max_memory` allows for the whole collection, chosen before any of it is embedded (`listed`:
    from a list file, which cannot make an ivf or ivfpq index)."""
    plan = plan_index(max(1, len(_new_paths(None, steps()))), feature_dim, max_memory, kind)
    if listed and plan.kind in IVF_KINDS:
        raise UserError(
            f"--max-memory {format_bytes(max_memory)} needs an {plan.kind} index here, which --list "
            "cannot make (it trains its lists on every vector at once); index the images with "
            "--images, or raise --max-memory"
        )
    return plan


def _add(index: IndexStore, features: np.ndarray, paths: list[str], labels: list | None) -> None:
    index.add(features, paths, labels)


class _Filler:
    """Fills a build's index a step at a time: each path once, no file whose bytes are indexed already (or met
    earlier in the build); `make(features, paths, labels, classes)` creates the index from the first images read
    when there is none, `add(index, features, paths, labels)` adds to it, `embed(paths)` is `embed_files`'s."""

    def __init__(self, index: IndexStore | None, make: Callable[..., IndexStore], embed: Callable, add: Callable):
        self.index, self.make, self.embed, self.add = index, make, embed, add
        self.listed = self.new = self.added = 0  # images listed, new to the index, added
        self.skipped: Unlisted = []  # (image or list line, reason)
        self.seen: set[str] = set()  # the contents met so far (`new_content`)

    def step(self, todo: Collection, unlisted: Unlisted) -> None:
        self.listed += len(todo.paths)
        self.skipped += unlisted
        indexed = self.index.ids_of(todo.paths) if self.index is not None else {}
        fresh = [p for p in dict.fromkeys(todo.paths) if p not in indexed]  # a path listed twice is embedded once
        hashes = new_content(self.index, fresh, self.seen)
        fresh = [p for p in fresh if p in hashes]
        feats, kept, bad = self.embed(fresh) if fresh else (None, [], [])
        self.new, self.added, self.skipped = self.new + len(fresh), self.added + len(kept), self.skipped + bad
        if kept:
            self._store(feats, kept, todo, hashes)
        if self.index is not None:
            self.index.sources += [s for s in todo.sources if s not in self.index.sources]

    def _store(self, features: np.ndarray, kept: list[str], todo: Collection, hashes: dict[str, str | None]) -> None:
        by_path = dict(zip(todo.paths, todo.labels or []))
        labels = None if todo.labels is None else [by_path[p] for p in kept]
        first = 0 if self.index is None else self.index.ntotal  # ids are given in order
        if self.index is None:
            self.index = self.make(features, kept, labels, todo.classes)
        else:
            self.add(self.index, features, kept, _labels_for(self.index, labels, todo.classes, len(kept)))
        self.index.record_hashes({first + j: h for j, p in enumerate(kept) if (h := hashes[p]) is not None})


def _finished(filler: _Filler, source, rerank: Rerank | None, in_parts: bool) -> IndexStore:
    """The filled index with the neighbour lists `rerank` needs, and an approximate one's recall measured again
    when it was built `in_parts` (extended, or from a list file: measured at build on its first part only)."""
    if not filler.listed:
        raise UserError(f"no images to index in {source}")
    index = filler.index
    if index is None:  # a new index, and not one image could be read (else those are reported, not fatal)
        raise UserError(f"none of the {filler.new} images in {source} could be read")
    if rerank is not None:
        prepare_store(index, rerank)  # its neighbour lists, or one line saying re-ranking is off and why
    calibrate_store(index)  # the page's "close match" threshold, from the labelled classes
    if index.kind in ("ivf", "hnsw") and filler.added and in_parts:
        index.measure_recall(tune=True)
    return index


def _report_skipped(out, skipped: list[tuple[str, str]]) -> None:
    """List the skipped images and list lines in `skipped.json` beside the index, and say so in one line."""
    if not skipped:
        return
    local_folder(out).mkdir(parents=True, exist_ok=True)
    write_json(local_folder(out) / "skipped.json", [{"path": p, "reason": r} for p, r in skipped])
    print(
        f"mproxy: warning: {len(skipped)} file(s) skipped (unreadable, or lines that name no image), e.g. "
        f"{skipped[0][0]}; the list is in {local_folder(out) / 'skipped.json'}",
        file=sys.stderr,
    )


def _summary(index: IndexStore, out, filler: _Filler) -> dict:
    """What `mproxy index` prints: the index, what was added, skipped or already there, its recall and memory."""
    summary = {
        "index": str(out),
        "kind": index.kind,
        "added": filler.added,
        "already_indexed": filler.listed - filler.new,
        "total": len(index),
        "skipped": len(filler.skipped),
        "classes": len(index.classes),
    }
    if index.kind != "exact":
        summary["params"] = index.params
    summary["recall"] = recall_text(index.recall_info(), len(index))  # the figure itself: meta.json, recall_info()
    summary["close_match"] = close_match_text(stored_close_match(index))
    memory = index.memory_info()
    if memory is not None:
        summary["memory"] = f"{format_bytes(memory['estimated_bytes'])} estimated" + (
            f" (--max-memory {format_bytes(memory['max_memory'])}: {memory['reason']})" if "reason" in memory else ""
        )
    return summary


def _labels_for(index: IndexStore, labels, classes: dict[int, str], n: int) -> list | None:
    """Labels of new items in the index's numbering: by class name, UNKNOWN for unlabelled images."""
    if labels is None:
        return [UNKNOWN] * n if index.labelled else None
    mapping = {y: index.label_for(name) for y, name in classes.items()}
    return [mapping.get(y, UNKNOWN) for y in labels]
