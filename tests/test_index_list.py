"""`mproxy index --list FILE`: a catalogue given as a list of image paths (with optional class names), read and
embedded a chunk at a time, bad lines and images reported and skipped; on a faiss folder and on Milvus Lite."""

import json
import shutil

import pytest
from conftest import run_cli

from momentum_proxy.retrieval import build
from momentum_proxy.retrieval.stores import local_folder, open_store


@pytest.fixture(params=["faiss", "milvus"])
def out(request, tmp_path):
    return str(tmp_path / "idx") if request.param == "faiss" else f"milvus:{tmp_path}/idx.db"


def test_a_list_is_indexed_in_chunks_with_bad_lines_reported(tiny_run, tiny_data, tmp_path, out, capsys, monkeypatch):
    images = sorted((tiny_data / "images").rglob("*.jpg"))[:10]
    (tmp_path / "pics").mkdir()
    shutil.copy(images[0], tmp_path / "pics" / "relative, with comma.jpg")
    (tmp_path / "pics" / "broken.jpg").write_bytes(b"not a jpeg")
    lines = [
        "path,class_name",
        '"pics/relative, with comma.jpg",my class',
        "pics/broken.jpg,my class",
        "pics/missing.jpg",
        "a,b,c",
        "",
        *[f"{p},{p.parent.name}" for p in images[1:8]],
        str(images[8]),
        f"{images[1]},{images[1].parent.name}",
    ]  # the last line repeats an image
    (tmp_path / "catalogue.csv").write_text("\n".join(lines) + "\n")
    embedded = []
    embed_files = build.embed_files
    monkeypatch.setattr(
        build, "embed_files", lambda e, paths, *a: embedded.append(len(paths)) or embed_files(e, paths, *a)
    )
    read = build.read_image_list
    monkeypatch.setattr(build, "read_image_list", lambda f: read(f, 4))
    code, stdout, err = run_cli(
        ["index", tiny_run, "--list", tmp_path / "catalogue.csv", "--out", out, "--device", "cpu"], capsys
    )
    assert code == 0, err
    assert max(embedded) <= 4 and len(embedded) >= 3  # the catalogue embedded a chunk at a time
    assert "added: 9" in stdout and "skipped: 3" in stdout and "total: 9" in stdout
    assert "already_indexed: 1" in stdout  # the repeated line
    report = json.loads((local_folder(out) / "skipped.json").read_text())
    assert {r["path"] for r in report} == {
        str(tmp_path / "pics" / "broken.jpg"),
        str(tmp_path / "pics" / "missing.jpg"),
        f"{tmp_path / 'catalogue.csv'}:5",
    }
    store = open_store(out)
    by_path = {it["path"]: it for it in store.live_items()}
    assert by_path[str(tmp_path / "pics" / "relative, with comma.jpg")]["class_name"] == "my class"
    assert by_path[str(images[3])]["class_name"] == images[3].parent.name
    assert by_path[str(images[8])]["label"] is None  # listed without a class
    assert len(by_path) == 9 and store.sources == [str(tmp_path / "catalogue.csv")]
    store.close()
    code, stdout, err = run_cli(["index", tiny_run, "--list", tmp_path / "catalogue.csv", "--out", out], capsys)
    assert code == 0 and "added: 0" in stdout and "already_indexed: 10" in stdout and "total: 9" in stdout, err
    assert "skipped: 3" in stdout  # the unreadable images, tried again (not fatal), and the bad line


def test_list_errors_are_one_line(tiny_run, tiny_data, tmp_path, capsys):
    code, _, err = run_cli(["index", tiny_run, "--list", tmp_path / "none.txt", "--out", tmp_path / "idx"], capsys)
    assert code == 2 and err == f"mproxy: error: image list not found: {tmp_path / 'none.txt'}\n"
    (tmp_path / "l.txt").write_text("path\n\n")
    code, _, err = run_cli(["index", tiny_run, "--list", tmp_path / "l.txt", "--out", tmp_path / "idx"], capsys)
    assert code == 2 and err == f"mproxy: error: no images to index in {tmp_path / 'l.txt'}\n"
    code, _, err = run_cli(
        ["index", tiny_run, "--list", tmp_path / "l.txt", "--images", tiny_data, "--out", tmp_path / "idx"], capsys
    )
    assert code == 2 and err == "mproxy: error: --list takes the place of --images\n"
