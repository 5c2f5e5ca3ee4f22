import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same, wait_for

from momentum_proxy.data.loading import load_datasets
from momentum_proxy.embedding.inference import ModuleEmbedder, embed_dataset, load_model
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.jobs import evaluate_arrays
from momentum_proxy.runs import BEST, LAST, RunDir, load_embeddings
from momentum_proxy.training import loop as training
from momentum_proxy.training.config import TrainConfig
from momentum_proxy.training.losses import LOSSES
from momentum_proxy.training.proxies import MomentumProxyUpdate, proxies_by_class, proxy_parameter

MODES = [("adam", "momentum"), ("sgd", "momentum"), ("adam", "gradient"), ("sgd", "gradient")]


def _batch(n=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % classes


@pytest.mark.parametrize("optimizer,proxy_update", MODES)
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_every_loss_and_optimizer_mode_steps(tiny_config, loss_name, optimizer, proxy_update):
    cfg = tiny_config
    cfg.loss, cfg.optimizer, cfg.proxy_update, cfg.proxy_momentum = loss_name, optimizer, proxy_update, 0.3
    torch.manual_seed(0)
    model, loss_fn = training.build(cfg, num_classes=3)
    opt = training.make_optimizer(cfg, model, loss_fn)
    proxy, _ = proxy_parameter(loss_fn)
    in_optimizer = any(p is proxy for g in opt.param_groups for p in g["params"])
    trainee = training.Trainee(model, loss_fn).train()
    images, labels = _batch()
    before = proxies_by_class(loss_fn).clone()
    head_before = model.fc.weight.detach().clone()

    loss, emb = trainee(images, labels)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.fc.weight, head_before)  # the network learns in every mode
    if cfg.momentum_mode:
        assert not in_optimizer and not proxy.requires_grad and proxy.grad is None
        assert torch.equal(proxies_by_class(loss_fn), before)  # the optimizer step left proxies alone
        MomentumProxyUpdate(cfg.proxy_momentum).update_loss(loss_fn, emb, labels)
        for c in range(3):
            expected = 0.7 * before[c] + 0.3 * emb[labels == c].detach().mean(0)
            torch.testing.assert_close(proxies_by_class(loss_fn)[c], expected)
    else:
        assert in_optimizer and proxy.grad is not None
        assert not torch.equal(proxies_by_class(loss_fn), before)  # learnable proxies are trained


def test_the_loop_decides_the_default_backbone_for_its_device_and_records_it(tiny_config):
    """The Python API, like the command line, leaves the backbone to the configuration: on this CPU, Lite0."""
    cfg = replace(tiny_config, backbone=None)
    job, _ = training.setup(cfg, overwrite=False, resume=False)
    assert job.cfg.backbone == "efficientnet_lite0" == RunDir(cfg.out).config().backbone


def test_train_writes_a_complete_run_folder(tiny_config):
    tiny_config.epochs = 3
    summary = training.train(tiny_config)
    run = RunDir(tiny_config.out)
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["optimizer"], cfg["proxy_update"]) == ("adam", "momentum")
    assert cfg["selection"] == "val" and "torch" in cfg["versions"]
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert np.isnan(rows[0]["train_loss"]) and all(np.isfinite(r["train_loss"]) for r in rows[1:])
    assert {"val_recall@1", "val_map@r", "seconds"} <= set(rows[0]) and not any(k.startswith("test") for k in rows[0])
    # best.pt holds the argmax epoch on val (first one on ties), its weights reproduce that epoch's val figure
    argmax = max(rows, key=lambda r: (r["val_map@r"], -r["epoch"]))["epoch"]
    best = run.load_checkpoint(BEST)
    assert best["epoch"] == summary["epoch"] == argmax
    assert run.load_checkpoint(LAST)["epoch"] == 3
    model, cfg_, _ = load_model(tiny_config.out, "cpu")
    data = load_datasets(tiny_config.data, tiny_config.image_size)
    val = evaluate_arrays(
        embed_dataset(ModuleEmbedder(model), data.val.dataset), data.val.labels, data.val.split, metrics=["map@r"]
    )
    assert val["map@r"] == pytest.approx(rows[argmax]["val_map@r"], abs=1e-6)
    # embeddings.npz and eval.json come from best.pt, on the test split
    db = load_embeddings(run / "embeddings.npz")
    np.testing.assert_allclose(db["features"], embed_dataset(ModuleEmbedder(model), data.test.dataset), atol=1e-5)
    assert db["features"].shape == (32, 512) and set(db["split"]) == {"test"} and len(db["class_names"]) == 32
    ev = json.loads((run / "eval.json").read_text())
    assert ev["selected_on"] == "val" and ev["epoch"] == argmax and ev["queries"] == 32
    assert ev["test"]["map@r"] == pytest.approx(
        evaluate_arrays(db["features"], db["labels"], db["split"], metrics=["map@r"])["map@r"]
    )
    assert not list(Path(tiny_config.out).rglob("*.tmp"))  # atomic writes leave no temporaries
    log = (run / "train.log").read_text()
    assert "epoch 3:" in log and "\r" not in log and "selected epoch" in log


