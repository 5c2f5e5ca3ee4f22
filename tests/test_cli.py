"""The command line end to end on a tiny dataset, and its one-line errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from momentum_proxy.cli import config_from_args, main, parser
from momentum_proxy.config import DEFAULT_RERANK, DEFAULT_TTA
from momentum_proxy.retrieval.rerank import Rerank
from momentum_proxy.runs import RunDir
from momentum_proxy.training.config import CATALOGUE_RECIPE, TrainConfig

TRAIN = [
    "--pretrained",
    "none",
    "--image-size",
    "64",
    "--batch-size",
    "8",
    "--lr",
    "1e-4",
    "--epochs",
    "1",
    "--loader-workers",
    "0",
]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "rün folder"
    main(["train", "--data", str(tiny_data), "--out", str(out), *TRAIN])
    return out


def test_prepare_train_evaluate_retrieve(tiny_data, trained, tmp_path, capsys):
    code, out, _ = run_cli(
        ["prepare", "synthetic", "--out", tmp_path / "syn", "--classes", 4, "--per-class", 3, "--size", 48], capsys
    )
    assert code == 0 and (tmp_path / "syn" / "manifest.csv").exists()

    trained_eval = (trained / "eval.json").read_bytes()
    code, out, _ = run_cli(
        ["evaluate", trained, "--json", tmp_path / "e.json", "--tta", "none", "--rerank", "none"], capsys
    )  # as training evaluated its test split
    assert code == 0 and "map@r" in out
    assert (
        "checkpoints/best.pt (epoch 1, selected on val map@r) on the test split, 32 queries, runtime torch, "
        "tta none, rerank none"
    ) in out
    res = json.loads((tmp_path / "e.json").read_text())
    assert set(res["test"]) == {
        "recall@1",
        "recall@2",
        "recall@4",
        "recall@8",
        "precision@1",
        "r_precision",
        "map@r",
        "nmi",
    }
    assert res["selected_on"] == "val" and res["runtime"] == "torch" and res["queries"] == 32
    trained_test = json.loads(trained_eval)["test"]
    assert all(abs(res["test"][k] - v) < 1e-6 for k, v in trained_test.items())  # the same figures, recomputed
    code, out, _ = run_cli(["evaluate", trained], capsys)  # the default pipeline: config.DEFAULT_TTA, DEFAULT_RERANK
    named = "-".join(p for p in (DEFAULT_TTA, DEFAULT_RERANK) if p != "none")  # e.g. evaluate-torch-dba.json
    assert code == 0 and f"written: {trained / f'evaluate-torch-{named}.json'}" in out
    assert f"runtime torch, tta {DEFAULT_TTA}, rerank {Rerank(DEFAULT_RERANK)}" in out
    default = json.loads((trained / f"evaluate-torch-{named}.json").read_text())
    assert default["tta"] == DEFAULT_TTA and default["rerank"] == Rerank(DEFAULT_RERANK).to_dict()
    code, out, _ = run_cli(["evaluate", trained, "--runtime", "onnx", "--metrics", "recall"], capsys)
    assert code == 0 and "runtime onnx" in out and f"written: {trained / f'evaluate-onnx-{named}.json'}" in out
    assert json.loads((trained / f"evaluate-onnx-{named}.json").read_text())["runtime"] == "onnx"
    assert (trained / "eval.json").read_bytes() == trained_eval  # training's test result is never rewritten

    query = tiny_data / "images" / "species_04" / "0001.jpg"
    code, out, _ = run_cli(["retrieve", trained, "--query", query, "-k", 5, "--out", tmp_path / "ret"], capsys)
    assert code == 0 and "searched the test split of dåta with space (32 images)" in out
    results = json.loads((tmp_path / "ret" / "results.json").read_text())
    assert results["query_label"] == 4 and len(results["results"]) == 5
    assert results["query_class_name"] == "species_04" and results["model"]["run"] == str(trained.resolve())
    assert all(r["same_class"] == (r["label"] == 4) for r in results["results"])
    assert all(r["class_name"] == f"species_{r['label']:02d}" and r["class_name"] in out for r in results["results"])
    raw, order = [r["score"] for r in results["results"]], [r["rerank_score"] for r in results["results"]]
    assert results["rerank"]["keep"] == 1 and raw[0] == max(raw)  # the plain top hit stays first
    assert order[1:] == sorted(order[1:], reverse=True) and all(-1 <= s <= 1 for s in raw)
    assert str(query) not in [r["path"] for r in results["results"]]
    with Image.open(tmp_path / "ret" / "retrieval.png") as im:
        assert im.width > 4 * im.height  # query + 5 results in a row


def test_retrieve_any_image_and_original_spelling(trained, tmp_path, capsys):
    """A query image that is not in the database (no class known), via --query_img_name / --data_base."""
    query = tmp_path / "new.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(query)
    code, _, err = run_cli(
        [
            "retrieve",
            "--query_img_name",
            query,
            "--data_base",
            trained / "embeddings.npz",
            "--retrieval_num",
            3,
            "--out",
            tmp_path / "r",
        ],
        capsys,
    )
    assert code == 0, err
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["query_label"] is None and len(results["results"]) == 3
    assert all(r["same_class"] is None for r in results["results"])


def test_index_build_add_search(tiny_data, trained, tmp_path, capsys):
    some = tmp_path / "some"
    some.mkdir()
    for p in sorted((tiny_data / "images" / "species_05").glob("*.jpg"))[:4]:
        with Image.open(p) as im:
            im.save(some / p.name, quality=80)  # the same photos re-encoded: other images (a byte copy is not added)
    (some / "broken.jpg").write_bytes(b"not a jpeg")
    idx = tmp_path / "idx"
    code, out, _ = run_cli(["index", trained, "--images", tiny_data, "--out", idx], capsys)
    assert code == 0 and "total: 64" in out
    code, out, _ = run_cli(["index", trained, "--images", some, "--out", idx], capsys)
    assert code == 0 and "added: 4" in out and "total: 68" in out and "skipped: 1" in out
    assert json.loads((idx / "skipped.json").read_text())[0]["path"].endswith("broken.jpg")
    query = tiny_data / "images" / "species_04" / "0002.jpg"
    code, _, err = run_cli(["retrieve", "--index", idx, "--query", query, "-k", 4, "--out", tmp_path / "q"], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    assert results["query_label"] == 4 and len(results["results"]) == 4


def test_original_command_line_resolves_to_the_same_config(tmp_path):
    new = parser().parse_args(
        [
            "train",
            "--data",
            str(tmp_path / "car"),
            "--recipe",
            "original",
            "--loss",
            "proxy_anchor",
            "--optimizer",
            "sgd*",
            "--momentum",
            "0.7",
            "--lr",
            "0.01",
            "--recalls",
            "1,10",
            "--batch-size",
            "32",
            "--epochs",
            "5",
            "--device",
            "cpu",
        ]
    )
    old = parser().parse_args(
        [
            "train",
            "--data_path",
            str(tmp_path),
            "--data_name",
            "car",
            "--backbone_type",
            "resnet50",
            "--loss_name",
            "proxy_anchor",
            "--optimizer_type",
            "sgd*",
            "--momentum",
            "0.7",
            "--lr",
            "0.01",
            "--recalls",
            "1,10",
            "--batch_size",
            "32",
            "--num_epochs",
            "5",
            "--device",
            "cpu",
        ]
    )
    a, b = config_from_args(new), config_from_args(old)
    assert a == b
    assert a.out == str(Path("results") / "car_resnet50_proxy_anchor_sgd-momentum_0.7")  # no * in folder names
    assert (a.sgd_momentum, a.select, a.select_metric) == (0.0, "test", "recall@1")  # the original's plain SGD
    defaults = config_from_args(parser().parse_args(["train", "--data_path", str(tmp_path), "--device", "cpu"]))
    assert (
        defaults.backbone,
        defaults.loss,
        defaults.optimizer,
        defaults.proxy_update,
        defaults.proxy_momentum,
        defaults.lr,
        defaults.recalls,
        defaults.batch_size,
        defaults.epochs,
    ) == ("resnet50", "proxy_nca", "adam", "momentum", 0.5, 1e-3, [1, 2, 4, 8], 64, 20)  # the original's adam*
    assert (defaults.momentum_target, defaults.proxy_init, defaults.warmup_epochs) == ("sum", "random", 0)
    assert defaults.data == str(tmp_path / "car")
    recipe = config_from_args(parser().parse_args(["train", "--data", str(tmp_path / "car"), "--device", "cpu"]))
    assert (recipe.backbone, recipe.loss, recipe.lr, recipe.proxy_init, recipe.loss_params) == (
        "efficientnet_lite0",
        "cos_face",
        2.15e-5,
        "class_mean",
        (30.7, 0.216),
    )
    # the original recipe keeps the original tool's settings whatever the defaults are
    assert (defaults.pooling, defaults.schedule, defaults.aug_scale_min, defaults.loss_params) == (
        "max",
        "multistep",
        0.16,
        (None, None),
    )


def _train_config(*argv) -> TrainConfig:
    return config_from_args(parser().parse_args(["train", *map(str, argv)]))


# (an original tool's or this tool's earlier spelling, today's explicit flags, end of the run folder's name)
EARLIER_SPELLINGS = [
    (["--optimizer_type", "adam*"], ["--optimizer", "adam", "--proxy-update", "momentum"], "adam-momentum_0.5"),
    (["--optimizer_type", "sgd*"], ["--optimizer", "sgd", "--proxy-update", "momentum"], "sgd-momentum_0.5"),
    (["--optimizer_type", "adam"], ["--optimizer", "adam", "--proxy-update", "gradient"], "adam_0.5"),
    (["--optimizer_type", "sgd"], ["--optimizer", "sgd", "--proxy-update", "gradient"], "sgd_0.5"),
    (["--optimizer", "sgd*"], ["--optimizer", "sgd", "--proxy-update", "momentum"], "sgd-momentum_0.5"),
    (["--proxy-update", "mean"], ["--momentum-target", "mean", "--proxy-update", "momentum"], "adam-momentum_0.5"),
    (
        ["--optimizer", "sgd*", "--proxy-update", "sum"],
        ["--optimizer", "sgd", "--momentum-target", "sum"],
        "sgd-momentum_0.5",
    ),
    (["--momentum", "0.7"], ["--proxy-momentum", "0.7"], "adam-momentum_0.7"),
    (
        ["--backbone_type", "googlenet", "--loss_name", "arc_face", "--batch_size", "32", "--num_epochs", "5"],
        ["--backbone", "googlenet", "--loss", "arc_face", "--batch-size", "32", "--epochs", "5"],
        "adam-momentum_0.5",
    ),
]


@pytest.mark.parametrize("earlier,explicit,name", EARLIER_SPELLINGS, ids=[" ".join(e[0]) for e in EARLIER_SPELLINGS])
def test_every_earlier_spelling_means_what_it_meant(earlier, explicit, name, tmp_path):
    """`adam*` is Adam with momentum proxies, a plain `adam` of --optimizer_type learns them; the run folder keeps
    its earlier name (`adam-momentum`). The original tool's spelling `--data_path` implies the original recipe."""
    old = _train_config("--data_path", tmp_path, "--data_name", "cub", "--device", "cpu", *earlier)
    new = _train_config("--data", tmp_path / "cub", "--recipe", "original", "--device", "cpu", *explicit)
    assert old == new and old.out.endswith(f"_{name}")
    assert old.momentum_mode == ("momentum" in name)


