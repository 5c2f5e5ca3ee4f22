"""Turn raw datasets into the prepared layout (see `manifest.py`): `out/images/...` + `out/manifest.csv`.

Each `prepare_*` function reads one official dataset layout, builds a list of `Record`s and hands it to
`write_prepared`, which re-encodes every image once (RGB JPEG, quality 95, short side reduced to
`short_side` when larger, optionally cropped to its box), skips unreadable or missing images with a
warning, carves the validation classes out of the train classes (`val_classes`) or, for the images protocol
(`split="images"`, `prepare folder` only), divides every class's photos into train, val and test
(`manifest.split_images`), and writes `manifest.csv` and `prepare_report.json` (which records the protocol).
Originals are only read; an output folder that already holds a prepared dataset is
refused unless `overwrite`, and then cleared first.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image
from scipy.io import loadmat
from tqdm import tqdm

from momentum_proxy.data.manifest import (
    MANIFEST,
    PROTOCOLS,
    carve_val,
    check_fractions,
    split_images,
    split_protocol,
    warn_small_data,
    write_manifest,
)
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import atomic_path, check_writable_folder, write_json

REPORT = "prepare_report.json"
IMAGES = "images"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
JPEG_QUALITY = 95
MAX_WORKERS = 2
CAR_TRAIN_CLASSES = 98  # Stanford Cars: classes 1-98 train, 99-196 test
CUB_TRAIN_CLASSES = 100  # CUB-200-2011: classes 1-100 train, 101-200 test

# EXIF orientation tag value -> transpose that displays the image upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class Record:
    """One source image: `rel` is its path inside the dataset (mirrored under `out/images/`);
    `box` is a PIL crop box (left, upper, right, lower) in source pixels, right/lower exclusive."""

    src: Path
    rel: str
    label: int
    class_name: str
    split: str
    box: tuple[float, float, float, float] | None = None


# ---------------------------------------------------------------------------------------------
# Shared writer
# ---------------------------------------------------------------------------------------------


def write_prepared(
    records: Iterable[Record],
    out: str | Path,
    *,
    dataset: str,
    source: str | Path,
    short_side: int | None = 256,
    crop: bool = False,
    workers: int = 1,
    val_classes: float | int = 0,
    val_seed: int = 0,
    overwrite: bool = False,
    split: str = "classes",
    fractions: tuple[float, float] = (0.2, 0.3),
) -> Path:
    """Cache `records` under `out/images/`, then write `out/manifest.csv` and `out/prepare_report.json`.

    Missing or unreadable images are skipped with a one-line warning and listed in the report; so is what the
    data are too small for (`manifest.small_data_warnings`).
    `split` "classes": `val_classes` (a count, or a fraction of the train classes) move to the `val` split,
    picked with `val_seed`. `split` "images": every class's photos are divided by `fractions` (val, test), shuffled
    with `val_seed` (`manifest.split_images`). Raises UserError when nothing could be written. Returns `out`.
    """
    records = list(records)
    out, source = Path(out), Path(source)
    _check_short_side(short_side)
    if not 1 <= workers <= MAX_WORKERS:
        raise UserError(f"workers must be 1..{MAX_WORKERS}, got {workers}")
    _check_separate(source, out)
    claim_output(out, overwrite)
    dsts = _destinations(records)
    jobs = [(r.src, out / d, r.box if crop else None, short_side) for r, d in zip(records, dsts)]
    reasons = _cache_all(jobs, workers, desc=f"prepare {dataset}")
    rows, skipped = _sort_out(records, dsts, reasons)
    if not rows:
        first = f": {skipped[0]['path']}: {skipped[0]['reason']}" if skipped else ""
        raise UserError(f"no readable images for {dataset} in {source}{first}")
    if skipped:
        print(
            f"mproxy: warning: skipped {len(skipped)} of {len(records)} unreadable images (listed in "
            f"{out / REPORT}); first: {skipped[0]['path']}: {skipped[0]['reason']}",
            file=sys.stderr,
        )
    if split == "images":
        df = split_images(pd.DataFrame(rows), *fractions, seed=val_seed)
        protocol = {"protocol": "images", "val_fraction": fractions[0], "test_fraction": fractions[1]}
    else:
        df = carve_val(pd.DataFrame(rows), val_classes, val_seed)
        protocol = {"protocol": split_protocol(df)}
    write_manifest(out, df)
    write_json(
        out / REPORT,
        {
            "dataset": dataset,
            "source": str(source.resolve()),
            "crop": crop,
            "short_side": short_side or None,
            **protocol,
            **split_counts(df),
            "skipped": skipped,
            "warnings": warn_small_data(df, split_option=dataset == "folder"),
        },
    )
    return out


def _cache_all(jobs: list[tuple], workers: int, desc: str) -> list[str | None]:
    """`_cache_job` of every job, in order, with a progress bar; in `workers` processes when more than one."""
    bar = dict(total=len(jobs), desc=desc, unit="img")
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(_cache_job, jobs, chunksize=16), **bar))
    return [_cache_job(j) for j in tqdm(jobs, **bar)]


def _sort_out(records: list[Record], dsts: list[str], reasons: list[str | None]) -> tuple[list[dict], list[dict]]:
    """The manifest rows of the cached images, and the skipped ones (source path and reason)."""
    rows, skipped = [], []
    for r, dst, reason in zip(records, dsts, reasons):
        if reason is None:
            rows.append({"path": dst, "label": r.label, "class_name": r.class_name, "split": r.split})
        else:
            skipped.append({"path": str(r.src), "reason": reason})
    return rows, skipped


def split_counts(df: pd.DataFrame) -> dict:
    """Images and classes, in all and per split (the report's and `prepare`'s summary)."""
    splits = [s for s in ("train", "val", "test", "query", "gallery") if s in set(df["split"])]
    return {
        "images": len(df),
        "classes": int(df["label"].nunique()),
        "counts": {s: int((df["split"] == s).sum()) for s in splits},
        "classes_per_split": {s: int(df.loc[df["split"] == s, "label"].nunique()) for s in splits},
    }


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that is a file, cannot be written, or holds a prepared dataset
    (unless `overwrite`)."""
    check_writable_folder(Path(out), "the output folder")
    if (Path(out) / MANIFEST).exists() and not overwrite:
        raise UserError(
            f"{out} already holds a prepared dataset; use --overwrite to replace it, or choose another --out"
        )