def test_test_labels_are_never_read_before_the_final_evaluation(tiny_config, tmp_path):
    """Shuffling the test labels changes nothing but the final test figures."""
    import shutil

    import pandas as pd

    training.train(tiny_config)
    shuffled = tmp_path / "shuffled"
    shutil.copytree(tiny_config.data, shuffled)
    df = pd.read_csv(shuffled / "manifest.csv")
    test = df["split"] == "test"
    df.loc[test, "label"] = np.random.default_rng(0).permutation(df.loc[test, "label"].to_numpy())
    df.to_csv(shuffled / "manifest.csv", index=False)
    other = replace(tiny_config, data=str(shuffled), out=str(tmp_path / "other"))
    training.train(other)
    a, b = RunDir(tiny_config.out), RunDir(other.out)
    val = lambda rows: [{k: v for k, v in r.items() if k.startswith("val_")} for r in rows]  # noqa: E731
    assert val(a.metrics()) == val(b.metrics())
    for name, value in a.load_checkpoint(BEST)["model"].items():
        assert torch.equal(value, b.load_checkpoint(BEST)["model"][name]), name
    assert a.eval()["test"] != b.eval()["test"]  # the final evaluation did read the (shuffled) labels


def test_select_last_without_val_and_select_test_is_labelled(tiny_data, tmp_path, capsys):
    import pandas as pd

    from momentum_proxy.experiments.sweep import report

    no_val = tmp_path / "noval"
    no_val.mkdir()
    df = pd.read_csv(tiny_data / "manifest.csv")
    df["path"] = [str(tiny_data / p) for p in df["path"]]
    df[df["split"] != "val"].to_csv(no_val / "manifest.csv", index=False)
    base = TrainConfig(
        data=str(no_val),
        out=str(tmp_path / "last"),
        pretrained="none",
        image_size=64,
        batch_size=8,
        epochs=2,
        loader_workers=0,
        warmup_epochs=0,
    )
    assert training.train(base)["selected_on"] == "last" and RunDir(base.out).load_checkpoint(BEST)["epoch"] == 2
    with pytest.raises(UserError, match="needs a val split"):
        training.train(replace(base, out=str(tmp_path / "v"), select="val"))
    on_test = replace(base, out=str(tmp_path / "runs" / "test"), select="test")
    summary = training.train(on_test)
    assert summary["selected_on"] == "test" and "optimistic" in summary["warning"]
    assert "test_map@r" in RunDir(on_test.out).metrics()[0]
    assert "SELECTED ON TEST" in capsys.readouterr().out
    assert "SELECTED ON TEST" in (RunDir(on_test.out) / "train.log").read_text()
    assert "**test** (optimistic)" in report(tmp_path / "runs")


def test_lr_column_is_the_rate_the_epoch_trained_with(tiny_config):
    tiny_config.epochs, tiny_config.milestone_rounding = 3, "floor"  # milestones int(1.5)=1, int(2.4)=2
    tiny_config.schedule, tiny_config.lr = "multistep", 1e-4
    training.train(tiny_config)
    assert [r["lr"] for r in RunDir(tiny_config.out).metrics()[1:]] == pytest.approx([1e-4, 1e-5, 1e-6])


