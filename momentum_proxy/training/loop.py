"""Training: the embedding net and a proxy loss, its proxies moved by momentum (`proxy_update="momentum"`) or learned.

`train(cfg)` runs one training job into `cfg.out` (see runs.py for the folder layout); `resume(run_dir)`
continues a killed run from its last finished epoch. Works single-process and under torchrun (DDP).

Model selection never looks at the test split unless asked to (`select="test"`, for reproducing published
tables): every epoch is scored on the validation split (`select="val"`, the default when the data has one; ties
broken by `choose_epoch`) or the last epoch is kept (`select="last"`); the test split is embedded once, at the end,
for the selected checkpoint (`--test-every-epoch` adds per-epoch test columns for curves, never used to select).
In an images split (`data.manifest.split_protocol`) val and test are queries searched among a gallery.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from momentum_proxy import distributed
from momentum_proxy.data.loading import DatasetSplits, EvalSplit, load_datasets, make_loader
from momentum_proxy.data.manifest import describe_protocol, manifest_sha256
from momentum_proxy.embedding.inference import ModuleEmbedder, autocast, embed_dataset, resolve_device
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.jobs import evaluate_arrays
from momentum_proxy.evaluation.metrics import class_margin
from momentum_proxy.models.backbones import resolve_config
from momentum_proxy.models.net import EmbeddingNet
from momentum_proxy.runs import BEST, CONFIG, LAST, RunDir
from momentum_proxy.training.config import TrainConfig, describe_recipe
from momentum_proxy.training.losses import create_loss
from momentum_proxy.training.proxies import MomentumProxyUpdate, init_proxies_from_class_means, proxy_parameter
from momentum_proxy.training.tracking import Tracker, open_tracker


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the run stops and keeps its last good checkpoint."""


class Trainee(nn.Module):
    """Model + loss in one module, so DDP averages the gradients of learnable proxies too."""

    def __init__(self, model: EmbeddingNet, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images, labels, freeze_backbone: bool = False, amp=None):
        with autocast(images.device, amp or "none"):
            emb = self.model(images, freeze_backbone=freeze_backbone)
        emb = emb.float()  # the loss and the proxy update stay in float32
        return self.loss(emb, labels), emb


def build(cfg: TrainConfig, num_classes: int) -> tuple[EmbeddingNet, nn.Module]:
    """The model and the loss of `cfg` (its backbone and image size decided: `resolve_config`)."""
    assert cfg.backbone is not None, "resolve_config decides the backbone"
    weights = None if cfg.pretrained == "none" else (cfg.weights or "default")
    model = EmbeddingNet(cfg.backbone, cfg.feature_dim, weights=weights, pooling=cfg.pooling, image_size=cfg.image_size)
    scale, margin = cfg.loss_params
    loss = create_loss(cfg.loss, num_classes, cfg.feature_dim, scale=scale, margin=margin)
    if cfg.momentum_mode:
        proxy_parameter(loss)[0].requires_grad_(False)
    return model, loss


def make_optimizer(cfg: TrainConfig, model: EmbeddingNet, loss: nn.Module) -> torch.optim.Optimizer:
    """Backbone at lr * backbone_lr_mult, head at lr; proxies at lr only when learned (`proxy_update="gradient"`)."""
    groups = [
        {"params": list(model.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_mult},
        {"params": model.head_parameters(), "lr": cfg.lr},
    ]
    if not cfg.momentum_mode:
        groups.append({"params": [p for p in loss.parameters() if p.requires_grad], "lr": cfg.lr})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=cfg.sgd_momentum)


def lr_milestones(epochs: int, rounding: str = "round") -> list[int]:
    """MultiStepLR milestones at 50 % and 80 % of the epochs, rounded (`floor`: the original tool's int())."""
    whole = int if rounding == "floor" else round
    return sorted({max(1, whole(epochs * f)) for f in (0.5, 0.8)})


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: `multistep` (x0.1 at `lr_milestones`) or `cosine` (annealed to 0)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=lr_milestones(cfg.epochs, cfg.milestone_rounding), gamma=0.1
    )


