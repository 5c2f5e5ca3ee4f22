"""Index folders that never surprise: any working directory, moved images, duplicates, stale models, bad --out."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_run, run_cli

from momentum_proxy.errors import UserError
from momentum_proxy.fileio import file_sha256
from momentum_proxy.retrieval.build import build_index
from momentum_proxy.retrieval.faiss_store import META_FILE, FaissStore
from momentum_proxy.retrieval.present import retrieve_and_draw


@pytest.fixture
def images(tiny_data, tmp_path):
    """A copy of two species of the tiny dataset as a plain folder (one sub-folder each)."""
    dst = tmp_path / "photos"
    for species in ("species_03", "species_04"):
        shutil.copytree(tiny_data / "images" / species, dst / species)
    return dst


def test_index_works_from_any_directory_and_reports_moved_images(tiny_run, images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    build_index(tiny_run, "photos", "idx")  # relative paths, as typed
    meta = json.loads((tmp_path / "idx" / META_FILE).read_text())
    assert all(p.startswith("/") for p in meta["paths"]) and meta["sources"] == [str(images)]
    query = images / "species_03" / "0001.jpg"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(["retrieve", "--index", tmp_path / "idx", "--query", query, "-k", 3, "--out", "r"], capsys)
    assert code == 0 and err == ""
    first = json.loads((elsewhere / "r" / "results.json").read_text())
    assert not any(r["missing"] for r in first["results"])
    # move one result's image away: the retrieval still works and reports it
    moved = first["results"][0]["path"]
    shutil.move(moved, tmp_path / "moved.jpg")
    code, _, err = run_cli(["retrieve", "--index", tmp_path / "idx", "--query", query, "-k", 3, "--out", "r2"], capsys)
    assert code == 0
    assert err.count("\n") == 1 and "1 of 3 result images are missing" in err and moved in err
    results = json.loads((elsewhere / "r2" / "results.json").read_text())["results"]
    assert [r["path"] for r in results] == [r["path"] for r in first["results"]]
    assert [r["missing"] for r in results] == [True, False, False]


def test_reindexing_skips_paths_and_contents_already_indexed(tiny_run, images, tmp_path):
    from PIL import Image

    first = build_index(tiny_run, images, tmp_path / "idx")
    assert first["added"] == 16 and first["already_indexed"] == 0
    shutil.copy(images / "species_03" / "0001.jpg", images / "species_03" / "copy.jpg")  # the same bytes
    shutil.copy(images / "species_03" / "0002.jpg", images / "species_04" / "copy2.jpg")
    with Image.open(images / "species_03" / "0001.jpg") as im:
        im.save(images / "species_03" / "reencoded.jpg", quality=70)  # the same photo, other bytes: another image
    again = build_index(tiny_run, images, tmp_path / "idx")
    assert (again["added"], again["already_indexed"], again["total"]) == (1, 18, 17)
    index = FaissStore.load(tmp_path / "idx")
    assert len(set(index.paths)) == len(index.paths) == 17
    assert str(images / "species_03" / "reencoded.jpg") in index.paths
    assert not {str(images / "species_03" / "copy.jpg"), str(images / "species_04" / "copy2.jpg")} & set(index.paths)
    assert sorted(index.hashes) == list(range(17))  # every item's content recorded


def test_a_milvus_store_records_contents_too(tiny_run, images, tmp_path):
    pytest.importorskip("milvus_lite")
    from momentum_proxy.retrieval.stores import open_store

    location = f"milvus:{tmp_path}/shop.db"
    build_index(tiny_run, images, location)
    shutil.copy(images / "species_03" / "0001.jpg", images / "copy.jpg")
    assert build_index(tiny_run, images, location, labels="folders")["added"] == 0
    store = open_store(location)
    try:
        original = str(images / "species_03" / "0001.jpg")
        digest = file_sha256(original)
        assert store.content_ids([digest, "0" * 64]) == {digest: store.ids_of([original])[original]}
        store.remove(store.ids_of([original])[original])
        assert store.content_ids([digest]) == {}  # a removed item's content is no longer indexed
    finally:
        store.close()


def test_an_index_without_content_hashes_keeps_working_and_a_rebuild_records_them(tiny_run, images, tmp_path):
    build_index(tiny_run, images, tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / META_FILE).read_text())
    del meta["sha256"]  # as written before contents were recorded
    (tmp_path / "idx" / META_FILE).write_text(json.dumps(meta))
    assert FaissStore.load(tmp_path / "idx").hashes == {}
    query = images / "species_03" / "0001.jpg"
    shutil.copy(query, tmp_path / "copy.jpg")
    r, _ = retrieve_and_draw(tmp_path / "copy.jpg", 16, tmp_path / "r", index_dir=str(tmp_path / "idx"))
    assert len(r.results) == 15 and str(query) not in [h.path for h in r.results]  # left out: found by cosine+bytes
    assert r.label_name == "species_03"
    assert build_index(tiny_run, images, tmp_path / "idx")["added"] == 0
    build_index(tiny_run, None, tmp_path / "idx", rebuild=True)
    assert len(FaissStore.load(tmp_path / "idx").hashes) == 16


def test_stale_index_says_what_changed_and_rebuild_fixes_it(tiny_data, images, tmp_path, capsys):
    run = make_run(tmp_path / "run", tiny_data, epoch=3)
    idx = tmp_path / "idx"
    build_index(run, images, idx)
    make_run(tmp_path / "run", tiny_data, epoch=5, seed=1)  # retrained with --overwrite
    code, _, err = run_cli(["index", run, "--images", images, "--out", idx], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"it was built from epoch 3 of {run.resolve()}, whose best checkpoint is now epoch 5;" in err
    assert f"mproxy index {run} --out {idx} --images {images} --rebuild" in err
    query = images / "species_04" / "0002.jpg"
    code, _, err = run_cli(["retrieve", "--index", idx, "--query", query, "--out", tmp_path / "q"], capsys)
    assert code == 2 and "--rebuild" in err
    code, out, err = run_cli(["index", run, "--out", idx, "--rebuild"], capsys)  # from the index's own images
    assert code == 0 and "added: 16" in out, err
    index = FaissStore.load(idx)
    assert index.model["checkpoint_epoch"] == 5 and len(index) == 16


def test_an_index_of_another_run_is_never_offered_a_rebuild(tiny_data, images, tmp_path, capsys):
    run_a, run_b = make_run(tmp_path / "a", tiny_data, epoch=0), make_run(tmp_path / "b", tiny_data, epoch=0, seed=1)
    idx = tmp_path / "idx"
    build_index(run_a, images, idx)
    code, _, err = run_cli(["index", run_b, "--images", images, "--out", idx], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--rebuild" not in err
    assert f"it was built from epoch 0 of {run_a.resolve()}, not by {run_b.resolve()} (epoch 0)" in err
    assert f"with the run that built it ({run_a.resolve()}" in err
    assert f"`mproxy index {run_b} --out NEW_FOLDER --images {images}`" in err
    make_run(tmp_path / "a", tiny_data, epoch=0, seed=2)  # run A retrained, same epoch
    code, _, err = run_cli(["retrieve", "--index", idx, "--query", images / "species_03" / "0001.jpg"], capsys)
    assert code == 2 and "is now epoch 0 (another checkpoint of that epoch: retrained?)" in err


def test_output_path_checked_before_embedding(tiny_run, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        "momentum_proxy.retrieval.build.load_embedder", lambda *a, **k: pytest.fail("the model was loaded")
    )
    a_file = tmp_path / "index.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        code, _, err = run_cli(["index", tiny_run, "--images", images, "--out", out], capsys)
        assert code == 2 and err.startswith("mproxy: error:") and len(err.strip().splitlines()) == 1
        assert "index.txt" in err
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["index.txt", "photos"]
    if os.geteuid() == 0:
        read_only = Path("/sys")  # root ignores permission bits, not sysfs
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir(mode=0o500)
    code, _, err = run_cli(["index", tiny_run, "--images", images, "--out", read_only / "new" / "idx"], capsys)
    assert code == 2 and f"cannot write the index folder {read_only / 'new' / 'idx'}: {read_only}" in err
    assert len(err.strip().splitlines()) == 1 and not (read_only / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p != read_only) == ["index.txt", "photos"]


def test_retrieve_checks_the_run_against_the_index_and_records_both(tiny_data, tiny_run, tmp_path, capsys):
    idx = tmp_path / "idx"
    build_index(tiny_run, tiny_data, idx)
    query = tiny_data / "images" / "species_01" / "0003.jpg"
    other = make_run(tmp_path / "other", tiny_data, seed=7)
    code, _, err = run_cli(["retrieve", other, "--index", idx, "--query", query, "--out", tmp_path / "o"], capsys)
    assert code == 2 and f"not by {other.resolve()}" in err and "--rebuild" not in err
    code, _, err = run_cli(
        ["retrieve", tiny_run, "--index", idx, "--query", query, "-k", 4, "--out", tmp_path / "q"], capsys
    )
    assert code == 0, err
    res = json.loads((tmp_path / "q" / "results.json").read_text())
    meta = json.loads((idx / META_FILE).read_text())
    assert res["model"]["run"] == str(tiny_run.resolve())
    assert res["model"]["checkpoint_sha256"] == meta["model"]["checkpoint_sha256"]
    assert res["index"]["path"] == str(idx) and res["index"]["items"] == 64
    # class names come from the prepared dataset's manifest; the query (an indexed image) is not its own result
    assert res["query_class_name"] == "species_01"
    assert all(r["class_name"].startswith("species_") for r in res["results"])
    assert str(query) not in [r["path"] for r in res["results"]]
    assert [r["same_class"] for r in res["results"]] == [r["class_name"] == "species_01" for r in res["results"]]


def test_unreadable_index_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no retrieval index"):
        retrieve_and_draw(__file__, 3, tmp_path / "out", index_dir=tmp_path)


def test_a_folder_of_class_folders_is_indexed_with_its_class_names(tiny_run, images, tmp_path, capsys):
    code, out, err = run_cli(["index", tiny_run, "--images", images, "--out", tmp_path / "idx"], capsys)
    assert code == 0, err
    assert "classes: 2" in out
    index = FaissStore.load(tmp_path / "idx")
    assert sorted(index.classes.values()) == ["species_03", "species_04"]
    assert all(index.item(i)["class_name"] == Path(index.paths[i]).parent.name for i in range(index.ntotal))
    query = images / "species_03" / "0001.jpg"
    code, out, _ = run_cli(
        ["retrieve", "--index", tmp_path / "idx", "--query", query, "-k", 15, "--out", tmp_path / "r"], capsys
    )
    rows = [line for line in out.splitlines() if line.startswith("#")]
    assert len(rows) == 15 and all(("species_03" in r) == r.endswith("  same class") for r in rows)
    assert all(r.endswith(("  same class", "  other class")) for r in rows)


def test_labels_none_or_from_a_csv_and_unknown_classes_print_as_a_dash(tiny_run, images, tmp_path, capsys):
    code, _, err = run_cli(
        ["index", tiny_run, "--images", images, "--out", tmp_path / "plain", "--labels", "none"], capsys
    )
    assert code == 0, err
    assert FaissStore.load(tmp_path / "plain").labels is None
    query = images / "species_03" / "0001.jpg"
    code, out, _ = run_cli(
        ["retrieve", "--index", tmp_path / "plain", "--query", query, "-k", 3, "--out", tmp_path / "r"], capsys
    )
    rows = [line for line in out.splitlines() if line.startswith("#")]
    columns = [re.fullmatch(r"#\d+ +(\d\.\d{3})(?: \(re-ranked \d\.\d{3}\))?  (\S+)  .*", line) for line in rows]
    assert len(rows) == 3 and all(c and c[2] == "-" for c in columns) and "None" not in out
    csv_file = tmp_path / "classes.csv"
    csv_file.write_text("path,class_name\nspecies_03/0001.jpg,iris\n" + f"{images / 'species_04' / '0002.jpg'},rose\n")
    code, _, err = run_cli(
        ["index", tiny_run, "--images", images, "--out", tmp_path / "csv", "--labels", csv_file], capsys
    )
    assert code == 0, err
    index = FaissStore.load(tmp_path / "csv")
    named = {
        Path(index.paths[i]).relative_to(images).as_posix(): index.item(i)["class_name"] for i in range(index.ntotal)
    }
    assert named.pop("species_03/0001.jpg") == "iris" and named.pop("species_04/0002.jpg") == "rose"
    assert set(named.values()) == {None}


def test_bad_labels_are_one_line(tiny_run, images, tmp_path, capsys):
    for labels, message in [
        ("colours", "--labels must be auto, none, folders or a CSV file"),
        (__file__, "expected 'path,class_name'"),
    ]:
        code, _, err = run_cli(
            ["index", tiny_run, "--images", images, "--out", tmp_path / "idx", "--labels", labels], capsys
        )
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_auto_labels_only_for_a_folder_whose_images_all_sit_in_class_folders(tiny_run, images, tmp_path):
    shutil.copy(images / "species_03" / "0001.jpg", images / "loose.jpg")
    build_index(tiny_run, images, tmp_path / "idx")
    assert FaissStore.load(tmp_path / "idx").labels is None
    build_index(tiny_run, images, tmp_path / "idx2", labels="folders")
    index = FaissStore.load(tmp_path / "idx2")
    loose = index.path_ids[str(images / "loose.jpg")]
    assert index.item(loose)["class_name"] is None and len(index.classes) == 2


def test_a_large_k_caps_the_picture_not_the_ranked_list(tiny_run, tiny_data, tmp_path, capsys):
    from PIL import Image

    from momentum_proxy.plots import MAX_DRAWN

    build_index(tiny_run, tiny_data, tmp_path / "idx")
    query = tiny_data / "images" / "species_01" / "0003.jpg"
    code, out, err = run_cli(
        ["retrieve", "--index", tmp_path / "idx", "--query", query, "-k", 60, "--out", tmp_path / "r"], capsys
    )
    assert code == 0, err
    assert sum(line.startswith("#") for line in out.splitlines()) == 60 > MAX_DRAWN
    assert len(json.loads((tmp_path / "r" / "results.json").read_text())["results"]) == 60
    with Image.open(tmp_path / "r" / "retrieval.png") as im:
        rows = -(-(MAX_DRAWN + 1) // 10)
        assert im.width <= 2000 and im.height <= rows * 250 + 50  # 5 rows of 10 cells, not 7


@pytest.mark.parametrize("rerank", ["none", "dba+aqe"])
def test_a_query_with_the_bytes_of_an_indexed_image_is_left_out_like_its_path(
    tiny_run, images, tmp_path, capsys, rerank
):
    build_index(tiny_run, images, tmp_path / "idx")
    original = images / "species_04" / "0002.jpg"
    query = tmp_path / "copy.jpg"
    shutil.copy(original, query)  # another path, the same bytes
    results = {}
    for name, q in (("path", original), ("copy", query)):
        code, out, err = run_cli(
            [
                "retrieve",
                "--index",
                tmp_path / "idx",
                "--query",
                q,
                "-k",
                15,
                "--rerank",
                rerank,
                "--out",
                tmp_path / name,
            ],
            capsys,
        )
        assert code == 0, err
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert results["copy"]["results"] == results["path"]["results"]  # left out alike: 15 others, same order
    assert str(original) not in [r["path"] for r in results["copy"]["results"]]
    assert results["copy"]["query_class_name"] == "species_04"
    for r in results["copy"]["results"]:  # the raw cosine always, the re-ranked score beside it when re-ranked
        assert -1 <= r["score"] <= 1 and (r["rerank_score"] is None) == (rerank == "none") and not r["same_image"]


def test_retrieve_from_an_index_writes_to_out_never_into_the_index_and_replaces_nothing(
    tiny_run, images, tmp_path, monkeypatch, capsys
):
    build_index(tiny_run, images, tmp_path / "idx")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "idx").rglob("*")}
    monkeypatch.chdir(tmp_path)
    query = images / "species_03" / "0001.jpg"
    for _ in range(2):
        code, out, err = run_cli(["retrieve", "--index", "idx", "--query", query, "-k", 3], capsys)
        assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "idx").rglob("*")} == before  # files and times unchanged
    assert sorted(p.name for p in (tmp_path / "retrieval").iterdir()) == [
        "results-2.json",
        "results.json",
        "retrieval-2.png",
        "retrieval.png",
    ]
    assert "retrieval picture: retrieval/retrieval-2.png" in out
    code, _, err = run_cli(["retrieve", "--index", "idx", "--query", query, "--out", "idx/pictures"], capsys)
    assert code == 2 and "is inside the index's folder" in err and not (tmp_path / "idx" / "pictures").exists()


def test_skipped_files_are_one_warning_line_naming_their_list(tiny_run, images, tmp_path, capsys):
    (images / "species_03" / "broken.jpg").write_bytes(b"not a jpeg")
    code, out, err = run_cli(["index", tiny_run, "--images", images, "--out", tmp_path / "idx"], capsys)
    assert code == 0 and "skipped: 1" in out
    assert err.count("\n") == 1 and err.startswith("mproxy: warning: 1 file(s) skipped")
    assert f"the list is in {tmp_path / 'idx' / 'skipped.json'}" in err
    assert str(images / "species_03" / "broken.jpg") in err
    assert json.loads((tmp_path / "idx" / "skipped.json").read_text())[0]["path"].endswith("broken.jpg")


def test_a_refused_index_command_leaves_no_folder_behind(tiny_run, tmp_path, capsys):
    out = tmp_path / "new" / "idx"
    code, _, err = run_cli(["index", tiny_run, "--images", __file__, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "new" / "idx").exists()
