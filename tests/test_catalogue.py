"""The images protocol (`prepare folder --split images`): every class in every split, evaluation against a gallery
(the catalogue), training on the user's classes, selection that can choose, and `evaluate --index`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_run, run_cli
from test_prepare import jpeg, report

from momentum_proxy.data.manifest import read_manifest, split_frame, split_protocol
from momentum_proxy.data.prepare import prepare_folder
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.jobs import evaluate_arrays
from momentum_proxy.evaluation.metrics import class_margin
from momentum_proxy.training.loop import Choice, choice_lines, choose_epoch


def photo_tree(root: Path, sizes: dict[str, int]) -> Path:
    """An ImageFolder tree: `sizes[class]` noise photos per class folder."""
    for c, (name, n) in enumerate(sizes.items()):
        for i in range(n):
            jpeg(root / name / f"{i}.jpg", size=(24, 20), seed=1000 * c + i)
    return root


def test_images_split_puts_every_class_in_every_split_and_names_the_small_ones(tmp_path, capsys):
    small = {f"tiny_{i:02d}": 1 + i % 2 for i in range(12)}  # 1 or 2 photos: too few for train, val and test
    src = photo_tree(tmp_path / "src", {"big": 10, "mid": 3, **small})
    code, out, err = run_cli(["prepare", "folder", "--src", src, "--out", tmp_path / "p", "--split", "images"], capsys)
    assert code == 0 and "protocol: images" in out
    df = read_manifest(tmp_path / "p")
    per_class = df.groupby("class_name")["split"].value_counts().unstack(fill_value=0)
    assert per_class.loc["big"].to_dict() == {"train": 5, "val": 2, "test": 3}  # 0.2 / 0.3 of 10, stratified
    assert per_class.loc["mid"].to_dict() == {"train": 1, "val": 1, "test": 1}  # the minimum: one in each
    assert (per_class.loc[list(small), ["val", "test"]] == 0).all().all()  # too small: train only, never dropped
    assert (per_class.loc[list(small), "train"] == pd.Series(small)).all()
    warning = [line for line in err.splitlines() if "too few photos for one in every split" in line]
    assert len(warning) == 1 and "12 class(es)" in warning[0]
    assert "tiny_00, tiny_01" in warning[0] and "tiny_09 and 2 more" in warning[0]  # 10 names, then a count
    rep = report(tmp_path / "p")
    assert rep["protocol"] == "images" and rep["warnings"] == [warning[0].removeprefix("mproxy: warning: ")]
    again = prepare_folder(src, tmp_path / "q", split="images")
    assert read_manifest(again).equals(df)  # seeded
    other = read_manifest(prepare_folder(src, tmp_path / "r", split="images", val_seed=1))
    assert not other.equals(df) and other["split"].value_counts().equals(df["split"].value_counts())


def test_images_split_without_val_and_refused_settings(tmp_path, capsys):
    src = photo_tree(tmp_path / "src", {"a": 4, "b": 4})
    code, out, _ = run_cli(
        ["prepare", "folder", "--src", src, "--out", tmp_path / "p", "--split", "images", "--val-classes", "0"], capsys
    )
    assert code == 0 and set(read_manifest(tmp_path / "p")["split"]) == {"train", "test"}
    assert "every class in train and test" in out
    with pytest.raises(UserError, match="together below 1"):
        prepare_folder(src, tmp_path / "x", split="images", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError, match="cannot go with --split images"):
        prepare_folder(src, tmp_path / "x", split="images", split_file=tmp_path / "s.csv")
    assert not (tmp_path / "x").exists()  # refused before any work


def test_a_class_disjoint_split_of_few_classes_names_split_images_in_one_line(tmp_path, capsys):
    src = photo_tree(tmp_path / "src", {f"c{i:02d}": 3 for i in range(12)})
    code, out, err = run_cli(["prepare", "folder", "--src", src, "--out", tmp_path / "p"], capsys)
    assert code == 0 and "protocol: classes" in out
    few = [line for line in err.splitlines() if "classes are left to train" in line]
    assert len(few) == 1 and "--split images" in few[0] and "--val-classes 0" in few[0]
    code, _, err = run_cli(["prepare", "folder", "--src", src, "--out", tmp_path / "q", "--val-classes", "0"], capsys)
    assert code == 0 and "--val-classes 0" not in err  # never advised when it is already given
    assert "--split images" in err
    code, _, err = run_cli(
        ["prepare", "synthetic", "--out", tmp_path / "s", "--classes", 6, "--per-class", 3, "--size", 32], capsys
    )
    assert code == 0 and "classes are left to train" in err and "--split images" not in err  # folder only


def test_images_split_evaluates_val_and_test_against_the_catalogue(tmp_path):
    src = photo_tree(tmp_path / "src", {"a": 10, "b": 10, "c": 3})
    df = read_manifest(prepare_folder(src, tmp_path / "p", split="images"))
    assert split_protocol(df) == "images"
    for split, gallery in [("val", {"train"}), ("test", {"train", "val"})]:
        frame = split_frame(df, split)
        queries, rest = frame[frame["split"] == "query"], frame[frame["split"] == "gallery"]
        assert set(queries["path"]) == set(df.loc[df["split"] == split, "path"])
        assert set(rest["path"]) == set(df.loc[df["split"].isin(gallery), "path"])
    assert (split_frame(df, "train")["split"] == "train").all()
    disjoint = df.assign(split=np.where(df["class_name"] == "a", "train", "test"))
    assert split_protocol(disjoint) == "classes" and set(split_frame(disjoint, "test")["split"]) == {"test"}


def brute_force(query, query_labels, gallery, gallery_labels, ks):
    """R@K, precision@1 and MAP@R (R: the query's class count in the gallery) by sorting every similarity."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    out = {f"recall@{k}": [] for k in ks} | {"precision@1": [], "map@r": []}
    for i in range(len(q)):
        r = int((gallery_labels == query_labels[i]).sum())
        if r == 0:
            continue
        order = np.lexsort((np.arange(len(g)), -(g @ q[i])))  # ties by gallery index
        hits = gallery_labels[order] == query_labels[i]
        for k in ks:
            out[f"recall@{k}"].append(hits[:k].any())
        out["precision@1"].append(hits[0])
        top = hits[:r]
        out["map@r"].append((np.cumsum(top) / np.arange(1, r + 1) * top).sum() / r)
    return {k: float(np.mean(v)) for k, v in out.items()}


def test_gallery_evaluation_equals_brute_force():
    rng = np.random.default_rng(0)
    gallery, gallery_labels = rng.normal(size=(40, 6)), rng.integers(0, 5, 40)
    query, query_labels = rng.normal(size=(15, 6)), np.append(rng.integers(0, 5, 14), 9)  # class 9: lone
    features = np.concatenate([query, gallery])
    labels = np.concatenate([query_labels, gallery_labels])
    split = np.array(["query"] * 15 + ["gallery"] * 40)
    got = evaluate_arrays(features, labels, split, metrics=["recall", "precision@1", "map@r"], recalls=[1, 2, 4, 8])
    want = brute_force(query, query_labels, gallery, gallery_labels, [1, 2, 4, 8])
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_class_margin_equals_brute_force():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 4, 30)
    split = np.array(["query"] * 10 + ["gallery"] * 20)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)

    def mean_of(rows):
        m = unit[rows].sum(0)
        return m / np.linalg.norm(m)

    margins = []
    for i in range(10):
        own = mean_of([j for j in range(10, 30) if y[j] == y[i]])
        others = [mean_of([j for j in range(10, 30) if y[j] == c]) for c in set(y[10:]) - {y[i]}]
        margins.append(unit[i] @ own - max(unit[i] @ o for o in others))
    assert class_margin(x, y, split) == pytest.approx(np.mean(margins), abs=1e-6)
    leave_one_out = []
    for i in range(30):
        own = mean_of([j for j in range(30) if y[j] == y[i] and j != i])
        others = [mean_of([j for j in range(30) if y[j] == c]) for c in set(y) - {y[i]}]
        leave_one_out.append(unit[i] @ own - max(unit[i] @ o for o in others))
    assert class_margin(x, y) == pytest.approx(np.mean(leave_one_out), abs=1e-6)


