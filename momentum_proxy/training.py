"""Training: the embedding net and a proxy loss, with momentum-updated proxies in the `*` optimizer modes.

`train(cfg)` runs one training job into `cfg.out` (see runs.py for the folder layout); `resume(run_dir)`
continues a killed run from its last finished epoch. Works single-process and under torchrun (DDP).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from momentum_proxy import distributed
from momentum_proxy.data.loading import ImageDataset, eval_dataset, load_splits, make_loader
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation import evaluate_embeddings
from momentum_proxy.inference import autocast, embed_dataset, resolve_device
from momentum_proxy.losses import MomentumProxyUpdate, create_loss, init_proxies_from_class_means, proxy_parameter
from momentum_proxy.models import EmbeddingNet
from momentum_proxy.runs import BEST, LAST, RunDir, TrainConfig


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the run stops and keeps its last good checkpoint."""


class Trainee(nn.Module):
    """Model + loss in one module, so DDP averages the gradients of learnable proxies too."""

    def __init__(self, model: EmbeddingNet, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images, labels, freeze_backbone: bool = False, amp=None):
        with autocast(images.device, amp or "none"):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_backbone):
                pooled = self.model.pooled(images)
            emb = self.model.fc(self.model.norm(pooled))
        emb = emb.float()  # the loss and the proxy update stay in float32
        return self.loss(emb, labels), emb


def build(cfg: TrainConfig, num_classes: int) -> tuple[EmbeddingNet, nn.Module]:
    weights = None if cfg.pretrained == "none" else (cfg.weights or "default")
    model = EmbeddingNet(cfg.backbone, cfg.feature_dim, weights=weights, pooling=cfg.pooling)
    loss = create_loss(cfg.loss, num_classes, cfg.feature_dim, scale=cfg.loss_scale, margin=cfg.margin)
    if cfg.momentum_mode:
        proxy_parameter(loss)[0].requires_grad_(False)
    return model, loss


def make_optimizer(cfg: TrainConfig, model: EmbeddingNet, loss: nn.Module) -> torch.optim.Optimizer:
    """Backbone at lr * backbone_lr_mult, head at lr; proxies at lr only in the learnable modes (adam, sgd)."""
    groups = [{"params": list(model.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_mult},
              {"params": model.head_parameters(), "lr": cfg.lr}]
    if not cfg.momentum_mode:
        groups.append({"params": [p for p in loss.parameters() if p.requires_grad], "lr": cfg.lr})
    if cfg.optimizer.startswith("adam"):
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=0.9)


def evaluate_model(model, test_set: ImageDataset, test_labels: np.ndarray, test_split: np.ndarray,
                   cfg: TrainConfig, device, dist) -> tuple[dict, np.ndarray]:
    """Embed the test split and compute the configured metrics (query/gallery mode when the split has one)."""
    feats = embed_dataset(model, test_set, device, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                          workers=cfg.workers, amp=cfg.amp, dist=dist)
    if "query" in set(test_split):
        q, g = test_split == "query", test_split == "gallery"
        res = evaluate_embeddings(feats[g], test_labels[g], query_features=feats[q], query_labels=test_labels[q],
                                  recalls=cfg.recalls, metrics=cfg.metrics)
    else:
        res = evaluate_embeddings(feats, test_labels, recalls=cfg.recalls, metrics=cfg.metrics)
    return res, feats