@dataclass
class TrainState:
    """Everything a resume needs: model, proxies, optimizer, scheduler, scaler, progress and RNG."""

    model: EmbeddingNet
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0
    best_epoch: int = 0
    best_score: float = -math.inf
    choice: Choice | None = None  # how best_epoch was chosen (not checkpointed: recomputed from the rows)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "best_epoch": self.best_epoch,
            "best": self.best_score,
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, d: dict) -> None:
        self.model.load_state_dict(d["model"])
        self.loss_fn.load_state_dict(d["loss"])
        self.optimizer.load_state_dict(d["optimizer"])
        self.scheduler.load_state_dict(d["scheduler"])
        self.scaler.load_state_dict(d["scaler"])
        torch.set_rng_state(d["rng"])
        self.epoch, self.best_epoch, self.best_score = d["epoch"], d["best_epoch"], d["best"]


@dataclass
class Job:
    """The fixed context of a run: configuration, data, device, process group, output folder."""

    cfg: TrainConfig
    data: DatasetSplits
    device: torch.device
    dist: distributed.DistInfo
    run: RunDir
    select: str  # val | last | test
    tracker: Tracker = field(default_factory=Tracker)  # --log: set by train(), fed by score and select_and_save

    @property
    def select_key(self) -> str | None:
        return None if self.select == "last" else f"{self.select}_{self.cfg.select_metric}"

    @property
    def select_keys(self) -> list[str]:
        """The selection metric, then the finer ones that break its ties (`TIE_BREAKS`), as row columns."""
        if self.select == "last":
            return []
        return [f"{self.select}_{m}" for m in dict.fromkeys([self.cfg.select_metric, *TIE_BREAKS])]


TIE_BREAKS = ("map@r", "margin")  # when epochs tie on the selection metric (saturated val): MAP@R, then the margin


@dataclass(frozen=True)
class Choice:
    """The selected epoch; `decided_by`: the tie-break column that chose it among epochs tied on the selection
    metric (None: no tie), or "tie" when they tied on every column (the first of them is kept); `tied`: those
    epochs."""

    epoch: int
    decided_by: str | None = None
    tied: tuple[int, ...] = ()


def choose_epoch(rows: list[dict], keys: list[str]) -> Choice:
    """The row whose `keys` values are largest, compared in order (NaN counts as lowest; a key absent from a row
    is skipped); among rows tied on all of them, the FIRST (earliest epoch) is kept: a later epoch must be
    strictly better to be chosen."""
    keys = [k for k in keys if all(k in r for r in rows)]

    def top(candidates: list[dict], key: str) -> list[dict]:
        values = [-math.inf if math.isnan(r[key]) else r[key] for r in candidates]
        return [r for r, v in zip(candidates, values) if v == max(values)]

    tied = top(rows, keys[0])
    candidates, decided_by = tied, None
    for key in keys[1:]:
        if len(candidates) == 1:
            break
        candidates, decided_by = top(candidates, key), key
    if len(candidates) > 1:
        decided_by = "tie"
    return Choice(candidates[0]["epoch"], decided_by, tuple(r["epoch"] for r in tied) if len(tied) > 1 else ())


@distributed.ends_process_group  # normally and on error, the process group set up inside is destroyed
def train(
    cfg: TrainConfig, *, overwrite: bool = False, resume: bool = False, on_epoch: Callable[[dict], None] | None = None
) -> dict:
    """Train (or continue) the run described by `cfg`; returns the summary written to eval.json.

    `on_epoch(row)` is called with every epoch's metrics row once its checkpoints are saved (e.g. a tuner's
    pruning check); an exception it raises stops the run there.
    """
    job, state = setup(cfg, overwrite=overwrite, resume=resume)
    cfg = job.cfg  # the backbone decided for the device
    if 0 < cfg.epochs <= cfg.warmup_epochs and not resume and job.dist.is_main:
        print(
            f"mproxy: warning: --warmup-epochs {cfg.warmup_epochs} covers all {cfg.epochs} epoch(s): the backbone "
            "is never trained, only the head and proxies",
            file=sys.stderr,
        )
    job.run.log(describe_protocol(job.data.protocol, job.data.val is not None), job.dist.is_main)
    job.run.log(describe_recipe(cfg.recipe, job.data.protocol), job.dist.is_main)
    job.tracker = open_tracker(cfg, job.run.path, job.dist.is_main, state.epoch if resume else None)
    rows = job.run.metrics()[: state.epoch + 1] if resume else [start(job, state)]
    loader = make_loader(
        job.data.train,
        cfg.batch_size,
        train=True,
        seed=cfg.seed,
        workers=cfg.loader_workers,
        rank=job.dist.rank,
        world_size=job.dist.world_size,
        pin_memory=job.device.type == "cuda",
    )
    step_fn = wrap_for_steps(job, state)
    updater = MomentumProxyUpdate(cfg.proxy_momentum, cfg.momentum_target) if cfg.momentum_mode else None
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        t0 = time.time()
        lr = state.optimizer.param_groups[1]["lr"]  # the rate this epoch trains with
        train_loss = train_one_epoch(job, state, step_fn, loader, updater, epoch)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": lr, **score(job, state.model)}
        rows.append({**row, "seconds": time.time() - t0})
        select_and_save(job, state, epoch, rows)
        if on_epoch is not None:
            on_epoch(rows[-1])
    job.tracker.close()
    return finish(job, state)