def test_proxies_start_at_raw_class_means(tiny_config):
    """Proxy initialisation and the momentum update work in the same (raw embedding) space."""
    tiny_config.epochs = 1
    job, state = training.setup(tiny_config, overwrite=False, resume=False)
    training.start(job, state)
    raw = embed_dataset(ModuleEmbedder(state.model, normalize=False), job.data.train_eval)
    labels = np.asarray(job.data.train.labels)
    expected = np.stack([raw[labels == c].mean(0) for c in range(2)])
    np.testing.assert_allclose(proxies_by_class(state.loss_fn).numpy(), expected, rtol=1e-4, atol=1e-4)
    assert np.linalg.norm(expected, axis=1).min() > 2  # raw, not unit-normalised


def test_training_loop_applies_the_momentum_update(tiny_config, monkeypatch):
    """Every optimizer step is followed by the loop's own proxy update, with the batch's embeddings."""
    calls = []
    real = MomentumProxyUpdate.update_loss

    def spy(self, loss, emb, labels):
        before = proxies_by_class(loss).clone()
        real(self, loss, emb, labels)
        calls.append((before, emb.clone(), labels.clone(), proxies_by_class(loss).clone(), self.momentum))

    monkeypatch.setattr(MomentumProxyUpdate, "update_loss", spy)
    tiny_config.epochs, tiny_config.proxy_momentum = 1, 0.3
    training.train(tiny_config)
    assert [c[4] for c in calls] == [1.0, 0.3, 0.3]  # proxy init (class means), then 2 steps (16 images, batch 8)
    for before, emb, labels, after, _ in calls[1:]:
        for c in labels.unique():
            torch.testing.assert_close(after[c], 0.7 * before[c] + 0.3 * emb[labels == c].mean(0))
    saved = RunDir(tiny_config.out).load_checkpoint(LAST)["loss"]["W"].t()
    assert torch.equal(saved, calls[-1][3])


def _state(run_dir):
    return torch.load(Path(run_dir) / LAST, weights_only=True)


def _assert_same_runs(straight, resumed):
    """Checkpoints (model, proxies, optimizer, scheduler, RNG), best.pt, metrics, embeddings and eval.json."""
    a, b = RunDir(straight), RunDir(resumed)
    for rel in (LAST, BEST):
        assert_same(a.load_checkpoint(rel), b.load_checkpoint(rel), rel)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a.metrics()) == strip(b.metrics()) and [r["epoch"] for r in b.metrics()] == [0, 1, 2, 3]
    ea, eb = load_embeddings(a / "embeddings.npz"), load_embeddings(b / "embeddings.npz")
    assert np.array_equal(ea["features"], eb["features"]) and a.eval() == b.eval()


def test_resume_after_an_interrupted_epoch_ends_in_the_same_state(tiny_config, tmp_path):
    """Stopped in this process after its warm-up epoch (the RNG has moved on since) and resumed, the run ends
    bit-identical to an uninterrupted one (a real killed process: the slow test below)."""
    tiny_config.epochs, tiny_config.warmup_epochs = 3, 1
    training.train(tiny_config)
    stopped = replace(tiny_config, out=str(tmp_path / "stopped"))

    def stop_after_epoch_1(row):
        if row["epoch"] == 1:
            raise _Stopped

    with pytest.raises(_Stopped):
        training.train(stopped, on_epoch=stop_after_epoch_1)
    torch.rand(7)  # the process's RNG is not where the checkpoint left it
    training.resume(stopped.out)
    _assert_same_runs(tiny_config.out, stopped.out)
    assert "resuming from epoch 1" in (RunDir(stopped.out) / "train.log").read_text()


@pytest.mark.slow  # a real training process killed with SIGKILL
def test_resume_after_kill_ends_in_the_same_state(tiny_config, tmp_path):
    """Kill a real training process after its warm-up epoch, resume it, compare with an uninterrupted run:
    checkpoints (model, proxies, optimizer, scheduler, RNG), best.pt, metrics and embeddings."""
    tiny_config.epochs, tiny_config.warmup_epochs = 3, 1
    straight = tiny_config.out
    training.train(tiny_config)

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "momentum_proxy",
        "train",
        "--data",
        tiny_config.data,
        "--out",
        str(killed),
        "--pretrained",
        "none",
        "--image-size",
        "64",
        "--batch-size",
        "8",
        "--epochs",
        "3",
        "--loader-workers",
        "0",
        "--warmup-epochs",
        "1",
        "--metrics",
        "recall,map@r",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (killed / LAST).exists() and _state(killed)["epoch"] >= 1, lambda: proc.poll() is None)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_killed = _state(killed)["epoch"]
    assert 1 <= epoch_killed < 3, "the process should die mid-run"

    training.resume(killed)
    _assert_same_runs(straight, killed)
    assert f"resuming from epoch {epoch_killed}" in (RunDir(killed) / "train.log").read_text()


