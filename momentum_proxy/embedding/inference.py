"""Embedding images with a trained model in PyTorch: loading a run's model (`TorchEmbedder`, the reference
`Embedder`), embedding datasets and image files."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

from momentum_proxy.data.loading import (
    ImageDataset,
    eval_resize,
    eval_transform,
    make_loader,
    read_image,
    to_array,
    to_batch,
)
from momentum_proxy.config import check_tta
from momentum_proxy.distributed import DistInfo, all_gather_cat
from momentum_proxy.embedding.tta import tta_embed
from momentum_proxy.errors import UserError
from momentum_proxy.models.backbones import resolve_config
from momentum_proxy.models.net import EmbeddingNet
from momentum_proxy.perf import flush_denormals
from momentum_proxy.runs import BEST, RunDir, TrainConfig, model_identity


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for `auto | cpu | cuda[:N]`. Every torch job starts here, so it also applies the
    process-wide CPU setting (denormals flushed, see perf.py)."""
    flush_denormals()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def load_model(run_dir: str | Path, device: str = "auto") -> tuple[EmbeddingNet, TrainConfig, str]:
    """A run's best model in eval mode on `device`, its config, and a fingerprint of the checkpoint.

    On CUDA this turns TF32 off for cuDNN convolutions in the process: with TF32 (PyTorch's default there) an
    image embedded alone (a query) and in a batch (an index, or a served batch) differ by about 1e-4, enough
    to reorder near ties between `mproxy retrieve`, the service and a query by id; in full float32 they agree
    as on a CPU."""
    run = RunDir(run_dir)
    device = resolve_device(device)
    cfg = resolve_config(run.config(), device.type)  # a run written through the API may leave the size open
    state = run.load_checkpoint(BEST)
    model = EmbeddingNet(cfg.backbone, cfg.feature_dim, weights=None, pooling=cfg.pooling, image_size=cfg.image_size)
    model.load_state_dict(state["model"])
    fingerprint = f"{Path(run.path).resolve()}#epoch{state['epoch']}"
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
    return model.to(device).eval(), cfg, fingerprint


class TorchEmbedder:
    """The run's best checkpoint in PyTorch: the reference `Embedder`; `tta` (none | flip) as `embedding.tta`."""

    runtime = "torch"

    def __init__(self, run_dir: str | Path, device: str = "auto", tta: str = "none"):
        check_tta(tta)
        self.model, cfg, _ = load_model(run_dir, device)
        self.device = next(self.model.parameters()).device
        self.image_size, self.feature_dim, self.tta = cfg.image_size, cfg.feature_dim, tta
        self.identity = {**model_identity(run_dir), "runtime": self.runtime, "verified": True, "tta": tta}

    @torch.inference_mode()
    def embed(self, images) -> np.ndarray:
        return tta_embed(self.model, torch.as_tensor(images).to(self.device, non_blocking=True), self.tta).cpu().numpy()


def autocast(device: torch.device, amp: str):
    """Autocast context for `--amp none|bf16|fp16`."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def embed_batch(model, images: torch.Tensor, device: torch.device, amp: str = "none",
                normalize: bool = True) -> torch.Tensor:
    """L2-normalised embeddings of a uint8 batch by a torch model or an `Embedder` (`deploy.runtimes.load_embedder`);
    a torch model's raw embeddings with `normalize=False`."""
    if hasattr(model, "embed"):
        return torch.from_numpy(model.embed(images)).to(device)
    with autocast(device, amp):
        out = model(images.to(device, non_blocking=True)).float()
    return F.normalize(out, dim=1) if normalize else out


@torch.inference_mode()
def embed_dataset(model, dataset: ImageDataset, device: torch.device, *, batch_size: int = 128,
                  workers: int | None = None, amp: str = "none", dist: DistInfo = DistInfo(),
                  progress: bool = True, desc: str = "embed", normalize: bool = True) -> np.ndarray:
    """L2-normalised float32 embeddings of every image of `dataset`, in order, by a torch model or an embedder
    (a torch model's raw embeddings with `normalize=False`).

    Under torchrun each rank embeds an interleaved shard and the shards are gathered on every rank.
    """
    was_training = getattr(model, "training", False)
    if was_training:
        model.eval()
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size)) if dist.enabled else dataset
    loader = make_loader(shard, batch_size, train=False, workers=workers, pin_memory=device.type == "cuda")
    feats, idx = [], []
    for images, _, index in tqdm(loader, desc=desc, leave=False, disable=not (progress and dist.is_main)):
        feats.append(embed_batch(model, images, device, amp, normalize))
        idx.append(index.to(device))
    feats, idx = torch.cat(feats), torch.cat(idx)
    if dist.enabled:
        feats, idx = all_gather_cat(feats), all_gather_cat(idx)
        feats = feats[torch.argsort(idx)]
    if was_training:
        model.train()
    return feats.cpu().numpy()


@torch.inference_mode()
def embed_files(model, paths: list[str | Path], image_size: int, device: torch.device, batch_size: int = 64,
                progress: bool = True) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Embed image files with a torch model or an embedder; returns (features of the readable ones, their paths,
    [(path, reason)] skipped). `progress`: a progress bar (for more than two batches)."""
    if isinstance(model, torch.nn.Module):
        model.eval()
    tf = eval_transform(image_size)
    feats, ok, skipped, batch = [], [], [], []

    def flush():
        if batch:
            feats.append(embed_batch(model, to_batch(batch), device).cpu())
            batch.clear()

    for p in tqdm(paths, desc="embed", leave=False, disable=not progress or len(paths) < 2 * batch_size):
        try:
            batch.append(to_array(tf(read_image(p, eval_resize(image_size)))))
        except (OSError, ValueError) as e:
            skipped.append((str(p), str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        ok.append(str(p))
        if len(batch) == batch_size:
            flush()
    flush()
    dim = getattr(model, "feature_dim", None) or (model.fc.out_features if hasattr(model, "fc") else 0)
    return (torch.cat(feats).numpy() if feats else np.zeros((0, dim), np.float32)), ok, skipped
