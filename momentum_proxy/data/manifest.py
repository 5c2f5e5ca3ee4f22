"""The prepared-dataset layout every command reads: a folder with images and `manifest.csv`.

Columns: `path` (relative to the folder), `label` (int, one per class, unique across the dataset),
`class_name`, `split`: train/test, or train/query/gallery for query-gallery datasets such as In-shop, plus
`val` — validation classes disjoint from both train and test, on which models are chosen. Manifests without
`val` rows (older ones, or prepared with `--val-classes 0`) stay valid.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path
from momentum_proxy.paths import MANIFEST, check_dataset

COLUMNS = ["path", "label", "class_name", "split"]
SPLITS = {"train", "val", "test", "query", "gallery"}


def write_manifest(root: str | Path, rows: pd.DataFrame | list[dict]) -> Path:
    """Atomically write `root/manifest.csv` from rows with the standard columns."""
    df = pd.DataFrame(rows, columns=COLUMNS) if not isinstance(rows, pd.DataFrame) else rows[COLUMNS]
    out = Path(root) / MANIFEST
    with atomic_path(out) as tmp:
        df.to_csv(tmp, index=False)
    return out


def read_manifest(root: str | Path) -> pd.DataFrame:
    """Read and validate `root/manifest.csv`; raise UserError with a one-line reason when it is unusable."""
    root = Path(root)
    check_dataset(root)
    path = root / MANIFEST
    try:
        df = pd.read_csv(path, dtype={"path": str, "class_name": str, "split": str})
    except Exception as e:  # pandas raises several types for garbage
        raise UserError(f"malformed {path}: {str(e).splitlines()[0]}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"malformed {path}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise UserError(f"{path} lists no images")
    if df[COLUMNS].isna().any().any():
        raise UserError(f"malformed {path}: empty cells")
    try:
        df["label"] = df["label"].astype(int)
    except (ValueError, TypeError):
        raise UserError(f"malformed {path}: non-integer label") from None
    bad = set(df["split"]) - SPLITS
    if bad:
        raise UserError(f"malformed {path}: unknown split(s) {sorted(bad)}; use {sorted(SPLITS)}")
    return df[COLUMNS].reset_index(drop=True)


def split_frame(df: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rows of one split; 'test' means test, or query+gallery for query-gallery datasets."""
    if split == "test" and "test" not in set(df["split"]):
        return df[df["split"].isin(["query", "gallery"])].reset_index(drop=True)
    return df[df["split"] == split].reset_index(drop=True)


def manifest_sha256(root: str | Path) -> str:
    """Fingerprint of a prepared dataset's manifest (a run notices when its dataset changed)."""
    return hashlib.sha256((Path(root) / MANIFEST).read_bytes()).hexdigest()


def parse_val_classes(text: str | float | int | None) -> float | int:
    """`--val-classes N|FRACTION`: an int count of classes (`5`), or a fraction of the train classes (`0.2`)."""
    if text is None:
        return 0
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--val-classes must be a class count or a fraction, got {text!r}") from None
    if value < 0 or (value >= 1 and value != int(value)):
        raise UserError(f"--val-classes must be a class count (>= 0) or a fraction in (0, 1), got {text!r}")
    return int(value) if value >= 1 or value == 0 else value


def val_class_count(val_classes: float | int, n_train: int) -> int:
    """How many of `n_train` train classes become validation classes.

    A count is taken as given (at least 2: retrieval within one class is trivially perfect) and must leave 2
    train classes. A fraction rounds, to at least 2 classes; when the train classes are too few for that,
    no val split is made (with a note), so the default works on any dataset.
    """
    if isinstance(val_classes, int):
        if val_classes == 1:
            raise UserError("--val-classes 1: retrieval within one class is trivially perfect; use 0 or >= 2")
        if val_classes and n_train - val_classes < 2:
            raise UserError(f"--val-classes {val_classes} leaves {n_train - val_classes} train classes of "
                            f"{n_train}; training needs at least 2")
        return val_classes
    n = max(2, round(val_classes * n_train))
    if n_train - n < 2:
        print(f"mproxy: note: {n_train} train classes are too few to carve val classes from; no val split made",
              file=sys.stderr)
        return 0
    return n


def carve_val(df: pd.DataFrame, val_classes: float | int, seed: int = 0) -> pd.DataFrame:
    """Move `val_classes` (count or fraction) of the train classes, picked with `seed`, to the `val` split."""
    train_labels = np.array(sorted(df.loc[df["split"] == "train", "label"].unique()))
    n = val_class_count(val_classes, len(train_labels))
    if n == 0:
        return df
    picked = np.random.default_rng(seed).choice(train_labels, size=n, replace=False)
    df = df.copy()
    df.loc[(df["split"] == "train") & df["label"].isin(picked), "split"] = "val"
    return df


MIN_TRAIN_CLASSES = 8  # fewer, and a proxy loss has little to learn from
MIN_VAL_CLASSES = 2  # fewer, and retrieval within the val split is trivial


def small_data_warnings(df: pd.DataFrame) -> list[str]:
    """What a prepared dataset is too small for, one sentence each (empty when nothing is): classes with a
    single image (as queries they have no other item of their class, so the metrics leave them out), too few
    classes to train, too few to validate."""
    out = []
    for split in ("val", "test"):
        sizes = df.loc[df["split"] == split, "class_name"].value_counts()
        lone = sorted(sizes[sizes < 2].index)
        if lone:
            out.append(f"{len(lone)} {split} class(es) have a single image ({', '.join(map(str, lone[:3]))}"
                       f"{', ...' if len(lone) > 3 else ''}): they stay in the {split} gallery, but as queries they "
                       "have no other image of their class and are left out of the metrics")
    lone_train = int((df.loc[df["split"] == "train", "class_name"].value_counts() < 2).sum())
    if lone_train:
        out.append(f"{lone_train} train class(es) have a single image: they train, but add little")
    train = df.loc[df["split"] == "train", "label"].nunique()
    val = df.loc[df["split"] == "val", "label"].nunique()
    if train < MIN_TRAIN_CLASSES:
        out.append(f"only {train} classes are left to train ({val} went to val): a proxy loss learns little from "
                   f"fewer than {MIN_TRAIN_CLASSES}; add classes, or use --val-classes 0 and select on the last epoch")
    if 0 < val < MIN_VAL_CLASSES:
        out.append(f"only {val} val class(es): choose --val-classes of at least {MIN_VAL_CLASSES}")
    return out


def warn_small_data(df: pd.DataFrame) -> list[str]:
    """Print `small_data_warnings` to stderr (`mproxy: warning: ...`); return them."""
    warnings = small_data_warnings(df)
    for w in warnings:
        print(f"mproxy: warning: {w}", file=sys.stderr)
    return warnings
