import contextlib
import os
import socket
import time

import pytest

# One OpenMP thread (torch, faiss, BLAS) in the test process and the processes it starts, set before torch loads:
# the tests' tiny models gain nothing from a second thread, and while other jobs share the cores OpenMP's barriers
# make every operation wait for a descheduled thread (a training test took 76 s instead of 10 on a busy 2-core
# machine). In-process and subprocess runs that are compared bit for bit keep one thread count.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared dataset: 8 synthetic species (2 train, 2 val, 4 test) x 8 images of 64 px."""
    from momentum_proxy.data.synthetic import generate_synthetic  # lazy: pandas and scipy, not at collection

    return generate_synthetic(
        tmp_path_factory.mktemp("tiny") / "dåta with space",
        classes=8,
        per_class=8,
        size=64,
        progress=False,
        val_classes=2,
    )


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A fast training configuration on `tiny_data` (random-weight Lite0, 64 px, 3 steps an epoch)."""
    from momentum_proxy.training.config import TrainConfig

    return TrainConfig(
        data=str(tiny_data),
        out=str(tmp_path / "run"),
        backbone="efficientnet_lite0",
        pretrained="none",
        image_size=64,
        batch_size=8,
        epochs=2,
        loader_workers=0,
        warmup_epochs=0,
        metrics=["recall", "map@r"],
    )


def make_run(out, data, *, epoch: int = 0, seed: int = 0):
    """A run folder with a random-weight model as its best checkpoint (no training): Lite0, 64 px, 32-d."""
    import torch

    from momentum_proxy.models.net import EmbeddingNet
    from momentum_proxy.runs import BEST, RunDir
    from momentum_proxy.training.config import TrainConfig

    cfg = TrainConfig(
        data=str(data), out=str(out), backbone="efficientnet_lite0", pretrained="none", image_size=64, feature_dim=32
    )
    run = RunDir(out)
    run.start(cfg, overwrite=True)
    torch.manual_seed(seed)
    run.save_checkpoint(BEST, {"epoch": epoch, "model": EmbeddingNet(cfg.backbone, 32, weights=None).state_dict()})
    return out


def assert_same(a, b, path=""):
    """Nested checkpoint contents (dicts, lists, tensors, numbers) equal bit for bit; NaN equals NaN."""
    import torch

    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b or a != a and b != b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """`make_run` on `tiny_data` (shared: tests must not change it)."""
    return make_run(tmp_path_factory.mktemp("serve") / "run", tiny_data)


@pytest.fixture(scope="session")
def index_dir(tiny_data, tiny_run, tmp_path_factory):
    """A pristine faiss index of `tiny_run` over `tiny_data` (64 images, labelled, class names), built once
    (shared by test_service.py and test_workers.py: tests copy it before changing it)."""
    from momentum_proxy.retrieval.build import build_index

    idx = tmp_path_factory.mktemp("index") / "idx"
    build_index(tiny_run, tiny_data, idx)
    return idx


def wait_for(condition, alive=lambda: True, limit: float = 1800, poll: float = 0.05) -> bool:
    """Poll `condition()` until it holds (True) or `alive()` turns false (False: what was waited on died first).
    `limit` only ends a hang: a slow machine is waited for, never failed for being slow."""
    end = time.monotonic() + limit
    while not condition():
        if not alive() or time.monotonic() > end:
            return condition()
        time.sleep(poll)
    return True


def run_cli(args, capsys):
    """Run `mproxy ARGS` in-process; return (exit code, stdout, stderr)."""
    from momentum_proxy.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def server(tmp_path):
    """A Milvus server (Milvus Lite's gRPC server in this process) that a test stops and starts again on its port;
    yields (a collection's location on it, stop, start)."""
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    data = str(tmp_path / "server.db")
    running = list(start_server_in_thread(data, port=0))

    def stop():
        running[0].stop(grace=0)
        running[1].close()

    def start():
        running[:] = start_server_in_thread(data, port=running[2])

    yield f"milvus://127.0.0.1:{running[2]}/products", stop, start
    stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A real Milvus server for the session: Milvus standalone 2.3 from PyPI's `milvus` package (a [test]
    dependency: a server binary that starts offline in about 10 s), on free ports of 127.0.0.1; yields its port.
    Its embedded etcd gets free ports from a config file (else its peer port is 2380, and a second server on the
    machine fails); a server that exits while starting fails the tests at once (its logs: data_dir/logs)."""
    milvus = pytest.importorskip(
        "milvus",
        reason="no Milvus server to test against: PyPI's `milvus` package (a "
        "[test] dependency, Linux x86-64 only) is not installed",
    )
    data, client, peer = tmp_path_factory.mktemp("milvus-server"), free_port(), free_port()
    (data / "etcd.yaml").write_text(
        f"name: default\nlisten-client-urls: http://127.0.0.1:{client}\n"
        f"advertise-client-urls: http://127.0.0.1:{client}\n"
        f"listen-peer-urls: http://127.0.0.1:{peer}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
        f"initial-cluster: default=http://127.0.0.1:{peer}\n"
    )
    server = milvus.MilvusServer(data_dir=str(data), etcd_port=client, wait_for_started=False)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ETCD_CONFIG_PATH", str(data / "etcd.yaml"))  # Milvus reads its settings from the environment
            server.start()
        for _ in range(300):  # 1 s each; it takes about 10
            if server.server_proc.poll() is not None:
                pytest.fail(f"the Milvus server exited ({server.server_proc.returncode}); its logs: {data}/logs")
            with contextlib.suppress(TimeoutError):
                server.wait_started(timeout=1000)
                break
        else:
            pytest.fail(f"the Milvus server did not answer in 300 s; its logs: {data}/logs")
        yield server.listen_port
    finally:
        server.stop()