def setup(cfg: TrainConfig, *, overwrite: bool, resume: bool) -> tuple[Job, TrainState]:
    """Validate everything, build model and optimizer, then claim (or reopen) the run folder."""
    cfg.validate()
    device = resolve_device(cfg.device)
    cfg = resolve_config(cfg, device.type)
    assert cfg.image_size is not None, "resolve_config decides the image size"
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    run = RunDir(cfg.out)
    run.check_writable()
    data = load_datasets(cfg.data, cfg.image_size, cfg.aug_scale_min)
    select = cfg.select or ("val" if data.val is not None else "last")
    if select == "val" and data.val is None:
        raise UserError(f"--select val needs a val split in {cfg.data} (prepare it with --val-classes N)")
    dist = distributed.init_distributed(device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if len(data.train) < cfg.batch_size * dist.world_size:
        raise UserError(f"batch size {cfg.batch_size} exceeds the {len(data.train)} train images")
    torch.manual_seed(cfg.seed)
    model, loss_fn = build(cfg, len(data.train.label_map))
    model.to(device)
    loss_fn.to(device)
    optimizer = make_optimizer(cfg, model, loss_fn)
    scheduler = make_scheduler(cfg, optimizer)
    state = TrainState(
        model, loss_fn, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    )
    job = Job(cfg, data, device, dist, run, select)
    if resume:
        state.load_state_dict(run.load_checkpoint(LAST))
        reschedule(state.scheduler, cfg, state.epoch)  # a no-op unless the run was extended
        run.log(f"resuming from epoch {state.epoch}", dist.is_main)
    elif dist.is_main:
        run.start(cfg, overwrite, extra={"data_manifest_sha256": manifest_sha256(cfg.data), "selection": select})
    distributed.barrier()
    return job, state


def start(job: Job, state: TrainState) -> dict:
    """Epoch 0: proxies at the pretrained model's class means (if so configured); the start is scored and
    competes for best."""
    t0 = time.time()
    if job.cfg.proxy_init == "class_mean" and job.cfg.epochs > 0:  # raw embeddings: the momentum update's space
        feats = embed_dataset(
            ModuleEmbedder(state.model, normalize=False),
            job.data.train_eval,
            batch_size=job.cfg.embed_batch_size,
            workers=job.cfg.loader_workers,
            dist=job.dist,
            desc="init proxies",
        )
        init_proxies_from_class_means(
            state.loss_fn,
            torch.from_numpy(feats).to(job.device),
            torch.tensor(job.data.train.labels, device=job.device),
        )
    row = {
        "epoch": 0,
        "train_loss": float("nan"),
        "lr": float("nan"),
        **score(job, state.model),
        "seconds": time.time() - t0,
    }
    select_and_save(job, state, 0, [row])
    return row


def wrap_for_steps(job: Job, state: TrainState) -> nn.Module:
    """The module each step calls: model + loss, compiled and/or wrapped in DDP as configured."""
    step_fn: nn.Module = Trainee(state.model, state.loss_fn)
    if job.cfg.compile:  # of a module, torch.compile returns an OptimizedModule (an nn.Module); its stub: a callable
        step_fn = torch.compile(step_fn)  # type: ignore[assignment]
    if job.dist.enabled:
        step_fn = DistributedDataParallel(
            step_fn,
            device_ids=[job.device.index] if job.device.type == "cuda" else None,
            find_unused_parameters=job.cfg.warmup_epochs > 0,
        )
    return step_fn


def train_one_epoch(job: Job, state: TrainState, step_fn, loader, updater, epoch: int) -> float:
    """One pass over the train split; returns the mean loss. The proxy update follows every optimizer step."""
    cfg, device = job.cfg, job.device
    loader.sampler.set_epoch(epoch)
    frozen = epoch <= cfg.warmup_epochs
    state.model.train()
    total, steps, pending = torch.zeros((), device=device), 0, []
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=not job.dist.is_main)
    for i, (images, labels, _) in enumerate(bar):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss, emb = step_fn(images, labels, freeze_backbone=frozen, amp=cfg.amp)
        state.scaler.scale(loss / cfg.grad_accum).backward()
        pending.append((emb.detach(), labels))
        if (i + 1) % cfg.grad_accum == 0:
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.optimizer.zero_grad(set_to_none=True)
            if updater is not None:  # every rank applies the same update from the global batch
                emb_all = distributed.all_gather_cat(torch.cat([e for e, _ in pending]), same_size=True)
                labels_all = distributed.all_gather_cat(torch.cat([y for _, y in pending]), same_size=True)
                updater.update_loss(state.loss_fn, emb_all, labels_all)
            pending.clear()
        total += loss.detach()
        steps += 1
        if steps % cfg.log_every == 0:  # the only host sync in the step loop
            running = (total / steps).item()
            check_finite(running, epoch, job.run)
            bar.set_postfix(loss=f"{running:.4f}")
    state.optimizer.zero_grad(set_to_none=True)  # an incomplete accumulation at the epoch's end is dropped
    state.scheduler.step()
    if job.dist.enabled:
        check_proxies_in_sync(state.loss_fn)
    train_loss = (total / max(steps, 1)).item()
    check_finite(train_loss, epoch, job.run)
    if updater is not None and updater.skipped:
        job.run.log(
            f"epoch {epoch}: {updater.skipped} proxy update(s) skipped so far: the batch's embeddings were "
            "not finite (proxies left unchanged)",
            job.dist.is_main,
        )
    return train_loss


