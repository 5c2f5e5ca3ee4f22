"""Model processes: a run's embedder in a child process, so that the server's Python work and the model never
compete for one interpreter lock or one OpenMP team.

`ModelProcess(run_dir)` starts `python -m momentum_proxy.embedding.processes` and talks to it over the child's stdin and
stdout: a batch of HWC uint8 arrays in, L2-normalised float32 rows out, raw bytes behind fixed headers (nothing is
pickled). The child embeds exactly as the in-process torch embedder does (the same `to_batch` layout, the same
model), with as many CPU threads as the parent asks for per batch. It exits when its stdin closes, so it never
outlives its parent, even one killed with `kill -9`; a child that died is started again for the next batch.

Why (docs: Serve): on a 2-core CPU, two single-threaded model copies at batch 8 embedded about 10 % more
images per second than one copy with both threads at its best batch size, and a model in the server's own
process loses more than that to the event loop: its OpenMP threads wait for each other whenever the HTTP work
takes one of their cores.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from momentum_proxy.data.loading import to_batch
from momentum_proxy.embedding.inference import TorchEmbedder, resolve_device
from momentum_proxy.errors import UserError
from momentum_proxy.perf import child_env, tune_allocator

REQUEST = struct.Struct("<IIII")  # images, height, width, CPU threads to use
REPLY = struct.Struct("<iQ")  # rows (-1: a one-line error follows), payload bytes


def auto_model_processes(device_type: str, runtime: str) -> int:
    """`--model-processes auto`: two model processes on a CPU with two or more cores (torch runtime), else none."""
    return 2 if device_type == "cpu" and runtime == "torch" and (os.cpu_count() or 1) >= 2 else 0


def check_model_processes(count: int | str, device: str, runtime: str) -> int:
    """The number of model processes for `count` (a number, or "auto"); UserError where they cannot be used."""
    kind = resolve_device(device).type
    if count == "auto":
        return auto_model_processes(kind, runtime)
    if not str(count).isdigit():
        raise UserError(f"--model-processes must be auto or a count of model processes (0: none), got {count!r}")
    if int(count) and (kind != "cpu" or runtime != "torch"):
        raise UserError(
            f"model processes run the torch runtime on the CPU; "
            f"with --device {device} --runtime {runtime} use --model-processes 0"
        )
    return int(count)


class ThreadBudget:
    """The CPU threads that model processes may use at once (`total`, the cores): each batch takes its threads
    before it runs and gives them back after.

    A small batch (at most `alone_batch` images: a lone client's query) that finds every thread free takes them
    all, for its latency, and the others wait until it is done (about a batch-1 time); any other batch takes
    `each`. Without the wait, a two-thread batch that another process joined ran 1.1 s instead of 35 ms in a
    measured run: GNU OpenMP threads wait for each other at every operation, and one of them had lost its core."""

    def __init__(self, total: int, each: int, alone_batch: int = 2):
        self.total, self.each, self.alone_batch, self.free = total, each, alone_batch, total
        self._changed = threading.Condition()

    @contextmanager
    def take(self, batch_size: int):
        """Wait for, and hold, the threads a batch of `batch_size` may use; the block gets their number."""
        with self._changed:
            n = self.total if batch_size <= self.alone_batch and self.free == self.total else self.each
            self._changed.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield n
        finally:
            with self._changed:
                self.free += n
                self._changed.notify_all()


class ModelProcess:
    """A run's torch model in a child process, as an `Embedder`: `.embed(images, threads)` -> (n, d) float32 unit
    rows, `threads` (default: the process's own) being the CPU threads this batch may use; `tta` as
    `TorchEmbedder`'s."""

    def __init__(self, run_dir: str | Path, threads: int = 1, tta: str = "none"):
        self.run_dir, self.threads, self.tta = str(run_dir), threads, tta
        self._lock = threading.Lock()  # one batch at a time
        self.restarts = -1
        info = self._start()
        self.image_size, self.feature_dim = info["image_size"], info["feature_dim"]
        self.identity, self.runtime, self.device = info["identity"], "torch", torch.device("cpu")

    def _start(self) -> dict:
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the package
        env = child_env(
            {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "momentum_proxy.embedding.processes", self.run_dir, str(self.threads), self.tta],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.restarts += 1
        return json.loads(self._reply())

    def embed(self, images, threads: int | None = None) -> np.ndarray:
        """`images`: uint8 N x 3 x S x S (tensor or array); sent as N x S x S x 3 (no copy when channels-last)."""
        batch = np.ascontiguousarray(torch.as_tensor(images).permute(0, 2, 3, 1).numpy(), dtype=np.uint8)
        n, h, w, _ = batch.shape
        threads = self.threads if threads is None else threads
        with self._lock:
            if self.proc.poll() is not None:  # died since the last batch (killed, out of memory)
                self._start()
            try:
                self.proc.stdin.write(REQUEST.pack(n, h, w, threads))
                self.proc.stdin.write(batch.data)
                self.proc.stdin.flush()
            except BrokenPipeError:
                raise RuntimeError(f"the model process exited (code {self.proc.wait()})") from None
            return np.frombuffer(self._reply(), np.float32).reshape(n, -1)

    def _reply(self) -> bytes:
        header = self.proc.stdout.read(REPLY.size)
        if len(header) < REPLY.size:
            raise RuntimeError(f"the model process exited (code {self.proc.wait()}); its error is in the log above")
        rows, size = REPLY.unpack(header)
        payload = self.proc.stdout.read(size)
        if rows < 0:
            raise UserError(payload.decode())
        return payload

    def close(self) -> None:
        with self._lock:
            if self.proc.poll() is None:
                self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            self.proc.stdout.close()


def child(run_dir: str, threads: int, tta: str) -> None:
    """The child's loop: load the run's model, say what it is, then embed batches until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then closes our stdin
    out = os.fdopen(os.dup(1), "wb")  # replies only; whatever a library prints goes to stderr
    os.dup2(2, 1)
    read = sys.stdin.buffer.read

    def reply(rows: int, payload: bytes) -> None:
        out.write(REPLY.pack(rows, len(payload)) + payload)
        out.flush()

    tune_allocator()
    torch.set_num_threads(threads)
    try:
        embedder = TorchEmbedder(run_dir, "cpu", tta)
    except UserError as e:
        return reply(-1, str(e).encode())
    reply(
        0,
        json.dumps(
            {"image_size": embedder.image_size, "feature_dim": embedder.feature_dim, "identity": embedder.identity}
        ).encode(),
    )
    try:
        while len(header := read(REQUEST.size)) == REQUEST.size:
            n, h, w, want = REQUEST.unpack(header)
            if len(data := read(n * h * w * 3)) < n * h * w * 3:  # the parent is gone
                break
            arrays = np.frombuffer(data, np.uint8).reshape(n, h, w, 3)
            if torch.get_num_threads() != want:
                torch.set_num_threads(want)
            reply(n, np.ascontiguousarray(embedder.embed(to_batch(list(arrays))), np.float32).tobytes())
    except BrokenPipeError:  # the parent is gone
        pass


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
