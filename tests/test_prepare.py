"""Dataset preparation from tiny archives written in the official layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from momentum_proxy.data.manifest import read_manifest
from momentum_proxy.data.prepare import (
    REPORT,
    prepare_car,
    prepare_cub,
    prepare_folder,
    prepare_isc,
    prepare_sop,
)
from momentum_proxy.errors import UserError

RED = (255, 0, 0)


def jpeg(path: Path, size=(40, 30), box=None, fmt="JPEG", seed=0) -> Path:
    """Write a random-noise image; `box` (PIL crop box) is painted solid red."""
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if box is not None:
        x1, y1, x2, y2 = box
        pixels[y1:y2, x1:x2] = RED
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt)
    return path


def digests(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def report(out: Path) -> dict:
    return json.loads((out / REPORT).read_text())


def size_of(out: Path, rel: str) -> tuple[int, int]:
    with Image.open(out / rel) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        return im.size


def is_red(out: Path, rel: str) -> bool:
    with Image.open(out / rel) as im:
        mean = np.asarray(im.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    return mean[0] > 200 and mean[1] < 50 and mean[2] < 50


# ---- folder ---------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path) -> Path:
    src = tmp_path / "src"
    for i, name in enumerate(["dog", "ant", "cat", "bee"]):
        jpeg(src / name / "a.jpg", seed=i)
        jpeg(src / name / "sub" / "b.png", fmt="PNG", seed=10 + i)
    (src / "ant" / "notes.txt").write_text("not an image, ignored")
    (src / "cat" / "text.jpg").write_text("a text file named .jpg")
    good = jpeg(tmp_path / "full.jpg", size=(200, 150)).read_bytes()
    (src / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "empty").mkdir()
    return src


def test_folder_default_split_skips_corrupt_files(tree, tmp_path, capsys):
    before = digests(tree)
    out = prepare_folder(tree, tmp_path / "out")
    warning = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(warning) == 1 and warning[0].startswith("mproxy: warning: skipped 2 of 10 unreadable images")
    assert digests(tree) == before  # originals untouched
    df = read_manifest(out)
    assert len(df) == 8
    classes = dict(zip(df["class_name"], df["label"]))
    assert classes == {"ant": 0, "bee": 1, "cat": 2, "dog": 3}
    assert set(df[df["split"] == "train"]["class_name"]) == {"ant", "bee"}
    assert set(df[df["split"] == "test"]["class_name"]) == {"cat", "dog"}
    assert "images/ant/sub/b.jpg" in set(df["path"])
    for rel in df["path"]:
        assert size_of(out, rel) == (40, 30)
    rep = report(out)
    assert rep["counts"] == {"test": 4, "train": 4} and rep["classes"] == 4 and rep["short_side"] == 256
    assert {Path(s["path"]).name for s in rep["skipped"]} == {"text.jpg", "truncated.jpg"}
    assert all("unreadable image" in s["reason"] for s in rep["skipped"])


def test_folder_split_file(tree, tmp_path):
    split_file = tmp_path / "splits.csv"
    split_file.write_text("class_name,split\n# comment\nant,test\nbee, train\n\ncat,train\ndog,test\n")
    out = prepare_folder(tree, tmp_path / "out", split_file=split_file)
    df = read_manifest(out)
    assert dict(zip(df["class_name"], df["split"])) == {"ant": "test", "bee": "train", "cat": "train", "dog": "test"}
    assert dict(zip(df["class_name"], df["label"]))["cat"] == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("ant,train\nbee,train\ncat,test\n", "does not list 1 class folder.*'dog'"),
        ("ant,train\nbee,train\ncat,test\ndog,test\nemu,test\n", "no image folder.*'emu'"),
        ("ant,train\nbee,train\ncat,test\ndog,dev\n", "line 4: split must be train, val or test"),
        ("ant train\n", "line 1: expected 'class_name,split'"),
    ],
)
def test_folder_split_file_errors(tree, tmp_path, text, message):
    split_file = tmp_path / "splits.csv"
    split_file.write_text(text)
    with pytest.raises(UserError, match=message):
        prepare_folder(tree, tmp_path / "out", split_file=split_file)


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="source folder not found"):
        prepare_folder(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class sub-folders with images"):
        prepare_folder(tmp_path / "empty", tmp_path / "out")
    jpeg(tmp_path / "one" / "only" / "a.jpg")
    with pytest.raises(UserError, match="at least 2"):
        prepare_folder(tmp_path / "one", tmp_path / "out")
    jpeg(tmp_path / "one" / "other" / "a.jpg")
    for out in (tmp_path / "one", tmp_path / "one" / "out", tmp_path):
        with pytest.raises(UserError, match="overlaps the source"):
            prepare_folder(tmp_path / "one", out)
    with pytest.raises(UserError, match="short_side"):
        prepare_folder(tmp_path / "one", tmp_path / "out", short_side=-1)


def test_resize_never_upscales_and_none_copies(tmp_path):
    src = tmp_path / "src"
    jpeg(src / "a" / "wide.jpg", size=(600, 400))
    jpeg(src / "a" / "small.jpg", size=(100, 80))
    jpeg(src / "b" / "tall.png", size=(300, 500), fmt="PNG")
    out = prepare_folder(src, tmp_path / "out")
    assert size_of(out, "images/a/wide.jpg") == (384, 256)
    assert size_of(out, "images/a/small.jpg") == (100, 80)
    assert size_of(out, "images/b/tall.jpg") == (256, 427)
    # A small plain JPEG is copied byte for byte, not re-encoded.
    assert (out / "images/a/small.jpg").read_bytes() == (src / "a" / "small.jpg").read_bytes()
    for short_side in (None, 0):
        out = prepare_folder(src, tmp_path / f"out{short_side}", short_side=short_side)
        assert (out / "images/a/wide.jpg").read_bytes() == (src / "a" / "wide.jpg").read_bytes()
        assert size_of(out, "images/b/tall.jpg") == (300, 500)  # PNG re-encoded as JPEG, same size
        assert report(out)["short_side"] is None


def test_same_stem_images_get_distinct_names(tmp_path):
    src = tmp_path / "src"
    jpeg(src / "a" / "x.jpg", seed=1)
    jpeg(src / "a" / "x.png", fmt="PNG", seed=2)
    jpeg(src / "b" / "y.jpg")
    out = prepare_folder(src, tmp_path / "out")
    assert list(read_manifest(out)["path"]) == ["images/a/x.jpg", "images/a/x_1.jpg", "images/b/y.jpg"]


def test_exif_orientation_is_applied(tmp_path):
    src = tmp_path / "src"
    for name in "ab":
        (src / name).mkdir(parents=True)
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        Image.new("RGB", (40, 30), "blue").save(src / name / "x.jpg", exif=exif)
    out = prepare_folder(src, tmp_path / "out")
    assert size_of(out, "images/a/x.jpg") == (30, 40)


def test_two_workers_match_one(tree, tmp_path):
    one = read_manifest(prepare_folder(tree, tmp_path / "one"))
    two = read_manifest(prepare_folder(tree, tmp_path / "two", workers=2))
    assert one.equals(two)
    with pytest.raises(UserError, match="workers"):
        prepare_folder(tree, tmp_path / "three", workers=3)


# ---- Stanford Cars --------------------------------------------------------------------------

CAR_FIELDS = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]


def write_cars(src: Path, annos: list[tuple]) -> None:
    """cars_annos.mat as in the release: 1xN struct `annotations` (1x1 numeric fields), 1x196 cell `class_names`."""
    arr = np.zeros((1, len(annos)), dtype=[(f, "O") for f in CAR_FIELDS])
    for i, (path, x1, y1, x2, y2, cls, test) in enumerate(annos):
        arr[0, i] = (
            path,
            *(np.array([[v]], dtype=np.uint16) for v in (x1, y1, x2, y2)),
            np.array([[cls]], dtype=np.uint8),
            np.array([[test]], dtype=np.uint8),
        )
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [f"Car Model {i} 2012" for i in range(1, 197)]
    src.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(src / "cars_annos.mat", {"annotations": arr, "class_names": names})


@pytest.fixture
def cars(tmp_path) -> Path:
    src = tmp_path / "cars"
    annos = [  # path, x1, y1, x2, y2 (inclusive), class, test flag
        ("car_ims/000001.jpg", 5, 4, 24, 19, 1, 1),
        ("car_ims/000002.jpg", 0, 0, 39, 29, 98, 0),
        ("car_ims/000003.jpg", 10, 10, 60, 60, 99, 0),  # box beyond the image: clipped
        ("car_ims/000004.jpg", 1, 2, 30, 20, 196, 1),
        ("car_ims/000005.jpg", 1, 2, 30, 20, 150, 0),  # missing file
    ]
    write_cars(src, annos)
    for i, (path, x1, y1, x2, y2, *_) in enumerate(annos[:4]):
        jpeg(src / path, box=(x1, y1, x2 + 1, y2 + 1), seed=i)
    return src


def test_car(cars, tmp_path, capsys):
    before = digests(cars)
    out = prepare_car(cars, tmp_path / "out")
    assert "skipped 1 of 5" in capsys.readouterr().err
    assert digests(cars) == before
    df = read_manifest(out)
    assert list(df["label"]) == [0, 97, 98, 195]
    assert list(df["split"]) == ["train", "train", "test", "test"]  # test flag ignored
    assert list(df["class_name"]) == [f"Car Model {c} 2012" for c in (1, 98, 99, 196)]
    assert df["path"][0] == "images/car_ims/000001.jpg" and size_of(out, df["path"][0]) == (40, 30)
    rep = report(out)
    assert rep["counts"] == {"test": 2, "train": 2} and rep["crop"] is False
    assert rep["skipped"] == [{"path": str(cars / "car_ims/000005.jpg"), "reason": "file not found"}]


def test_car_crop(cars, tmp_path):
    out = prepare_car(cars, tmp_path / "out", crop=True)
    df = read_manifest(out)
    sizes = [size_of(out, p) for p in df["path"]]
    assert sizes == [(20, 16), (40, 30), (30, 20), (30, 19)]
    assert is_red(out, df["path"][0]) and is_red(out, df["path"][3])


def test_car_layout_errors(tmp_path):
    with pytest.raises(UserError, match=r"cars_annos.mat not found in .*cars_annos.mat \+ car_ims/"):
        prepare_car(tmp_path, tmp_path / "out")
    write_cars(tmp_path / "cars", [("car_ims/000001.jpg", 0, 0, 5, 5, 1, 0)])
    with pytest.raises(UserError, match="car_ims/ not found"):
        prepare_car(tmp_path / "cars", tmp_path / "out")
    (tmp_path / "bad" / "car_ims").mkdir(parents=True)
    (tmp_path / "bad" / "cars_annos.mat").write_text("not a mat file")
    with pytest.raises(UserError, match="cannot read"):
        prepare_car(tmp_path / "bad", tmp_path / "out")


# ---- CUB-200-2011 ---------------------------------------------------------------------------


@pytest.fixture
def cub(tmp_path) -> Path:
    root = tmp_path / "raw" / "CUB_200_2011"
    images = [  # id, relpath, class, box x y w h
        (1, "001.Black_footed_Albatross/a_1.jpg", 1, (3.0, 2.0, 20.0, 15.0)),
        (2, "100.Brown_Pelican/b_2.jpg", 100, (0.0, 0.0, 40.0, 30.0)),
        (3, "101.White_Pelican/c_3.jpg", 101, (10.4, 5.6, 12.0, 11.0)),
        (4, "200.Common_Yellowthroat/d_4.jpg", 200, (1.0, 1.0, 5.0, 5.0)),
    ]
    for i, rel, _, (x, y, w, h) in images:
        jpeg(root / "images" / rel, box=(round(x), round(y), round(x + w), round(y + h)), seed=i)
    (root / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in images))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {cls}\n" for i, _, cls, _ in images))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} {x} {y} {w} {h}\n" for i, _, _, (x, y, w, h) in images))
    names = {int(rel[:3]): rel.split("/")[0] for _, rel, _, _ in images}
    (root / "classes.txt").write_text("".join(f"{c} {names.get(c, f'{c:03d}.Bird_{c}')}\n" for c in range(1, 201)))
    return root


def test_cub_from_parent_with_crop(cub, tmp_path):
    out = prepare_cub(cub.parent, tmp_path / "out", crop=True)
    df = read_manifest(out)
    assert list(df["label"]) == [0, 99, 100, 199]
    assert list(df["split"]) == ["train", "train", "test", "test"]
    assert df["class_name"][2] == "101.White_Pelican"
    assert df["path"][0] == "images/001.Black_footed_Albatross/a_1.jpg"
    assert [size_of(out, p) for p in df["path"]] == [(20, 15), (40, 30), (12, 11), (5, 5)]
    assert all(is_red(out, p) for p in df["path"])
    rep = report(out)
    assert rep["crop"] is True and rep["source"] == str(cub.resolve()) and rep["skipped"] == []


def test_cub_errors(cub, tmp_path):
    (cub / "bounding_boxes.txt").unlink()
    prepare_cub(cub, tmp_path / "out")  # boxes are only needed to crop
    with pytest.raises(UserError, match="bounding_boxes.txt not found"):
        prepare_cub(cub, tmp_path / "out", crop=True)
    (cub / "image_class_labels.txt").unlink()
    with pytest.raises(UserError, match="image_class_labels.txt not found"):
        prepare_cub(cub.parent, tmp_path / "out")
    with pytest.raises(UserError, match="images.txt not found"):
        prepare_cub(tmp_path, tmp_path / "out")


# ---- Stanford Online Products ---------------------------------------------------------------


@pytest.fixture
def sop(tmp_path) -> Path:
    src = tmp_path / "Stanford_Online_Products"
    train = [
        (1, 1, 1, "bicycle_final/111085122871_0.JPG"),
        (2, 1, 1, "bicycle_final/111085122871_1.JPG"),
        (3, 2, 2, "cabinet_final/1110_0.JPG"),
    ]
    test = [(4, 11319, 1, "bicycle_final/2220_0.JPG"), (5, 11320, 12, "toaster_final/3330_0.JPG")]
    for name, rows in (("train", train), ("test", test)):
        lines = ["image_id class_id super_class_id path"] + [" ".join(map(str, r)) for r in rows]
        (src / f"Ebay_{name}.txt").parent.mkdir(parents=True, exist_ok=True)
        (src / f"Ebay_{name}.txt").write_text("\n".join(lines) + "\n")
        for r in rows:
            jpeg(src / r[3], seed=r[0])
    return src


def test_sop(sop, tmp_path):
    out = prepare_sop(sop, tmp_path / "out")
    df = read_manifest(out)
    assert list(df["split"]) == ["train"] * 3 + ["test"] * 2
    assert list(df["label"]) == [0, 0, 1, 11318, 11319]
    assert list(df["class_name"]) == ["bicycle_1", "bicycle_1", "cabinet_2", "bicycle_11319", "toaster_11320"]
    assert df["path"][0] == "images/bicycle_final/111085122871_0.jpg"
    assert report(out)["classes_per_split"] == {"test": 2, "train": 2}


def test_sop_errors(sop, tmp_path):
    (sop / "Ebay_test.txt").write_text("1 1 1 bicycle_final/x.JPG\n")
    with pytest.raises(UserError, match="expected the header"):
        prepare_sop(sop, tmp_path / "out")
    (sop / "Ebay_test.txt").unlink()
    with pytest.raises(UserError, match="Ebay_test.txt not found"):
        prepare_sop(sop, tmp_path / "out")


# ---- In-shop Clothes Retrieval --------------------------------------------------------------


def write_isc(src: Path, rows: list[tuple[str, str, str]], count: int | None = None) -> None:
    src.mkdir(parents=True, exist_ok=True)
    lines = [str(len(rows) if count is None else count), "image_name item_id evaluation_status"]
    lines += [f"{path}          {item}          {status}" for path, item, status in rows]  # padded like the release
    (src / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")


def test_isc(tmp_path):
    src = tmp_path / "inshop"
    rows = [
        ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
        ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
        ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
        ("img/WOMEN/Tees/id_00000001/01_1_front.jpg", "id_00000001", "gallery"),
    ]
    write_isc(src, rows)
    for i, (path, _, _) in enumerate(rows):
        jpeg(src / path, seed=i)
    out = prepare_isc(src, tmp_path / "out")
    df = read_manifest(out)
    assert list(df["split"]) == ["train", "train", "query", "gallery", "gallery"]
    assert list(df["label"]) == [1, 1, 2, 2, 0]
    assert list(df["class_name"]) == ["id_00000002", "id_00000002", "id_00000080", "id_00000080", "id_00000001"]
    assert report(out)["counts"] == {"gallery": 2, "query": 1, "train": 2}


def test_isc_errors(tmp_path):
    with pytest.raises(UserError, match="list_eval_partition.txt not found"):
        prepare_isc(tmp_path, tmp_path / "out")
    src = tmp_path / "inshop"
    write_isc(src, [("img/a.jpg", "id_1", "train")], count=2)
    with pytest.raises(UserError, match="img/ not found"):
        prepare_isc(src, tmp_path / "out")
    (src / "img").mkdir()
    with pytest.raises(UserError, match="declares 2 images but lists 1"):
        prepare_isc(src, tmp_path / "out")
    write_isc(src, [("img/a.jpg", "id_1", "val")])
    with pytest.raises(UserError, match="line 3: status must be"):
        prepare_isc(src, tmp_path / "out")
    write_isc(src, [("img/a.jpg", "id_1", "train")])
    with pytest.raises(UserError, match="no readable images.*a.jpg: file not found"):
        prepare_isc(src, tmp_path / "out")


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("folder", "no class sub-folders"),
        ("car", "cars_annos.mat"),
        ("cub", "images.txt"),
        ("sop", "Ebay_train.txt"),
        ("isc", "list_eval_partition.txt"),
    ],
)
def test_cli_dispatches_each_kind_to_its_preparer(kind, expected, tmp_path, capsys):
    from momentum_proxy.cli import main

    (tmp_path / "raw").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["prepare", kind, "--src", str(tmp_path / "raw"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and expected in capsys.readouterr().err


# ---- validation split and output folders ---------------------------------------------------------


@pytest.fixture
def ten_classes(tmp_path) -> Path:
    src = tmp_path / "ten"
    for c in range(10):
        for i in range(2):
            jpeg(src / f"class_{c}" / f"{i}.jpg", size=(24, 20), seed=100 * c + i)
    return src


def test_folder_carves_seeded_val_classes_out_of_train(ten_classes, tmp_path):
    df = read_manifest(prepare_folder(ten_classes, tmp_path / "a"))  # default: 20 % of the 5 train classes, >= 2
    classes = {s: set(df.loc[df["split"] == s, "class_name"]) for s in ("train", "val", "test")}
    assert len(classes["val"]) == 2 and len(classes["train"]) == 3
    assert classes["test"] == {f"class_{c}" for c in range(5, 10)}  # test classes never change
    assert not (classes["val"] & classes["train"]) and not (classes["val"] & classes["test"])
    again = read_manifest(prepare_folder(ten_classes, tmp_path / "b"))
    assert again.equals(df)  # seeded
    picks = {
        frozenset(
            read_manifest(prepare_folder(ten_classes, tmp_path / f"s{seed}", val_seed=seed)).query("split == 'val'")[
                "class_name"
            ]
        )
        for seed in range(6)
    }
    assert len(picks) > 1  # the seed decides which classes
    assert read_manifest(prepare_folder(ten_classes, tmp_path / "c", val_classes=3))["split"].value_counts()["val"] == 6
    assert "val" not in set(read_manifest(prepare_folder(ten_classes, tmp_path / "d", val_classes=0))["split"])
    assert report(tmp_path / "a")["classes_per_split"] == {"train": 3, "val": 2, "test": 5}
    for bad, message in [(1, "trivially perfect"), (4, "leaves 1 train classes")]:
        with pytest.raises(UserError, match=message):
            prepare_folder(ten_classes, tmp_path / "e", val_classes=bad)


def test_split_file_names_val_classes(ten_classes, tmp_path):
    split_file = tmp_path / "splits.csv"
    split_file.write_text("".join(f"class_{c},{'train' if c < 4 else 'val' if c < 6 else 'test'}\n" for c in range(10)))
    df = read_manifest(prepare_folder(ten_classes, tmp_path / "out", split_file=split_file))
    assert set(df.loc[df["split"] == "val", "class_name"]) == {"class_4", "class_5"}  # as listed, nothing carved
    assert df["split"].value_counts()["train"] == 8


def test_paper_datasets_have_no_val_unless_asked(cub, tmp_path):
    assert "val" not in set(read_manifest(prepare_cub(cub, tmp_path / "plain"))["split"])


def test_prepare_refuses_to_replace_a_dataset_unless_overwrite(ten_classes, tree, tmp_path):
    out = prepare_folder(ten_classes, tmp_path / "out")
    with pytest.raises(UserError, match="already holds a prepared dataset"):
        prepare_folder(tree, out)
    assert len(read_manifest(out)) == 20
    prepare_folder(tree, out, overwrite=True)
    assert not (out / "images" / "class_0").exists()  # the old dataset's images are gone
    assert set(read_manifest(out)["class_name"]) == {"ant", "bee", "cat", "dog"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare_folder(tree, tmp_path / "file")


def test_small_data_is_warned_about_in_one_line_each_and_recorded(tmp_path, capsys):
    src = tmp_path / "twelve"
    for c in range(12):
        for i in range(1 if c in (0, 7) else 3):  # class_00 (train) and class_07 (test) have one photo each
            jpeg(src / f"class_{c:02d}" / f"{i}.jpg", size=(24, 20), seed=100 * c + i)
    out = prepare_folder(src, tmp_path / "p")
    err = [line for line in capsys.readouterr().err.splitlines() if "mproxy:" in line]  # not the progress bar
    assert all(line.startswith("mproxy: warning: ") for line in err)
    assert any(
        "1 test class(es) have a single image (class_07)" in line and "left out of the metrics" in line for line in err
    )
    assert any("only 4 classes are left to train (2 went to val)" in line for line in err)
    warnings = report(out)["warnings"]
    assert len(warnings) == len(err) == 3  # the lone test class, the lone train class (unless carved to val), few
    df = read_manifest(out)
    assert (df["class_name"] == "class_07").sum() == 1  # nothing is dropped


def test_enough_data_prepares_without_warnings(ten_classes, tmp_path, capsys):
    for c in range(10, 16):
        for i in range(2):
            jpeg(ten_classes / f"class_{c}" / f"{i}.jpg", size=(24, 20), seed=100 * c + i)
    prepare_folder(ten_classes, tmp_path / "p", val_classes=0)
    assert "mproxy:" not in capsys.readouterr().err and report(tmp_path / "p")["warnings"] == []