def test_explicit_proxy_and_optimizer_options(tmp_path):
    cfg = _train_config(
        "--data",
        tmp_path,
        "--out",
        tmp_path / "r",
        "--proxy-update",
        "gradient",
        "--optimizer",
        "sgd",
        "--sgd-momentum",
        "0.5",
        "--proxy-momentum",
        "0.3",
        "--momentum-target",
        "sum",
        "--loader-workers",
        "3",
        "--no-final-test",
        "--eval-batch-size",
        "5",
        "--select",
        "null",
    )
    assert (cfg.proxy_update, cfg.optimizer, cfg.sgd_momentum, cfg.proxy_momentum, cfg.momentum_target) == (
        "gradient",
        "sgd",
        0.5,
        0.3,
        "sum",
    )
    assert (cfg.momentum_mode, cfg.loader_workers, cfg.final_test, cfg.embed_batch_size, cfg.select) == (
        False,
        3,
        False,
        5,
        None,
    )
    defaults = _train_config("--data", tmp_path, "--out", tmp_path / "r")
    assert (defaults.proxy_update, defaults.optimizer, defaults.proxy_momentum, defaults.momentum_target) == (
        "momentum",
        "adam",
        0.637,
        "mean",
    )
    assert (defaults.loader_workers, defaults.final_test, defaults.backbone) == (None, True, None)


