"""Loading a prepared dataset for training and embedding: decoding, augmentation, samplers, loaders.

Images are decoded and augmented with Pillow (SIMD resampling; JPEG draft mode decodes at reduced scale when
the target is small) and batched as uint8 HWC arrays, which become NCHW tensors in channels-last memory
without a copy; normalisation happens inside the model. Training augmentation is seeded per
(seed, epoch, sample), so a resumed or distributed run sees exactly the images an uninterrupted
single-process run would.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info
from torchvision import transforms as T

from momentum_proxy.data.manifest import read_manifest, split_frame, split_protocol
from momentum_proxy.errors import UserError


def read_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Open an image as RGB; with `min_side`, a JPEG may be decoded at reduced scale down to that short side."""
    with Image.open(path) as im:
        if min_side is not None:
            im.draft("RGB", (min_side, min_side))
        return im.convert("RGB")


class TrainAugment:
    """Random resized crop (area `scale`, aspect `ratio`, as torchvision's) + horizontal flip, drawn from the
    given numpy generator, so that it is thread-safe and reproducible per sample."""

    def __init__(self, size: int, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale = size, scale
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        w, h = image.size
        box = (0, 0, w, h)  # fallback: the whole image
        for _ in range(10):
            area = w * h * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                box = (x, y, x + cw, y + ch)
                break
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def train_transform(size: int, scale_min: float = 0.16) -> TrainAugment:
    """Training augmentation: random-resized crop of `scale_min` to all of the image's area, then a flip."""
    return TrainAugment(size, scale=(scale_min, 1.0))


def eval_resize(size: int) -> int:
    """Short side before the centre crop at evaluation (the usual 256 for 224)."""
    return round(size * 256 / 224)


def eval_transform(size: int) -> T.Compose:
    """Deterministic: resize the short side to `eval_resize(size)`, then centre-crop `size`."""
    return T.Compose([T.Resize(eval_resize(size)), T.CenterCrop(size)])


_POOL: ThreadPoolExecutor | None = None


def loading_pool() -> ThreadPoolExecutor:
    """Threads that decode a batch in the main process (Pillow releases the GIL while decoding/resizing)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="mproxy-load")
    return _POOL


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def to_batch(images) -> torch.Tensor:
    """HWC uint8 arrays -> one NCHW uint8 tensor in channels-last memory (a view, no second copy)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def collate(items):
    """Batch (HWC uint8 array, label, index) items: (images as in `to_batch`, labels, indices)."""
    images, labels, index = zip(*items)
    return to_batch(images), torch.tensor(labels), torch.tensor(index)


class ImageDataset(Dataset):
    """Images of one split of a prepared dataset. Items are (HWC uint8 array, label index, row index).

    Indices may be plain ints or (index, seed) pairs from `SeededSampler`: a `TrainAugment` transform draws
    from a generator seeded by that seed, independent of worker, thread and process.
    """

    def __init__(
        self,
        root: str | Path,
        frame: pd.DataFrame,
        transform: TrainAugment | T.Compose,
        label_map: dict[int, int] | None = None,
        min_side: int | None = None,
    ):
        self.root = Path(root)
        self.frame = frame
        self.paths = frame["path"].tolist()
        self.raw_labels = frame["label"].astype(int).tolist()
        self.label_map = label_map or {c: i for i, c in enumerate(sorted(set(self.raw_labels)))}
        self.labels = [self.label_map[c] for c in self.raw_labels]
        self.transform = transform
        self.min_side = min_side  # decode JPEGs at reduced scale down to this short side (evaluation)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        image = read_image(self.root / self.paths[index], self.min_side)
        if isinstance(self.transform, TrainAugment):
            image = self.transform(image, np.random.default_rng(seed))
        else:
            image = self.transform(image)
        return to_array(image), self.labels[index], index

    def __getitems__(self, items: list) -> list:
        """A batch: decoded by a thread pool in the main process, one by one inside a loader process."""
        if get_worker_info() is not None or len(items) < 2:
            return [self[i] for i in items]
        return list(loading_pool().map(self.__getitem__, items))


class SeededSampler(Sampler):
    """Wraps an epoch-seeded (Distributed)Sampler and pairs each index with a per-(epoch, index) seed."""

    def __init__(self, base: DistributedSampler, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.base.set_epoch(epoch)

    def __iter__(self):
        n = len(self.base.dataset)
        for i in self.base:
            yield i, (self.seed * 1_000_003 + self.epoch * n + i) % (2**63)

    def __len__(self) -> int:
        return len(self.base)


def default_workers(accelerator: bool = False) -> int:
    """Loader processes. With 2 cores or fewer and the model on the CPU, none: batches are then decoded by
    threads between model steps, because a loader process preempting the model's threads stalls every
    parallel region (measured: pipeline efficiency 0.81 with one process, see docs: Speed)."""
    cores = os.cpu_count() or 2
    if cores <= 2 and not accelerator:
        return 0
    return max(1, min(8, cores - 1))


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset`: shuffled, seeded and sharded by rank for training; in order for embedding."""
    workers = default_workers(accelerator=pin_memory) if workers is None else workers
    sampler = None
    if train:
        base = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        sampler = SeededSampler(base, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=train,
        collate_fn=collate,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )


@dataclass
class EvalSplit:
    """An evaluation split (val or test) embedded in order: dataset, labels and each row's split name."""

    name: str
    frame: pd.DataFrame
    dataset: ImageDataset

    @property
    def labels(self) -> np.ndarray:
        return self.frame["label"].to_numpy()

    @property
    def split(self) -> np.ndarray:
        return self.frame["split"].to_numpy()

    @property
    def num_queries(self) -> int:
        """Queries of the evaluation: the query rows in query/gallery mode, else every row."""
        return int((self.split == "query").sum()) or len(self.frame)

    @property
    def lone_queries(self) -> int:
        """Queries with no other item of their class to find (left out of the retrieval metrics)."""
        labels, split = self.labels, self.split
        if (split == "query").any():
            return int((~np.isin(labels[split == "query"], labels[split == "gallery"])).sum())
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        return int((counts[inverse] < 2).sum())


@dataclass
class DatasetSplits:
    """A prepared dataset for training: augmented train set, the same images for embedding, val and test."""

    train: ImageDataset
    train_eval: ImageDataset
    val: EvalSplit | None
    test: EvalSplit
    protocol: str = "classes"  # manifest.split_protocol: images when val/test queries search the train photos


def load_datasets(root: str | Path, image_size: int, aug_scale_min: float = 0.16) -> DatasetSplits:
    """Read and check a prepared dataset's splits (val is None when the manifest has none; in an images split val
    and test are queries + gallery, `manifest.split_frame`); `aug_scale_min` is the training crops' smallest area
    fraction."""
    df = read_manifest(root)
    train, val, test = (split_frame(df, s) for s in ("train", "val", "test"))
    where = Path(root) / "manifest.csv"
    if train.empty:
        raise UserError(f"{where} has no train images")
    if test.empty:
        raise UserError(f"{where} has no test (or query/gallery) images")
    if train["label"].nunique() < 2:
        raise UserError("the train split needs at least 2 classes")
    val_split = None if val.empty else EvalSplit("val", val, eval_dataset(root, val, image_size))
    test_split = EvalSplit("test", test, eval_dataset(root, test, image_size))
    for split in (val_split, test_split):  # checked now, not after training
        if split is not None and split.lone_queries == split.num_queries:
            raise UserError(
                f"{where}: no {split.name} query has another image of its class; retrieval on {split.name} is undefined"
            )
    return DatasetSplits(
        train=train_dataset(root, train, image_size, aug_scale_min),
        train_eval=eval_dataset(root, train, image_size),
        val=val_split,
        test=test_split,
        protocol=split_protocol(df),
    )


def train_dataset(root, frame: pd.DataFrame, image_size: int, aug_scale_min: float = 0.16) -> ImageDataset:
    return ImageDataset(root, frame, train_transform(image_size, aug_scale_min))


def eval_dataset(root, frame: pd.DataFrame, image_size: int) -> ImageDataset:
    return ImageDataset(root, frame, eval_transform(image_size), min_side=eval_resize(image_size))