def evaluate_split(
    model: EmbeddingNet, split: EvalSplit, cfg: TrainConfig, device, dist, *, metrics=None, recalls=None
) -> tuple[dict, np.ndarray]:
    """Embed one evaluation split and compute its metrics (query/gallery mode when it has one)."""
    feats = embed_dataset(
        ModuleEmbedder(model, amp=cfg.amp),
        split.dataset,
        batch_size=cfg.embed_batch_size,
        workers=cfg.loader_workers,
        dist=dist,
        desc=f"embed {split.name}",
    )
    return evaluate_arrays(
        feats,
        split.labels,
        split.split,
        metrics=metrics or cfg.epoch_metrics(),
        recalls=recalls or cfg.epoch_recalls(),
        device=device,
    ), feats


def score(job: Job, model: EmbeddingNet) -> dict:
    """Per-epoch metrics, prefixed by split: val always when present, test only if selecting on it or asked."""
    splits = [job.data.val] if job.data.val is not None else []
    if job.select == "test" or job.cfg.test_every_epoch:
        splits.append(job.data.test)
    row = {}
    for split in splits:
        selects = job.select == split.name  # the split selection reads: its tie-breaks too (TIE_BREAKS)
        metrics = list(dict.fromkeys([*job.cfg.epoch_metrics(), "map@r"])) if selects else None
        res, feats = evaluate_split(model, split, job.cfg, job.device, job.dist, metrics=metrics)
        if selects:
            res["margin"] = class_margin(feats, split.labels, split.split)
        job.tracker.scored(split, feats)
        row.update({f"{split.name}_{k}": v for k, v in res.items()})
    return row


def select_and_save(job: Job, state: TrainState, epoch: int, rows: list[dict]) -> None:
    """Keep `best.pt` for the selected epoch (`choose_epoch`: the selection metric, ties broken by `TIE_BREAKS`,
    the first best kept; or the last epoch) and `last.pt`."""
    state.choice = choose_epoch(rows, job.select_keys) if job.select_keys else Choice(epoch)
    improved = state.choice.epoch == epoch
    if improved:
        state.best_epoch = epoch
        state.best_score = rows[-1][job.select_key] if job.select_key else float(epoch)
    state.epoch = epoch
    if job.dist.is_main:
        job.tracker.epoch(rows[-1])  # before the checkpoint: a resume purges the epochs logged after it
        checkpoint = state.state_dict()
        if improved:
            job.run.save_checkpoint(BEST, checkpoint)
        job.run.save_checkpoint(LAST, checkpoint)  # last: a resume starts after this epoch
        job.run.write_metrics(rows)
        line = epoch_line(rows[-1], job)
        if line is not None:
            job.run.log(line, True)


