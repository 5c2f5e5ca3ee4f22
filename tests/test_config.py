"""The two configurations: `config.ModelConfig` (the foundation: what loading, embedding and evaluating a run read)
and `training.config.TrainConfig`, which extends it with the training options."""

import json
import subprocess
import sys
from dataclasses import fields

import pytest

from momentum_proxy import config
from momentum_proxy.config import ModelConfig
from momentum_proxy.errors import UserError
from momentum_proxy.runs import RunDir
from momentum_proxy.training.config import CATALOGUE_RECIPE, TrainConfig

MODEL_FIELDS = {
    "data",
    "backbone",
    "feature_dim",
    "pooling",
    "image_size",
    "batch_size",
    "eval_batch_size",
    "loader_workers",
    "recalls",
}


def test_the_foundation_holds_no_training_options():
    assert {f.name for f in fields(ModelConfig)} == MODEL_FIELDS
    training_only = {f.name for f in fields(TrainConfig)} - MODEL_FIELDS
    assert {"out", "lr", "epochs", "loss", "optimizer", "proxy_momentum", "select", "seed"} <= training_only
    for name in ("TrainConfig", "upgrade_options", "ORIGINAL_RECIPE", "RECIPES", "LOSS_NAMES", "run_folder_name"):
        assert not hasattr(config, name), f"config.{name} belongs to training/config.py"


def test_a_training_config_is_a_model_config_with_the_same_model_fields():
    assert issubclass(TrainConfig, ModelConfig)
    model, train = ModelConfig(data="d"), TrainConfig(data="d", out="o")
    assert {f.name: getattr(train, f.name) for f in fields(ModelConfig)} == model.to_dict()
    assert type(train.for_device("cuda")) is TrainConfig and train.for_device("cuda").backbone == "resnet50"
    assert type(train.with_(feature_dim=8)) is TrainConfig


def test_a_run_of_any_layout_loads_as_model_settings(tmp_path):
    """config.json holds every training option, and older runs older spellings: the layers below training read
    the model's settings and pass over the rest; training reads the earlier spellings (`upgrade_options`)."""
    written = TrainConfig(data=str(tmp_path), out=str(tmp_path), backbone="resnet50", feature_dim=64)
    earlier = {**written.to_dict(), "momentum": 0.3, "optimizer": "sgd*", "versions": {"torch": "2"}}
    del earlier["proxy_momentum"]
    (tmp_path / "config.json").write_text(json.dumps(earlier))
    run = RunDir(tmp_path)
    assert run.config() == ModelConfig(data=str(tmp_path), backbone="resnet50", feature_dim=64)
    full = TrainConfig.from_dict(run.info())
    assert (full.proxy_momentum, full.optimizer, full.proxy_update) == (0.3, "sgd", "momentum")


def test_the_training_options_load_without_torch():
    """The command line parses and checks options before torch loads."""
    code = (
        "import sys; from momentum_proxy.training.config import TrainConfig; "
        "TrainConfig.from_recipe('original').validate(); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _manifest(root, rows: list[tuple[int, str]]) -> str:
    """A prepared dataset's manifest.csv of (label, split) rows (no images: the recipe reads only the manifest)."""
    root.mkdir()
    lines = [f"{i}.jpg,{label},c{label},{split}" for i, (label, split) in enumerate(rows)]
    (root / "manifest.csv").write_text("\n".join(["path,label,class_name,split", *lines]) + "\n")
    return str(root)


def test_the_python_api_picks_the_recipe_as_the_command_line_does(tmp_path):
    images = _manifest(tmp_path / "images", [(c, s) for c in (0, 1) for s in ("train", "val", "test")])
    classes = _manifest(tmp_path / "classes", [(0, "train"), (1, "train"), (2, "val"), (3, "test")])
    catalogue = TrainConfig.from_recipe("catalogue", data=images, out="o")
    assert catalogue.recipe == "catalogue" and all(getattr(catalogue, k) == v for k, v in CATALOGUE_RECIPE.items())
    assert TrainConfig.for_data(images, "o") == catalogue
    assert TrainConfig.for_data(classes, "o", seed=3) == TrainConfig(data=classes, out="o", seed=3)
    assert TrainConfig(data=classes, out="o").recipe == "default"
    with pytest.raises(UserError, match="data folder not found"):
        TrainConfig.for_data(tmp_path / "missing", "o")
    with pytest.raises(UserError, match="unknown --recipe 'bogus'; choose from default, original, catalogue"):
        TrainConfig.from_recipe("bogus")
    with pytest.raises(UserError, match="unknown --recipe"):
        TrainConfig(data=images, out="o", recipe="auto").validate()