def rows(*values):
    return [{"epoch": e, "val_recall@1": r, "val_map@r": m, "val_margin": g} for e, (r, m, g) in enumerate(values)]


def test_selection_falls_back_on_finer_metrics_and_keeps_the_first_of_a_full_tie():
    keys = ["val_recall@1", "val_map@r", "val_margin"]
    assert choose_epoch(rows((0.9, 0.5, 0.1), (0.95, 0.4, 0.0)), keys) == Choice(1)  # no tie: the metric decides
    assert choose_epoch(rows((1.0, 0.5, 0.1), (1.0, 0.6, 0.0), (1.0, 0.55, 0.0)), keys) == Choice(
        1, "val_map@r", (0, 1, 2)
    )
    assert choose_epoch(rows((1.0, 0.6, 0.1), (1.0, 0.6, 0.2), (0.9, 0.9, 0.9)), keys) == Choice(
        1, "val_margin", (0, 1)
    )
    # a tie on every metric keeps the FIRST best epoch (a "last best" rule would pick 2 here)
    assert choose_epoch(rows((0.5, 0.1, 0.1), (1.0, 0.6, 0.2), (1.0, 0.6, 0.2)), keys) == Choice(1, "tie", (1, 2))
    assert choose_epoch(rows((1.0, 0.6, 0.2), (1.0, 0.6, 0.2)), keys).epoch == 0
    assert choose_epoch(rows((1.0, 0.6, float("nan")), (1.0, 0.6, 0.0)), keys).epoch == 1  # NaN counts as lowest