def finish(job: Job, state: TrainState) -> dict:
    """Load the selected checkpoint, evaluate it once on the test split, write eval.json and embeddings.npz.

    With `final_test` off (tuning trials) the test split is never embedded and nothing more is written; the
    selection alone is returned (`test` None)."""
    cfg, dist = job.cfg, job.dist
    if not cfg.final_test:
        summary = {**selection_summary(job, state), "test": None}
        job.run.log(
            f"selected epoch {state.best_epoch} on {job.select}; test not evaluated (final_test off)"
            + "".join(f"\n{line}" for line in choice_lines(summary)),
            dist.is_main,
        )
        return summary
    model_state = distributed.broadcast_object(job.run.load_checkpoint(BEST)["model"] if dist.is_main else None)
    state.model.load_state_dict(model_state)
    res, feats = evaluate_split(
        state.model,
        job.data.test,
        cfg,
        job.device,
        dist,
        metrics=["recall", "precision@1", "r_precision", "map@r"],
        recalls=cfg.recalls,
    )
    summary = {
        **selection_summary(job, state),
        "split": "test",
        "queries": job.data.test.num_queries,
        "lone_queries": job.data.test.lone_queries,
        "test": res,
    }
    if job.select == "test":
        summary["warning"] = "selected on test: the test figures are optimistic (only for reproducing tables)"
    if dist.is_main:
        job.run.write_eval(summary)
        test = job.data.test
        job.run.save_embeddings(
            feats,
            test.labels,
            [str(Path(cfg.data) / p) for p in test.frame["path"]],
            list(test.split),
            list(test.frame["class_name"]),
        )
        job.run.log(selection_line(summary), True)
    distributed.barrier()
    return summary


def selection_summary(job: Job, state: TrainState) -> dict:
    """What eval.json says of the selection: checkpoint, epoch, split and metric, score, the tie-break that
    decided it (`Choice`), the protocol and whether the epochs trained at all."""
    choice = state.choice or Choice(state.best_epoch)
    by_val = job.select != "last"
    return {
        "checkpoint": BEST,
        "epoch": state.best_epoch,
        "selected_on": job.select,
        "select_metric": job.cfg.select_metric if by_val else None,
        "selection_score": state.best_score if by_val else None,
        "tie_break": choice.decided_by and choice.decided_by.removeprefix(f"{job.select}_"),
        "tied_epochs": list(choice.tied),
        "protocol": job.data.protocol,
        "epochs": job.cfg.epochs,
    }


def epoch_line(row: dict, job: Job) -> str | None:
    """An epoch's progress line; None for epoch 0 when nothing was scored (no val split)."""
    shown = " ".join(
        f"{k}={v:.4f}"
        for k, v in row.items()
        if k not in ("epoch", "seconds", "lr") and not (k == "train_loss" and row["epoch"] == 0)
    )
    if row["epoch"] == 0 and not shown:
        return None
    start = " (pretrained start)" if row["epoch"] == 0 else ""
    return f"epoch {row['epoch']}{start}: {shown} ({row['seconds']:.0f}s)"


def selection_line(summary: dict) -> str:
    """What was selected, on which split and metric (and how a tie was broken), its test figures and, last, whether
    the pretrained start was kept."""
    epoch, how = summary["epoch"], summary["selected_on"]
    if how == "last":
        chosen = f"kept the last epoch ({epoch}); no val split to select on"
    else:
        chosen = f"selected epoch {epoch} on {how} {summary['select_metric']}={summary['selection_score']:.4f}"
        if how == "test":
            chosen += " [SELECTED ON TEST: optimistic]"
    test = " ".join(f"{k}={v:.4f}" for k, v in summary["test"].items())
    lone = summary.get("lone_queries")
    left_out = f", {lone} without another image of its class left out" if lone else ""
    return "\n".join(
        [
            chosen,
            f"test ({summary['queries']} queries{left_out}, once, for the selected checkpoint): {test}",
            *choice_lines(summary),
        ]
    )


