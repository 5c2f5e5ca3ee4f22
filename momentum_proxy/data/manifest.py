"""The prepared-dataset layout every command reads: a folder with images and `manifest.csv`.

Columns: `path` (relative to the folder), `label` (int, one per class, unique across the dataset),
`class_name`, `split` (train/test, or train/query/gallery for query-gallery datasets such as In-shop).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path

MANIFEST = "manifest.csv"
COLUMNS = ["path", "label", "class_name", "split"]
SPLITS = {"train", "test", "query", "gallery"}


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
    if not root.exists():
        raise UserError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"data path is not a folder: {root}")
    path = root / MANIFEST
    if not path.exists():
        hint = " (empty folder)" if not any(root.iterdir()) else ""
        raise UserError(f"no {MANIFEST} in {root}{hint}; prepare it first with `mproxy prepare ...`")
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