def test_choice_lines_say_how_a_tie_was_broken_and_when_the_pretrained_model_is_kept():
    summary = {
        "epoch": 0,
        "selected_on": "val",
        "select_metric": "recall@1",
        "selection_score": 1.0,
        "tie_break": "map@r",
        "tied_epochs": [0, 1, 2],
        "epochs": 2,
    }
    assert choice_lines(summary) == [
        "val recall@1 tied at 1.0000 in epochs 0, 1, 2: chosen on val map@r instead (the selection metric is "
        "saturated)",
        "training did not improve validation; the pretrained model is kept",
    ]
    assert choice_lines({**summary, "epoch": 1, "tie_break": None, "tied_epochs": []}) == []
    assert choice_lines({**summary, "epochs": 0, "tie_break": None}) == []  # --epochs 0 trains nothing, by choice


@pytest.fixture(scope="module")
def tiny_images(tiny_data, tmp_path_factory):
    """`tiny_data`'s 8 species as an images split: per species 4 train, 2 val, 2 test photos."""
    root = tmp_path_factory.mktemp("images")
    df = read_manifest(tiny_data)
    for path, name in zip(df["path"], df["class_name"]):
        (root / "src" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tiny_data) / path, root / "src" / name / Path(path).name)
    return prepare_folder(root / "src", root / "data", split="images", val_fraction=0.25, test_fraction=0.25)


def test_training_on_an_images_split_has_a_proxy_for_every_class(tiny_images, tiny_config, capsys, monkeypatch):
    from momentum_proxy.runs import LAST, RunDir
    from momentum_proxy.training import loop

    scores = iter([{"val_recall@1": 1.0, "val_map@r": 1.0, "val_margin": m} for m in (0.3, 0.2, 0.3)])
    monkeypatch.setattr(loop, "score", lambda job, model: next(scores))  # a saturated validation split
    cfg = tiny_config.with_(data=str(tiny_images), select_metric="recall@1")
    summary = loop.train(cfg)
    out = capsys.readouterr().out
    assert "protocol: images" in out
    proxies = RunDir(cfg.out).load_checkpoint(LAST)["loss"]["W"]
    assert proxies.shape == (cfg.feature_dim, 8)  # all 8 species: every one has train photos
    assert summary["epoch"] == 0 and summary["tie_break"] == "tie" and summary["tied_epochs"] == [0, 1, 2]
    assert summary["queries"] == 16 and summary["lone_queries"] == 0  # 2 test photos a species, searched in 48
    lines = out.strip().splitlines()
    assert "the first of them is kept" in lines[-2]
    assert lines[-1] == "training did not improve validation; the pretrained model is kept"


def test_a_run_without_val_prints_no_empty_start_line(tiny_data, tiny_config, tmp_path, capsys):
    from momentum_proxy.data.manifest import write_manifest
    from momentum_proxy.training import loop

    data = tmp_path / "noval"
    shutil.copytree(tiny_data, data)
    df = read_manifest(data)
    write_manifest(data, df[df["split"] != "val"])
    loop.train(tiny_config.with_(data=str(data), epochs=1))
    out = capsys.readouterr().out
    assert "epoch 0" not in out and "epoch 1:" in out and "kept the last epoch (1)" in out


def test_evaluate_against_an_index_scores_the_test_photos_in_the_catalogue(tiny_images, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_images)
    photos = Path(tiny_images).parent / "src"  # the user's photo folders: labels by folder name, numbered anew
    code, _, err = run_cli(
        ["index", run, "--images", photos, "--out", tmp_path / "idx", "--tta", "none", "--rerank", "none"], capsys
    )
    assert code == 0, err
    code, out, err = run_cli(["evaluate", run, "--index", tmp_path / "idx", "--rerank", "none"], capsys)
    assert code == 0, err
    assert "16 test photos found in it left out" in out  # their originals: a query never finds itself
    by_index = json.loads((Path(run) / "evaluate-torch-index.json").read_text())
    code, _, err = run_cli(["evaluate", run, "--tta", "none", "--rerank", "none", "--out", tmp_path / "e.json"], capsys)
    assert code == 0, err
    own = json.loads((tmp_path / "e.json").read_text())
    assert "the catalogue (48 train + val images)" in own["against"]
    assert by_index["gallery"] == 48 and by_index["queries"] == own["queries"] == 16
    for key, value in own["test"].items():  # the same catalogue, reached through the index
        assert by_index["test"][key] == pytest.approx(value, abs=1e-6), key
    code, _, err = run_cli(["evaluate", run, "--index", tmp_path / "idx", "--split", "val"], capsys)
    assert code == 2 and err.strip().startswith("mproxy: error: --index scores")
