"""Process-wide CPU performance settings applied by the command line's entry point."""

from __future__ import annotations

import ctypes
import gc
import importlib
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
KEEP_BYTES = 1 << 30
_PASSIVE_SET = False  # passive_omp_wait set OMP_WAIT_POLICY (the user had not)


def flush_denormals() -> bool:
    """Treat denormal floats as zero on the CPU (x86 FTZ/DAZ): tiny activations and gradients otherwise take
    a slow microcode path."""
    import torch  # lazy: the CLI imports this module before parsing options

    return torch.set_flush_denormal(True)


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS after every tensor.

    By default glibc serves large blocks (activations) with mmap and unmaps them on free, so every forward pass
    page-faults its activations in again: on 2 cores this doubled inference time (kernel time 12 s vs 3.5 s for
    the same work). Returns whether the settings were applied (glibc on Linux only).
    """
    return mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) and mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)


def share_heap() -> bool:
    """Let threads started from now on allocate from the main heap instead of their own glibc arena.

    A thread's arena is built from 64 MB heaps that are unmapped when freed, whatever `tune_allocator` says, so
    a model run by a worker thread (the service's batcher) page-faults its activations in again on every batch:
    Lite0 at 224 px embedded a batch of 8 in 122 ms there against 91 ms with this setting (docs: Serve).
    Returns whether it was applied (glibc on Linux only)."""
    return mallopt(M_ARENA_MAX, 1)


def passive_omp_wait() -> None:
    """Let OpenMP worker threads sleep, not spin, when an operation ends (unless the user set OMP_WAIT_POLICY).

    Read once, when torch loads its OpenMP runtime, so it must come before torch is imported. In `mproxy serve`
    with the model in the server's process (a batcher thread and the event loop beside it), spinning workers took
    the cores from the threads that had work: one client's p50 went from 69 to 48 ms and the server's CPU per
    search from 155 to 96 ms (docs: Choosing post-processing, Cost). Model processes, which run nothing but the
    model, do better with OpenMP's own policy (`child_env`)."""
    global _PASSIVE_SET
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _PASSIVE_SET = True


def child_env(env: dict[str, str]) -> dict[str, str]:
    """`env` for a model process: without the OMP_WAIT_POLICY that `passive_omp_wait` set (one the user set stays).

    A model process runs one model and nothing else; its OpenMP threads that spin briefly between the
    operations of a forward pass (OpenMP's default) answered a lone query in 35 ms against 62 ms when they slept,
    and 16 clients got 62.6 searches/s against 50.5 (docs: Serve)."""
    if _PASSIVE_SET:
        env = {k: v for k, v in env.items() if k != "OMP_WAIT_POLICY"}
    return env


def single_thread_blas() -> None:
    """Run numpy's BLAS (OpenBLAS) on one thread in this process (threadpoolctl).

    The service's searches and re-ranking multiply one query by the index (a few milliseconds of work); with
    OpenBLAS's threads they waited for each other and for the cores the model processes were using: the
    default re-ranking over 960 items took 6.9 ms of CPU and 14.8 ms per search on a busy 2-core machine
    against 0.9 ms and 3.6 ms on one thread (docs: Serve). PyTorch and faiss keep their own threads."""
    from threadpoolctl import threadpool_limits  # lazy: only the service limits them

    importlib.import_module("numpy")  # its BLAS must be loaded to be found
    threadpool_limits(1, user_api="blas")


def mallopt(param: int, value: int) -> bool:
    """glibc's `mallopt(param, value)`; False where it is not available (not Linux, not glibc) or refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def freeze_gc() -> None:
    """Collect once, then keep every object alive now (torch, the model, the index) out of later collections:
    in `mproxy serve` a full collection over them held the GIL for about 0.2 s and stalled every request."""
    gc.collect()
    gc.freeze()