def test_command_line_overrides_a_config_file_wherever_it_stands(tmp_path):
    (tmp_path / "c.yaml").write_text("proxy_update: gradient\nproxy_momentum: 0.2\nepochs: 7\n")
    config = ["--config", tmp_path / "c.yaml"]
    for argv in (["--epochs", "2", *config], [*config, "--epochs", "2"]):
        cfg = _train_config("--data", tmp_path, "--out", tmp_path / "r", *argv)
        assert (cfg.proxy_update, cfg.proxy_momentum, cfg.epochs) == ("gradient", 0.2, 2)
    cfg = _train_config("--data", tmp_path, "--out", tmp_path / "r", *config, "--optimizer", "adam*")
    assert (cfg.optimizer, cfg.proxy_update) == ("adam", "momentum")  # an earlier flag overrides the file too


@pytest.fixture(scope="module")
def images_split(tiny_data, tmp_path_factory):
    """`tiny_data`'s photos prepared with `prepare folder --split images`: all 8 species in train, val and test."""
    root = tmp_path_factory.mktemp("images split")
    shutil.copytree(tiny_data / "images", root / "src")
    main(["prepare", "folder", "--src", str(root / "src"), "--out", str(root / "data"), "--split", "images"])
    return root / "data"


def test_the_recipe_follows_the_protocol_and_options_override_it(images_split, tiny_data, tmp_path):
    """`--recipe auto` (the default) is the catalogue recipe on an images split and the default recipe on a
    class-disjoint one; explicit options and --config override it, an explicit --recipe replaces it."""
    default = TrainConfig(data="", out="")
    assert all(getattr(default, name) != value for name, value in CATALOGUE_RECIPE.items())  # else one goes untested

    def parsed(*argv) -> TrainConfig:
        return _train_config(*argv, "--out", tmp_path / "r").with_(data="", out="")

    assert parsed("--data", images_split) == TrainConfig.from_recipe("catalogue")
    assert parsed("--data", tiny_data) == default
    assert parsed("--data", images_split, "--recipe", "default") == default
    assert parsed("--lr", "3e-3", "--data", images_split) == TrainConfig.from_recipe("catalogue", lr=3e-3)
    (tmp_path / "c.json").write_text(json.dumps({"data": str(images_split), "epochs": 3, "recipe": "default"}))
    assert parsed("--config", tmp_path / "c.json") == TrainConfig.from_recipe("catalogue", epochs=3)  # its data
    swept = parser().parse_args(["sweep", "--data", str(images_split), "--out", str(tmp_path / "s")])
    assert swept.recipe == "catalogue" and all(getattr(swept, k) == v for k, v in CATALOGUE_RECIPE.items())


