"""The run folder: config.json, metrics.csv, checkpoints/{last,best}.pt, embeddings.npz — all written atomically."""
from __future__ import annotations

import csv
import io
import shutil
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path, read_json, write_json, write_text

CONFIG, METRICS, EMBEDDINGS = "config.json", "metrics.csv", "embeddings.npz"
LAST, BEST = "checkpoints/last.pt", "checkpoints/best.pt"


# The original MP tool's behaviour, for exact reproduction (`--recipe original`, implied by its spelling
# `--data_path/--data_name`): its documented defaults, one learning rate, random proxies, no warm-up, and its
# proxy update that adds m * f_i for every sample.
ORIGINAL_RECIPE = dict(backbone="resnet50", loss="proxy_nca", lr=1e-3, backbone_lr_mult=1.0, warmup_epochs=0,
                       proxy_init="random", proxy_update="sum")


@dataclass
class TrainConfig:
    """Every option of a training run (the CLI's `mproxy train` options map 1:1 onto these fields).

    The defaults are the recipe measured best on real fine-grained photos (README, "Training recipe"):
    NormalizedSoftmax with momentum proxies initialised at the class means, one warm-up epoch of head and
    proxies, and the backbone at a tenth of the head's learning rate.
    """

    data: str
    out: str
    backbone: str = "efficientnet_lite0"
    pretrained: str = "default"  # default | none
    weights: str | None = None  # explicit pretrained weights file
    feature_dim: int = 512
    pooling: str = "max"
    loss: str = "normalized_softmax"
    loss_scale: float | None = None  # None: the library's default scale / temperature
    margin: float | None = None
    optimizer: str = "adam*"
    momentum: float = 0.5
    proxy_update: str = "mean"  # mean | sum (the original tool)
    proxy_init: str = "class_mean"  # class_mean | random
    lr: float = 1e-4
    backbone_lr_mult: float = 0.1
    warmup_epochs: int = 1  # epochs that train only head and proxies, backbone frozen
    batch_size: int = 64
    epochs: int = 20
    recalls: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    metrics: list[str] = field(default_factory=lambda: ["recall", "map@r"])
    image_size: int = 224
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    amp: str = "none"  # none | bf16 | fp16
    grad_accum: int = 1
    compile: bool = False
    eval_batch_size: int | None = None
    log_every: int = 10

    @property
    def momentum_mode(self) -> bool:
        return self.optimizer.endswith("*")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def validate(self) -> None:
        from momentum_proxy.losses import LOSSES

        if self.loss not in LOSSES:
            raise UserError(f"unknown loss {self.loss!r}; choose from {', '.join(LOSSES)}")
        if self.optimizer not in ("adam*", "sgd*", "adam", "sgd"):
            raise UserError(f"unknown optimizer {self.optimizer!r}; choose from adam*, sgd*, adam, sgd")
        if self.pretrained not in ("default", "none"):
            raise UserError(f"--pretrained must be default or none, got {self.pretrained!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise UserError(f"--amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.proxy_init not in ("class_mean", "random"):
            raise UserError(f"--proxy-init must be class_mean or random, got {self.proxy_init!r}")
        for name in ("batch_size", "epochs", "feature_dim", "image_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.recalls or min(self.recalls) < 1:
            raise UserError("--recalls must be positive integers, e.g. 1,2,4,8")
        if self.weights is not None and not Path(self.weights).is_file():
            raise UserError(f"weights file not found: {self.weights}")


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("momentum-proxy", "torch", "torchvision", "timm", "pytorch-metric-learning", "faiss-cpu", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class RunDir:
    """Reads and writes one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    # --- config -----------------------------------------------------------------------------
    def has_run(self) -> bool:
        return (self / CONFIG).exists()

    def start(self, cfg: TrainConfig, overwrite: bool) -> None:
        """Claim the folder for a new run; refuse one that holds a run unless `overwrite`."""
        if self.has_run():
            if not overwrite:
                raise UserError(f"{self.path} already holds a run; use --resume {self.path} to continue it "
                                "or --overwrite to replace it")
            for rel in (CONFIG, METRICS, EMBEDDINGS, "eval.json"):
                (self / rel).unlink(missing_ok=True)
            shutil.rmtree(self / "checkpoints", ignore_errors=True)
        write_json(self / CONFIG, {**asdict(cfg), "versions": package_versions()})

    def config(self) -> TrainConfig:
        if not self.has_run():
            raise UserError(f"{self.path} is not a run folder (no {CONFIG})")
        return TrainConfig.from_dict(read_json(self / CONFIG))

    # --- metrics ----------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        if not (self / METRICS).exists():
            return []
        with open(self / METRICS, newline="") as f:
            return [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def write_metrics(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_text(self / METRICS, buf.getvalue())

    # --- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, rel: str, state: dict) -> None:
        with atomic_path(self / rel) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, rel: str = BEST) -> dict:
        path = self / rel
        if not path.exists():
            raise UserError(f"no checkpoint {rel} in {self.path}")
        return torch.load(path, map_location="cpu", weights_only=True)

    # --- embeddings database ----------------------------------------------------------------
    def save_embeddings(self, features: np.ndarray, labels: np.ndarray, paths: list[str], split: list[str]) -> None:
        save_embeddings(self / EMBEDDINGS, features, labels, paths, split)


def save_embeddings(path: Path, features: np.ndarray, labels, paths, split) -> None:
    """An embeddings database: L2-normalised features, labels, image paths and splits (npz, no pickle)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, features=features.astype(np.float32), labels=np.asarray(labels, np.int64),
                 paths=np.asarray(paths, dtype=str), split=np.asarray(split, dtype=str))


def load_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    """Read an embeddings .npz (arrays `features`, `labels`, optional `paths`, `split`) without pickle."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"embeddings file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read embeddings {path}: {str(e).splitlines()[0]}") from None
    for key in ("features", "labels"):
        if key not in data:
            raise UserError(f"{path} lacks the array {key!r}")
    if data["features"].ndim != 2 or len(data["features"]) != len(data["labels"]):
        raise UserError(f"{path}: features must be N x d with one label per row")
    return data
