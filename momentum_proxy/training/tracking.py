"""Experiment tracking: `--log tensorboard` mirrors every epoch of a run into RUN_DIR/tensorboard/.

`metrics.csv` stays the source of truth; TensorBoard gets the same row per epoch (step = epoch, 0 = the pretrained
start): every column as a scalar (`val_map@r` -> `val/map@r`, `train_loss` -> `train/loss`, `lr` -> `train/lr`,
`seconds` -> `train/seconds`; epoch 0's empty loss and rate are left out), and a retrieval picture: a fixed query of
the first split the epoch scored (val, else test) with its top results framed green/red, drawn from the embeddings
that scoring computed. Only rank 0 writes. An epoch is written before its checkpoint, and the writer of a resumed run
purges every step after the checkpoint it resumes from (TensorBoard's `purge_step`), so each epoch appears once.
"""

from __future__ import annotations

import math
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from momentum_proxy import plots
from momentum_proxy.data.loading import EvalSplit
from momentum_proxy.errors import require_extra
from momentum_proxy.runs import TENSORBOARD
from momentum_proxy.training.config import TrainConfig

PICTURE_K = 8  # results in the per-epoch retrieval picture


class Tracker:
    """No tracking (`--log none`, and every rank but 0): each call does nothing."""

    def scored(self, split: EvalSplit, features: np.ndarray) -> None:
        """The embeddings of an evaluation split scored in this epoch."""

    def epoch(self, row: dict) -> None:
        """Record one epoch's metrics row (called before its checkpoint is saved)."""

    def close(self) -> None:
        """Flush and close, at the end of training."""


def open_tracker(cfg: TrainConfig, run_dir: Path, is_main: bool, resumed_epoch: int | None = None) -> Tracker:
    """The tracker of `cfg.log` for this process. `resumed_epoch`: the epoch of the checkpoint a resumed run
    continues from (what was logged after it is purged); None for a new run."""
    if cfg.log == "none" or not is_main:
        return Tracker()
    return TensorBoardTracker(
        Path(run_dir) / TENSORBOARD, cfg.data, purge_step=None if resumed_epoch is None else resumed_epoch + 1
    )


def scalar_tag(column: str) -> str:
    """The TensorBoard tag of a metrics.csv column: `val_map@r` -> `val/map@r`, `lr` -> `train/lr`."""
    split, _, name = column.partition("_")
    return f"{split}/{name}" if split in ("train", "val", "test") and name else f"train/{column}"


class TensorBoardTracker(Tracker):
    """Scalars and the retrieval picture of every epoch, in TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: Path, data_root: str, purge_step: int | None = None):
        require_extra("track", "--log tensorboard")
        from torch.utils.tensorboard import SummaryWriter  # the [track] extra (tensorboard), only when logging

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        self._finalizer = weakref.finalize(self, self.writer.close)  # closed too when training stops on an error
        self.data_root = Path(data_root)
        self.pending: tuple[EvalSplit, np.ndarray] | None = None

    def scored(self, split: EvalSplit, features: np.ndarray) -> None:
        if self.pending is None:  # the first split scored in the epoch is pictured: val, else test
            self.pending = (split, features)

    def epoch(self, row: dict) -> None:
        step = int(row["epoch"])
        for column, value in row.items():
            if column != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(scalar_tag(column), value, step)
        if self.pending is not None:
            split, features = self.pending
            self.pending = None
            picture = retrieval_picture(split, features, self.data_root, f"epoch {step}")
            if picture is not None:
                self.writer.add_image(f"retrieval/{split.name}", picture, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self._finalizer()


@dataclass(frozen=True)
class Shown:
    """One result of the picture, with the fields `plots.draw_results` reads."""

    rank: int
    path: Path
    score: float
    label: int
    class_name: str
    same_class: bool


def retrieval_picture(split: EvalSplit, features: np.ndarray, data_root: Path, title: str) -> np.ndarray | None:
    """The split's fixed query (its first query with another item of its class to find) and its PICTURE_K nearest
    items (the gallery in query/gallery mode, else the split without the query), as an RGB uint8 array; None when
    no query has a match."""
    labels, kinds = split.labels, split.split
    queries = np.flatnonzero(kinds == "query")
    gallery_of_split = np.flatnonzero(kinds == "gallery") if len(queries) else np.arange(len(labels))
    queries = queries if len(queries) else gallery_of_split
    q = next((q for q in queries if ((labels[gallery_of_split] == labels[q]) & (gallery_of_split != q)).any()), None)
    if q is None:
        return None
    gallery = gallery_of_split[gallery_of_split != q]
    scores = features[gallery] @ features[q]
    order = np.argsort(-scores, kind="stable")[:PICTURE_K]
    frame = split.frame
    results = [
        Shown(
            rank + 1,
            data_root / frame["path"].iat[i],
            float(scores[j]),
            int(labels[i]),
            str(frame["class_name"].iat[i]),
            bool(labels[i] == labels[q]),
        )
        for rank, (j, i) in enumerate(zip(order, gallery[order]))
    ]
    query = frame["path"].iat[q]
    with tempfile.TemporaryDirectory() as tmp:
        png = plots.draw_results(
            data_root / query,
            results,
            Path(tmp) / "picture.png",
            label=int(labels[q]),
            label_name=str(frame["class_name"].iat[q]),
            title=f"{title}: {split.name} {query}",
        )
        with Image.open(png) as im:
            return np.asarray(im.convert("RGB"))