def claim_output(out: Path, overwrite: bool) -> None:
    """Make `out` ready for a new prepared dataset (see `check_output`); with `overwrite` an old dataset's
    manifest, report and images are removed first; other contents are left alone."""
    check_output(out, overwrite)
    if (out / MANIFEST).exists():
        for name in (MANIFEST, REPORT):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / IMAGES, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _check_short_side(short_side: int | None) -> None:
    if short_side is not None and (isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 0):
        raise UserError(f"short_side must be a positive integer, or 0/None for no resizing; got {short_side!r}")


def _check_separate(src: Path, out: Path) -> None:
    """Refuse an output folder that is, contains or lies inside the source, so originals stay untouched."""
    a, b = src.resolve(), out.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise UserError(f"output folder {out} overlaps the source {src}; choose a separate folder")


def _destinations(records: list[Record]) -> list[str]:
    """Manifest paths `images/<rel>.jpg`, unique (a numeric suffix resolves clashes such as a.png/a.jpg)."""
    seen: set[str] = set()
    dsts = []
    for r in records:
        rel = PurePosixPath(r.rel.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise UserError(f"unsafe image path in the dataset listing: {r.rel!r}")
        stem = str(rel.with_suffix("")) if rel.suffix.lower() in IMAGE_EXTS else str(rel)
        dst, n = f"{IMAGES}/{stem}.jpg", 1
        while dst.lower() in seen:  # lower(): case-insensitive file systems
            dst, n = f"{IMAGES}/{stem}_{n}.jpg", n + 1
        seen.add(dst.lower())
        dsts.append(dst)
    return dsts


class _Skip(Exception):
    """An image that cannot be used; the message is the reason recorded in the report."""


def _cache_job(job: tuple) -> str | None:
    """Write one cached image; return None on success or the reason it was skipped."""
    src, dst, box, short_side = job
    if not src.is_file():
        return "file not found"
    try:
        im = _transform(src, box, short_side)
    except _Skip as e:
        return str(e)
    except Exception as e:  # any decoder failure skips the image, never the run
        return f"unreadable image ({type(e).__name__}: {e})".splitlines()[0]
    with atomic_path(dst) as tmp:  # write errors (disk full, ...) are fatal
        if im is None:
            shutil.copyfile(src, tmp)
        else:
            im.save(tmp, "JPEG", quality=JPEG_QUALITY)
    return None


def _transform(src: Path, box, short_side: int | None) -> Image.Image | None:
    """The decoded, cropped, upright, resized RGB image; None when the source file can be copied as is."""
    with Image.open(src) as im:
        im.load()  # decodes fully: catches truncated and corrupt files
        orientation = im.getexif().get(0x0112, 1)
        if box is not None:
            box = _clip_box(box, im.size)
            if box is None:
                raise _Skip("bounding box outside the image")
            im = im.crop(box)
        elif im.format == "JPEG" and im.mode == "RGB" and orientation == 1:
            if _target_size(im.size, short_side) == im.size:
                return None
        im = im.convert("RGB")
    if orientation in _ORIENTATION:
        im = im.transpose(_ORIENTATION[orientation])
    size = _target_size(im.size, short_side)
    return im if size == im.size else im.resize(size, Image.Resampling.LANCZOS)


def _clip_box(box, size) -> tuple[int, int, int, int] | None:
    """Round a crop box to pixels and clip it to the image; None when nothing is left."""
    w, h = size
    x1, y1, x2, y2 = (round(float(v)) for v in box)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _target_size(size: tuple[int, int], short_side: int | None) -> tuple[int, int]:
    """Size with the short side reduced to `short_side` (aspect kept); never upscales."""
    w, h = size
    if not short_side or min(w, h) <= short_side:
        return size
    scale = short_side / min(w, h)
    if w <= h:
        return short_side, max(1, round(h * scale))
    return max(1, round(w * scale)), short_side


# ---------------------------------------------------------------------------------------------
# Dataset readers
# ---------------------------------------------------------------------------------------------


def _require(path: Path, expected: str) -> Path:
    """Return `path`, or raise UserError naming it and the expected layout."""
    if not path.exists():
        kind = "/" if path.suffix == "" else ""
        raise UserError(f"{path.name}{kind} not found in {path.parent}: expected {expected}")
    return path


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of the non-empty lines of a text listing."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    return [(i, line.split()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _int(value: str, path: Path, lineno: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"malformed {path} line {lineno}: expected an integer, got {value!r}") from None


def _fields(row: list[str], n: int, path: Path, lineno: int) -> list[str]:
    if len(row) < n:
        raise UserError(f"malformed {path} line {lineno}: expected {n} fields, got {len(row)}")
    return row


def prepare_folder(
    src: str | Path,
    out: str | Path,
    split_file: str | Path | None = None,
    short_side: int | None = 256,
    *,
    workers: int = 1,
    val_classes: float | int = 0.2,
    val_seed: int = 0,
    overwrite: bool = False,
    split: str = "classes",
    val_fraction: float = 0.2,
    test_fraction: float = 0.3,
) -> Path:
    """Prepare an ImageFolder tree: `src/<class_name>/**/<image>` (jpg, png, bmp, gif, webp, tif, ppm/pgm).

    Classes are the sub-folders holding at least one image, sorted by name; label = index in that order.
    `split` "images": every class in every split, its photos divided by `val_fraction` and `test_fraction`
    (`manifest.split_images`; `val_classes` 0: no val). `split` "classes" (class-disjoint):
    without `split_file` the first half (`n // 2`) are train and the rest test, and `val_classes` of the
    train classes become validation classes. `split_file` is a text file with one `class_name,split` line
    per class (split: train, val or test); blank lines, `#` comments and a `class_name,split` header are
    ignored, the name is everything before the last comma. It must list every class and no others; its
    val classes are used as listed (`val_classes` applies only when it names none).
    """
    src = Path(src)
    if split not in PROTOCOLS:
        raise UserError(f"unknown --split {split!r}; choose from {', '.join(PROTOCOLS)}")
    if split == "images" and split_file is not None:
        raise UserError("--split-file names each class's split (class-disjoint); it cannot go with --split images")
    if split == "images":
        check_fractions(val_fraction, test_fraction)
    classes = _class_folders(src)
    names = list(classes)
    if split == "images":
        splits = dict.fromkeys(names, "train")  # divided per class by write_prepared
    elif split_file is None:
        if len(names) < 2:
            raise UserError(f"{src} has only {len(names)} class folder; a train/test split needs at least 2")
        splits = {name: "train" if i < len(names) // 2 else "test" for i, name in enumerate(names)}
    else:
        splits = _read_split_file(Path(split_file), names)
        if "val" in splits.values():
            val_classes = 0
    records = [
        Record(f, f.relative_to(src).as_posix(), label, name, splits[name])
        for label, name in enumerate(names)
        for f in classes[name]
    ]
    fractions = (val_fraction if val_classes != 0 else 0.0, test_fraction)
    return write_prepared(
        records,
        out,
        dataset="folder",
        source=src,
        short_side=short_side,
        workers=workers,
        val_classes=val_classes,
        val_seed=val_seed,
        overwrite=overwrite,
        split=split,
        fractions=fractions,
    )


def _class_folders(src: Path) -> dict[str, list[Path]]:
    """The image files of each class sub-folder of `src` that holds any, by folder name, sorted."""
    if not src.is_dir():
        raise UserError(f"source folder not found: {src}")
    classes = {}
    for d in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        if images:
            classes[d.name] = images
    if not classes:
        raise UserError(f"no class sub-folders with images in {src}: expected an ImageFolder tree (<class>/<image>)")
    return classes


def _read_split_file(path: Path, classes: list[str]) -> dict[str, str]:
    if not path.is_file():
        raise UserError(f"split file not found: {path}")
    splits: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line.replace(" ", "") == "class_name,split":
            continue
        name, sep, split = (s.strip() for s in line.rpartition(","))
        if not sep or not name:
            raise UserError(f"malformed {path} line {lineno}: expected 'class_name,split', got {line!r}")
        if split not in ("train", "val", "test"):
            raise UserError(f"malformed {path} line {lineno}: split must be train, val or test, got {split!r}")
        if splits.setdefault(name, split) != split:
            raise UserError(f"{path} line {lineno}: class {name!r} listed with two splits")
    unknown = sorted(set(splits) - set(classes))
    if unknown:
        raise UserError(f"{path} lists {len(unknown)} class(es) with no image folder, e.g. {unknown[0]!r}")
    unlisted = [c for c in classes if c not in splits]
    if unlisted:
        raise UserError(f"{path} does not list {len(unlisted)} class folder(s), e.g. {unlisted[0]!r}")
    return splits


def prepare_car(
    src: str | Path, out: str | Path, crop: bool = False, short_side: int | None = 256, *, workers: int = 1, **options
) -> Path:
    """Prepare Stanford Cars (`src/cars_annos.mat` + `src/car_ims/`): classes 1-98 train, 99-196 test.

    The release's `test` flag is ignored (class-disjoint split, as in metric learning). With `crop`, each
    image is cut to its box (x1, y1, x2, y2: inclusive pixel coordinates, clipped to the image).
    """
    src = Path(src)
    expected = "the Stanford Cars release (cars_annos.mat + car_ims/)"
    mat_path = _require(src / "cars_annos.mat", expected)
    _require(src / "car_ims", expected)
    try:
        mat = loadmat(mat_path, squeeze_me=True)
        annos, class_names = mat["annotations"], mat["class_names"]
    except Exception as e:  # scipy raises several types for non-.mat or incomplete files
        raise UserError(f"cannot read {mat_path}: {type(e).__name__}: {e}") from None
    annos, class_names = np.atleast_1d(annos), [str(n) for n in np.atleast_1d(class_names)]
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class"]
    missing = [f for f in fields if f not in (annos.dtype.names or ())]
    if missing:
        raise UserError(f"malformed {mat_path}: annotations lack field(s) {', '.join(missing)}")
    records = []
    for a in annos:
        cls = int(a["class"])
        if not 1 <= cls <= len(class_names):
            raise UserError(f"malformed {mat_path}: class {cls} outside 1..{len(class_names)}")
        rel = str(a["relative_im_path"])
        box = (int(a["bbox_x1"]), int(a["bbox_y1"]), int(a["bbox_x2"]) + 1, int(a["bbox_y2"]) + 1)
        split = "train" if cls <= CAR_TRAIN_CLASSES else "test"
        records.append(Record(src / rel, rel, cls - 1, class_names[cls - 1], split, box))
    return write_prepared(
        records, out, dataset="car", source=src, short_side=short_side, crop=crop, workers=workers, **options
    )


def prepare_cub(
    src: str | Path, out: str | Path, crop: bool = False, short_side: int | None = 256, *, workers: int = 1, **options
) -> Path:
    """Prepare CUB-200-2011 (`src` is the CUB_200_2011 folder or its parent): classes 1-100 train, 101-200 test.

    Reads images.txt, image_class_labels.txt, classes.txt and, with `crop`, bounding_boxes.txt
    (box x, y, w, h -> crop (x, y, x + w, y + h)); images under images/.
    """
    src = Path(src)
    root = src / "CUB_200_2011" if not (src / "images.txt").exists() and (src / "CUB_200_2011").is_dir() else src
    expected = "the CUB_200_2011 release (images.txt, image_class_labels.txt, classes.txt, bounding_boxes.txt, images/)"
    files = ["images.txt", "image_class_labels.txt", "classes.txt", "images"] + (["bounding_boxes.txt"] if crop else [])
    for name in files:
        _require(root / name, expected)

    def table(name: str, n: int) -> dict[int, list[str]]:
        """`id -> remaining fields` of a CUB listing whose rows have `n` fields."""
        path = root / name
        return {_int(r[0], path, i): _fields(r, n, path, i)[1:] for i, r in _read_lines(path)}

    def lookup(table_: dict[int, list[str]], key: int, name: str) -> list[str]:
        if key not in table_:
            raise UserError(f"id {key} missing in {root / name}")
        return table_[key]

    images, labels, classes = table("images.txt", 2), table("image_class_labels.txt", 2), table("classes.txt", 2)
    boxes = table("bounding_boxes.txt", 5) if crop else {}
    records = []
    for image_id, (rel, *_) in images.items():
        label_field = lookup(labels, image_id, "image_class_labels.txt")[0]
        if not label_field.isdigit():
            path = root / "image_class_labels.txt"
            raise UserError(f"malformed {path}: class {label_field!r} of image id {image_id}")
        cls = int(label_field)
        class_name = lookup(classes, cls, "classes.txt")[0]
        box = None
        if crop:
            try:
                x, y, w, h = (float(v) for v in lookup(boxes, image_id, "bounding_boxes.txt")[:4])
            except ValueError:
                raise UserError(f"malformed {root / 'bounding_boxes.txt'}: box of image id {image_id}") from None
            box = (x, y, x + w, y + h)
        split = "train" if cls <= CUB_TRAIN_CLASSES else "test"
        records.append(Record(root / "images" / rel, rel, cls - 1, class_name, split, box))
    return write_prepared(
        records, out, dataset="cub", source=root, short_side=short_side, crop=crop, workers=workers, **options
    )


def prepare_sop(src: str | Path, out: str | Path, short_side: int | None = 256, *, workers: int = 1, **options) -> Path:
    """Prepare Stanford Online Products: `src/Ebay_train.txt` -> train, `src/Ebay_test.txt` -> test.

    Listing rows are `image_id class_id super_class_id path` after a header; label = class_id - 1,
    class_name = `<super>_<class_id>` with `<super>` the path's first folder minus `_final`.
    """
    src = Path(src)
    expected = "the Stanford Online Products release (Ebay_train.txt, Ebay_test.txt, <category>_final/)"
    records = []
    for split in ("train", "test"):
        path = _require(src / f"Ebay_{split}.txt", expected)
        rows = _read_lines(path)
        if not rows or rows[0][1][:2] != ["image_id", "class_id"]:
            raise UserError(f"malformed {path}: expected the header 'image_id class_id super_class_id path'")
        for lineno, row in rows[1:]:
            _, class_id, _, rel = _fields(row, 4, path, lineno)[:4]
            cid = _int(class_id, path, lineno)
            super_name = rel.replace("\\", "/").split("/")[0].removesuffix("_final")
            records.append(Record(src / rel, rel, cid - 1, f"{super_name}_{cid}", split))
    return write_prepared(records, out, dataset="sop", source=src, short_side=short_side, workers=workers, **options)


def prepare_isc(src: str | Path, out: str | Path, short_side: int | None = 256, *, workers: int = 1, **options) -> Path:
    """Prepare In-shop Clothes Retrieval: `src/list_eval_partition.txt` + images under `src/img/`.

    The listing is a count line, the header `image_name item_id evaluation_status`, then one row per
    image (status train/query/gallery). class_name = item id; label = index of the item id in sorted order.
    """
    src = Path(src)
    expected = "the In-shop Clothes Retrieval release (list_eval_partition.txt + img/)"
    path = _require(src / "list_eval_partition.txt", expected)
    _require(src / "img", expected)
    rows = _read_lines(path)
    if len(rows) < 2 or rows[1][1][:2] != ["image_name", "item_id"]:
        raise UserError(f"malformed {path}: expected a count line, then 'image_name item_id evaluation_status'")
    count = _int(rows[0][1][0], path, rows[0][0])
    entries = []
    for lineno, row in rows[2:]:
        rel, item, status = _fields(row, 3, path, lineno)[:3]
        if status not in ("train", "query", "gallery"):
            raise UserError(f"malformed {path} line {lineno}: status must be train/query/gallery, got {status!r}")
        entries.append((rel, item, status))
    if count != len(entries):
        raise UserError(f"malformed {path}: declares {count} images but lists {len(entries)} (truncated?)")
    labels = {item: i for i, item in enumerate(sorted({e[1] for e in entries}))}
    records = [Record(src / rel, rel, labels[item], item, status) for rel, item, status in entries]
    return write_prepared(records, out, dataset="isc", source=src, short_side=short_side, workers=workers, **options)


PREPARERS: dict[str, Callable[..., Path]] = {
    "folder": prepare_folder,
    "car": prepare_car,
    "cub": prepare_cub,
    "sop": prepare_sop,
    "isc": prepare_isc,
}
