"""The names of the files the toolkit reads and writes, and cheap checks that a path holds what a command needs.

Plain Python (no torch, pandas or faiss), so the command line refuses a wrong path in a fraction of a second,
before any heavy library is imported; the modules that own these files read them fully later.
"""
from __future__ import annotations

from pathlib import Path

from momentum_proxy.errors import UserError

MANIFEST = "manifest.csv"  # a prepared dataset (data.manifest)
CONFIG, METRICS, EMBEDDINGS, EVAL, LOG = "config.json", "metrics.csv", "embeddings.npz", "eval.json", "train.log"
LAST, BEST = "checkpoints/last.pt", "checkpoints/best.pt"  # a run folder (runs)
META_FILE = "meta.json"  # a saved index (retrieval.faiss_store)


def check_dataset(path: str | Path) -> None:
    """A prepared dataset: a folder holding manifest.csv."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data folder not found: {path}")
    if not path.is_dir():
        raise UserError(f"data path is not a folder: {path}")
    if not (path / MANIFEST).is_file():
        hint = " (empty folder)" if not any(path.iterdir()) else ""
        raise UserError(f"no {MANIFEST} in {path}{hint}; prepare it first with `mproxy prepare ...`")


def check_run(path: str | Path) -> None:
    """A trained run: config.json and the selected checkpoint."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise UserError(f"{path} is not a run folder (no {CONFIG})")
    if not (path / BEST).is_file():
        raise UserError(f"{path} has no trained model yet ({BEST}); train it first, or --resume it")


def check_index(path: str | Path) -> None:
    """A saved retrieval index: a folder holding meta.json."""
    if not (Path(path) / META_FILE).is_file():
        raise UserError(f"no retrieval index in {path} (no {META_FILE}); make one with `mproxy index RUN "
                        f"--images DIR --out {path}`")


def check_file(path: str | Path, what: str) -> None:
    if Path(path).is_dir():
        raise UserError(f"{what} {path} is a folder; a file is expected")
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {path}")


def check_folder(path: str | Path, what: str) -> None:
    if not Path(path).is_dir():
        raise UserError(f"{what} not found: {path}" if not Path(path).exists() else f"{path} is a file; a {what} is "
                        "expected")
