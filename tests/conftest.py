import pytest

from momentum_proxy.data.synthetic import generate_synthetic


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared dataset: 8 synthetic species (2 train, 2 val, 4 test) x 8 images of 64 px."""
    return generate_synthetic(tmp_path_factory.mktemp("tiny") / "dåta with space", classes=8, per_class=8, size=64,
                              progress=False, val_classes=2)


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A fast training configuration on `tiny_data` (random-weight Lite0, 64 px, 3 steps an epoch)."""
    from momentum_proxy.runs import TrainConfig

    return TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), backbone="efficientnet_lite0",
                       pretrained="none", image_size=64, batch_size=8, epochs=2, loader_workers=0, warmup_epochs=0,
                       metrics=["recall", "map@r"])


def make_run(out, data, *, epoch: int = 0, seed: int = 0):
    """A run folder with a random-weight model as its best checkpoint (no training): Lite0, 64 px, 32-d."""
    import torch

    from momentum_proxy.models.net import EmbeddingNet
    from momentum_proxy.runs import BEST, RunDir, TrainConfig

    cfg = TrainConfig(data=str(data), out=str(out), backbone="efficientnet_lite0", pretrained="none", image_size=64,
                      feature_dim=32)
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
