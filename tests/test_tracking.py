"""Experiment tracking (`train --log tensorboard`): the event files hold metrics.csv's values epoch by epoch and a
retrieval picture; a run stopped and resumed holds each epoch once; only rank 0 writes; without the [track] extra
the option fails in one line naming it."""

import io
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from momentum_proxy.cli import config_from_args, parser
from momentum_proxy.errors import UserError
from momentum_proxy.runs import RunDir
from momentum_proxy.training.config import TrainConfig
from momentum_proxy.training.loop import resume, train
from momentum_proxy.training.tracking import Tracker, open_tracker

GREEN, RED = (0x1A, 0x98, 0x50), (0xD7, 0x30, 0x27)  # the picture's frames (plots.draw_results)


def accumulator(run):
    """Everything TensorBoard shows for the run, read back by its own reader (steps purged as it purges them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the [track] extra

    acc = EventAccumulator(str(Path(run) / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def tag(column: str) -> str:
    return column.replace("_", "/", 1) if column.startswith(("train_", "val_", "test_")) else f"train/{column}"


def assert_mirrors_metrics_csv(run) -> None:
    """Every metrics.csv column (but epoch) is a scalar with one value per epoch, equal to the file's (float32)."""
    rows, acc = RunDir(run).metrics(), accumulator(run)
    columns = [c for c in rows[0] if c != "epoch"]
    assert sorted(acc.Tags()["scalars"]) == sorted(map(tag, columns))
    for column in columns:
        expected = [(r["epoch"], r[column]) for r in rows if math.isfinite(r[column])]
        got = [(e.step, e.value) for e in acc.Scalars(tag(column))]
        assert [s for s, _ in got] == [s for s, _ in expected], column
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), column


def test_the_event_files_mirror_metrics_csv_and_picture_every_epoch(tiny_config):
    cfg = tiny_config.with_(log="tensorboard", test_every_epoch=True)
    train(cfg)
    assert_mirrors_metrics_csv(cfg.out)
    acc = accumulator(cfg.out)
    assert {"train/loss", "train/lr", "val/map@r", "val/recall@1", "test/map@r"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]  # epoch 0 trained nothing: no loss, no rate
    assert acc.Tags()["images"] == ["retrieval/val"]  # val is pictured when both splits are scored
    images = acc.Images("retrieval/val")
    assert [i.step for i in images] == [0, 1, 2]
    picture = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    framed = sum(int((picture == colour).all(axis=-1).sum()) for colour in (GREEN, RED))
    assert picture.shape[0] > 100 and picture.shape[1] > 500 and framed > 500


def test_a_resumed_run_continues_the_event_files_without_repeating_an_epoch(tiny_config, monkeypatch):
    cfg = tiny_config.with_(log="tensorboard")
    save = RunDir.save_checkpoint

    def stop_before_epoch_2_is_saved(self, rel, state):
        if state["epoch"] == 2:
            raise RuntimeError("stopped")
        save(self, rel, state)

    monkeypatch.setattr(RunDir, "save_checkpoint", stop_before_epoch_2_is_saved)
    with pytest.raises(RuntimeError, match="stopped"):
        train(cfg)
    monkeypatch.undo()
    resume(cfg.out)  # from epoch 1: epoch 2 is trained and logged again
    files = sorted((Path(cfg.out) / "tensorboard").glob("events.out.tfevents.*"))
    written = Counter(step for f in files for step, tags in file_events(f) if "val/map@r" in tags)
    assert len(files) == 2 and written == {0: 1, 1: 1, 2: 2}  # the stopped run had logged epoch 2 already
    assert_mirrors_metrics_csv(cfg.out)  # ... and TensorBoard shows it once: the resumed writer purged it
    assert [i.step for i in accumulator(cfg.out).Images("retrieval/val")] == [0, 1, 2]


def file_events(path: Path):
    """(step, tags) of every event of one event file, as written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # the [track] extra

    for event in EventFileLoader(str(path)).Load():
        yield event.step, {v.tag for v in event.summary.value}


def test_only_rank_0_writes(tiny_config, tmp_path):
    cfg = tiny_config.with_(log="tensorboard")
    for tracker in (open_tracker(cfg, tmp_path, is_main=False), open_tracker(cfg.with_(log="none"), tmp_path, True)):
        assert type(tracker) is Tracker
        tracker.epoch({"epoch": 0, "val_map@r": 0.5})
        tracker.close()
    assert not any(tmp_path.iterdir())
    assert type(open_tracker(cfg, tmp_path / "run", is_main=True)) is not Tracker


def test_the_option_is_parsed_and_checked(tiny_data, tmp_path, capsys):
    args = parser().parse_args(
        ["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--log", "tensorboard"]
    )
    assert config_from_args(args).log == "tensorboard"
    code, _, err = run_cli(["train", "--data", tiny_data, "--out", tmp_path / "run", "--log", "wandb"], capsys)
    assert code == 2 and err == "mproxy: error: unknown --log 'wandb'; choose from none, tensorboard\n"


def test_without_tensorboard_the_option_fails_in_one_line_naming_the_extra(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails, as without the [track] extra
    for command in ("train", "sweep"):
        code, _, err = run_cli(
            [command, "--data", tiny_data, "--out", tmp_path / command, "--log", "tensorboard"], capsys
        )
        assert code == 2
        assert err == (
            f"mproxy: error: mproxy {command} --log tensorboard needs the [track] extra: "
            "pip install 'momentum-proxy[track]'\n"
        )
    with pytest.raises(UserError, match=r"^--log tensorboard needs the \[track\] extra"):  # the Python API, resume
        train(TrainConfig(data=str(tiny_data), out=str(tmp_path / "api"), log="tensorboard"))
    assert not any(tmp_path.iterdir())  # refused before anything was written
