"""Throughput benchmark: the whole training/embedding pipeline against the bare model on pre-made tensors.

Pipeline efficiency = pipeline images/s / model images/s, measured in one run; embedding is also timed in
onnxruntime (the exported model, fp32 and static int8) against PyTorch eager. Every measurement is repeated in
interleaved rounds and reported as median and spread; ratios are ratios of medians. Without `data`, a temporary
dataset of full-size (500x375) JPEGs is generated and prepared as a user would (resize-once cache).

`bench_search` measures evaluation's exact k-NN the same way: GFLOP/s (2·Q·N·d) of `vectors.search_chunks` on the
kernel evaluation uses on the device, against a bare `torch.mm` of the same products in one run.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from momentum_proxy.data.loading import ImageDataset, load_datasets, make_loader
from momentum_proxy.data.prepare import prepare_folder
from momentum_proxy.deploy.export import INPUT_NAME, ExportNet, export_onnx, onnx_session
from momentum_proxy.deploy.int8 import calibration_batches, quantize
from momentum_proxy.embedding.inference import ModuleEmbedder, autocast, embed_dataset, resolve_device
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import write_json
from momentum_proxy.models.fold import fold_batchnorm
from momentum_proxy.training.config import TrainConfig
from momentum_proxy.training.loop import Trainee, build, make_optimizer
from momentum_proxy.training.proxies import MomentumProxyUpdate
from momentum_proxy.vectors import (
    DEFAULT_CHUNK_SIZE,
    MAX_BLOCK_SIMS,
    MAX_CHUNK_NEIGHBOURS,
    on_device,
    search_chunks,
    search_device,
)


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


def _onnx_embedders(
    model: torch.nn.Module, folder: Path, image_size: int, dev: torch.device, data: str, calibration_images: int
) -> dict:
    """{"embed_onnx": fp32, "embed_onnx_int8": static int8 (calibrated on `data`'s training images)}, each a
    function `images -> normalised embeddings` through onnxruntime for the current weights of `model`."""
    fp32, int8 = folder / "model.onnx", folder / "model_int8.onnx"
    export_onnx(ExportNet(copy.deepcopy(model).cpu().eval(), normalize=True), fp32, image_size)
    quantize(fp32, int8, calibration_batches(data, image_size, calibration_images), INPUT_NAME)
    sessions = {"embed_onnx": onnx_session(fp32, str(dev)), "embed_onnx_int8": onnx_session(int8, str(dev))}
    return {name: (lambda images, s=s: s.run(None, {INPUT_NAME: images})[0]) for name, s in sessions.items()}


def bench(
    *,
    data: str | None = None,
    backbone: str = "efficientnet_lite0",
    image_size: int = 224,
    batch_size: int = 32,
    steps: int = 10,
    rounds: int = 5,
    device: str = "auto",
    loader_workers: int | None = None,
    compile: bool = False,
    amp: str = "none",
    json_out: str | None = None,
) -> dict:
    """Images/s of training and embedding, pipeline and bare model, plus embedding in onnxruntime: every
    measurement repeated in `rounds` interleaved rounds of `steps` steps; medians, spreads and ratios of medians."""
    if rounds < 1 or steps < 1:
        raise UserError("--rounds and --steps must be at least 1")
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = _generated_data(Path(tmp), steps, batch_size)
        cfg = TrainConfig(
            data=data,
            out="",
            backbone=backbone,
            pretrained="none",  # speed does not depend on weights
            image_size=image_size,
            batch_size=batch_size,
            loader_workers=loader_workers,
            device=str(dev),
            compile=compile,
            amp=amp,
            warmup_epochs=0,
        )
        values = interleave(_measures(cfg, dev, steps, Path(tmp)), rounds)
    res = {
        "backbone": backbone,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "rounds": rounds,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "compile": compile,
        "amp": amp,
        **summarise(values),
        **_ratios(values),
    }
    if json_out:
        write_json(json_out, res)
    return res


def _generated_data(root: Path, steps: int, batch_size: int) -> str:
    """A dataset of full-size photo-like JPEGs, prepared under `root` as a user would (resize-once cache)."""
    # 4 train classes give steps + 2 training batches; 4 test classes give steps + 1 embedding batches
    per_class = max(8, (steps + 2) * 2 * batch_size // 4 + 1)
    raw = make_photo_dataset(root / "raw", classes=8, per_class=per_class)
    return str(prepare_folder(raw, root / "prepared", short_side=256))


def _measures(cfg: TrainConfig, dev: torch.device, steps: int, tmp: Path) -> dict[str, Callable[[], float]]:
    """The six measurements (each returns images/s) of a model built from `cfg` on `cfg.data`, in report order."""
    splits = load_datasets(cfg.data, cfg.image_size)
    model, loss_fn = build(cfg, len(splits.train.label_map))
    model.to(dev)
    loss_fn.to(dev)
    return {
        **_training_measures(cfg, splits.train, model, loss_fn, dev, steps),
        **_embedding_measures(cfg, splits.test.dataset, model, dev, steps, tmp),
    }


def _uint8_batch(n: int, image_size: int) -> torch.Tensor:
    """`n` random uint8 images in the loader's layout (HWC memory, NCHW view)."""
    return torch.randint(0, 256, (n, image_size, image_size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)


def _training_measures(
    cfg: TrainConfig,
    train_set: ImageDataset,
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    dev: torch.device,
    steps: int,
) -> dict[str, Callable[[], float]]:
    """Training steps (forward, backward, optimiser, proxy update) fed by the loader (`train_pipeline`) and
    by one pre-made batch (`train_model`)."""
    optimizer = make_optimizer(cfg, model, loss_fn)
    updater = MomentumProxyUpdate(cfg.proxy_momentum, cfg.momentum_target)
    trainee = Trainee(model, loss_fn)
    step_fn = torch.compile(trainee) if cfg.compile else trainee

    def train_step(images, labels):
        loss, emb = step_fn(images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True), amp=cfg.amp)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        updater.update_loss(loss_fn, emb, labels.to(dev))

    loader = make_loader(
        train_set, cfg.batch_size, train=True, workers=cfg.loader_workers, pin_memory=dev.type == "cuda"
    )
    need = steps + 1
    if len(loader) < need:
        raise UserError(f"the train split gives {len(loader)} batches; {need} needed (lower --steps)")
    fixed = _uint8_batch(cfg.batch_size, cfg.image_size)
    fixed_labels = torch.arange(cfg.batch_size) % len(train_set.label_map)

    def train_model():
        trainee.train()
        return _rate(lambda _: train_step(fixed, fixed_labels), steps, cfg.batch_size)

    def train_pipeline():
        trainee.train()
        batches = iter(loader)  # started only now, so no loading overlaps another measurement
        return _rate(lambda _: train_step(*next(batches)[:2]), steps, cfg.batch_size)

    return {"train_pipeline": train_pipeline, "train_model": train_model}


def _embedding_measures(
    cfg: TrainConfig, test_set: ImageDataset, model: torch.nn.Module, dev: torch.device, steps: int, tmp: Path
) -> dict[str, Callable[[], float]]:
    """Embedding of the first test images by the pipeline (`embed_pipeline`), and of one pre-made batch in
    PyTorch (`embed_model`; `embed_model_folded` with BatchNorm folded, as runs are loaded for inference) and
    onnxruntime fp32 and int8 (`embed_onnx`, `embed_onnx_int8`); warms up the pipeline once."""
    eval_bs = 2 * cfg.batch_size
    eval_fixed = _uint8_batch(eval_bs, cfg.image_size)
    eval_numpy = np.ascontiguousarray(eval_fixed.numpy())  # onnxruntime takes contiguous NCHW
    n_eval = min(len(test_set), eval_bs * (steps + 1))
    subset = torch.utils.data.Subset(test_set, range(n_eval))
    embed_steps = max(2, n_eval // eval_bs)
    onnx_embed = _onnx_embedders(model, tmp, cfg.image_size, dev, cfg.data, 2 * eval_bs)
    embedder = ModuleEmbedder(model, image_size=cfg.image_size, amp=cfg.amp)

    def embed_pipeline():
        t0 = time.perf_counter()
        embed_dataset(embedder, subset, batch_size=eval_bs, workers=cfg.loader_workers, progress=False)
        return n_eval / (time.perf_counter() - t0)

    def embed_step(net: torch.nn.Module) -> Callable[[int], None]:
        @torch.inference_mode()
        def step(_):
            with autocast(dev, cfg.amp):
                out = net(eval_fixed.to(dev))
            torch.nn.functional.normalize(out.float(), dim=1).cpu()

        return step

    def embed_model():
        model.eval()
        return _rate(embed_step(model), embed_steps, eval_bs)

    def embed_model_folded():  # the model as `load_model` gives it, with the weights of this round
        folded = copy.deepcopy(model.eval())
        fold_batchnorm(folded, eval_fixed[:1].to(dev))
        return _rate(embed_step(folded), embed_steps, eval_bs)

    def onnx_rate(name):
        return lambda: _rate(lambda _: onnx_embed[name](eval_numpy), embed_steps, eval_bs)

    embed_dataset(
        embedder,
        torch.utils.data.Subset(test_set, range(eval_bs)),
        batch_size=eval_bs,
        workers=cfg.loader_workers,
        progress=False,
    )  # warm-up (thread pool, allocator)
    return {
        "embed_pipeline": embed_pipeline,
        "embed_model": embed_model,
        "embed_model_folded": embed_model_folded,
        "embed_onnx": onnx_rate("embed_onnx"),
        "embed_onnx_int8": onnx_rate("embed_onnx_int8"),
    }


def _ratios(values: dict[str, list[float]]) -> dict:
    """Pipeline efficiencies, and the speed-ups over PyTorch eager of BatchNorm folding and onnxruntime: ratios
    of medians."""
    med = {name: float(np.median(v)) for name, v in values.items()}
    return {
        "train_efficiency": round(med["train_pipeline"] / med["train_model"], 3),
        "embed_efficiency": round(med["embed_pipeline"] / med["embed_model"], 3),
        "fold_speedup": round(med["embed_model_folded"] / med["embed_model"], 3),
        "onnx_speedup": round(med["embed_onnx"] / med["embed_model"], 3),
        "onnx_int8_speedup": round(med["embed_onnx_int8"] / med["embed_model"], 3),
    }


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_seconds(query: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Seconds of a bare `torch.mm` computing every query x gallery inner product in the blocks evaluation's search
    uses under its memory bound (query chunks of `chunk_size` rows, at most `vectors.MAX_CHUNK_NEIGHBOURS` // k;
    gallery blocks of `vectors.MAX_BLOCK_SIMS` // rows), into one reused buffer: the matrix-multiply limit."""
    rows = max(1, min(chunk_size, len(query), MAX_CHUNK_NEIGHBOURS // max(1, k)))
    cols = max(1, min(len(gallery), MAX_BLOCK_SIMS // rows))
    out = torch.empty(rows * cols, dtype=torch.float32, device=query.device)
    _sync(query.device)
    t0 = time.perf_counter()
    for i in range(0, len(query), rows):
        q = query[i : i + rows]
        for j in range(0, len(gallery), cols):
            g = gallery[j : j + cols]
            torch.mm(q, g.T, out=out[: len(q) * len(g)].view(len(q), len(g)))
    _sync(query.device)
    return time.perf_counter() - t0


def search_seconds(query, gallery, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Seconds of `vectors.search_chunks` (top `k` of every query, no exclusion), every chunk taken to numpy."""
    t0 = time.perf_counter()
    for _ in search_chunks(query, gallery, np.full(len(query), k), False, chunk_size):
        pass
    return time.perf_counter() - t0


def bench_search(
    queries: int = 4096,
    gallery: int = 100_000,
    dim: int = 512,
    k: int = 10,
    *,
    rounds: int = 5,
    device: str = "auto",
    seed: int = 0,
    json_out: str | None = None,
) -> dict:
    """Exact search at the matrix-multiply limit: GFLOP/s (2·Q·N·d flops) of evaluation's exact k-NN
    (`search`: `vectors.search_chunks` on the kernel `vectors.search_device` picks for `device`: faiss on the CPU,
    torch on CUDA) and of a bare `torch.mm` of the same products (`mm`, `matmul_seconds`), on random unit vectors,
    in `rounds` interleaved rounds; on the CPU also the torch kernel there (`torch_knn`), the one not chosen.
    `ratio` (and `torch_knn_ratio`) = median GFLOP/s over median `mm` GFLOP/s; the goal is ratio >= 0.8."""
    if rounds < 1 or min(queries, gallery, dim, k) < 1:
        raise UserError("--rounds, the shape and --top-k must be at least 1")
    if k > gallery:
        raise UserError(f"--top-k {k} is more than the {gallery} gallery items")
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((gallery, dim), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[rng.integers(0, gallery, queries)] + 0.1 * rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    where = search_device(dev)
    tq, tg = torch.from_numpy(q).to(dev), torch.from_numpy(g).to(dev)
    sq, sg = on_device(q, where), on_device(g, where)  # what evaluation hands the search on this device
    gflop = 2 * queries * gallery * dim / 1e9
    measures = {"search": lambda: gflop / search_seconds(sq, sg, k), "mm": lambda: gflop / matmul_seconds(tq, tg, k)}
    if where is None:  # the CPU: the torch kernel too, to show why faiss is chosen
        measures["torch_knn"] = lambda: gflop / search_seconds(tq, tg, k)
    measures["mm"]()  # warm-up: thread pools, allocator, first CUDA kernels
    values = interleave(measures, rounds)
    med = {name: float(np.median(v)) for name, v in values.items()}
    res = {
        "queries": queries,
        "gallery": gallery,
        "dim": dim,
        "k": k,
        "device": str(dev),
        "kernel": "faiss" if where is None else "torch",
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "gflop": round(gflop, 3),
        **{f"{name}_gflops": round(m, 2) for name, m in med.items()},
        "spread": {name: [round(min(v), 2), round(max(v), 2)] for name, v in values.items()},
        "repeats": {name: [round(x, 2) for x in v] for name, v in values.items()},
        "ratio": round(med["search"] / med["mm"], 3),
    }
    if "torch_knn" in med:
        res["torch_knn_ratio"] = round(med["torch_knn"] / med["mm"], 3)
    if json_out:
        write_json(json_out, res)
    return res
