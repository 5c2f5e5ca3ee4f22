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

    return TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), pretrained="none", image_size=64,
                       batch_size=8, epochs=2, workers=0, warmup_epochs=0, metrics=["recall", "map@r"])
