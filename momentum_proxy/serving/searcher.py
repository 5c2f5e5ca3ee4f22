"""Search and edit a saved index with the model that built it, without HTTP (the service's engine).

```python
from momentum_proxy.serving.searcher import Searcher
s = Searcher("index/mine")
s.search("photo.jpg", k=8)["results"]      # or an embedding (numpy), an item id (int), image bytes, a PIL image
await s.asearch(image_bytes, k=8)           # the same in an event loop (the service's path)
```

Queries that arrive together from several threads are embedded as one batch (`Batcher`: a query announces
itself before it is decoded, and a batch waits for announced queries, at most `batch_wait_ms` after its first
one, up to `max_batch`; a lone query does not wait). With `model_processes=N` the model runs in N child
processes (`embedding.processes`), each fed its share of the batches. Searches run while items are added or removed:
a lock guards the in-memory index only for the search itself and for each change; changes are written one at a
time, crash-safe (see `retrieval.faiss_store`; a Milvus store writes each change itself, `retrieval.milvus_store`),
before they are acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from momentum_proxy.data.loading import eval_resize, eval_transform, read_image, to_array, to_batch
from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.embedding.processes import ModelProcess, ThreadBudget, check_model_processes
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path
from momentum_proxy.retrieval import calibrate
from momentum_proxy.retrieval.build import index_tta, open_index
from momentum_proxy.retrieval.hits import judged
from momentum_proxy.retrieval.rerank import Rerank, kept_size, store_neighbours
from momentum_proxy.retrieval.search import copies_of, search_hits
from momentum_proxy.retrieval.store import UNKNOWN, IndexStore, check_mix
from momentum_proxy.retrieval.stores import describe, local_folder, open_store

MAX_K = 1000
INLINE_SEARCH_ITEMS = 5_000  # an exact search over more items (a millisecond and up) runs off the event loop
DEFAULT_MAX_PIXELS = 40_000_000
UPLOADS = "uploads"  # uploaded images are kept as INDEX/uploads/<hash>/<their name> (`stores.local_folder`)
HASH_FOLDER = 16  # hex digits of an upload's sha256 that name its folder
NAME_BYTES = 200  # longest upload name kept (UTF-8 bytes)
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
log = logging.getLogger(__name__)


def _lists_needed(rerank: Rerank) -> int:
    """Neighbours per item that searches with `rerank` need kept (one spare for a query's own item)."""
    return rerank.list_size + 1 if rerank.list_size else 0


def check_k(k: int) -> None:
    if not 1 <= int(k) <= MAX_K:
        raise UserError(f"k must be between 1 and {MAX_K}, got {k}")


def is_image_query(query) -> bool:
    """An image (bytes, a file path or a PIL image) rather than an item id or an embedding."""
    return isinstance(query, (bytes, bytearray, str, Path, Image.Image))


class BadImage(UserError):
    """Not an image, or a corrupt one."""


class ImageTooLarge(UserError):
    """An image over the pixel limit (decompression bombs included)."""


class ItemNotFound(UserError):
    """No such item (unknown or deleted id, or its image file is gone)."""


def upload_name(name: str | None, fmt: str) -> str:
    """An uploaded file's name, safe to keep: its last path part, without control characters, characters that
    file systems refuse (`\\ / : * ? " < > |`) or leading dots, at most NAME_BYTES long; `image` when nothing is
    left; the format's suffix added when it has none."""
    name = re.split(r"[\\/]", name or "")[-1]
    name = re.sub(r'[\x00-\x1f\x7f:*?"<>|]', "_", name).strip().lstrip(".")
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, SUFFIXES.get(fmt, ".img")[1:]
    suffix = suffix[:16]
    stem = stem.encode()[: NAME_BYTES - len(suffix.encode()) - 1].decode(errors="ignore").strip() or "image"
    return f"{stem}.{suffix}"


def decode_image(data: bytes, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str]:
    """Image bytes -> (the model's input as HWC uint8, exactly as `embed_files` makes it from a file; format).

    The pixel count is checked from the header before anything is decoded."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            (w, h), fmt = im.size, im.format
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e).splitlines()[0]) from None
    except Exception:  # Pillow raises several types for non-images
        raise BadImage("not an image file (or an unsupported format)") from None
    if w * h > max_pixels:
        raise ImageTooLarge(f"image of {w}x{h} pixels is over the limit of {max_pixels:,} pixels")
    try:
        return to_array(eval_transform(image_size)(read_image(io.BytesIO(data), eval_resize(image_size)))), fmt
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e).splitlines()[0]) from None
    except Exception as e:
        raise BadImage(f"corrupt image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


class Batcher:
    """Runner threads (one by default) that run a batch function on batches of submitted items: dynamic batching.

    Callers may announce an item before they have it ready (`with batcher.arriving() as submit: ...decode...;
    submit(item)`). A batch waits, at most `wait_ms` after its first item, for announced items and until it
    holds as many items as the last round saw (the last batch plus what queued while it ran): a lone client's
    query is embedded at once, while concurrent clients' queries join one batch instead of being cut into
    small, slow ones. With several `runners`, one gathers a batch at a time, and a batch is cut at its share of
    the last round (the items then queued or running), so that the runners run side by side (the model
    processes of `embedding.processes`) instead of taking turns.

    `setup()` runs in each runner's thread and returns the batch function (items -> rows), so a model is loaded
    and run by one thread only. That matters on CPU: GNU OpenMP gives every thread that runs PyTorch operations
    its own worker pool, and once a process holds more OpenMP threads than cores its workers stop spinning and
    sleep between operations, which doubled the batch-1 latency of Lite0 when the model was loaded in another
    thread (docs: Serve)."""

    def __init__(
        self,
        setup: Callable[[], Callable[[list], np.ndarray]],
        max_batch: int = 32,
        wait_ms: float = 50.0,
        on_batch: Callable[[int], None] | None = None,
        runners: int = 1,
    ):
        self.max_batch, self.wait, self.on_batch, self.runners = max_batch, wait_ms / 1000, on_batch, runners
        self.queue: queue.Queue = queue.Queue()
        self.announced, self._count_lock = 0, threading.Lock()
        self.demand = 1  # queries seen in the last round: those answered and those that queued meanwhile
        self.running = 0  # queries in the batches being run
        self._collecting = threading.Lock()  # one runner gathers a batch at a time
        self.restarts = 0  # runner loops restarted after a fault outside the batch function
        readies = [Future() for _ in range(runners)]
        self.threads = [
            threading.Thread(target=self._run, args=(setup, ready), name=f"mproxy-batcher-{i}", daemon=True)
            for i, ready in enumerate(readies)
        ]
        for thread in self.threads:
            thread.start()
        try:
            for ready in readies:
                ready.result()  # re-raises what setup raised
        except BaseException:
            self.close()
            raise

    @contextmanager
    def arriving(self, n: int = 1):
        """Announce `n` items; the block gets a `submit` for them. Those not submitted when it ends are given up."""
        left = [n]
        with self._count_lock:
            self.announced += n

        def submit(item) -> Future:
            future = self.submit(item)
            with self._count_lock:
                if left[0] > 0:
                    left[0] -= 1
                    self.announced -= 1
            return future

        try:
            yield submit
        finally:
            with self._count_lock:
                self.announced -= left[0]

    def submit(self, item) -> Future:
        future: Future = Future()
        self.queue.put((item, future))
        return future

    def close(self) -> None:
        self.queue.put(None)
        for thread in self.threads:
            thread.join()

    def _collect(self, batch: list) -> list:
        """Extend `batch` (its first entry taken from the queue) into the next batch; return it."""
        deadline = time.monotonic() + self.wait
        share = -(-self.demand // self.runners)  # several runners: each takes its share of the last round
        while len(batch) < self.max_batch:
            if self.runners > 1 and len(batch) >= share:
                break
            try:
                entry = self.queue.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0 or (self.announced == 0 and len(batch) >= share):  # nobody else expected
                    break
                try:
                    entry = self.queue.get(timeout=min(left, 0.001))
                except queue.Empty:
                    continue
            if entry is None:
                self.queue.put(None)  # close after this batch
                break
            batch.append(entry)
        return batch

    def _run(self, setup, ready: Future) -> None:
        try:
            fn = setup()
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(None)
        while True:
            taken, batch = [], []  # taken: every entry off the queue, so that a fault answers them all
            try:
                with self._collecting:
                    if (first := self.queue.get()) is None:
                        self.queue.put(None)  # the other runners stop too
                        return
                    taken.append(first)
                    # a caller that gave up (a cancelled future) is left out; the others can no longer be cancelled
                    batch = [(item, f) for item, f in self._collect(taken) if f.set_running_or_notify_cancel()]
                    with self._count_lock:
                        self.running += len(batch)
                if batch:
                    self._run_batch(fn, batch)
            except Exception as e:  # a fault outside the batch function: its callers get it, the runner goes on
                log.exception("batch runner failed; restarting it")
                self.restarts += 1
                for _, f in taken:
                    if not (f.done() or f.cancelled()):
                        f.set_exception(e)
            finally:
                with self._count_lock:
                    self.running -= len(batch)

    def _run_batch(self, fn, batch: list) -> None:
        items, futures = zip(*batch)
        try:
            out = fn(list(items))
        except Exception as e:  # every waiting caller gets the error
            for f in futures:
                f.set_exception(e)
            return
        self.demand = self.running + self.queue.qsize()
        if self.on_batch:
            self.on_batch(len(batch))
        for f, row in zip(futures, out):
            f.set_result(row)


def bucketed(run: Callable[[list], np.ndarray], max_batch: int, blank) -> Callable[[list], np.ndarray]:
    """`run` on batches padded with `blank` to the next power of two (or `max_batch`), each size run once now.

    For CUDA: cuDNN plans its convolutions for every new input shape the first time it meets it, which stalled
    the served batches of each new size for seconds in a measured run (docs: Serve); padded, a server
    meets only these few sizes, all planned before it answers."""
    sizes = sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})
    for size in sizes:
        run([blank] * size)

    def padded(items: list) -> np.ndarray:
        size = next(s for s in sizes if s >= len(items))
        return run(list(items) + [blank] * (size - len(items)))[: len(items)]

    return padded


class Searcher:
    """A saved index plus the model that built it: search, add, remove (thread-safe)."""

    def __init__(
        self,
        index_dir: str | Path,
        *,
        run_dir: str | Path | None = None,
        device: str = "auto",
        max_batch: int = 32,
        batch_wait_ms: float = 50.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        on_batch: Callable[[int], None] | None = None,
        runtime: str = "torch",
        model_processes: int | str = 0,
        tta: str | None = None,
        rerank: Rerank | None = None,
        mmap: bool = False,
    ):
        """`tta`: the test-time augmentation of queries and added images (None: the index's own; another one is
        refused, see `retrieval.build.index_tta`). `rerank`: the re-ranking of searches that ask for none
        (`retrieval.rerank`); the neighbour lists it needs are computed now, unless the index holds them, and
        saved with the index. `mmap`: a faiss ivf or ivfpq index's lists stay in its file, mapped into memory
        (adds are then refused)."""
        self.location = describe(index_dir)  # an absolute folder or a Milvus location
        self.uploads = local_folder(index_dir) / UPLOADS
        self.mmap = mmap
        self.index, self.run_dir = open_index(self.location, run_dir, mmap=mmap)
        self.tta = index_tta(self.location, self.index.model, tta)
        self.model_processes = check_model_processes(model_processes, device, runtime)
        self.processes: list[ModelProcess] = []
        self.embedder = None  # torch, or the run's verified ONNX export; loaded by the batcher's thread

        def setup():
            if self.model_processes:
                self.processes.append(process := ModelProcess(self.run_dir, budget.each, self.tta))

                def run_in_process(arrays: list) -> np.ndarray:
                    with budget.take(len(arrays)) as threads:
                        return process.embed(to_batch(arrays), threads)

                return run_in_process
            self.embedder = load_embedder(self.run_dir, runtime, device, self.tta)

            def run(arrays: list) -> np.ndarray:
                return self.embedder.embed(to_batch(arrays))

            if self.embedder.device.type != "cuda":
                return run
            blank = np.zeros((self.embedder.image_size, self.embedder.image_size, 3), np.uint8)
            return bucketed(run, max_batch, blank)

        cores = torch.get_num_threads()
        budget = ThreadBudget(cores, max(1, cores // max(1, self.model_processes)))
        try:
            self.batcher = Batcher(setup, max_batch, batch_wait_ms, on_batch, runners=max(1, self.model_processes))
        except BaseException:
            for process in self.processes:
                process.close()
            raise
        self.embedder = self.embedder or self.processes[0]
        self.index.model["runtime"] = check_mix(self.index.model, self.embedder.identity)  # recorded on the next add
        self.image_size, self.max_pixels = self.embedder.image_size, max_pixels
        self.device = self.embedder.device
        self._lock = threading.Lock()  # the in-memory index
        self._write_lock = threading.Lock()  # one change (and its save) at a time
        self.rerank = (rerank or Rerank()).for_collection(len(self.index))
        self.prepared = _lists_needed(self.rerank)  # neighbours per item kept for re-ranking (+1 spare)
        if self.prepared and kept_size(self.index) < self.prepared:
            store_neighbours(self.index, self.prepared)
            self._write(self.index.snapshot())

    def close(self) -> None:
        self.batcher.close()
        self.index.close()
        for process in self.processes:
            process.close()

    # ------------------------------------------------------------------------------------------- decoding
    def decode(self, data: bytes) -> tuple[np.ndarray, str]:
        return decode_image(data, self.image_size, self.max_pixels)

    def _decode_query(self, query) -> np.ndarray:
        """A PIL image, an image file path or image bytes as the model's input."""
        if isinstance(query, Image.Image):
            return to_array(eval_transform(self.image_size)(query.convert("RGB")))
        if isinstance(query, (str, Path)):
            if not Path(query).is_file():
                raise UserError(f"query image not found: {query}")
            query = Path(query).read_bytes()
        return self.decode(query)[0]

    # ------------------------------------------------------------------------------------------- search
    def search(self, query, k: int = 10, *, min_score: float | None = None, rerank: Rerank | None = None) -> dict:
        """Top-k of `query`: an item id (int), an embedding (numpy array, list or tuple of floats), image
        bytes, an image file path, or a PIL image, re-ranked by `rerank` (None: the server's). Returns {"query",
        "results", "timing_ms"} (decode, embed and search milliseconds, and "rerank", the part of search spent
        re-ranking); results carry rank, id, path, label, class_name, score (the raw cosine), rerank_score (the
        re-ranked score that ordered them, else None), same_class and same_image (a copy of the query's bytes).
        `min_score` keeps the results whose raw cosine reaches it. A query by id, or by the path of an indexed
        image, leaves that item out of its results (and items holding the same bytes); image bytes are a new
        query: an indexed copy of them stays in the results (first), marked same_image."""
        check_k(k)
        rerank = self._rerank_for(rerank)
        t0 = time.perf_counter()
        if not is_image_query(query):
            return self._answer(query, self._features(query), k, min_score, t0, t0, rerank)
        with self.batcher.arriving() as submit:  # concurrent queries still decoding join its batch
            array = self._decode_query(query)
            t1 = time.perf_counter()
            future = submit(array)
        return self._answer(query, future.result()[None], k, min_score, t0, t1, rerank)

    def _rerank_for(self, rerank: Rerank | None) -> Rerank:
        """A search's re-ranking: `rerank`, else the server's; refused when it needs longer neighbour lists than
        this server keeps (computing them would take the index's lock for O(items²) work)."""
        rerank = rerank or self.rerank
        kept = max(self.prepared, kept_size(self.index))
        if _lists_needed(rerank) > kept:
            raise UserError(
                f"re-ranking {rerank} needs {rerank.list_size} neighbours per item; this server keeps "
                f"{max(kept - 1, 0)} (start it with --rerank {rerank.method} --rerank-k {rerank.k})"
            )
        return rerank

    async def asearch(
        self, query, k: int = 10, *, min_score: float | None = None, rerank: Rerank | None = None
    ) -> dict:
        """`search` for an event loop (the service's): an image is decoded in a worker thread, and its batch is
        awaited without holding a thread, so that the answers of a batch go out at once instead of through
        one woken thread each (docs: Serve). The search itself runs in the loop's thread where it is fast
        (an approximate index not re-ranked, or an exact search over up to `INLINE_SEARCH_ITEMS` items), else in
        a worker."""
        if not is_image_query(query):
            return await asyncio.to_thread(self.search, query, k, min_score=min_score, rerank=rerank)
        check_k(k)
        rerank = self._rerank_for(rerank)
        t0 = time.perf_counter()
        with self.batcher.arriving() as submit:
            array = await asyncio.to_thread(self._decode_query, query)
            t1 = time.perf_counter()
            future = submit(array)
        features = (await asyncio.wrap_future(future))[None]
        exhaustive = self.index.kind == "exact" or rerank.active
        if self.index.remote or exhaustive and self.index.ntotal > INLINE_SEARCH_ITEMS:
            return await asyncio.to_thread(self._answer, query, features, k, min_score, t0, t1, rerank)
        return self._answer(query, features, k, min_score, t0, t1, rerank)

    def _features(self, query) -> np.ndarray:
        """The embedding of an id or embedding query, shape (1, d)."""
        if isinstance(query, bool) or not isinstance(query, (int, np.integer, np.ndarray, list, tuple)):
            raise UserError(
                f"a query is an item id, an embedding, image bytes, an image path or a PIL image, "
                f"not {type(query).__name__}"
            )
        if isinstance(query, (int, np.integer)):
            with self._lock:
                if not self.index.exists(int(query)):
                    raise ItemNotFound(f"no item with id {query}")
                return self.index.vector(int(query))
        features = np.asarray(query, np.float32).reshape(1, -1)
        if features.shape[1] != self.index.feature_dim or not np.isfinite(features).all():
            raise UserError(f"the embedding must be {self.index.feature_dim} finite numbers")
        return features

    def _answer(
        self, query, features: np.ndarray, k: int, min_score: float | None, t0: float, t1: float, rerank: Rerank
    ) -> dict:
        """The search's response for a query embedded by `t1` (started at `t0`)."""
        t2 = time.perf_counter()
        query_id = int(query) if isinstance(query, (int, np.integer)) else None
        query_path = Path(query) if isinstance(query, (str, Path)) else None
        content = (hashlib.sha256(query).hexdigest(), len(query)) if isinstance(query, (bytes, bytearray)) else None
        timing = {"rerank": 0.0}
        with self._lock:
            own, hits = search_hits(
                self.index,
                features,
                k,
                query_path=query_path,
                query_id=query_id,
                query_content=content,
                min_score=min_score,
                rerank=rerank,
                timing=timing,
            )
        t3 = time.perf_counter()
        label = own["label"] if own else None
        return {
            "query": own or {"id": None, "path": None, "label": None, "class_name": None},
            "results": [h.to_dict() for h in judged(hits, label)],
            "rerank": rerank.to_dict(),
            "timing_ms": {"decode": 1000 * (t1 - t0), "embed": 1000 * (t2 - t1), "search": 1000 * (t3 - t2), **timing},
        }

    # ------------------------------------------------------------------------------------------- items
    def item(self, item_id: int) -> dict:
        with self._lock:
            if not self.index.exists(item_id):
                raise ItemNotFound(f"no item with id {item_id}")
            return self.index.item(item_id)

    def image_path(self, item_id: int) -> Path:
        """The image file of a live item (ItemNotFound when the id is unknown or the file is missing)."""
        path = Path(self.item(item_id)["path"])
        if not path.is_file():
            raise ItemNotFound(f"the image file of item {item_id} is missing: {path}")
        return path

    def add(
        self, images: list[bytes], class_name: str | None = None, names: list[str | None] | None = None
    ) -> list[dict]:
        """Embed and add image files (bytes, with their file `names`; kept as INDEX/uploads/<hash>/<name>), all
        with `class_name` if given, and save the index before returning. An image whose content is already
        indexed (uploaded, or indexed from a folder by `mproxy index`) is not added again: that item is returned
        with "added": false. Nothing is added when any image is bad."""
        if not images:
            raise UserError("no images to add")
        self.index.check_add()  # before an image is kept
        with self.batcher.arriving(len(images)) as submit:
            decoded = [self.decode(data) for data in images]  # all checked before anything is written
            futures = [submit(a) for a, _ in decoded]
        features = np.stack([f.result() for f in futures])
        contents = [(hashlib.sha256(data).hexdigest(), len(data)) for data in images]
        names = names or [None] * len(images)
        with self._write_lock:
            with self._lock:
                found = {c: min(ids) for c, f in zip(contents, features) if (ids := copies_of(self.index, f[None], c))}
            new = [i for i, c in enumerate(contents) if c not in found and c not in contents[:i]]
            paths = {contents[i]: self._store(images[i], decoded[i][1], names[i]) for i in new}
            with self._lock:
                if new:
                    added = self.index.add(
                        features[new], [paths[contents[i]] for i in new], self._labels(self.index, class_name, len(new))
                    )
                    self.index.record_hashes({i: contents[j][0] for i, j in zip(added, new)})
                    found.update(zip([contents[i] for i in new], added))
                items = [{**self.index.item(found[c]), "added": i in new} for i, c in enumerate(contents)]
            if new:
                self._write(self._changed(labelled=bool(class_name)))
        return items

    def remove(self, item_id: int) -> None:
        """Delete an item and save the index before returning."""
        with self._write_lock:
            with self._lock:
                if not self.index.exists(item_id):
                    raise ItemNotFound(f"no item with id {item_id}")
                labelled = self.index.item(item_id)["label"] is not None
                self.index.remove(item_id)
            self._write(self._changed(labelled))

    def _changed(self, labelled: bool):
        """The snapshot to save after an add or remove (in the write lock). When labelled items came or went in an
        index small enough to be measured whole (`calibrate.MAX_ITEMS`), its close-match threshold is measured
        again first, on vectors copied under the search lock and outside it; a larger index keeps the one that
        `mproxy index` measured on its sample, which one change barely moves."""
        with self._lock:
            small = labelled and len(self.index) <= calibrate.MAX_ITEMS
            sample = calibrate.calibration_sample(self.index) if small else None
        found = calibrate.close_match_threshold(*sample) if sample is not None else None
        with self._lock:
            if small:
                calibrate.keep_close_match(self.index, found)
            return self.index.snapshot()

    @staticmethod
    def _labels(index: IndexStore, class_name: str | None, n: int) -> list | None:
        if class_name:
            return [index.label_for(class_name)] * n
        return [UNKNOWN] * n if index.labelled else None

    def _store(self, data: bytes, fmt: str, name: str | None) -> str:
        """Keep an uploaded image in the index's folder under its own name (`upload_name`), atomically, in a
        folder named by its content (so that two photos of one name do not meet)."""
        path = self.uploads / hashlib.sha256(data).hexdigest()[:HASH_FOLDER] / upload_name(name, fmt)
        if not path.exists():
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        return str(path)

    def _write(self, snapshot) -> None:
        """Save a change (outside the search lock); on failure, return to what is on disk."""
        try:
            snapshot.write(self.location)
        except BaseException:
            with self._lock:
                self.index = open_store(self.location, mmap=self.mmap)
            raise

    # ------------------------------------------------------------------------------------------- info
    def stats(self) -> dict:
        with self._lock:
            index = self.index
            live = len(index)
            return {
                "items": live,
                "deleted": index.ntotal - live,
                "kind": index.kind,
                "params": index.params,
                "recall": index.recall_info(),
                "mmap": self.mmap,
                "feature_dim": index.feature_dim,
                "classes": len(index.classes),
                "image_size": self.image_size,
                "device": str(self.device),
                "runtime": self.embedder.runtime,
                "tta": self.tta,
                "rerank": self.rerank.to_dict(),
                "close_match": calibrate.stored_close_match(index),
                "model_processes": self.model_processes,
                "model": {
                    "run": self.run_dir,
                    **{k: index.model.get(k) for k in ("backbone", "checkpoint_sha256", "checkpoint_epoch")},
                },
            }
