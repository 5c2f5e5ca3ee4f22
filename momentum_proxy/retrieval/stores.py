"""The index store a location names, opened, built and locked in one place: a folder is a faiss index
(`faiss_store`, the embedded default), `milvus:PATH.db` a Milvus Lite file and `milvus://HOST:PORT/COLLECTION`
a Milvus server or cluster (`milvus_store`, the [milvus] extra; see `paths.milvus_location`)."""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from momentum_proxy.errors import UserError
from momentum_proxy.fileio import check_unlocked, check_writable_folder, folder_lock
from momentum_proxy.paths import META_FILE, milvus_location
from momentum_proxy.retrieval.faiss_store import WRITER_LOCK, FaissStore, IndexPlan
from momentum_proxy.retrieval.store import IndexStore


def open_store(location, expect_model: dict | None = None, mmap: bool = False) -> IndexStore:
    """The store at `location`, refused when a key of `expect_model` differs from what it was built with. `mmap`:
    a faiss ivf or ivfpq index's lists stay in its file, mapped (`FaissStore.load`)."""
    milvus = milvus_location(location)
    if milvus is None:
        return FaissStore.load(location, expect_model, mmap=mmap)
    if mmap:
        raise UserError(
            f"--mmap maps a faiss ivf or ivfpq index folder; {location} is a Milvus store (Milvus keeps its own memory)"
        )
    from momentum_proxy.retrieval.milvus_store import MilvusStore  # extra: [milvus]

    return MilvusStore.open(milvus, expect_model)


def store_exists(location) -> bool:
    """Whether `location` holds a store (a Milvus server is asked)."""
    milvus = milvus_location(location)
    if milvus is None:
        return (Path(location) / META_FILE).exists()
    from momentum_proxy.retrieval.milvus_store import MilvusStore  # extra: [milvus]

    return MilvusStore.present(milvus)


def build_store(
    location,
    features,
    paths,
    labels=None,
    *,
    kind: str | None = "exact",
    model: dict | None = None,
    classes: dict[int, str] | None = None,
    plan: IndexPlan | None = None,
) -> IndexStore:
    """A new store of `features` for `location`, written there by its `save` (which replaces what was there).
    `plan`: a faiss index's kind and size chosen for a memory budget (`faiss_store.plan_index`)."""
    milvus = milvus_location(location)
    if milvus is None:
        return FaissStore.build(features, paths, labels, kind=kind, model=model, classes=classes, plan=plan)
    if plan is not None:
        raise UserError(
            "--max-memory chooses a faiss index; a Milvus index searches exactly (FLAT) in Milvus's own memory"
        )
    from momentum_proxy.retrieval.milvus_store import MilvusStore  # extra: [milvus]

    return MilvusStore.build(milvus, features, paths, labels, kind=kind or "exact", model=model, classes=classes)


def local_folder(location) -> Path:
    """This machine's folder for a store's files (uploads, reports, retrieval pictures): a faiss index's own
    folder, else the one `paths.MilvusLocation.local_folder` names."""
    milvus = milvus_location(location)
    return Path(location).absolute() if milvus is None else milvus.local_folder


def describe(location) -> str:
    """`location` as results and summaries record it: an absolute folder or a Milvus location."""
    milvus = milvus_location(location)
    return str(Path(location).absolute()) if milvus is None else str(milvus)


def check_not_being_written(location) -> None:
    """`writer_lock`'s refusal, early and holding nothing (`fileio.check_unlocked`): `index` and `serve` call it
    before their imports and model load, so that a second writer hears in a fraction of a second, not ten."""
    milvus = milvus_location(location)
    if milvus is None or milvus.lite:
        check_unlocked(local_folder(location), WRITER_LOCK, "being written")


@contextmanager
def writer_lock(location, job: str, create: bool = False):
    """Be the one process that writes the store at `location` for the block (faiss: its folder's lock file;
    Milvus Lite: the lock file in `local_folder`; a Milvus server: not held here). With `create`, the folder is
    checked writable and made first; a folder made here is removed again when the block fails before writing
    anything into it, so a refused command leaves nothing behind."""
    milvus = milvus_location(location)
    made = None
    lock: AbstractContextManager[None]
    if milvus is not None and not milvus.lite:
        lock = nullcontext()
    else:
        folder = local_folder(location)
        if create or milvus is not None:
            check_writable_folder(folder, "the index folder")
            made = None if folder.exists() else folder
            folder.mkdir(parents=True, exist_ok=True)
        lock = folder_lock(folder, WRITER_LOCK, "being written", job)
    try:
        with lock:
            yield
    except BaseException:
        if made is not None and {p.name for p in made.iterdir()} <= {WRITER_LOCK}:
            shutil.rmtree(made, ignore_errors=True)
        raise
