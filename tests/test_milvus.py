"""`mproxy index/retrieve/serve` over a Milvus store: Milvus Lite (the real engine, embedded in the test process)
for the commands and the service's API tests (those of test_service.py, run here on a Milvus Lite index), and a
Milvus server (Milvus Lite's gRPC server on a port) that goes away and comes back."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_run, run_cli
from fastapi.testclient import TestClient
from test_service import (  # noqa: F401
    TOKEN,
    jpeg_bytes,
    test_add_delete_persist_and_ids_stable_across_restart,
    test_bad_parameters_are_422_with_one_line,
    test_health_stats_metrics_docs_page,
    test_internal_error_is_500_without_details_and_server_goes_on,
    test_items_metadata_and_image_files,
    test_k_default_max_and_min_score,
    test_results_are_ranked_from_1_and_judged_only_against_a_known_class,
    test_search_equals_mproxy_retrieve_index,
    test_searcher_without_http,
)

from momentum_proxy.retrieval.build import build_index
from momentum_proxy.retrieval.stores import build_store, open_store
from momentum_proxy.serving.app import create_app


# ----------------------------------------------------------------------------------- test_service.py's fixtures
@pytest.fixture(scope="module")
def index_dir(tiny_data, tiny_run, tmp_path_factory):
    """A pristine Milvus Lite index of the tiny dataset (64 images, labelled, class names)."""
    location = f"milvus:{tmp_path_factory.mktemp('milvus')}/catalogue.db"
    build_index(tiny_run, tiny_data, location)
    return location


@pytest.fixture(scope="module")
def client(index_dir):
    with TestClient(create_app(index_dir)) as c:
        yield c


def copy_store(source: str, target: str) -> None:
    """A copy of the store at `source` (ids renumbered from 0: copy a store without removed items)."""
    old = open_store(source)
    items = old.live_items()
    copy = build_store(
        target,
        np.concatenate([old.vector(it["id"]) for it in items]),
        [it["path"] for it in items],
        [-1 if it["label"] is None else it["label"] for it in items],
        model=old.model,
        classes=old.classes,
    )
    copy.sources = old.sources
    copy.save(target)
    copy.close()
    old.close()


@pytest.fixture
def writable(index_dir, tmp_path):
    """A copy of the index served with a write token; yields (client, location)."""
    location = f"milvus:{tmp_path}/copy.db"
    copy_store(index_dir, location)
    with TestClient(create_app(location, token=TOKEN), raise_server_exceptions=False) as c:
        yield c, location


# ----------------------------------------------------------------------------------- the commands
def test_index_retrieve_rebuild_through_the_cli(tiny_run, tiny_data, tmp_path, capsys):
    db = tmp_path / "shop.db"
    code, out, err = run_cli(
        ["index", tiny_run, "--images", tiny_data, "--out", f"milvus:{db}", "--device", "cpu"], capsys
    )
    assert code == 0, err
    assert "added: 64" in out and "total: 64" in out and "classes: 8" in out
    query = tiny_data / "images" / "species_03" / "0001.jpg"
    code, out, err = run_cli(
        ["retrieve", "--index", f"milvus:{db}", "--query", query, "-k", 5, "--out", tmp_path / "r"], capsys
    )
    assert code == 0, err
    listed = [line for line in out.splitlines() if line.startswith("#")]
    assert len(listed) == 5 and str(query) not in out  # the query's own item left out
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["index"] == {
        "path": f"milvus:{db}",
        "kind": "exact",
        "items": 64,
        "params": {"index_type": "FLAT", "metric_type": "IP"},
        "recall": {"k": 10, "recall": 1.0, "exact": True},
    }  # Milvus searches exactly (FLAT)
    assert saved["query_class_name"] == "species_03" and all(r["class_name"] for r in saved["results"])
    code, out, err = run_cli(
        ["retrieve", "--index", f"milvus:{db}", "--query", query, "-k", 5, "--rerank", "dba", "--out", tmp_path / "r"],
        capsys,
    )
    assert code == 0 and len([line for line in out.splitlines() if line.startswith("#")]) == 5, err
    # the same command again adds nothing; a rebuild from the store's own items replaces it
    code, out, _ = run_cli(["index", tiny_run, "--images", tiny_data, "--out", f"milvus:{db}"], capsys)
    assert "added: 0" in out and "already_indexed: 64" in out and "total: 64" in out
    store = open_store(f"milvus:{db}")
    store.remove(0)
    store.close()
    code, out, err = run_cli(["index", tiny_run, "--out", f"milvus:{db}", "--rebuild"], capsys)
    assert code == 0 and "added: 63" in out and "total: 63" in out, err
    rebuilt = open_store(f"milvus:{db}")
    assert rebuilt.ntotal == 63 and rebuilt.classes == {i: f"species_{i:02d}" for i in range(8)}


def test_a_stale_or_missing_milvus_index_is_refused_in_one_line(tiny_run, tiny_data, index_dir, tmp_path, capsys):
    query = tiny_data / "images" / "species_03" / "0001.jpg"
    other = make_run(tmp_path / "other", tiny_data, epoch=3, seed=1)
    code, _, err = run_cli(["retrieve", other, "--index", index_dir, "--query", query], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"the index {index_dir} is stale: it was built from epoch 0 of {tiny_run.resolve()}, not by " in err
    assert "search or extend it with the run that built it" in err
    code, _, err = run_cli(["retrieve", "--index", f"milvus:{tmp_path}/none.db", "--query", query], capsys)
    assert code == 2 and err == (
        f"mproxy: error: no Milvus Lite index at {tmp_path}/none.db; make one with `mproxy "
        f"index RUN --images DIR --out milvus:{tmp_path}/none.db`\n"
    )
    assert not (tmp_path / "none.db").exists()  # not created by looking
    code, _, err = run_cli(["index", tiny_run, "--images", tiny_data, "--out", "milvus:shop"], capsys)
    assert (
        code == 2
        and err == "mproxy: error: milvus:shop: a Milvus Lite location is milvus:PATH.db (the file name ends in .db)\n"
    )
    code, _, err = run_cli(
        ["index", tiny_run, "--images", tiny_data, "--out", f"milvus:{tmp_path}/x.db", "--kind", "hnsw"], capsys
    )
    assert code == 2 and "a Milvus index searches exactly (FLAT); --kind hnsw is for a faiss index folder" in err


HOLD = """import sys, time
from momentum_proxy.retrieval.stores import build_store
build_store(sys.argv[1], [[1.0, 0.0]], ["/a.jpg"]).save(sys.argv[1])
print("open", flush=True)
time.sleep(600)
"""


def test_a_milvus_lite_file_open_in_another_process_is_refused_in_one_line(tiny_data, tmp_path, capsys):
    location = f"milvus:{tmp_path}/busy.db"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, location], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        code, _, err = run_cli(
            ["retrieve", "--index", location, "--query", tiny_data / "images" / "species_03" / "0001.jpg"], capsys
        )
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and err == (
        f"mproxy: error: cannot open the Milvus Lite file {tmp_path}/busy.db: another "
        "process (e.g. mproxy serve) has it open; Milvus Lite lets one process use a file "
        "at a time\n"
    )


def test_uploads_go_beside_the_milvus_lite_file(writable, tmp_path):
    c, location = writable
    r = c.post(
        "/items",
        files=[("images", ("a.jpg", jpeg_bytes(seed=9), "image/jpeg"))],
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["items"][0]["path"].startswith(str(tmp_path / "copy.files" / "uploads") + "/")


# ----------------------------------------------------------------------------------- a server that goes away
def test_the_service_answers_503_while_the_server_is_away_then_recovers(
    server, index_dir, tiny_data, tmp_path, monkeypatch, capsys
):
    location, stop, start = server
    monkeypatch.setenv("MPROXY_MILVUS_TOKEN", "root:Milvus")
    monkeypatch.chdir(tmp_path)  # a server store's local files: ./products.files
    copy_store(index_dir, location)
    with TestClient(create_app(location, token=TOKEN), raise_server_exceptions=False) as c:
        before = c.post("/search", json={"id": 3, "k": 4}).json()["results"]
        stop()
        for answer in (
            c.get("/health"),
            c.post("/search", json={"id": 3, "k": 4}),
            c.get("/items/3"),
            c.post("/search", files={"image": ("q.jpg", jpeg_bytes(), "image/jpeg")}),
            c.post(
                "/items",
                files=[("images", ("a.jpg", jpeg_bytes(), "image/jpeg"))],
                headers={"Authorization": f"Bearer {TOKEN}"},
            ),
        ):
            assert answer.status_code == 503
            assert answer.json()["error"].startswith(f"the Milvus store {location} cannot be reached")
        query = tiny_data / "images" / "species_03" / "0001.jpg"
        code, _, err = run_cli(["retrieve", "--index", location, "--query", query], capsys)
        assert code == 2 and err.startswith(f"mproxy: error: the Milvus store {location} cannot be reached")
        assert err.count("\n") == 1
        start()
        assert c.get("/health").json() == {"status": "ok", "items": 64}
        assert c.post("/search", json={"id": 3, "k": 4}).json()["results"] == before
