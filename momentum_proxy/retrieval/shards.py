"""Sharded embedding for `mproxy index` under torchrun: every rank embeds its share of the images into chunk
files, then rank 0 fills the store from them (`retrieval.build.build_index`), as a single process would.

- The images to embed (those the index does not hold yet, in the order a single-process build embeds them) are cut
  into chunks of `chunk_size`; chunk c is rank c % world_size's. Each rank embeds on its own device (cuda:LOCAL_RANK
  where CUDA is, else the CPU) and writes each chunk whole or not at all (a temporary file renamed into place) into
  the work folder (`work_folder`: `.chunks` in the index's local folder), which every rank must see.
- A chunk file (npz) holds the features of the images it read, their paths, the images it could not read with the
  reason, and the `fingerprint` of the model that embedded them. A rerun uses every chunk file of the same
  fingerprint, whichever run wrote it, and embeds only the images no chunk holds; chunk files of another model are
  removed with a one-line note. Rank 0 removes the work folder once the store is saved.
- Only rank 0 opens the store (Milvus Lite lets one process open a file) and holds its writer lock; the other ranks
  wait for its plan. The ranks talk over gloo whatever the device: the plan, then one barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.distributed import DistInfo, barrier, broadcast_object, init_distributed
from momentum_proxy.embedding.inference import embed_files
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path
from momentum_proxy.retrieval.stores import local_folder

WORK_FOLDER = ".chunks"
CHUNK_SIZE = 4096  # images per chunk file (a multiple of the batch size keeps a single process's batches)
WAIT = timedelta(days=7)  # how long a rank waits for the others (torchrun ends every rank when one fails)
KILL_ENV = "MPROXY_TEST_KILL_AFTER"  # test hook, see `test_kill`
FINGERPRINT_KEYS = ("backbone", "feature_dim", "checkpoint_sha256", "runtime", "tta", "export_sha256")


def work_folder(location) -> Path:
    """Where the chunk files of a sharded build of the store at `location` go."""
    return local_folder(location) / WORK_FOLDER


def start() -> DistInfo:
    """This process's place in a torchrun job (the gloo process group joined), or a lone process's."""
    return init_distributed(torch.device("cpu"), timeout=WAIT)


def rank_device(device: str, info: DistInfo) -> str:
    """The device a rank embeds on: `auto` and `cuda` mean cuda:LOCAL_RANK where CUDA is (GPUs shared in turn
    when a node runs more ranks than it has); others as given."""
    if info.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        gpu = info.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        return f"cuda:{gpu}"
    return device


def fingerprint(identity: dict, image_size: int) -> str:
    """What makes two embeddings of an image the same: the embedder's model, runtime, tta and image size."""
    text = json.dumps({**{k: identity.get(k) for k in FINGERPRINT_KEYS}, "image_size": image_size}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_done: Counter = Counter()


def test_kill(stage: str) -> None:
    """Test hook for the kill-and-rerun tests (tests/test_index_shards.py): with `MPROXY_TEST_KILL_AFTER=STAGE:N` or
    `STAGE:N:RANK`, the process (of rank RANK) SIGKILLs itself after its Nth `chunk` file written or its Nth
    `insert` into the store. Unset, it does nothing."""
    spec = os.environ.get(KILL_ENV, "").split(":")
    if spec[0] != stage or len(spec) > 2 and spec[2] != os.environ.get("RANK", "0"):
        return
    _done[stage] += 1
    if _done[stage] >= int(spec[1]):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Plan:
    """What rank 0 sends every rank: the images left to embed and how they are cut into chunk files."""

    fingerprint: str
    tta: str
    todo: list[str]
    chunk_size: int
    name: str = ""  # of its chunk files, NAME-000000.npz, ...: a rerun embeds another list

    def __post_init__(self):
        self.name = self.name or hashlib.sha256("\n".join([self.fingerprint, *self.todo]).encode()).hexdigest()[:12]

    @property
    def chunks(self) -> int:
        return -(-len(self.todo) // self.chunk_size)

    def file(self, folder: Path, c: int) -> Path:
        return folder / f"{self.name}-{c:06d}.npz"


def write_chunk(path: Path, fp: str, features: np.ndarray, kept: list[str], skipped: list[tuple[str, str]]) -> None:
    """One chunk file, whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            fingerprint=np.array(fp),
            features=np.asarray(features, np.float32),
            paths=np.array(kept, dtype=str),
            skipped_paths=np.array([p for p, _ in skipped], dtype=str),
            skipped_reasons=np.array([r for _, r in skipped], dtype=str),
        )


class Chunks:
    """The chunk files of a work folder embedded by one model (`fingerprint`): where each image's features are.
    Files of another model, or unreadable ones, are removed (one line on stderr says how many)."""

    def __init__(self, folder: Path, fp: str, feature_dim: int):
        self.files: list[Path] = []
        self.where: dict[str, tuple[int, int]] = {}  # image path -> (file number, row)
        self.bad: dict[str, str] = {}  # image path -> why it could not be read
        self.dim, dropped = feature_dim, 0
        for tmp in folder.glob(".*.tmp"):  # a chunk file being written when its rank was killed
            tmp.unlink(missing_ok=True)
        for file in sorted(folder.glob("*.npz")):
            try:
                with np.load(file) as z:
                    if str(z["fingerprint"]) != fp:
                        raise ValueError("another model")
                    paths, bad = z["paths"].tolist(), zip(z["skipped_paths"].tolist(), z["skipped_reasons"].tolist())
            except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile):
                file.unlink(missing_ok=True)
                dropped += 1
                continue
            self.where.update((p, (len(self.files), row)) for row, p in enumerate(paths))
            self.bad.update(bad)
            self.files.append(file)
        if dropped:
            print(
                f"mproxy: removed {dropped} chunk file(s) of another model (or unreadable) from {folder}",
                file=sys.stderr,
            )

    def __contains__(self, path: str) -> bool:
        return path in self.where or path in self.bad

    def take(self, paths: list[str]) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
        """What `embedding.inference.embed_files` returns for `paths`, read from the chunk files."""
        kept: list[str] = []
        skipped: list[tuple[str, str]] = []
        rows: defaultdict[int, list[tuple[int, int]]] = defaultdict(list)  # file number -> (place, row) pairs
        for p in paths:
            if p in self.where:
                file, row = self.where[p]
                rows[file].append((len(kept), row))
                kept.append(p)
            elif p in self.bad:
                skipped.append((p, self.bad[p]))
            else:
                raise UserError(f"no chunk file holds {p} (removed during the build?); run the same command again")
        features = np.zeros((len(kept), self.dim), np.float32)
        for file, pairs in rows.items():
            with np.load(self.files[file]) as z:
                at, rows_in_file = zip(*pairs)
                features[list(at)] = z["features"][list(rows_in_file)]
        return features, kept, skipped


def embed_share(embedder, plan: Plan, info: DistInfo, folder: Path, batch_size: int) -> None:
    """Embed this rank's chunks of `plan` that have no file yet, each into its file."""
    mine = range(info.rank, plan.chunks, info.world_size)
    for c in tqdm(mine, desc=f"chunks (rank 0 of {info.world_size})", leave=False, disable=not info.is_main):
        path = plan.file(folder, c)
        if path.exists():
            continue
        paths = plan.todo[c * plan.chunk_size : (c + 1) * plan.chunk_size]
        features, kept, skipped = embed_files(embedder, paths, batch_size, progress=info.is_main)
        write_chunk(path, plan.fingerprint, features, kept, skipped)
        test_kill("chunk")


class Sharding:
    """Rank 0's side of a sharded build; `follow` is the other ranks'."""

    def __init__(self, info: DistInfo, folder: Path, chunk_size: int, batch_size: int):
        self.info, self.folder, self.chunk_size, self.batch_size = info, folder, chunk_size, batch_size
        self.sent = False

    def _send(self, plan: Plan | None) -> None:
        self.sent = True
        broadcast_object(plan)

    def abandon(self) -> None:
        """Tell the other ranks to stop (rank 0 failed before sending its plan; it says why)."""
        if not self.sent:
            self._send(None)

    def embed(self, embedder, todo: list[str]) -> Chunks:
        """Send the plan for `todo` (less what chunk files hold already), embed rank 0's share, wait for every rank;
        the chunk files that then hold all of `todo`."""
        fp = fingerprint(embedder.identity, embedder.image_size)
        held = Chunks(self.folder, fp, embedder.feature_dim)
        left = [p for p in todo if p not in held]
        if left:
            self.folder.mkdir(parents=True, exist_ok=True)
        if len(left) < len(todo):
            print(
                f"mproxy: {len(todo) - len(left)} of {len(todo)} images reused from the chunk files in {self.folder}",
                file=sys.stderr,
            )
        plan = Plan(fp, embedder.identity.get("tta", "none"), left, self.chunk_size)
        self._send(plan)
        embed_share(embedder, plan, self.info, self.folder, self.batch_size)
        barrier()
        return Chunks(self.folder, fp, embedder.feature_dim)

    def add(self, index, features: np.ndarray, paths: list[str], labels: list | None) -> None:
        """Add items to the store being filled: to a store that persists every add (`writes_through`: Milvus) a
        chunk at a time (a fill killed midway keeps what it inserted, and the rerun adds the rest), to one that
        persists on `save` (faiss) at once (saved once, at the end)."""
        step = self.chunk_size if index.writes_through else len(paths)
        for s in range(0, len(paths), step):
            index.add(features[s : s + step], paths[s : s + step], None if labels is None else labels[s : s + step])
            test_kill("insert")

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def follow(info: DistInfo, run_dir, runtime: str, device: str, folder: Path, batch_size: int) -> None:
    """A rank other than 0: wait for rank 0's plan, embed this rank's chunks, wait for every rank."""
    plan = broadcast_object(None)
    if plan is None:  # rank 0 stopped (and says why)
        return
    if info.rank < plan.chunks:
        embedder = load_embedder(run_dir, runtime, device, plan.tta)
        if fingerprint(embedder.identity, embedder.image_size) != plan.fingerprint:
            raise UserError(
                f"rank {info.rank} embeds with another model than rank 0 (is {run_dir} the same run on every node?)"
            )
        embed_share(embedder, plan, info, folder, batch_size)
    barrier()
