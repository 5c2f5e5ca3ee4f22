"""The prepared-dataset layout every command reads: a folder with images and `manifest.csv`.

Columns: `path` (relative to the folder), `label` (int, one per class, unique across the dataset),
`class_name`, `split`: train/test, or train/query/gallery for query-gallery datasets such as In-shop, plus
`val` — validation classes disjoint from both train and test, on which models are chosen. Manifests without
`val` rows (older ones, or prepared with `--val-classes 0`) stay valid.

Two protocols (`split_protocol`, read from the manifest itself): `classes`, class-disjoint splits (the benchmark
protocol: how well does the embedding serve classes it never saw?), and `images`, every class in train, val and
test with its photos divided (`split_images`; the user's own catalogue: new photos of known classes). In an images
split, val and test are evaluated as queries against a gallery (`split_frame`): val photos against the train
photos, test photos against the train + val photos (the catalogue).
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
PROTOCOLS = ("classes", "images")
NAMES_SHOWN = 10  # classes named in a message before "and N more"


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
    """Rows of one split; 'test' means test, or query+gallery for query-gallery datasets. In an images split
    (`split_protocol`), val and test are query rows (that split's photos) + gallery rows (`gallery_splits`)."""
    if split == "test" and "test" not in set(df["split"]):
        return df[df["split"].isin(["query", "gallery"])].reset_index(drop=True)
    rows = df[df["split"] == split]
    if split not in GALLERY_SPLITS or rows.empty or split_protocol(df) != "images":
        return rows.reset_index(drop=True)
    gallery = df[df["split"].isin(GALLERY_SPLITS[split])]
    return pd.concat([rows.assign(split="query"), gallery.assign(split="gallery")], ignore_index=True)


GALLERY_SPLITS = {"val": ("train",), "test": ("train", "val")}  # images split: what each split's queries search


def split_protocol(df: pd.DataFrame) -> str:
    """`images` when a val or test class also has train photos (every class in every split), else `classes`."""
    train = set(df.loc[df["split"] == "train", "label"])
    return "images" if train & set(df.loc[df["split"].isin(["val", "test"]), "label"]) else "classes"


def describe_protocol(protocol: str, has_val: bool) -> str:
    """The protocol in force (`split_protocol`), in one line (`prepare` and `train` print it)."""
    if protocol == "images":
        return (
            "protocol: images (every class in train, val and test; val photos are searched among the train "
            "photos, test photos among the train + val photos: the catalogue)"
            if has_val
            else "protocol: images (every class in train and test; test photos are searched among the train "
            "photos: the catalogue)"
        )
    return (
        "protocol: classes (class-disjoint: val and test classes are never trained; each of their photos "
        "searches the others of its split)"
    )


def name_some(names, limit: int = NAMES_SHOWN) -> str:
    """`a, b, c` or, beyond `limit` names, `a, ..., j and 5 more`."""
    names = [str(n) for n in names]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
            raise UserError(
                f"--val-classes {val_classes} leaves {n_train - val_classes} train classes of "
                f"{n_train}; training needs at least 2"
            )
        return val_classes
    n = max(2, round(val_classes * n_train))
    if n_train - n < 2:
        print(
            f"mproxy: note: {n_train} train classes are too few to carve val classes from; no val split made",
            file=sys.stderr,
        )
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


def split_images(df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int = 0) -> pd.DataFrame:
    """The images protocol: each class's photos divided, shuffled with `seed`, into train, val and test.

    A class gets round(n x fraction) photos in val and in test, at least one each (no val with `val_fraction`
    0), and keeps at least one in train. A class too small for one photo in every split stays whole in train:
    it is in the catalogue and trained on, but has no queries (`small_data_warnings` names it)."""
    check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    df = df.copy()
    df["split"] = "train"
    for _, rows in df.groupby("label", sort=True):
        n = len(rows)
        n_val = max(1, round(n * val_fraction)) if val_fraction else 0
        n_test = max(1, round(n * test_fraction))
        if n < 2 + (n_val > 0):
            continue  # too small: train only
        while n - n_val - n_test < 1:  # give train one back from the larger of val and test
            if n_val > n_test or (n_val == n_test and n_val > 1):
                n_val -= 1
            else:
                n_test -= 1
        order = rows.index.to_numpy()[rng.permutation(n)]
        df.loc[order[:n_test], "split"] = "test"
        df.loc[order[n_test : n_test + n_val], "split"] = "val"
    return df


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Refuse shares of an images split that leave a class no train photo (or test none)."""
    if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"--val-fraction {val_fraction:g} and --test-fraction {test_fraction:g}: each must be in "
            "[0, 1) (test > 0) and together below 1, so that every class keeps train photos"
        )


MIN_TRAIN_CLASSES = 8  # fewer, and a proxy loss has little to learn from
MIN_VAL_CLASSES = 2  # fewer, and retrieval within the val split is trivial
SPLIT_IMAGES_HINT = (
    "or use --split images (every class in train, val and test: a model for the classes you have, "
    "evaluated against your catalogue)"
)


def small_data_warnings(df: pd.DataFrame, split_option: bool = False) -> list[str]:
    """What a prepared dataset is too small for, one sentence each (empty when nothing is), classes named (up to
    `NAMES_SHOWN`): in a class-disjoint split, val/test classes with a single image (as queries they have no other
    item of their class, so the metrics leave them out), too few classes to train, too few to validate (with
    `split_option`, naming `--split images`, which `prepare folder` offers); in an images split, the classes too
    small for a photo in every split (train only)."""
    if split_protocol(df) == "images":
        return _images_warnings(df)
    out = []
    for split in ("val", "test"):
        sizes = df.loc[df["split"] == split, "class_name"].value_counts()
        lone = sorted(sizes[sizes < 2].index)
        if lone:
            out.append(
                f"{len(lone)} {split} class(es) have a single image ({name_some(lone)}): they stay in the "
                f"{split} gallery, but as queries they have no other image of their class and are left out "
                "of the metrics"
            )
    sizes = df.loc[df["split"] == "train", "class_name"].value_counts()
    lone_train = sorted(sizes[sizes < 2].index)
    if lone_train:
        out.append(
            f"{len(lone_train)} train class(es) have a single image ({name_some(lone_train)}): they train, "
            "but add little"
        )
    train = df.loc[df["split"] == "train", "label"].nunique()
    val = df.loc[df["split"] == "val", "label"].nunique()
    hint = f"; {SPLIT_IMAGES_HINT}" if split_option else ""
    if train < MIN_TRAIN_CLASSES:
        advice = "add classes, or use --val-classes 0 and select on the last epoch" if val else "add classes"
        out.append(
            f"only {train} classes are left to train ({val} went to val): a class-disjoint split trains on "
            f"too few for a proxy loss to learn much (fewer than {MIN_TRAIN_CLASSES}); {advice}{hint}"
        )
    if 0 < val < MIN_VAL_CLASSES:
        out.append(f"only {val} val class(es): choose --val-classes of at least {MIN_VAL_CLASSES}{hint}")
    return out


def _images_warnings(df: pd.DataFrame) -> list[str]:
    """An images split's classes without queries (too small for a photo in every split: kept in train)."""
    queried = set(df.loc[df["split"] != "train", "label"])
    alone = sorted(set(df.loc[~df["label"].isin(queried), "class_name"]))
    if not alone:
        return []
    return [
        f"{len(alone)} class(es) have too few photos for one in every split ({name_some(alone)}): they stay "
        "in train (trained on and in the catalogue) but have no val or test photos"
    ]


def warn_small_data(df: pd.DataFrame, split_option: bool = False) -> list[str]:
    """Print `small_data_warnings` to stderr (`mproxy: warning: ...`); return them."""
    warnings = small_data_warnings(df, split_option)
    for w in warnings:
        print(f"mproxy: warning: {w}", file=sys.stderr)
    return warnings
