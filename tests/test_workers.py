"""Model processes (`embedding/processes.py`): the same embeddings as in-process, restart after a crash, the CPU
thread budget, the batcher's runners, and `--model-processes` refusals."""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from momentum_proxy.data.loading import to_batch
from momentum_proxy.embedding.processes import ThreadBudget, auto_model_processes, check_model_processes
from momentum_proxy.errors import UserError
from momentum_proxy.serving.searcher import Batcher, Searcher


def test_model_processes_give_the_in_process_results_and_restart_after_a_kill(index_dir, tiny_data):
    images = [p.read_bytes() for p in sorted((tiny_data / "images").rglob("*.jpg"))[:6]]
    local, remote = Searcher(index_dir), Searcher(index_dir, model_processes=2)
    try:
        assert len(remote.processes) == 2 and remote.stats()["model_processes"] == 2
        assert remote.embedder.identity == local.embedder.identity
        arrays = [local.decode(b)[0] for b in images]
        want = local.embedder.embed(to_batch(arrays))
        for threads in (1, 2):
            np.testing.assert_allclose(remote.processes[0].embed(to_batch(arrays), threads), want, atol=1e-5)
        for data in images[:3]:
            assert remote.search(data, 5)["results"] == local.search(data, 5)["results"]
        killed = remote.processes[0]
        os.kill(killed.proc.pid, signal.SIGKILL)
        killed.proc.wait()
        for data in images:  # both runners take batches; the killed process is started again
            assert remote.search(data, 3)["results"] == local.search(data, 3)["results"]
        assert killed.restarts == 1 and killed.proc.poll() is None
    finally:
        local.close()
        remote.close()
    assert all(p.proc.poll() is not None for p in remote.processes)  # closed with the searcher


def test_a_model_process_exits_when_its_parent_closes_the_pipe(index_dir, tiny_run, monkeypatch):
    from momentum_proxy import perf
    from momentum_proxy.embedding.processes import ModelProcess

    monkeypatch.setenv("OMP_WAIT_POLICY", "")  # so that the original (or its absence) comes back afterwards
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(perf, "_PASSIVE_SET", False)
    perf.passive_omp_wait()  # as `mproxy serve` does: the server's threads sleep between operations
    process = ModelProcess(tiny_run)
    environ = Path(f"/proc/{process.proc.pid}/environ")
    if environ.exists():  # Linux: the model process runs with OpenMP's own wait policy (perf.child_env)
        assert b"OMP_WAIT_POLICY=" not in environ.read_bytes()
    process.proc.stdin.close()  # what a parent killed with kill -9 leaves behind
    assert process.proc.wait(timeout=300) == 0


def test_thread_budget_gives_a_lone_small_batch_every_thread_and_never_more_threads_than_cores():
    budget = ThreadBudget(total=4, each=2, alone_batch=2)
    with budget.take(1) as n:
        assert n == 4 and budget.free == 0
    with budget.take(8) as n:  # large: its share, even alone
        assert n == 2
        with budget.take(1) as m:  # small, but another batch runs: its share
            assert m == 2 and budget.free == 0
    held, started = [], threading.Event()

    def second():
        started.set()
        with budget.take(8) as k:
            held.append((k, time.perf_counter()))

    with budget.take(2) as n:  # alone: all 4 threads; a batch arriving meanwhile waits
        assert n == 4
        worker = threading.Thread(target=second)
        worker.start()
        started.wait()
        time.sleep(0.2)
        assert held == []
        released = time.perf_counter()
    worker.join()
    assert held[0][0] == 2 and held[0][1] >= released
    assert budget.free == 4


def test_batcher_runners_each_take_their_share_of_the_last_round():
    sizes, gate = [], threading.Barrier(2)

    def setup():
        def run(items):
            sizes.append(len(items))
            if len(sizes) <= 2:
                gate.wait(timeout=300)  # the first two batches run side by side
            return np.array(items)

        return run

    batcher = Batcher(setup, wait_ms=2000, runners=2)
    try:
        batcher.demand = 8
        futures = [batcher.submit(i) for i in range(8)]
        assert [f.result(timeout=300) for f in futures] == list(range(8))
        assert sizes == [4, 4]  # not one batch of 8 while the other runner waits
        assert len(batcher.threads) == 2
    finally:
        batcher.close()
    assert not any(t.is_alive() for t in batcher.threads)


def test_model_processes_option_is_checked(monkeypatch):
    assert check_model_processes("auto", "cpu", "onnx") == 0
    assert check_model_processes("0", "cpu", "torch") == 0 and check_model_processes(2, "cpu", "torch") == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert auto_model_processes("cpu", "torch") == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert auto_model_processes("cpu", "torch") == 2 and auto_model_processes("cuda", "torch") == 0
    with pytest.raises(UserError, match="auto or a count"):
        check_model_processes("-1", "cpu", "torch")
    with pytest.raises(UserError, match="use --model-processes 0"):
        check_model_processes(2, "cpu", "onnx")


def test_serve_refuses_bad_model_processes_in_one_line(index_dir, capsys):
    from momentum_proxy.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", str(index_dir), "--model-processes", "two"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mproxy: error: --model-processes must be auto") and "\n" not in err
    assert Path(index_dir).is_dir()