class _Stopped(Exception):
    """Raised by an `on_epoch` callback to end a run after an epoch, as a kill would."""


def test_an_epoch_after_a_resume_that_scores_worse_does_not_replace_best(tiny_config, monkeypatch):
    """The best val score is part of the checkpoint: after a resume, an epoch scoring worse than the best one
    before the interruption must not overwrite best.pt, nor become the selected epoch of eval.json."""
    key = f"val_{tiny_config.select_metric}"
    val_scores = [0.2, 0.9, 0.5, 0.4]  # epochs 0..3: epoch 1 is best; 2 and 3, after the resume, are worse
    monkeypatch.setattr(training, "score", lambda job, model: {key: val_scores.pop(0)})
    tiny_config.epochs = 3

    def stop_after_epoch_1(row):
        if row["epoch"] == 1:
            raise _Stopped

    with pytest.raises(_Stopped):
        training.train(tiny_config, on_epoch=stop_after_epoch_1)
    run = RunDir(tiny_config.out)
    best_before = (run / BEST).read_bytes()
    assert run.load_checkpoint(BEST)["epoch"] == 1 and run.load_checkpoint(LAST)["epoch"] == 1

    summary = training.resume(tiny_config.out)
    assert [r[key] for r in run.metrics()] == [0.2, 0.9, 0.5, 0.4] and val_scores == []
    assert run.load_checkpoint(LAST)["epoch"] == 3
    assert run.load_checkpoint(BEST)["epoch"] == 1 and (run / BEST).read_bytes() == best_before  # untouched
    assert summary["epoch"] == run.eval()["epoch"] == 1 and run.eval()["selection_score"] == 0.9
    assert "selected epoch 1 on val" in (run / "train.log").read_text()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, monkeypatch):
    real_forward = training.Trainee.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        loss, emb = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 3 else loss), emb

    monkeypatch.setattr(training.Trainee, "forward", poisoned)
    with pytest.raises(training.TrainingDiverged, match="last good checkpoint"):
        training.train(tiny_config)
    assert RunDir(tiny_config.out).load_checkpoint(LAST)["epoch"] == 1
    for value in RunDir(tiny_config.out).load_checkpoint(LAST)["model"].values():
        assert torch.isfinite(value.float()).all()


def test_refuses_to_overwrite_another_run_but_reuses_a_dead_end(tiny_config):
    tiny_config.epochs = 1
    Path(tiny_config.out).mkdir()
    (Path(tiny_config.out) / "config.json").write_text("{}")  # a run that died before its first checkpoint
    training.train(tiny_config)
    with pytest.raises(UserError, match="already holds a run"):
        training.train(tiny_config)
    training.train(tiny_config, overwrite=True)


def test_bad_options_are_refused_before_anything_is_written(tiny_config):
    for change, message in [
        ({"metrics": ["foo"]}, "unknown --metrics"),
        ({"proxy_momentum": 2.0}, "proxy-momentum"),
        ({"proxy_update": "avg"}, "proxy-update"),
        ({"select": "best"}, "select"),
        ({"select_metric": "nmi"}, "select-metric"),
        ({"backbone": "nonet"}, "unknown backbone"),
    ]:
        with pytest.raises(UserError, match=message):
            training.train(replace(tiny_config, **change))
        assert not Path(tiny_config.out).exists()
    best = training.train(replace(tiny_config, metrics=["map@r"], epochs=1))  # no recall requested: no KeyError
    assert "val_map@r" in RunDir(tiny_config.out).metrics()[0] and best["test"]["recall@1"] >= 0