def test_an_unknown_recipe_is_refused_in_one_line(images_split, tmp_path, capsys):
    code, _, err = run_cli(["train", "--data", images_split, "--recipe", "bogus", "--out", tmp_path / "r"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("mproxy: error: ") and "invalid choice: 'bogus'" in err and "catalogue" in err


def test_train_says_which_recipe_and_the_run_records_it(images_split, tmp_path, capsys):
    run = tmp_path / "run"
    options = ["--pretrained", "none", "--image-size", "64", "--batch-size", "8", "--loader-workers", "0"]
    code, out, err = run_cli(["train", "--data", images_split, "--out", run, *options, "--epochs", "0"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("protocol: images"))
    assert lines[at + 1] == "recipe: catalogue (the images protocol's; --recipe default for the benchmark recipe)"
    stored = json.loads((run / "config.json").read_text())
    options = dict(pretrained="none", image_size=64, batch_size=8, loader_workers=0, epochs=0)
    assert TrainConfig.from_dict(stored).with_(data="", out="", backbone=None) == TrainConfig.from_recipe(
        "catalogue", **options
    )
    code, out, err = run_cli(["train", "--resume", run], capsys)  # auto does not make a resume refuse
    assert code == 0 and "already finished at epoch 0" in out, err
    code, _, err = run_cli(["train", "--resume", run, "--lr", str(stored["lr"])], capsys)
    assert code == 0, err  # the stored value: accepted
    code, _, err = run_cli(["train", "--resume", run, "--lr", str(stored["lr"] * 3)], capsys)
    assert code == 2 and f"--lr {stored['lr'] * 3} differs from the run's {stored['lr']}" in err


# config.json of a run of the earlier layout, as its train command wrote it (only the options that matter here)
EARLIER_CONFIG = {"optimizer": "sgd", "momentum": 0.3, "proxy_update": "sum", "workers": 0, "sgd_momentum": 0.9}


@pytest.mark.parametrize("optimizer,mode", [("sgd*", "momentum"), ("sgd", "gradient")])
def test_config_files_of_the_earlier_layout_load(optimizer, mode, tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps({**EARLIER_CONFIG, "optimizer": optimizer, "data": str(tmp_path), "out": str(tmp_path / "o")})
    )
    from_run = TrainConfig.from_dict(RunDir(tmp_path).info())
    from_flag = _train_config("--config", tmp_path / "config.json", "--device", "cpu")
    for cfg in (from_run, from_flag):
        assert (cfg.optimizer, cfg.proxy_update, cfg.proxy_momentum, cfg.momentum_target, cfg.loader_workers) == (
            "sgd",
            mode,
            0.3,
            "sum",
            0,
        )
    # tune's best.json: the searched options and the space's fixed ones (no optimizer: the default adam*)
    (tmp_path / "best.json").write_text(
        json.dumps({"data": str(tmp_path), "momentum": 0.6, "proxy_update": "mean", "workers": 0, "lr": 1e-4})
    )
    best = _train_config("--config", tmp_path / "best.json", "--out", tmp_path / "b")
    assert (best.optimizer, best.proxy_update, best.proxy_momentum, best.momentum_target, best.lr) == (
        "adam",
        "momentum",
        0.6,
        "mean",
        1e-4,
    )


def test_runs_of_the_earlier_layout_are_reported_plotted_and_swept(trained, tmp_path, capsys):
    from momentum_proxy.experiments.sweep import config_changes

    run = tmp_path / "old" / "run"
    shutil.copytree(trained, run)
    stored = json.loads((run / "config.json").read_text())
    today = TrainConfig.from_dict(RunDir(run).info())
    for key in ("proxy_momentum", "momentum_target", "loader_workers"):
        stored.pop(key)
    stored.update(optimizer="adam*", momentum=today.proxy_momentum, proxy_update=today.momentum_target, workers=0)
    (run / "config.json").write_text(json.dumps(stored))
    assert config_changes(RunDir(run), today) == []  # a sweep finds it finished
    code, out, err = run_cli(["report", tmp_path / "old"], capsys)
    assert code == 0, err
    assert "| optimizer | proxies | m |" in out and f"| adam | momentum | {today.proxy_momentum:g} |" in out
    code, _, err = run_cli(["plot", "momentum", tmp_path / "old"], capsys)
    assert code == 0 and (tmp_path / "old" / "momentum.png").stat().st_size > 1000, err


def test_cli_and_python_api_decide_the_default_backbone_alike(tmp_path):
    """No backbone given: EfficientNet-Lite0, ResNet-50 on CUDA, decided by the configuration for both entry points
    (the training loop calls `for_device` with the device it trains on)."""
    from_cli = _train_config("--data", tmp_path, "--out", tmp_path / "r")
    from_api = TrainConfig(data=str(tmp_path), out=str(tmp_path / "r"))
    assert from_cli.backbone is None and from_api.backbone is None
    for device_type, backbone in [("cpu", "efficientnet_lite0"), ("cuda", "resnet50")]:
        assert from_cli.for_device(device_type).backbone == from_api.for_device(device_type).backbone == backbone
    assert from_api.with_(backbone="googlenet").for_device("cuda").backbone == "googlenet"  # a given one stays
    named = _train_config("--data", tmp_path / "cub", "--device", "cuda")  # the run folder is named after it
    assert named.out == str(Path("results") / "cub_resnet50_cos_face_adam-momentum_0.637")


def _bad_manifest(tmp_path, name, text):
    d = tmp_path / name
    d.mkdir()
    (d / "manifest.csv").write_text(text)
    return d


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing_data", "data folder not found"),
        ("empty_data", "empty folder"),
        ("no_columns", "missing column"),
        ("bad_split", "unknown split"),
        ("unknown_backbone", "unknown backbone"),
        ("unknown_loss", "unknown --loss"),
        ("unknown_optimizer", "unknown --optimizer"),
        ("missing_query", "query image not found"),
        ("resume_nothing", "not a run folder"),
        ("existing_run", "already holds a run"),
    ],
)
def test_bad_input_gives_one_line_error(case, expected, tiny_data, trained, tmp_path, capsys):
    data = str(tiny_data)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {
        "missing_data": ["train", "--data", tmp_path / "nope", *TRAIN],
        "empty_data": ["train", "--data", empty, *TRAIN],
        "no_columns": ["train", "--data", _bad_manifest(tmp_path, "cols", "a,b\n1,2\n"), *TRAIN],
        "bad_split": [
            "train",
            "--data",
            _bad_manifest(tmp_path, "split", "path,label,class_name,split\nx.jpg,0,a,dev\n"),
            *TRAIN,
        ],
        "unknown_backbone": ["train", "--data", data, "--backbone", "vgg99", "--out", tmp_path / "r", *TRAIN],
        "unknown_loss": ["train", "--data", data, "--loss", "triplet", "--out", tmp_path / "r", *TRAIN],
        "unknown_optimizer": ["train", "--data", data, "--optimizer", "lamb", "--out", tmp_path / "r", *TRAIN],
        "missing_query": ["retrieve", trained, "--query", tmp_path / "missing.jpg"],
        "resume_nothing": ["train", "--resume", tmp_path],
        "existing_run": ["train", "--data", data, "--out", trained, *TRAIN],
    }[case]
    if args[0] == "train" and "--out" not in args and "--resume" not in args:
        args += ["--out", tmp_path / "run"]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mproxy: error:") and expected in lines[0], err
    assert "Traceback" not in err
    if case != "existing_run":
        assert not (tmp_path / "run" / "config.json").exists()  # bad input claims no run folder


def test_evaluate_embeddings_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 4)
    feats = (rng.normal(size=(10, 8))[labels] + 0.3 * rng.normal(size=(40, 8))).astype(np.float32)
    split = np.array(["query", "gallery"] * 20)
    np.savez(tmp_path / "e.npz", features=feats, labels=labels)
    np.savez(tmp_path / "qg.npz", features=feats, labels=labels, split=split)
    code, out, _ = run_cli(
        [
            "evaluate",
            "--embeddings",
            tmp_path / "e.npz",
            "--metrics",
            "recall,map@r",
            "--recalls",
            "1,5",
            "--json",
            tmp_path / "r.json",
        ],
        capsys,
    )
    assert code == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res) == {"recall@1", "recall@5", "map@r"} and all(0 <= v <= 1 for v in res.values())
    from momentum_proxy.evaluation.metrics import evaluate_embeddings

    q, g = split == "query", split == "gallery"
    expected = evaluate_embeddings(
        feats[g], labels[g], query_features=feats[q], query_labels=labels[q], metrics=["recall"], recalls=[1]
    )
    code, _, _ = run_cli(
        [
            "evaluate",
            "--embeddings",
            tmp_path / "qg.npz",
            "--metrics",
            "recall",
            "--recalls",
            "1",
            "--rerank",
            "none",
            "--json",
            tmp_path / "qg.json",
        ],
        capsys,
    )  # the plain cosine search
    assert code == 0 and json.loads((tmp_path / "qg.json").read_text()) == pytest.approx(expected)
    np.savez(tmp_path / "bad.npz", feats=feats)
    code, _, err = run_cli(["evaluate", "--embeddings", tmp_path / "bad.npz"], capsys)
    assert code == 2 and "lacks the array 'features'" in err


