"""The images an index job embeds: a prepared dataset or a folder (`collect_images`, classes from the dataset, the
sub-folders or a CSV file), a list file read a chunk at a time (`read_image_list`), or an index's own items for a
rebuild (`images_to_index`); each as a `Collection`."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from momentum_proxy.data.manifest import MANIFEST, read_manifest
from momentum_proxy.data.prepare import IMAGE_EXTS
from momentum_proxy.errors import UserError
from momentum_proxy.retrieval.store import UNKNOWN
from momentum_proxy.retrieval.stores import open_store, store_exists

LABEL_SOURCES = ("auto", "none", "folders")  # or the path of a CSV file


def collect_images(source: str | Path, labels: str = "auto") -> tuple[list[str], list[int] | None, dict[int, str]]:
    """Absolute image paths, their labels (or None) and class names, of a prepared dataset or of every image file
    below a folder.

    `labels`: `auto` takes a prepared dataset's classes, or the sub-folder names of a folder of class folders
    (every image one level down); `folders` the first sub-folder below `source` (images directly in it: unknown
    class); `none` no classes; anything else is a CSV file of `path,class_name` lines (paths relative to `source`
    or absolute; a header line `path,class_name` is allowed; unlisted images: unknown class)."""
    source = Path(source).absolute()
    if labels not in LABEL_SOURCES and not Path(labels).is_file():
        raise UserError(f"--labels must be auto, none, folders or a CSV file; not found: {labels}")
    if (source / MANIFEST).exists():
        df = read_manifest(source).drop_duplicates("path")
        paths = [os.path.normpath(source / p) for p in df["path"]]
        if labels in ("auto", "folders"):
            classes = dict(zip(df["label"].astype(int), df["class_name"]))
            return paths, df["label"].astype(int).tolist(), classes
    else:
        if not source.is_dir():
            raise UserError(f"image folder not found: {source}")
        paths = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not paths:
            raise UserError(f"no images found in {source}")
    if labels == "none":
        return paths, None, {}
    if labels in ("auto", "folders"):
        parts = [Path(p).relative_to(source).parts for p in paths]
        if labels == "auto" and not all(len(p) == 2 for p in parts):
            return paths, None, {}
        names = [p[0] if len(p) > 1 else None for p in parts]
    else:
        names = _csv_classes(Path(labels), source, paths)
    classes = {i: name for i, name in enumerate(sorted({n for n in names if n is not None}))}
    label_of = {name: i for i, name in classes.items()}
    return paths, [label_of.get(n, UNKNOWN) for n in names], classes


def _csv_classes(csv_file: Path, source: Path, paths: list[str]) -> list[str | None]:
    """The class name of each of `paths` from a `path,class_name` CSV file (None where not listed)."""
    named = {}
    with open(csv_file, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if number == 1 and [c.strip() for c in row] == ["path", "class_name"] or not row:
                continue
            if len(row) != 2 or not row[1].strip():
                raise UserError(f"{csv_file}:{number}: expected 'path,class_name', got {','.join(row)!r}")
            named[os.path.normpath(source / row[0].strip())] = row[1].strip()
    if not named.keys() & set(paths):
        raise UserError(f"{csv_file} names none of the images below {source}")
    return [named.get(p) for p in paths]


@dataclass
class Collection:
    """Images to index: absolute paths, labels (or None) named by `classes`, and the folders they came from."""

    paths: list[str]
    labels: list[int] | None
    classes: dict[int, str]
    sources: list[str]


def images_to_index(images: str | Path | None, out, rebuild: bool, labels: str = "auto") -> Collection:
    """What `build_index` embeds: the images below `images` (classes as `collect_images`'s `labels` says), or,
    for a rebuild without them, the index's own live items."""
    if images is not None:
        return Collection(*collect_images(images, labels), [str(Path(images).absolute())])
    if not (rebuild and store_exists(out)):
        raise UserError(
            "give the images to index with --images or --list (only --rebuild of an existing index may omit them)"
        )
    old = open_store(out)
    try:
        live = old.live_items()
    finally:
        old.close()
    if not live:
        raise UserError(f"the index {out} has no items to rebuild from; give --images")
    known = [UNKNOWN if it["label"] is None else it["label"] for it in live] if old.labelled else None
    return Collection([it["path"] for it in live], known, old.classes, list(old.sources))


LIST_CHUNK = 4096  # lines of an image list embedded and added at a time


Unlisted = list[tuple[str, str]]  # (list line, reason) for each line of a list file that names no image


def read_image_list(list_file: str | Path, chunk: int = LIST_CHUNK) -> Iterator[tuple[Collection, Unlisted]]:
    """The images of a list file, `chunk` lines at a time, as `Collection`s, and the lines that name no image, as
    (line, reason) pairs in the last place of each yielded pair. A line is `path` or `path,class_name` (CSV; a
    header line `path` or `path,class_name` is allowed; paths relative to the file's folder or absolute; an empty
    class name: unknown class). Read as it is used: memory does not grow with the list."""
    list_file = Path(list_file).absolute()
    base, source = list_file.parent, [str(list_file)]
    with open(list_file, newline="", encoding="utf-8") as f:
        rows: list[tuple[str, str | None]] = []
        bad: Unlisted = []
        for number, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            if not any(cells) or number == 1 and cells in (["path"], ["path", "class_name"]):
                continue
            if len(cells) > 2 or not cells[0]:
                bad.append((f"{list_file}:{number}", "expected 'path' or 'path,class_name'"))
            else:
                rows.append((os.path.normpath(base / cells[0]), cells[1] if len(cells) == 2 and cells[1] else None))
            if len(rows) == chunk:
                yield _listed(rows, source), bad
                rows, bad = [], []
        if rows or bad:
            yield _listed(rows, source), bad


def _listed(rows: list[tuple[str, str | None]], source: list[str]) -> Collection:
    """A chunk of a list file's (path, class name) rows as a Collection (labels None when no row names a class)."""
    classes = {i: name for i, name in enumerate(sorted({n for _, n in rows if n is not None}))}
    label_of = {name: i for i, name in classes.items()}
    labels = [UNKNOWN if n is None else label_of[n] for _, n in rows] if classes else None
    return Collection([p for p, _ in rows], labels, classes, source)