def test_grad_accumulation_equals_the_larger_batch(tiny_config, tmp_path):
    """Batch 4 x 2 accumulation steps = batch 8: same samples, same averaged gradient, same proxy update."""
    tiny_config.optimizer, tiny_config.lr, tiny_config.epochs = "sgd", 1e-2, 1
    big = tiny_config
    training.train(big)
    from dataclasses import replace

    small = replace(big, out=str(tmp_path / "accum"), batch_size=4, grad_accum=2)
    training.train(small)
    a, b = _state(big.out), _state(small.out)
    for key in ("model", "loss"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_on_cpu_and_fp16_refused(tiny_config, monkeypatch):
    from momentum_proxy.models.net import EmbeddingNet

    dtypes = []
    real = EmbeddingNet.pooled

    def spy(self, x):
        out = real(self, x)
        if self.training:
            dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(EmbeddingNet, "pooled", spy)
    tiny_config.amp, tiny_config.epochs = "bf16", 1
    best = training.train(tiny_config)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the training forward ran in bf16
    assert np.isfinite(best["test"]["recall@1"])
    state = _state(tiny_config.out)
    assert all(v.dtype != torch.bfloat16 for v in state["loss"].values())  # proxies stay float32
    tiny_config.amp = "fp16"
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        training.train(tiny_config, overwrite=True)


def test_original_recipe_optimizer_and_schedule(tiny_config):
    """The original tool: SGD without momentum, milestones int(50 %) and int(80 %) of the epochs."""
    cfg = TrainConfig.from_recipe(
        "original", data=tiny_config.data, out=tiny_config.out, optimizer="sgd", pretrained="none"
    )
    model, loss = training.build(cfg, num_classes=2)
    opt = training.make_optimizer(cfg, model, loss)
    assert isinstance(opt, torch.optim.SGD) and all(g["momentum"] == 0 for g in opt.param_groups)
    assert cfg.milestone_rounding == "floor" and training.lr_milestones(7, "floor") == [3, 5]
    assert training.lr_milestones(7) == [4, 6] and training.lr_milestones(20, "floor") == [10, 16]


def test_warmup_leaves_the_backbone_bit_identical_while_head_and_proxies_move(tiny_config):
    tiny_config.warmup_epochs, tiny_config.epochs = 1, 2
    job, state = training.setup(tiny_config, overwrite=False, resume=False)
    training.start(job, state)
    snapshot = {k: v.clone() for k, v in state.model.state_dict().items()}
    proxies = proxies_by_class(state.loss_fn).clone()
    loader = training.make_loader(job.data.train, 8, train=True, workers=0)
    updater = MomentumProxyUpdate(tiny_config.proxy_momentum)
    step_fn = training.wrap_for_steps(job, state)
    training.train_one_epoch(job, state, step_fn, loader, updater, epoch=1)  # warm-up epoch
    after = state.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snapshot.items() if k.startswith("backbone."))
    assert not torch.equal(after["fc.weight"], snapshot["fc.weight"])
    assert not torch.equal(proxies_by_class(state.loss_fn), proxies)
    training.train_one_epoch(job, state, step_fn, loader, updater, epoch=2)  # after the warm-up: all train
    assert not all(
        torch.equal(state.model.state_dict()[k], v)
        for k, v in snapshot.items()
        if k.startswith("backbone.") and v.dtype.is_floating_point
    )


def test_query_gallery_data_through_train_and_evaluate(tiny_data, tmp_path):
    import pandas as pd

    from momentum_proxy.evaluation.jobs import evaluate_run

    qg = tmp_path / "qg"
    qg.mkdir()
    df = pd.read_csv(tiny_data / "manifest.csv")
    df["path"] = [str(tiny_data / p) for p in df["path"]]
    test = df.index[df["split"] == "test"]
    df.loc[test, "split"] = ["query" if i % 2 else "gallery" for i in range(len(test))]
    df.to_csv(qg / "manifest.csv", index=False)
    cfg = TrainConfig(
        data=str(qg),
        out=str(tmp_path / "run"),
        pretrained="none",
        image_size=64,
        batch_size=8,
        epochs=1,
        loader_workers=0,
        warmup_epochs=0,
    )
    summary = training.train(cfg)
    db = load_embeddings(tmp_path / "run" / "embeddings.npz")
    q, g = db["split"] == "query", db["split"] == "gallery"
    from momentum_proxy.evaluation.metrics import evaluate_embeddings

    expected = evaluate_embeddings(
        db["features"][g],
        db["labels"][g],
        query_features=db["features"][q],
        query_labels=db["labels"][q],
        metrics=["recall", "map@r"],
        recalls=cfg.recalls,
    )
    assert summary["queries"] == 16 and summary["test"]["map@r"] == pytest.approx(expected["map@r"])
    again = evaluate_run(cfg.out, device="cpu", metrics=["recall", "map@r"])
    assert again["queries"] == 16 and again["test"]["recall@1"] == pytest.approx(expected["recall@1"])