def choice_lines(summary: dict) -> list[str]:
    """How a tie on the selection metric was broken, and the plain words when the pretrained start was kept."""
    lines, how, tied = [], summary["selected_on"], summary.get("tied_epochs") or []
    by = summary.get("tie_break")
    if by and tied:
        epochs = ", ".join(map(str, tied))
        tie = f"{how} {summary['select_metric']} tied at {summary['selection_score']:.4f} in epochs {epochs}"
        lines.append(
            f"{tie}: the first of them is kept (every finer metric tied too)"
            if by == "tie"
            else f"{tie}: chosen on {how} {by} instead (the selection metric is saturated)"
        )
    if summary["epoch"] == 0 and how != "last" and summary.get("epochs", 0) > 0:
        lines.append(f"training did not improve {'validation' if how == 'val' else how}; the pretrained model is kept")
    return lines


def check_proxies_in_sync(loss_fn: nn.Module) -> None:
    """Every rank must hold bit-identical proxies; a difference is a bug, not a user error."""
    proxies = proxy_parameter(loss_fn)[0].detach()
    gathered = distributed.all_gather_cat(proxies[None])
    if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
        raise RuntimeError("proxies differ across ranks")


def check_finite(value: float, epoch: int, run: RunDir) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"loss became {value} in epoch {epoch}; stopped, the last good checkpoint is "
            f"{run / LAST} (try a lower --lr)"
        )


def resume(run_dir: str | Path, epochs: int | None = None, **changes) -> dict:
    """Continue a killed run from its last finished epoch; return the summary of eval.json.

    `epochs` above the run's extends an unfinished run: config.json records the new total and the learning-rate
    schedule becomes the one of a run planned for that many epochs, from the epoch reached on (`reschedule`).
    A finished run is left as it is (the summary says `already_finished`); extending it is refused, since its
    test split was evaluated and a longer run chosen after that would be chosen on test. `changes` (e.g. device,
    loader_workers, log) apply to this continuation only; they change where and how it runs, not what it learns."""
    run = RunDir(run_dir)
    cfg = TrainConfig.from_dict(run.info())
    if not (run / LAST).exists():
        raise UserError(f"{run.path} has no checkpoint to resume from ({LAST}); start it again with train")
    if epochs is not None and epochs < cfg.epochs:
        raise UserError(
            f"--epochs {epochs} is fewer than the run's {cfg.epochs}; a resume continues or extends a "
            "run, never shortens it"
        )
    done = run.load_checkpoint(LAST)["epoch"]
    if done >= cfg.epochs and (run.eval() is not None or not cfg.final_test):
        if epochs is not None and epochs > cfg.epochs:
            raise UserError(
                f"{run.path} finished at epoch {done} and its test split was evaluated; a longer run "
                f"chosen now would be chosen after seeing test. Start a new one: mproxy train --config "
                f"{run / CONFIG} --epochs {epochs} --out NEW_RUN"
            )
        return {**(run.eval() or {}), "already_finished": done}
    if epochs is not None and epochs > cfg.epochs:
        run.extend(epochs)
        run.log(f"extending the run from {cfg.epochs} to {epochs} epochs (schedule rebuilt from epoch {done})")
        cfg.epochs = epochs
    cfg = cfg.with_(**changes, out=str(run.path))
    return train(cfg, resume=True)


def reschedule(scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: TrainConfig, epoch: int) -> None:
    """Make `scheduler`, restored at `epoch` from a run planned for fewer epochs, the schedule of a run planned
    for `cfg.epochs`: the rates of the epochs to come are those that run would use (cosine annealed over the new
    total; multistep x0.1 at its milestones). Epochs already trained keep the rates they had."""
    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        if scheduler.T_max == cfg.epochs:
            return
        scheduler.T_max = cfg.epochs
        factor = (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2
    else:
        assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)  # make_scheduler's other kind
        milestones = lr_milestones(cfg.epochs, cfg.milestone_rounding)
        if sorted(scheduler.milestones) == milestones:
            return
        scheduler.milestones = Counter(milestones)
        factor = scheduler.gamma ** sum(m <= epoch for m in milestones)
    eta_min = getattr(scheduler, "eta_min", 0.0)  # multistep: none
    for group in scheduler.optimizer.param_groups:
        group["lr"] = eta_min + (group["initial_lr"] - eta_min) * factor
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