READ_ONLY = Path("/sys/mproxy-test") if os.geteuid() == 0 else None  # root ignores permission bits, not sysfs


@pytest.fixture
def places(tmp_path):
    """Bad places to write to: an existing file, a path under a file, a read-only folder."""
    file = tmp_path / "file.txt"
    file.write_text("x")
    read_only = READ_ONLY
    if read_only is None:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o500)
    return {"FILE": file, "UNDER_FILE": file / "sub", "READ_ONLY": read_only / "out", "DIR": tmp_path}


BAD = [  # (command line with placeholders, expected text of the one-line error)
    (["train", "--data", "DATA", "--out", "FILE", *TRAIN], "is a file"),
    (["train", "--data", "DATA", "--out", "UNDER_FILE", *TRAIN], "is a file"),
    (["train", "--data", "DATA", "--out", "READ_ONLY", *TRAIN], "cannot write the run folder"),
    (["train", "--data", "FILE", "--out", "DIR/r", *TRAIN], "not a folder"),
    (["train", "--data", "DATA", "--out", "DIR/r", "--metrics", "foo", *TRAIN], "unknown --metrics 'foo'"),
    (["train", "--data", "DATA", "--out", "DIR/r", "--momentum", "2", *TRAIN], "--proxy-momentum must be in [0, 1]"),
    (["train", "--data", "DATA", "--out", "DIR/r", "--select", "best", *TRAIN], "unknown --select"),
    (["train", "--data", "DATA", "--out", "DIR/r", "--select-metric", "nmi", *TRAIN], "unknown --select-metric"),
    (["train", "--data", "DATA", "--out", "DIR/r", "--proxy-update", "avg", *TRAIN], "unknown --proxy-update"),
    (["train", "--data", "DATA", "--out", "DIR/r", "--epochs", "-1", *TRAIN[:-4]], "--epochs must be >= 0"),
    (["train", "--resume", "FILE"], "not a run folder"),
    (["retrieve", "RUN", "--query", "QUERY", "--out", "FILE"], "is a file"),
    (["retrieve", "RUN", "--query", "QUERY", "--out", "READ_ONLY"], "cannot write the output folder"),
    (["retrieve", "RUN", "--query", "DIR", "--out", "DIR/r"], "is a folder; a file is expected"),
    (["retrieve", "RUN", "--query", "QUERY", "-k", "0"], "-k must be at least 1"),
    (["retrieve", "RUN", "--query", "QUERY", "--split", "dev", "--out", "DIR/r"], "unknown --split"),
    (["retrieve", "FILE", "--query", "QUERY", "--out", "DIR/r"], "not a run folder"),
    (["evaluate", "RUN", "--metrics", "foo"], "unknown metric 'foo'"),
    (["evaluate", "RUN", "--json", "DIR"], "is a folder"),
    (["prepare", "folder", "--src", "DATA", "--out", "FILE"], "is a file"),
    (["prepare", "folder", "--src", "FILE", "--out", "DIR/p"], "source folder not found"),
    (["prepare", "folder", "--src", "DATA", "--out", "READ_ONLY"], "cannot write the output folder"),
    (["prepare", "synthetic", "--out", "FILE"], "is a file"),
    (["prepare", "synthetic", "--out", "DIR/p", "--val-classes", "abc"], "--val-classes must be"),
    (["prepare", "synthetic", "--out", "DATA"], "already holds a prepared dataset"),
    (["sweep", "--data", "DATA", "--out", "DIR/s", "--momentum", "a,b", *TRAIN], "expected comma-separated float"),
    (["report", "DIR"], "no finished run"),
    (["plot", "curves", "FILE"], "is a file; a run folder is expected"),
]


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(BAD)])
def test_every_bad_path_or_option_is_one_line_and_writes_nothing(argv, expected, places, tiny_data, trained, capsys):
    subst = {**places, "DATA": tiny_data, "RUN": trained, "QUERY": tiny_data / "images" / "species_04" / "0001.jpg"}
    args = []
    for a in argv:
        head, _, tail = a.partition("/")
        args.append(str(subst[head] / tail) if head in subst and tail else str(subst.get(a, a)))
    before = {p: p.stat().st_mtime_ns for p in [*places["DIR"].rglob("*"), *trained.rglob("*"), *tiny_data.rglob("*")]}
    code, out, err = run_cli(args, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mproxy: error:") and expected in lines[0], err
    after = {p: p.stat().st_mtime_ns for p in [*places["DIR"].rglob("*"), *trained.rglob("*"), *tiny_data.rglob("*")]}
    assert after == before  # nothing written, nothing changed


def test_bad_options_fail_before_torch_is_imported(tiny_data, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; from momentum_proxy.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    assert 'torch' not in sys.modules, 'torch was imported'; raise"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "train",
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "r"),
            "--loss",
            "triplet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "unknown --loss 'triplet'" in res.stderr and "Traceback" not in res.stderr


NEW_OPTION_ERRORS = [  # (a bad value of a new option, its one-line error)
    (["--proxy-update", "avg"], "unknown --proxy-update 'avg'; choose from momentum, gradient"),
    (["--momentum-target", "avg"], "unknown --momentum-target 'avg'; choose from mean, sum"),
    (["--proxy-momentum", "2"], "--proxy-momentum must be in [0, 1], got 2.0"),
    (["--momentum", "abc"], "--proxy-momentum takes float, got 'abc'"),
    (["--optimizer", "lamb"], "unknown --optimizer 'lamb'; choose from adam, sgd"),
    (["--optimizer_type", "lamb*"], "unknown --optimizer 'lamb'; choose from adam, sgd"),
    (["--loader-workers", "-1"], "--loader-workers must be >= 0, got -1"),
    (["--loader-workers", "two"], "--loader-workers takes int | None, got 'two'"),
    (["--no-final-test", "yes"], "unrecognized arguments: yes"),
]


def test_bad_values_of_the_new_options_are_one_line_before_torch_is_imported(tiny_data, tmp_path):
    """All cases in one fresh interpreter (each in-process, its stderr captured): exit 2, the one line, no torch."""
    import subprocess
    import sys

    code = (
        "import contextlib, io, json, sys\nfrom momentum_proxy.cli import main\nresults = []\n"
        "for argv in json.loads(sys.argv[1]):\n    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n        try:\n            main(argv)\n"
        "        except SystemExit as e:\n            results.append([e.code, err.getvalue()])\n"
        "print(json.dumps({'results': results, 'torch': 'torch' in sys.modules}))"
    )
    base = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "r")]
    cases = json.dumps([base + argv for argv, _ in NEW_OPTION_ERRORS])
    res = subprocess.run([sys.executable, "-c", code, cases], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["torch"] is False and len(report["results"]) == len(NEW_OPTION_ERRORS)
    for (argv, expected), (status, err) in zip(NEW_OPTION_ERRORS, report["results"]):
        assert status == 2 and err == f"mproxy: error: {expected}\n", argv
    assert not (tmp_path / "r").exists()


def test_help_shows_defaults_and_version(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0 and "default: 2.15e-05)" in out and "default: cos_face)" in out
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("mproxy 0.")


def test_retrieve_large_k_is_capped_and_laid_out_in_rows(trained, tiny_data, tmp_path, capsys):
    query = tiny_data / "images" / "species_04" / "0001.jpg"
    code, out, _ = run_cli(["retrieve", trained, "--query", query, "-k", 1000, "--out", tmp_path / "r"], capsys)
    assert code == 0 and "-k 1000 capped to the 31 images there" in out
    with Image.open(tmp_path / "r" / "retrieval.png") as im:
        assert im.height > im.width / 4  # 32 pictures in rows of 10, not one 32-wide strip
    code, out, _ = run_cli(
        ["retrieve", trained, "--query", query, "-k", 3, "--split", "all", "--out", tmp_path / "all"], capsys
    )
    assert code == 0 and "searched all splits of dåta with space (64 images)" in out


def test_evaluate_notices_a_changed_dataset(trained, capsys, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data_manifest_sha256"] = "0" * 64
    (run / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["evaluate", run, "--metrics", "recall"], capsys)
    assert code == 0 and "manifest.csv changed since this run was trained" in err


def test_files_follow_the_umask(tmp_path):
    from momentum_proxy.fileio import write_json

    old = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_train_config_file_with_flags_overriding(tmp_path, tiny_data, capsys):
    (tmp_path / "c.yaml").write_text(f"data: {tiny_data}\nloss: cos_face\nlr: 0.003\nepochs: 7\n")
    cfg = config_from_args(
        parser().parse_args(
            ["train", "--config", str(tmp_path / "c.yaml"), "--epochs", "2", "--out", str(tmp_path / "r")]
        )
    )
    assert (cfg.data, cfg.loss, cfg.lr, cfg.epochs) == (str(tiny_data), "cos_face", 0.003, 2)
    (tmp_path / "c.json").write_text(json.dumps({"loss": "cos_face", "lrate": 1}))
    code, _, err = run_cli(["train", "--config", tmp_path / "c.json", "--data", "x"], capsys)
    assert code == 2 and re.fullmatch(r"mproxy: error: \S+c\.json: unknown option\(s\) lrate\n", err)


def test_every_multi_word_option_takes_its_underscore_spelling(tiny_data, tmp_path):
    from momentum_proxy.cli import OptionParser, add_train_options, config_from_args

    p = OptionParser(prog="train")
    add_train_options(p)
    p.add_argument("--out")
    a = p.parse_args(
        [
            "--data",
            str(tiny_data),
            "--out",
            str(tmp_path / "r"),
            "--image_size",
            "96",
            "--warmup_epochs",
            "0",
            "--backbone_lr_mult",
            "0.5",
            "--test_every_epoch",
        ]
    )
    cfg = config_from_args(a)
    assert (cfg.image_size, cfg.warmup_epochs, cfg.backbone_lr_mult, cfg.test_every_epoch) == (96, 0, 0.5, True)


def test_an_interrupted_command_says_how_to_continue(tiny_data, tmp_path, capsys, monkeypatch):
    from momentum_proxy.training import loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)
    code, _, err = run_cli(["train", "--data", tiny_data, "--out", tmp_path / "r", *TRAIN], capsys)
    assert code == 130 and err == f"mproxy: interrupted; continue with: mproxy train --resume {tmp_path / 'r'}\n"


def test_every_command_refuses_a_wrong_path_before_importing_torch(tmp_path):
    """One subprocess runs each command line in turn and checks that torch (and pandas) were never imported."""
    missing = tmp_path / "missing"
    cases = [
        ["train", "--data", missing, "--out", tmp_path / "r"],
        ["evaluate", missing],
        ["evaluate", "--embeddings", missing / "e.npz"],
        ["retrieve", missing, "--query", __file__],
        ["retrieve", "--index", missing, "--query", __file__],
        ["serve", f"milvus:{missing}.db"],
        ["retrieve", "--index", f"milvus:{missing}.db", "--query", __file__],
        ["index", missing, "--images", tmp_path, "--out", tmp_path / "i"],
        ["export", missing, "--out", tmp_path / "m.onnx"],
        ["serve", missing],
        ["plot", "curves", missing],
        ["report", missing],
        ["tune", "--data", missing, "--out", tmp_path / "t", "--trials", "1"],
        ["sweep", "--data", missing, "--out", tmp_path / "s"],
        ["train", "--resume", missing],
        ["tune-rerank", missing, "--out", tmp_path / "t", "--trials", "1"],
    ]
    code = f"""
import sys
from momentum_proxy.cli import main
for args in {[[str(a) for a in case] for case in cases]!r}:
    try:
        main(args)
    except SystemExit as e:
        assert e.code == 2, (args, e.code)
    heavy = {{"torch", "pandas", "faiss"}} & set(sys.modules)
    assert not heavy, (args, heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(cases) and all(
        line.startswith("mproxy: error: ") and "missing" in line for line in lines
    ), lines


@pytest.mark.parametrize(
    "args,message",
    [
        (["bench", "--loader-workers", "abc"], "--loader-workers takes int, got 'abc'"),
        (["frob"], "invalid choice: 'frob'"),
        (["index"], "the following arguments are required: run_dir, --out"),
        (["prepare", "folder"], "the following arguments are required: --src, --out"),
    ],
)
def test_argument_errors_of_every_command_are_one_line(args, message, capsys):
    code, out, err = run_cli(args, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("mproxy: error: ") and message in err
