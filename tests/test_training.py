import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from momentum_proxy import training
from momentum_proxy.errors import UserError
from momentum_proxy.losses import LOSSES, MomentumProxyUpdate, proxies_by_class, proxy_parameter
from momentum_proxy.runs import BEST, LAST, RunDir, load_embeddings

OPTIMIZERS = ["adam*", "sgd*", "adam", "sgd"]


def _batch(n=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % classes


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_every_loss_and_optimizer_mode_steps(tiny_config, loss_name, optimizer):
    cfg = tiny_config
    cfg.loss, cfg.optimizer, cfg.momentum = loss_name, optimizer, 0.3
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
        MomentumProxyUpdate(cfg.momentum).update_loss(loss_fn, emb, labels)
        for c in range(3):
            expected = 0.7 * before[c] + 0.3 * emb[labels == c].detach().mean(0)
            torch.testing.assert_close(proxies_by_class(loss_fn)[c], expected)
    else:
        assert in_optimizer and proxy.grad is not None
        assert not torch.equal(proxies_by_class(loss_fn), before)  # learnable proxies are trained


def test_train_writes_a_complete_run_folder(tiny_config):
    best = training.train(tiny_config)
    run = RunDir(tiny_config.out)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["optimizer"] == "adam*" and cfg["momentum"] == 0.5 and "torch" in cfg["versions"]
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert np.isnan(rows[0]["train_loss"]) and all(np.isfinite(r["train_loss"]) for r in rows[1:])
    assert {"recall@1", "recall@8", "map@r", "seconds"} <= set(rows[0])
    assert best["recall@1"] == max(r["recall@1"] for r in rows)  # epoch 0 competes for best
    for rel in (LAST, BEST):
        state = torch.load(run / rel, weights_only=True)
        assert {"model", "loss", "optimizer", "scheduler", "epoch", "rng"} <= set(state)
    assert run.load_checkpoint(LAST)["epoch"] == 2
    db = load_embeddings(run / "embeddings.npz")
    assert db["features"].shape == (24, 512) and len(db["paths"]) == 24
    np.testing.assert_allclose(np.linalg.norm(db["features"], axis=1), 1, atol=1e-5)
    assert not list(Path(tiny_config.out).rglob("*.tmp"))  # atomic writes leave no temporaries


def _state(run_dir):
    return torch.load(Path(run_dir) / LAST, weights_only=True)


def test_resume_after_kill_ends_in_the_same_state(tiny_config, tmp_path):
    """Kill a real training process after its first epoch, resume it, compare with an uninterrupted run."""
    tiny_config.epochs = 3
    straight = tiny_config.out
    training.train(tiny_config)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "momentum_proxy", "train", "--data", tiny_config.data, "--out", str(killed),
           "--pretrained", "none", "--image-size", "64", "--batch-size", "8", "--epochs", "3", "--workers", "0",
           "--warmup-epochs", "0", "--metrics", "recall,map@r"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / LAST).exists() and torch.load(killed / LAST, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_killed = _state(killed)["epoch"]
    assert 1 <= epoch_killed < 3, "the process should die mid-run"

    training.resume(killed)
    a, b = _state(straight), _state(killed)
    assert a["epoch"] == b["epoch"] == 3
    for key in ("model", "loss"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0, msg=name)
    with open(killed / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2, 3]


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


def test_refuses_to_overwrite_another_run(tiny_config):
    tiny_config.epochs = 1
    training.train(tiny_config)
    with pytest.raises(UserError, match="already holds a run"):
        training.train(tiny_config)
    training.train(tiny_config, overwrite=True)


def test_grad_accumulation_equals_the_larger_batch(tiny_config, tmp_path):
    """Batch 4 x 2 accumulation steps = batch 8: same samples, same averaged gradient, same proxy update."""
    tiny_config.optimizer, tiny_config.lr, tiny_config.epochs = "sgd*", 1e-2, 1
    big = tiny_config
    training.train(big)
    from dataclasses import replace

    small = replace(big, out=str(tmp_path / "accum"), batch_size=4, grad_accum=2)
    training.train(small)
    a, b = _state(big.out), _state(small.out)
    for key in ("model", "loss"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_on_cpu_and_fp16_refused(tiny_config):
    tiny_config.amp, tiny_config.epochs = "bf16", 1
    best = training.train(tiny_config)
    assert np.isfinite(best["recall@1"])
    state = _state(tiny_config.out)
    assert all(v.dtype != torch.bfloat16 for v in state["loss"].values())  # proxies stay float32
    tiny_config.amp = "fp16"
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        training.train(tiny_config, overwrite=True)