def train(cfg: TrainConfig, *, overwrite: bool = False, resume: bool = False) -> dict:
    """Train (or continue) the run described by `cfg`; returns the best epoch's metrics."""
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    dist = distributed.init_distributed(device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    train_set, test_set, test_frame = load_splits(cfg.data, cfg.image_size)
    test_labels, test_split = test_frame["label"].to_numpy(), test_frame["split"].to_numpy()
    if len(train_set) < cfg.batch_size * dist.world_size:
        raise UserError(f"batch size {cfg.batch_size} exceeds the {len(train_set)} train images")
    torch.manual_seed(cfg.seed)
    model, loss_fn = build(cfg, len(train_set.label_map))
    run = RunDir(cfg.out)
    if dist.is_main and not resume:
        run.start(cfg, overwrite)
    distributed.barrier()
    model.to(device)
    loss_fn.to(device)
    optimizer = make_optimizer(cfg, model, loss_fn)
    milestones = sorted({max(1, round(cfg.epochs * f)) for f in (0.5, 0.8)})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    updater = MomentumProxyUpdate(cfg.momentum, cfg.proxy_update) if cfg.momentum_mode else None
    trainee = Trainee(model, loss_fn)
    step_fn = torch.compile(trainee) if cfg.compile else trainee
    if dist.enabled:
        step_fn = DistributedDataParallel(step_fn, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=cfg.warmup_epochs > 0)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    key = f"recall@{min(cfg.recalls)}"
    rows, start_epoch, best = [], 1, -math.inf
    if resume:
        state = run.load_checkpoint(LAST)
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        rows = [r for r in run.metrics() if r["epoch"] <= state["epoch"]]
    else:
        t0 = time.time()
        if cfg.proxy_init == "class_mean":  # proxies start at the pretrained model's class means
            init_set = eval_dataset(cfg.data, train_set.frame, cfg.image_size)
            feats = embed_dataset(model, init_set, device, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                                  workers=cfg.workers, dist=dist, desc="init proxies")
            init_proxies_from_class_means(loss_fn, torch.from_numpy(feats).to(device),
                                          torch.tensor(train_set.labels, device=device))
        res, _ = evaluate_model(model, test_set, test_labels, test_split, cfg, device, dist)
        rows.append({"epoch": 0, "train_loss": float("nan"), **res, "seconds": time.time() - t0,
                     "lr": cfg.lr})
        best = res[key]
        if dist.is_main:  # the pretrained start competes for best
            run.save_checkpoint(BEST, checkpoint(0, best, model, loss_fn, optimizer, scheduler, scaler))
            run.save_checkpoint(LAST, checkpoint(0, best, model, loss_fn, optimizer, scheduler, scaler))
            run.write_metrics(rows)
        report(rows[-1], key, dist)

    loader = make_loader(train_set, cfg.batch_size, train=True, seed=cfg.seed, workers=cfg.workers,
                         rank=dist.rank, world_size=dist.world_size, pin_memory=device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        loader.sampler.set_epoch(epoch)
        frozen = epoch <= cfg.warmup_epochs
        trainee.train()
        total, steps, pending = torch.zeros((), device=device), 0, []
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not dist.is_main)
        for i, (images, labels, _) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss, emb = step_fn(images, labels, freeze_backbone=frozen, amp=cfg.amp)
            scaler.scale(loss / cfg.grad_accum).backward()
            pending.append((emb.detach(), labels))
            if (i + 1) % cfg.grad_accum == 0:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if updater is not None:  # every rank applies the same update from the global batch
                    emb_all = distributed.all_gather_cat(torch.cat([e for e, _ in pending]), same_size=True)
                    labels_all = distributed.all_gather_cat(torch.cat([y for _, y in pending]), same_size=True)
                    updater.update_loss(loss_fn, emb_all, labels_all)
                pending.clear()
            total += loss.detach()
            steps += 1
            if steps % cfg.log_every == 0:  # the only host sync in the step loop
                running = (total / steps).item()
                check_finite(running, epoch, run)
                bar.set_postfix(loss=f"{running:.4f}")
        optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation at the epoch's end is dropped
        scheduler.step()
        if dist.enabled:
            check_proxies_in_sync(loss_fn)
        train_loss = (total / max(steps, 1)).item()
        check_finite(train_loss, epoch, run)
        res, feats = evaluate_model(model, test_set, test_labels, test_split, cfg, device, dist)
        rows.append({"epoch": epoch, "train_loss": train_loss, **res, "seconds": time.time() - t0,
                     "lr": optimizer.param_groups[1]["lr"]})
        improved = res[key] > best
        best = max(best, res[key])
        if dist.is_main:
            state = checkpoint(epoch, best, model, loss_fn, optimizer, scheduler, scaler)
            if improved:
                run.save_checkpoint(BEST, state)
            run.save_checkpoint(LAST, state)  # last: a resume starts after this epoch
            run.write_metrics(rows)
        report(rows[-1], key, dist)

    best_state = run.load_checkpoint(BEST) if dist.is_main else None
    if dist.is_main:
        model.load_state_dict(best_state["model"])
    model_state = distributed.broadcast_object(model.state_dict() if dist.is_main else None)
    model.load_state_dict(model_state)
    _, feats = evaluate_model(model, test_set, test_labels, test_split, cfg, device, dist)
    if dist.is_main:
        run.save_embeddings(feats, test_labels, [str(Path(cfg.data) / p) for p in test_frame["path"]],
                            list(test_split))
    distributed.barrier()
    return max(rows, key=lambda r: r[key])


def checkpoint(epoch, best, model, loss_fn, optimizer, scheduler, scaler) -> dict:
    return {"epoch": epoch, "best": best, "model": model.state_dict(), "loss": loss_fn.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": torch.get_rng_state()}


def check_proxies_in_sync(loss_fn: nn.Module) -> None:
    """Every rank must hold bit-identical proxies; a difference is a bug, not a user error."""
    proxies = proxy_parameter(loss_fn)[0].detach()
    gathered = distributed.all_gather_cat(proxies[None])
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("proxies differ across ranks")


def check_finite(value: float, epoch: int, run: RunDir) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss became {value} in epoch {epoch}; stopped, the last good checkpoint is "
                               f"{run / LAST} (try a lower --lr)")


def report(row: dict, key: str, dist) -> None:
    if dist.is_main:
        shown = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds", "lr"))
        tqdm.write(f"epoch {row['epoch']}: {shown} ({row['seconds']:.0f}s)")


def resume(run_dir: str | Path) -> dict:
    """Continue a killed run from its last finished epoch."""
    run = RunDir(run_dir)
    cfg = run.config()
    if not (run / LAST).exists():
        raise UserError(f"{run.path} has no checkpoint to resume from ({LAST})")
    cfg.out = str(run.path)
    return train(cfg, resume=True)
