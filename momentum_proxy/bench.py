"""Throughput benchmark: the whole training/embedding pipeline against the bare model on pre-made tensors.

Pipeline efficiency = pipeline images/s / model images/s, measured in one run. Without `data`, a temporary
dataset of full-size (500x375) JPEGs is generated and prepared as a user would (resize-once cache).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from momentum_proxy.data.loading import load_datasets, make_loader
from momentum_proxy.data.prepare import prepare_folder
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import write_json
from momentum_proxy.inference import autocast, embed_dataset, resolve_device
from momentum_proxy.losses import MomentumProxyUpdate
from momentum_proxy.runs import TrainConfig
from momentum_proxy.training import Trainee, build, make_optimizer


def make_photo_dataset(root: Path, classes: int = 8, per_class: int = 40, size=(500, 375), seed: int = 0) -> Path:
    """An ImageFolder of photo-like JPEGs (smooth colour fields with shapes), `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            im = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
            noise = rng.normal(0, 6, (h, w, 3))
            arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{i:03d}.jpg", quality=90)
    return root


def _rate(fn, steps: int, images_per_step: int, warmup: int = 2) -> float:
    """Images per second of `fn(step)` over `steps` calls after `warmup` calls."""
    for i in range(warmup):
        fn(i)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    return steps * images_per_step / (time.perf_counter() - t0)


def bench(*, data: str | None = None, backbone: str = "efficientnet_lite0", image_size: int = 224,
          batch_size: int = 32, steps: int = 10, device: str = "auto", workers: int | None = None,
          compile: bool = False, amp: str = "none", json_out: str | None = None) -> dict:
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            # 4 train classes give steps + 2 training batches; 4 test classes give steps + 1 embedding batches
            per_class = max(8, (steps + 2) * 2 * batch_size // 4 + 1)
            raw = make_photo_dataset(Path(tmp) / "raw", classes=8, per_class=per_class)
            data = str(prepare_folder(raw, Path(tmp) / "prepared", short_side=256))
        cfg = TrainConfig(data=data, out="", backbone=backbone, pretrained="none",  # speed does not depend on weights
                          image_size=image_size, batch_size=batch_size,
                          workers=workers, device=str(dev), compile=compile, amp=amp, warmup_epochs=0)
        splits = load_datasets(data, image_size)
        train_set, test_set = splits.train, splits.test.dataset
        model, loss_fn = build(cfg, len(train_set.label_map))
        model.to(dev)
        loss_fn.to(dev)
        optimizer = make_optimizer(cfg, model, loss_fn)
        updater = MomentumProxyUpdate(cfg.momentum)
        trainee = Trainee(model, loss_fn).train()
        step_fn = torch.compile(trainee) if compile else trainee

        def train_step(images, labels):
            loss, emb = step_fn(images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True), amp=amp)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updater.update_loss(loss_fn, emb, labels.to(dev))

        loader = make_loader(train_set, batch_size, train=True, workers=workers, pin_memory=dev.type == "cuda")
        need = steps + 2
        if len(loader) < need:
            raise UserError(f"the train split gives {len(loader)} batches; {need} needed (lower --steps)")
        batches = None

        def pipeline_step(_):
            nonlocal batches
            batches = batches or iter(loader)  # started only now, so no loading overlaps the model-only run
            images, labels, _ = next(batches)
            train_step(images, labels)

        # pre-made batch in the loader's layout (HWC memory, NCHW view)
        fixed = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        fixed_labels = torch.arange(batch_size) % len(train_set.label_map)
        train_model = _rate(lambda _: train_step(fixed, fixed_labels), steps, batch_size)
        train_pipeline = _rate(pipeline_step, steps, batch_size)
        batches = None  # release the loader

        eval_bs = 2 * batch_size
        n_eval = min(len(test_set), eval_bs * (steps + 1))
        subset = torch.utils.data.Subset(test_set, range(n_eval))
        embed_dataset(model, torch.utils.data.Subset(test_set, range(eval_bs)), dev, batch_size=eval_bs,
                      workers=workers, amp=amp, progress=False)  # warm-up
        t0 = time.perf_counter()
        embed_dataset(model, subset, dev, batch_size=eval_bs, workers=workers, amp=amp, progress=False)
        embed_pipeline = n_eval / (time.perf_counter() - t0)
        model.eval()
        eval_fixed = torch.randint(0, 256, (eval_bs, image_size, image_size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)

        @torch.inference_mode()
        def embed_step(_):
            with autocast(dev, amp):
                out = model(eval_fixed.to(dev))
            torch.nn.functional.normalize(out.float(), dim=1).cpu()

        embed_model = _rate(embed_step, max(2, n_eval // eval_bs), eval_bs, warmup=1)
    res = {"backbone": backbone, "image_size": image_size, "batch_size": batch_size, "steps": steps,
           "device": str(dev), "threads": torch.get_num_threads(), "compile": compile, "amp": amp,
           "train_pipeline_ips": round(train_pipeline, 2), "train_model_ips": round(train_model, 2),
           "train_efficiency": round(train_pipeline / train_model, 3),
           "embed_pipeline_ips": round(embed_pipeline, 2), "embed_model_ips": round(embed_model, 2),
           "embed_efficiency": round(embed_pipeline / embed_model, 3)}
    if json_out:
        write_json(json_out, res)
    return res