def test_original_recipe_end_to_end(tiny_data, tmp_path, capsys):
    from momentum_proxy.cli import main

    main(
        [
            "train",
            "--data_path",
            str(tiny_data.parent),
            "--data_name",
            tiny_data.name,
            "--out",
            str(tmp_path / "o"),
            "--pretrained",
            "none",
            "--image-size",
            "48",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--loader-workers",
            "0",
        ]
    )
    run = RunDir(tmp_path / "o")
    cfg = TrainConfig.from_dict(run.info())
    assert (cfg.backbone, cfg.loss, cfg.lr, cfg.proxy_update, cfg.momentum_target, cfg.proxy_init, cfg.select) == (
        "resnet50",
        "proxy_nca",
        1e-3,
        "momentum",
        "sum",
        "random",
        "test",
    )
    assert run.eval()["selected_on"] == "test" and "test_recall@1" in run.metrics()[0]
    assert "SELECTED ON TEST" in capsys.readouterr().out


def test_default_recipe_loss_parameters_reach_the_loss_and_only_for_cos_face(tiny_data, tmp_path):
    from pytorch_metric_learning import losses

    cfg = TrainConfig(
        data=str(tiny_data), out=str(tmp_path), backbone="efficientnet_lite0", pretrained="none", feature_dim=16
    )
    loss = training.build(cfg, num_classes=2)[1]
    assert (cfg.loss, loss.scale, loss.margin) == ("cos_face", 30.7, 0.216)  # the tuned recipe
    arc = training.build(replace(cfg, loss="arc_face"), num_classes=2)[1]
    library = losses.ArcFaceLoss(num_classes=2, embedding_size=16)
    assert (arc.scale, arc.margin) == (library.scale, library.margin)  # other losses: the library's
    given = training.build(replace(cfg, loss_scale=8.0, margin=0.1), num_classes=2)[1]
    assert (given.scale, given.margin) == (8.0, 0.1)


def test_queries_without_another_image_of_their_class_are_counted_and_said(tiny_data, tmp_path):
    import pandas as pd
    from conftest import make_run

    from momentum_proxy.evaluation.jobs import describe, evaluate_run

    data = tmp_path / "data"
    df = pd.read_csv(tiny_data / "manifest.csv")
    df["path"] = [str(tiny_data / p) for p in df["path"]]
    lone = df.index[df["class_name"] == "species_07"][1:]  # species_07 (test) keeps one image
    data.mkdir()
    df.drop(lone).to_csv(data / "manifest.csv", index=False)
    run = make_run(tmp_path / "run", data)
    summary = evaluate_run(run, device="cpu", metrics=["recall"], out=tmp_path / "e.json")
    assert (summary["queries"], summary["lone_queries"]) == (25, 1)
    assert "25 queries (1 without another image of its class: left out of the metrics)" in describe(summary, run)


@pytest.mark.parametrize("schedule,planned", [("cosine", 3), ("multistep", 4)])
def test_resume_with_more_epochs_extends_a_killed_run_on_the_schedule_of_the_new_total(
    tiny_config, tmp_path, schedule, planned
):
    tiny_config.schedule, tiny_config.warmup_epochs, tiny_config.epochs = schedule, 0, planned
    training.train(tiny_config)  # planned for the new total from the start
    tiny_config.out, tiny_config.epochs = str(tmp_path / "extended"), 2

    def stop_after_epoch_1(row):
        if row["epoch"] == 1:
            raise _Stopped

    with pytest.raises(_Stopped):
        training.train(tiny_config, on_epoch=stop_after_epoch_1)
    training.resume(tiny_config.out, epochs=planned)
    straight, extended = RunDir(tmp_path / "run"), RunDir(tiny_config.out)
    assert TrainConfig.from_dict(extended.info()).epochs == planned
    assert [r["epoch"] for r in extended.metrics()] == list(range(planned + 1))
    np.testing.assert_allclose(
        [r["lr"] for r in extended.metrics()[1:]], [r["lr"] for r in straight.metrics()[1:]], rtol=1e-12
    )  # epoch 1 at the old plan's rate, the rest at the new plan's
    assert f"extending the run from 2 to {planned} epochs" in (extended / "train.log").read_text()


