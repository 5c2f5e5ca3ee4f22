"""Throughput benchmark: the whole training/embedding pipeline against the bare model on pre-made tensors.

Pipeline efficiency = pipeline images/s / model images/s, measured in one run; embedding is also timed in
onnxruntime (the exported model, fp32 and static int8) against PyTorch eager. Every measurement is repeated in
interleaved rounds and reported as median and spread; ratios are ratios of medians. Without `data`, a temporary dataset of full-size
(500x375) JPEGs is generated and prepared as a user would (resize-once cache).
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Callable

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


def _rate(fn, steps: int, images_per_step: int, warmup: int = 1) -> float:
    """Images per second of `fn(step)` over `steps` calls after `warmup` calls."""
    for i in range(warmup):
        fn(i)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    return steps * images_per_step / (time.perf_counter() - t0)


def interleave(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each measurement once per round, alternating (A, B, C, A, B, C, ...), so that a slow spell on a shared
    machine hits every contender rather than deciding a ratio; the values of each, in round order."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            values[name].append(measure())
    return values


def summarise(values: dict[str, list[float]]) -> dict:
    """Per measurement: median (`NAME_ips`), and the spread (min, max) and every round under `repeats`."""
    out: dict = {f"{name}_ips": round(float(np.median(v)), 2) for name, v in values.items()}
    out["spread"] = {name: [round(min(v), 2), round(max(v), 2)] for name, v in values.items()}
    out["repeats"] = {name: [round(x, 2) for x in v] for name, v in values.items()}
    return out


def _onnx_embedders(model: torch.nn.Module, folder: Path, image_size: int, dev: torch.device, data: str,
                    calibration_images: int) -> dict:
    """{"embed_onnx": fp32, "embed_onnx_int8": static int8 (calibrated on `data`'s training images)}, each a
    function `images -> normalised embeddings` through onnxruntime for the current weights of `model`."""
    from momentum_proxy.export import ExportNet, INPUT_NAME, export_onnx, onnx_session
    from momentum_proxy.int8 import calibration_batches, quantize

    fp32, int8 = folder / "model.onnx", folder / "model_int8.onnx"
    export_onnx(ExportNet(copy.deepcopy(model).cpu().eval(), normalize=True), fp32, image_size)
    quantize(fp32, int8, calibration_batches(data, image_size, calibration_images), INPUT_NAME)
    sessions = {"embed_onnx": onnx_session(fp32, str(dev)), "embed_onnx_int8": onnx_session(int8, str(dev))}
    return {name: (lambda images, s=s: s.run(None, {INPUT_NAME: images})[0]) for name, s in sessions.items()}


def bench(*, data: str | None = None, backbone: str = "efficientnet_lite0", image_size: int = 224,
          batch_size: int = 32, steps: int = 10, rounds: int = 5, device: str = "auto", workers: int | None = None,
          compile: bool = False, amp: str = "none", json_out: str | None = None) -> dict:
    """Images/s of training and embedding, pipeline and bare model, plus embedding in onnxruntime: every
    measurement repeated in `rounds` interleaved rounds of `steps` steps; medians, spreads and ratios of medians."""
    if rounds < 1 or steps < 1:
        raise UserError("--rounds and --steps must be at least 1")
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
        trainee = Trainee(model, loss_fn)
        step_fn = torch.compile(trainee) if compile else trainee

        def train_step(images, labels):
            loss, emb = step_fn(images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True), amp=amp)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updater.update_loss(loss_fn, emb, labels.to(dev))

        loader = make_loader(train_set, batch_size, train=True, workers=workers, pin_memory=dev.type == "cuda")
        need = steps + 1
        if len(loader) < need:
            raise UserError(f"the train split gives {len(loader)} batches; {need} needed (lower --steps)")

        # pre-made batches in the loader's layout (HWC memory, NCHW view)
        fixed = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        fixed_labels = torch.arange(batch_size) % len(train_set.label_map)
        eval_bs = 2 * batch_size
        eval_fixed = torch.randint(0, 256, (eval_bs, image_size, image_size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        eval_numpy = np.ascontiguousarray(eval_fixed.numpy())  # onnxruntime takes contiguous NCHW
        n_eval = min(len(test_set), eval_bs * (steps + 1))
        subset = torch.utils.data.Subset(test_set, range(n_eval))
        embed_steps = max(2, n_eval // eval_bs)
        onnx_embed = _onnx_embedders(model, Path(tmp), image_size, dev, data, 2 * eval_bs)

        def train_model():
            trainee.train()
            return _rate(lambda _: train_step(fixed, fixed_labels), steps, batch_size)

        def train_pipeline():
            trainee.train()
            batches = iter(loader)  # started only now, so no loading overlaps another measurement
            return _rate(lambda _: train_step(*next(batches)[:2]), steps, batch_size)

        def embed_pipeline():
            t0 = time.perf_counter()
            embed_dataset(model, subset, dev, batch_size=eval_bs, workers=workers, amp=amp, progress=False)
            return n_eval / (time.perf_counter() - t0)

        @torch.inference_mode()
        def torch_embed_step(_):
            with autocast(dev, amp):
                out = model(eval_fixed.to(dev))
            torch.nn.functional.normalize(out.float(), dim=1).cpu()

        def embed_model():
            model.eval()
            return _rate(torch_embed_step, embed_steps, eval_bs)

        def onnx_rate(name):
            return lambda: _rate(lambda _: onnx_embed[name](eval_numpy), embed_steps, eval_bs)

        embed_dataset(model, torch.utils.data.Subset(test_set, range(eval_bs)), dev, batch_size=eval_bs,
                      workers=workers, amp=amp, progress=False)  # warm-up (thread pool, allocator)
        values = interleave({"train_pipeline": train_pipeline, "train_model": train_model,
                             "embed_pipeline": embed_pipeline, "embed_model": embed_model,
                             "embed_onnx": onnx_rate("embed_onnx"),
                             "embed_onnx_int8": onnx_rate("embed_onnx_int8")}, rounds)
    res = {"backbone": backbone, "image_size": image_size, "batch_size": batch_size, "steps": steps,
           "rounds": rounds, "device": str(dev), "threads": torch.get_num_threads(), "compile": compile, "amp": amp,
           **summarise(values)}
    med = {name: float(np.median(v)) for name, v in values.items()}
    res.update(train_efficiency=round(med["train_pipeline"] / med["train_model"], 3),
               embed_efficiency=round(med["embed_pipeline"] / med["embed_model"], 3),
               onnx_speedup=round(med["embed_onnx"] / med["embed_model"], 3),
               onnx_int8_speedup=round(med["embed_onnx_int8"] / med["embed_model"], 3))
    if json_out:
        write_json(json_out, res)
    return res
