"""Embedding images in PyTorch: a torch module as an `Embedder` (`ModuleEmbedder`), a run's best model
(`TorchEmbedder`, the reference), and embedding datasets and image files by any `Embedder`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from momentum_proxy.config import ModelConfig, check_tta
from momentum_proxy.data.loading import (
    ImageDataset,
    eval_resize,
    eval_transform,
    make_loader,
    read_image,
    to_array,
    to_batch,
)
from momentum_proxy.distributed import DistInfo, all_gather_cat
from momentum_proxy.embedding.base import Embedder
from momentum_proxy.embedding.tta import tta_embed
from momentum_proxy.errors import UserError
from momentum_proxy.models.backbones import resolve_config
from momentum_proxy.models.fold import fold_batchnorm
from momentum_proxy.models.net import EmbeddingNet
from momentum_proxy.perf import flush_denormals
from momentum_proxy.runs import BEST, RunDir, model_identity


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


def load_model(run_dir: str | Path, device: str = "auto", fold: bool = True) -> tuple[EmbeddingNet, ModelConfig, str]:
    """A run's best model in eval mode on `device`, its config, and a fingerprint of the checkpoint.

    With `fold` (the default) its BatchNorm layers are folded into the convolutions before them (`models.fold`):
    the same embeddings to about 1e-5, faster (on a 2-core CPU, Lite0 embedded 17–20 % more images per second);
    such a model is for inference only.

    On CUDA this turns TF32 off for cuDNN convolutions in the process: with TF32 (PyTorch's default there) an
    image embedded alone (a query) and in a batch (an index, or a served batch) differ by about 1e-4, enough
    to reorder near ties between `mproxy retrieve`, the service and a query by id; in full float32 they agree
    as on a CPU."""
    run = RunDir(run_dir)
    dev = resolve_device(device)
    cfg = resolve_config(run.config(), dev.type)  # a run written through the API may leave the size open
    state = run.load_checkpoint(BEST)
    model = EmbeddingNet(cfg.backbone, cfg.feature_dim, weights=None, pooling=cfg.pooling, image_size=cfg.image_size)
    model.load_state_dict(state["model"])
    fingerprint = f"{Path(run.path).resolve()}#epoch{state['epoch']}"
    if dev.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
    model = model.to(dev).eval()
    if fold:
        shape, seeded = (1, 3, cfg.image_size, cfg.image_size), torch.Generator().manual_seed(0)
        fold_batchnorm(model, torch.randint(0, 256, shape, dtype=torch.uint8, generator=seeded).to(dev))
    return model, cfg, fingerprint


def autocast(device: torch.device, amp: str):
    """Autocast context for `--amp none|bf16|fp16`."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """`model` in eval mode for the block, then back in the mode it had (training embeds between epochs). A model
    already in eval mode is left alone: switching walks every module, about 2 ms a batch for Lite0 on a CPU, which
    a served query would pay twice."""
    if not model.training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train()


class ModuleEmbedder:
    """A model in PyTorch (an `EmbeddingNet`: uint8 NCHW batches to raw embeddings) as an `Embedder`: the one adapter
    through which a torch model embeds (the model in training, a run's best model in `TorchEmbedder`).

    `tta` (none | flip) as `embedding.tta`; `amp` (none | bf16 | fp16) autocasts the forward pass;
    `normalize=False` gives the raw rows (what the momentum update works on; only without `tta`). `image_size`
    (the input size `embed_files` resizes to) and `identity` say what the model expects and is."""

    runtime = "torch"

    def __init__(
        self,
        model: EmbeddingNet,
        *,
        image_size: int | None = None,
        tta: str = "none",
        amp: str = "none",
        normalize: bool = True,
        identity: dict | None = None,
    ):
        check_tta(tta)
        if not normalize and tta != "none":
            raise ValueError("raw embeddings (normalize=False) are only defined without test-time augmentation")
        self.model, self.tta, self.amp, self.normalize = model, tta, amp, normalize
        self.device = next(model.parameters()).device
        self.image_size = image_size or 0  # 0: not given (a dataset brings its own size; embed_files needs it)
        self.feature_dim = model.fc.out_features
        self.identity = identity if identity is not None else {"runtime": self.runtime, "tta": tta}

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp):
            return self.model(images).float()

    @torch.inference_mode()
    def embed(self, images) -> np.ndarray:
        images = torch.as_tensor(images).to(self.device, non_blocking=True)
        with eval_mode(self.model):
            out = tta_embed(self._forward, images, self.tta) if self.normalize else self._forward(images)
        return out.cpu().numpy()


class TorchEmbedder(ModuleEmbedder):
    """The run's best checkpoint in PyTorch: the reference `Embedder`; `tta` (none | flip) as `embedding.tta`."""

    def __init__(self, run_dir: str | Path, device: str = "auto", tta: str = "none"):
        check_tta(tta)
        model, cfg, _ = load_model(run_dir, device)
        super().__init__(
            model,
            image_size=cfg.image_size,
            tta=tta,
            identity={**model_identity(run_dir), "runtime": self.runtime, "verified": True, "tta": tta},
        )


def embed_dataset(
    embedder: Embedder,
    dataset: ImageDataset,
    *,
    batch_size: int = 128,
    workers: int | None = None,
    dist: DistInfo = DistInfo(),
    progress: bool = True,
    desc: str = "embed",
) -> np.ndarray:
    """The embeddings (float32 rows, as `embedder` gives them) of every image of `dataset`, in order.

    Under torchrun each rank embeds an interleaved shard and the shards are gathered on every rank.
    """
    shard = Subset(dataset, range(dist.rank, len(dataset), dist.world_size)) if dist.enabled else dataset
    loader = make_loader(shard, batch_size, train=False, workers=workers, pin_memory=embedder.device.type == "cuda")
    feats, idx = [], []
    for images, _, index in tqdm(loader, desc=desc, leave=False, disable=not (progress and dist.is_main)):
        feats.append(torch.from_numpy(embedder.embed(images)))
        idx.append(index)
    rows = torch.cat(feats) if feats else torch.zeros((0, embedder.feature_dim))
    order = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
    if dist.enabled:  # gathered where the collective runs (NCCL: on the GPU)
        rows, order = all_gather_cat(rows.to(embedder.device)), all_gather_cat(order.to(embedder.device))
        rows = rows[torch.argsort(order)]
    return rows.cpu().numpy()


def embed_files(
    embedder: Embedder, paths: Sequence[str | Path], batch_size: int = 64, progress: bool = True
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Embed image files at `embedder.image_size`; returns (features of the readable ones, their paths,
    [(path, reason)] skipped). `progress`: a progress bar (for more than two batches)."""
    size = embedder.image_size
    tf = eval_transform(size)
    feats: list[np.ndarray] = []
    ok: list[str] = []
    skipped: list[tuple[str, str]] = []
    batch: list[np.ndarray] = []

    def flush():
        if batch:
            feats.append(embedder.embed(to_batch(batch)))
            batch.clear()

    for p in tqdm(paths, desc="embed", leave=False, disable=not progress or len(paths) < 2 * batch_size):
        try:
            batch.append(to_array(tf(read_image(p, eval_resize(size)))))
        except (OSError, ValueError) as e:
            skipped.append((str(p), str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        ok.append(str(p))
        if len(batch) == batch_size:
            flush()
    flush()
    return (np.concatenate(feats) if feats else np.zeros((0, embedder.feature_dim), np.float32)), ok, skipped