def test_resuming_a_finished_run_changes_nothing_and_extending_it_is_refused(tiny_config):
    tiny_config.epochs = 1
    training.train(tiny_config)
    run = RunDir(tiny_config.out)
    before = {rel: (run / rel).read_bytes() for rel in ("eval.json", "train.log", "metrics.csv", "config.json", LAST)}
    summary = training.resume(tiny_config.out)
    assert summary["already_finished"] == 1 and summary["epoch"] == run.eval()["epoch"]
    with pytest.raises(UserError, match="finished at epoch 1 and its test split was evaluated"):
        training.resume(tiny_config.out, epochs=2)
    with pytest.raises(UserError, match="fewer than the run's"):
        training.resume(tiny_config.out, epochs=0)
    assert {rel: (run / rel).read_bytes() for rel in before} == before


def test_resume_refuses_options_that_differ_from_the_run_in_one_line(tiny_config, capsys):
    from conftest import run_cli

    tiny_config.epochs = 1
    training.train(tiny_config)
    run = tiny_config.out
    code, out, _ = run_cli(["train", "--resume", run, "--epochs", "1", "--batch-size", "8"], capsys)
    assert code == 0 and f"{run}: already finished at epoch 1; nothing changed" in out  # same values: fine
    code, out, _ = run_cli(["train", "--resume", run, "--device", "cpu", "--loader-workers", "1"], capsys)
    assert code == 0 and "already finished" in out  # where and how it runs may change
    for args, message in [
        (["--lr", "0.1"], "--lr 0.1 differs from the run's 2.15e-05 (config.json)"),
        (["--optimizer_type", "sgd"], "--optimizer sgd differs from the run's adam"),
        (["--data", run], "--data cannot be given with --resume"),
        (["--epochs", "2"], "finished at epoch 1 and its test split was evaluated"),
    ]:
        code, _, err = run_cli(["train", "--resume", run, *args], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err


def test_splits_are_checked_before_the_first_epoch_and_a_whole_warm_up_is_warned_about(
    tiny_data, tiny_config, tmp_path, capsys
):
    import pandas as pd

    df = pd.read_csv(tiny_data / "manifest.csv")
    df["path"] = [str(tiny_data / p) for p in df["path"]]
    one_each = df[(df["split"] != "test") | ~df.duplicated("class_name")]  # every test class keeps one image
    data = tmp_path / "one_each"
    data.mkdir()
    one_each.to_csv(data / "manifest.csv", index=False)
    with pytest.raises(UserError, match="no test query has another image of its class"):
        training.train(replace(tiny_config, data=str(data)))
    assert not Path(tiny_config.out).exists()  # refused before anything was written or trained
    training.train(replace(tiny_config, epochs=1, warmup_epochs=1))
    assert "--warmup-epochs 1 covers all 1 epoch(s): the backbone is never trained" in capsys.readouterr().err


def test_zero_epochs_keeps_the_pretrained_start_as_the_run(tiny_config):
    """`--epochs 0`: the start is scored and becomes the run's model (what 'just use the pretrained model' means),
    nothing is trained and negative epochs are refused."""
    with pytest.raises(UserError, match="--epochs must be >= 0"):
        training.train(replace(tiny_config, epochs=-1))
    torch.manual_seed(tiny_config.seed)
    start = training.build(tiny_config, 2)[0].state_dict()
    summary = training.train(replace(tiny_config, epochs=0))
    run = RunDir(tiny_config.out)
    assert [r["epoch"] for r in run.metrics()] == [0] and summary["epoch"] == 0
    best = run.load_checkpoint(BEST)
    assert best["epoch"] == 0
    for name, tensor in start.items():
        assert torch.equal(best["model"][name], tensor), name
    assert summary["test"]["recall@1"] >= 0 and (run / "eval.json").exists()
