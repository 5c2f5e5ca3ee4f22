"""The run folder: config.json, metrics.csv, train.log, checkpoints/{last,best}.pt, eval.json, embeddings.npz,
tensorboard/ (`--log tensorboard`).

Every file except the append-only train.log is written atomically. A folder is a run once it holds a
checkpoint: a folder left with only config.json (a run that failed or was killed before its first checkpoint)
is reused silently.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from momentum_proxy.config import ModelConfig
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path, check_writable_folder, file_sha256, read_json, write_json, write_text
from momentum_proxy.paths import BEST, CONFIG, EMBEDDINGS, EVAL, LAST, LOG, METRICS  # the run folder's names

TENSORBOARD = "tensorboard"  # event files of `--log tensorboard` (training/tracking.py)


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
        """A run: its config and at least one checkpoint."""
        return (self / CONFIG).exists() and (self / LAST).exists()

    def has_model(self) -> bool:
        """A trained model to embed with: the config and the selected checkpoint."""
        return (self / CONFIG).exists() and (self / BEST).exists()

    def check_writable(self) -> None:
        """Refuse, before any work, a path that is a file, lies under a file, or cannot be written."""
        check_writable_folder(self.path, "the run folder")

    def start(self, cfg: ModelConfig, overwrite: bool, extra: dict | None = None) -> None:
        """Claim the folder for a new run; refuse one that holds a run unless `overwrite`."""
        if self.has_run() and not overwrite:
            raise UserError(
                f"{self.path} already holds a run; use --resume {self.path} to continue it or --overwrite to replace it"
            )
        for rel in (CONFIG, METRICS, EMBEDDINGS, EVAL, LOG):
            (self / rel).unlink(missing_ok=True)
        for folder in ("checkpoints", TENSORBOARD):  # a new run's curves never continue an old one's
            shutil.rmtree(self / folder, ignore_errors=True)
        write_json(self / CONFIG, {**cfg.to_dict(), **(extra or {}), "versions": package_versions()})

    def config(self) -> ModelConfig:
        """The model's settings from config.json (training reads all of it: `TrainConfig.from_dict(run.info())`)."""
        return ModelConfig.from_dict(self.info())

    def extend(self, epochs: int) -> None:
        """Record in config.json that the run now trains `epochs` epochs (`training.loop.resume`)."""
        write_json(self / CONFIG, {**self.info(), "epochs": epochs})

    def info(self) -> dict:
        """config.json as written: the options plus what the run recorded (manifest hash, selection, versions)."""
        if not (self / CONFIG).exists():
            raise UserError(f"{self.path} is not a run folder (no {CONFIG})")
        return read_json(self / CONFIG)

    def log(self, line: str, is_main: bool = True) -> None:
        """Print a progress line and append it to train.log (without progress-bar noise)."""
        if is_main:
            tqdm.write(line)
            with open(self / LOG, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    # --- evaluation -------------------------------------------------------------------------
    def write_eval(self, summary: dict) -> None:
        write_json(self / EVAL, summary)

    def eval(self) -> dict | None:
        """eval.json (test figures of the selected checkpoint), or None before the run finished."""
        return read_json(self / EVAL) if (self / EVAL).exists() else None

    # --- metrics ----------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        if not (self / METRICS).exists():
            return []
        with open(self / METRICS, newline="") as f:
            return [
                {k: int(v) if k == "epoch" else (float(v) if v else math.nan) for k, v in row.items()}
                for row in csv.DictReader(f)
            ]

    def write_metrics(self, rows: list[dict]) -> None:
        """metrics.csv; NaN (epoch 0's loss and rate: nothing was trained) is written as an empty cell."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows([{k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows])
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
    def save_embeddings(
        self, features: np.ndarray, labels: np.ndarray, paths: list[str], split: list[str], class_names: list[str]
    ) -> None:
        save_embeddings(self / EMBEDDINGS, features, labels, paths, split, class_names)


def save_embeddings(path: Path, features: np.ndarray, labels, paths, split, class_names) -> None:
    """An embeddings database: L2-normalised features, labels, image paths, splits, class names (npz, no pickle)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            features=features.astype(np.float32),
            labels=np.asarray(labels, np.int64),
            paths=np.asarray(paths, dtype=str),
            split=np.asarray(split, dtype=str),
            class_names=np.asarray(class_names, dtype=str),
        )


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


def model_identity(run_dir: str | Path) -> dict:
    """What an index records about the model that embedded it; a mismatch means the index is unusable."""
    run = RunDir(run_dir)
    cfg = run.config()
    epoch = run.load_checkpoint(BEST)["epoch"]
    return {
        "run": str(run.path.resolve()),
        "backbone": cfg.backbone,
        "feature_dim": cfg.feature_dim,
        "checkpoint_sha256": file_sha256(run / BEST),
        "checkpoint_epoch": epoch,
    }
