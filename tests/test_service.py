"""`mproxy serve`: every endpoint and error of the HTTP API (FastAPI TestClient), and the Searcher behind it."""

import hashlib
import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, wait_for
from fastapi.testclient import TestClient
from PIL import Image

from momentum_proxy.cli import main
from momentum_proxy.config import DEFAULT_TTA
from momentum_proxy.deploy.runtimes import export_file
from momentum_proxy.fileio import file_sha256
from momentum_proxy.retrieval.build import build_index
from momentum_proxy.retrieval.present import retrieve_and_draw
from momentum_proxy.retrieval.stores import open_store
from momentum_proxy.runs import BEST
from momentum_proxy.serving.app import create_app
from momentum_proxy.serving.searcher import Searcher

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def client(index_dir):
    """A read-only client on the pristine index (tests that write use `writable`)."""
    with TestClient(create_app(index_dir)) as c:
        yield c


@pytest.fixture
def writable(index_dir, tmp_path):
    """A copy of the index served with a write token; yields (client, folder)."""
    import shutil

    folder = tmp_path / "idx"
    shutil.copytree(index_dir, folder)
    with TestClient(create_app(folder, token=TOKEN), raise_server_exceptions=False) as c:
        yield c, folder


def jpeg_bytes(size=(80, 60), colour=(200, 30, 30), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size[1], size[0], 3)) * 60 + np.array(colour) * 0.7).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def upload(client, data: bytes, **fields):
    return client.post(
        "/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={k: str(v) for k, v in fields.items()}
    )


def assert_same_results(api_results, retrieve_results):
    assert [r["path"] for r in api_results] == [r["path"] for r in retrieve_results]
    assert [r["label"] for r in api_results] == [r["label"] for r in retrieve_results]
    np.testing.assert_allclose([r["score"] for r in api_results], [r["score"] for r in retrieve_results], atol=1e-5)


def test_search_equals_mproxy_retrieve_index(client, index_dir, tiny_data, tmp_path):
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg_bytes())
    indexed = tiny_data / "images" / "species_02" / "0004.jpg"
    retrieve_and_draw(outside, 7, tmp_path / "outside", index_dir=index_dir)
    got = upload(client, outside.read_bytes(), k=7)
    assert got.status_code == 200, got.text
    expected = json.loads((tmp_path / "outside" / "results.json").read_text())["results"]
    assert_same_results(got.json()["results"], expected)
    retrieve_and_draw(indexed, 6, tmp_path / "indexed", index_dir=index_dir)
    expected = json.loads((tmp_path / "indexed" / "results.json").read_text())["results"]
    # an upload is anonymous bytes: the copy of an indexed image finds that item first, then retrieve's list
    item_id = open_store(index_dir).ids_of([str(indexed)])[str(indexed)]
    copy = upload(client, indexed.read_bytes(), k=7).json()["results"]
    assert copy[0]["id"] == item_id and copy[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [r["same_image"] for r in copy] == [True] + [False] * 6  # labelled, not left out: a new query
    assert_same_results(copy[1:], expected)
    # by id: the indexed image's item, itself excluded as by `retrieve`; its class known, results framed
    by_id = client.post("/search", json={"id": item_id, "k": 6}).json()
    assert_same_results(by_id["results"], expected)
    assert by_id["query"] == {"id": item_id, "path": str(indexed), "label": 2, "class_name": "species_02"}
    assert [r["same_class"] for r in by_id["results"]] == [r["label"] == 2 for r in by_id["results"]]
    assert set(by_id["results"][0]) == {
        "rank",
        "id",
        "path",
        "label",
        "class_name",
        "score",
        "same_class",
        "rerank_score",
        "same_image",
    }
    assert set(by_id["timing_ms"]) == {"decode", "embed", "search", "rerank", "total"}
    # by embedding: the item's own vector finds the item itself first, then the same list
    vector = open_store(index_dir).vector(item_id)[0].tolist()
    by_vec = client.post("/search", json={"embedding": vector, "k": 7}).json()["results"]
    assert by_vec[0]["id"] == item_id and by_vec[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [r["id"] for r in by_vec[1:]] == [r["id"] for r in by_id["results"]]


def test_every_score_is_the_raw_cosine_and_min_score_reads_it(index_dir):
    from momentum_proxy.retrieval.rerank import Rerank

    store = open_store(index_dir)
    query = store.vector(5)[0]
    with TestClient(create_app(index_dir, rerank=Rerank("dba+aqe"))) as client:
        for rerank in ("dba+aqe", "dba", "none"):
            answer = client.post("/search", json={"id": 5, "k": 20, "rerank": rerank})
            assert answer.status_code == 200, answer.text
            results = answer.json()["results"]
            cosines = [float(store.vector(r["id"])[0] @ query) for r in results]
            np.testing.assert_allclose([r["score"] for r in results], cosines, atol=1e-5)  # exact, in any order
            reranked = [r["rerank_score"] for r in results]
            if rerank == "none":
                assert reranked == [None] * 20 and cosines == sorted(cosines, reverse=True)
            else:  # keep 1 (the default): the plain top hit first, the re-ranking orders the rest
                assert cosines[0] == max(cosines) and reranked[1:] == sorted(reranked[1:], reverse=True)
                assert cosines != sorted(cosines, reverse=True)
            cut = float(np.median(cosines))
            kept = client.post("/search", json={"id": 5, "k": 20, "rerank": rerank, "min_score": cut}).json()
            assert [r["id"] for r in kept["results"]] == [r["id"] for r in results if r["score"] >= cut]
            assert [r["rank"] for r in kept["results"]] == list(range(1, len(kept["results"]) + 1))
            # an upload of an indexed image's bytes: that item is labelled, whatever ordered the list
            photo = Path(store.item(7)["path"]).read_bytes()
            found = client.post(
                "/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": "64", "rerank": rerank}
            ).json()["results"]
            copies = [r for r in found if r["same_image"]]
            assert len(found) == 64 and [r["id"] for r in copies] == [7]
            assert copies[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_a_wrong_method_or_path_is_a_json_error_like_every_other(client):
    for answer, status in (
        (client.get("/search"), 405),
        (client.delete("/search"), 405),
        (client.get("/nowhere"), 404),
    ):
        assert answer.status_code == status and answer.headers["content-type"] == "application/json"
        assert set(answer.json()) == {"error"} and answer.json()["error"]


def test_one_duplicate_rule_for_uploads_and_folders_and_uploads_keep_their_names(writable, tiny_run, tmp_path):
    c, folder = writable
    auth = {"Authorization": f"Bearer {TOKEN}"}
    photos = tmp_path / "photos"
    photos.mkdir()
    red, blue = jpeg_bytes(seed=1), jpeg_bytes(colour=(20, 40, 220), seed=2)
    (photos / "IMG 0001.jpg").write_bytes(red)
    answer = c.post(
        "/items",
        headers=auth,
        files=[("images", ("../IMG 0001.jpg", red, "image/jpeg")), ("images", ("IMG 0001.jpg", red, "image/jpeg"))],
    ).json()
    first = answer["items"]
    assert [it["added"] for it in first] == [True, False] and first[0]["id"] == first[1]["id"]  # once, not twice
    digest = hashlib.sha256(red).hexdigest()
    assert first[0]["path"] == str(folder / "uploads" / digest[:16] / "IMG 0001.jpg")  # its own name, cleaned
    assert Path(first[0]["path"]).read_bytes() == red
    (photos / "blue.jpg").write_bytes(blue)
    c.app.state.searcher.close()  # the index is written by one process at a time
    summary = build_index(tiny_run, photos, folder)  # the uploaded photo, from its folder: not stored again
    assert (summary["added"], summary["already_indexed"], summary["total"]) == (1, 1, 66)
    with TestClient(create_app(folder, token=TOKEN)) as again:  # and the reverse: a photo indexed from its folder
        answer = again.post("/items", headers=auth, files=[("images", ("copy.jpg", blue, "image/jpeg"))]).json()
        assert not answer["items"][0]["added"] and answer["items"][0]["path"] == str(photos / "blue.jpg")
        assert answer["total"] == 66
        results = again.post("/search", files={"image": ("q.jpg", blue, "image/jpeg")}).json()["results"]
        assert results[0]["path"] == str(photos / "blue.jpg") and results[0]["same_image"]


def test_results_are_ranked_from_1_and_judged_only_against_a_known_class(client, index_dir, tmp_path, capsys):
    """The page shows each result's `#rank` and frames it green or red by `same_class`: ranks run 1..k for every
    kind of query, and a query whose class is unknown (an uploaded image, an embedding) has every `same_class`
    null, never false, in the API as in `mproxy retrieve` (its list and results.json)."""
    vector = open_store(index_dir).vector(3)[0].tolist()
    answers = {
        "id": client.post("/search", json={"id": 3, "k": 5}).json(),
        "embedding": client.post("/search", json={"embedding": vector, "k": 5}).json(),
        "upload": upload(client, jpeg_bytes(), k=5).json(),
    }
    for how, body in answers.items():
        assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5], how
        assert all(r["label"] is not None for r in body["results"]), how  # each result's own class is known
    assert answers["id"]["query"]["label"] is not None
    assert all(isinstance(r["same_class"], bool) for r in answers["id"]["results"])
    for how in ("embedding", "upload"):
        assert answers[how]["query"]["label"] is None
        assert [r["same_class"] for r in answers[how]["results"]] == [None] * 5, how

    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg_bytes())
    code, out, err = run_cli(
        ["retrieve", "--index", index_dir, "--query", outside, "-k", 5, "--out", tmp_path / "r"], capsys
    )
    assert code == 0, err
    listed = [line for line in out.splitlines() if line.startswith("#")]
    assert [line.split()[0] for line in listed] == ["#1", "#2", "#3", "#4", "#5"]
    assert not any(line.endswith(("same class", "other class")) for line in listed)  # no verdict
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["query_label"] is None and [r["rank"] for r in saved["results"]] == [1, 2, 3, 4, 5]
    assert [r["same_class"] for r in saved["results"]] == [None] * 5


def test_k_default_max_and_min_score(client):
    assert len(client.post("/search", json={"id": 0}).json()["results"]) == 10
    assert len(client.post("/search", json={"id": 0, "k": 1000}).json()["results"]) == 63  # all but itself
    scores = [r["score"] for r in client.post("/search", json={"id": 0, "k": 63}).json()["results"]]
    cut = scores[5]
    kept = client.post("/search", json={"id": 0, "k": 63, "min_score": cut}).json()["results"]
    assert [r["score"] for r in kept] == [s for s in scores if s >= cut]
    assert len(upload(client, jpeg_bytes(), k=3, min_score=1.0).json()["results"]) == 0


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        (dict(json={"id": 0, "k": 1001}), "k: Input should be less than or equal to 1000"),
        (dict(json={"id": 0, "k": 0}), "k: Input should be greater than or equal to 1"),
        (dict(json={"id": 0, "k": "many"}), "k: Input should be a valid integer"),
        (dict(json={"id": 0, "embedding": [0.1] * 32}), "give one query"),
        (dict(json={"k": 3}), "give one query"),
        (dict(json={"embedding": [0.1] * 5}), "the embedding must be 32 finite numbers"),
        (dict(json={"id": 0, "colour": "red"}), "colour: Extra inputs are not permitted"),
        (dict(json=[1, 2]), "must be a JSON object"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), "must be JSON"),
        (dict(files={"other": ("a.jpg", b"x", "image/jpeg")}), "needs an image file in the field 'image'"),
        (
            dict(files={"image": ("a.jpg", jpeg_bytes(), "image/jpeg")}, data={"k": "2000"}),
            "less than or equal to 1000",
        ),
    ],
)
def test_bad_parameters_are_422_with_one_line(client, request_kwargs, message):
    r = client.post("/search", **request_kwargs)
    assert r.status_code == 422 and message in r.json()["error"] and "\n" not in r.json()["error"]


def test_bad_images_400_and_too_large_413(index_dir):
    with TestClient(create_app(index_dir, max_upload_bytes=100_000, max_pixels=500_000)) as c:
        r = upload(c, b"%PDF-1.4 not an image")
        assert r.status_code == 400 and r.json() == {"error": "not an image file (or an unsupported format)"}
        whole = jpeg_bytes((200, 200))
        truncated = whole[: len(whole) // 2]
        r = upload(c, truncated)
        assert r.status_code == 400 and r.json()["error"].startswith("corrupt image")
        r = upload(c, bytes(200_000))
        assert r.status_code == 413 and "over the limit of 100,000 bytes" in r.json()["error"]
        # a decompression bomb: a tiny PNG file of 9,000 x 9,000 pixels
        buf = io.BytesIO()
        Image.new("L", (9_000, 9_000)).save(buf, "PNG")
        assert len(buf.getvalue()) < 100_000
        r = upload(c, buf.getvalue())
        assert r.status_code == 413 and "9000x9000 pixels is over the limit of 500,000" in r.json()["error"]
        assert c.get("/health").status_code == 200  # still serving


def test_items_metadata_and_image_files(client, index_dir):
    item = client.get("/items/5").json()
    assert set(item) == {"id", "path", "label", "class_name"} and item["id"] == 5
    assert item["class_name"] == f"species_{item['label']:02d}" == Path(item["path"]).parent.name
    r = client.get("/items/5/image")
    assert r.status_code == 200 and r.content == open(item["path"], "rb").read()
    assert r.headers["content-type"] == "image/jpeg"
    for path in ("/items/64", "/items/-1", "/items/64/image", "/items/99999999999999999999/image"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"].startswith("no item with id")
    assert client.get("/items/abc").status_code == 422
    for path in ("/items/..%2F..%2Fetc%2Fpasswd/image", "/items/5/../../meta.json", "/meta.json", "/images/x.jpg"):
        assert client.get(path).status_code in (404, 422)


def test_add_delete_persist_and_ids_stable_across_restart(writable, tiny_data):
    c, folder = writable
    auth = {"Authorization": f"Bearer {TOKEN}"}
    red, blue = jpeg_bytes(seed=1), jpeg_bytes(colour=(20, 40, 220), seed=2)
    files = [("images", ("red.jpg", red, "image/jpeg")), ("images", ("blue.jpg", blue, "image/jpeg"))]
    assert c.post("/items", files=files).status_code == 401
    assert c.post("/items", files=files, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = c.post("/items", files=files, data={"class_name": "my flowers"}, headers=auth)
    assert r.status_code == 200, r.text
    added = r.json()["items"]
    assert [it["id"] for it in added] == [64, 65] and all(it["added"] for it in added)
    assert added[0]["class_name"] == "my flowers" and added[0]["label"] == added[1]["label"] == 8
    assert r.json()["total"] == 66
    # persisted before the answer, searchable, served
    assert len(open_store(folder)) == 66
    hit = upload(c, red, k=1).json()["results"][0]
    assert hit["id"] == 64 and hit["score"] == pytest.approx(1.0, abs=1e-4)
    assert c.get("/items/64/image").content == red
    uploads = c.app.state.searcher.uploads
    assert uploads.is_dir() and all(open_store(folder).item(i)["path"].startswith(str(uploads)) for i in (64, 65))
    again = c.post("/items", files=files[:1], headers=auth).json()  # the same image again: not duplicated
    assert again["items"][0]["id"] == 64 and not again["items"][0]["added"] and again["total"] == 66
    bad = [files[1], ("images", ("x.jpg", b"garbage", "image/jpeg"))]
    assert c.post("/items", files=bad, headers=auth).status_code == 400
    assert len(open_store(folder)) == 66  # nothing half-added
    # delete: gone from results and items, ids of the others unchanged
    assert c.delete("/items/3").status_code == 401
    assert c.delete("/items/3", headers=auth).json() == {"deleted": 3, "total": 65}
    assert c.delete("/items/3", headers=auth).status_code == 404
    assert c.get("/items/3").status_code == 404
    assert all(r["id"] != 3 for r in c.post("/search", json={"id": 4, "k": 1000}).json()["results"])
    # an image file gone from disk: its item answers 404 for the image, the rest goes on
    blue_file = open_store(folder).item(65)["path"]
    Path(blue_file).rename(uploads.parent / "blue.jpg")
    r = c.get("/items/65/image")
    assert r.status_code == 404 and r.json()["error"] == f"the image file of item 65 is missing: {blue_file}"
    assert c.post("/search", json={"id": 65, "k": 3}).status_code == 200
    before = {i: c.get(f"/items/{i}").json() for i in (0, 4, 64, 65)}
    with TestClient(create_app(folder)) as restarted:
        assert {i: restarted.get(f"/items/{i}").json() for i in (0, 4, 64, 65)} == before
        assert restarted.get("/items/3").status_code == 404 and restarted.get("/health").json()["items"] == 65


def test_health_stats_metrics_docs_page(client, index_dir, tiny_run):
    assert client.get("/health").json() == {"status": "ok", "items": 64}
    stats = client.get("/stats").json()
    assert stats["items"] == 64 and stats["kind"] == "exact" and stats["feature_dim"] == 32
    assert stats["model"]["checkpoint_sha256"] == file_sha256(tiny_run / BEST)
    assert stats["model"]["backbone"] == "efficientnet_lite0" and stats["model"]["run"] == str(tiny_run.resolve())
    client.post("/search", json={"id": 1})
    client.get("/items/999")
    text = client.get("/metrics").text
    assert 'mproxy_requests_total{method="POST",route="/search",status="200"}' in text
    assert 'mproxy_requests_total{method="GET",route="/items/{item_id}",status="404"}' in text
    assert 'mproxy_request_seconds_bucket{le="0.1",method="POST",route="/search"}' in text
    assert "mproxy_index_items 64.0" in text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # works offline: scripts served here
    for asset in re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text):
        assert client.get(asset).status_code == 200, asset
    assert len(re.findall(r'\.(?:js|css)"', docs.text)) == 2
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/items", "/items/{item_id}", "/items/{item_id}/image", "/health", "/stats"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "://" not in page.text  # no CDN: works offline
    assert (
        client.options(
            "/search", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        ).headers.get("access-control-allow-origin")
        is None
    )  # CORS off by default


def test_internal_error_is_500_without_details_and_server_goes_on(writable, monkeypatch):
    c, _ = writable
    searcher = c.app.state.searcher
    monkeypatch.setattr(searcher, "search", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("secret detail")))
    r = c.post("/search", json={"id": 1})
    assert r.status_code == 500 and r.json() == {"error": "internal error (see the server log)"}
    monkeypatch.undo()
    assert c.post("/search", json={"id": 1}).status_code == 200


def test_concurrent_queries_are_batched_while_items_are_added(index_dir, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "idx"
    shutil.copytree(index_dir, folder)
    sizes = []
    searcher = Searcher(folder, batch_wait_ms=20, on_batch=sizes.append)
    try:
        queries = [jpeg_bytes(seed=s) for s in range(8)]
        alone = [searcher.search(q, 5) for q in queries]
        assert max(sizes) == 1
        results, errors = [None] * 8, []
        embed, first = searcher.embedder.embed, threading.Event()

        def embed_once_others_wait(batch):  # the first query's batch runs until two submissions queue behind it
            if not first.is_set():
                first.set()
                assert wait_for(lambda: searcher.batcher.queue.qsize() >= 2, limit=600)
            return embed(batch)

        monkeypatch.setattr(searcher.embedder, "embed", embed_once_others_wait)

        def run(i):
            try:
                results[i] = searcher.search(queries[i], 5)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        adder = threading.Thread(target=lambda: searcher.add([jpeg_bytes(seed=100 + i) for i in range(3)]))
        threads[0].start()
        assert wait_for(first.is_set, limit=600)  # the runner is busy with the first query alone: the others queue
        for t in [*threads[1:], adder]:
            t.start()
        for t in [*threads, adder]:
            t.join()
        assert not errors and max(sizes) > 1  # embedded together
        for a, b in zip(alone, results):
            ids_a = [r["id"] for r in a["results"]]
            ids_b = [r["id"] for r in b["results"] if r["id"] < 64]
            assert ids_b == ids_a[: len(ids_b)]
            np.testing.assert_allclose(
                [r["score"] for r in b["results"] if r["id"] < 64],
                [r["score"] for r in a["results"]][: len(ids_b)],
                atol=1e-4,
            )
        assert len(open_store(folder)) == 67
    finally:
        searcher.close()


def test_cuda_batches_are_padded_to_sizes_planned_at_start():
    from momentum_proxy.serving.searcher import bucketed

    calls = []

    def run(items):
        calls.append(len(items))
        return np.array([[-1.0] if item == "blank" else [float(item)] for item in items])

    padded = bucketed(run, 12, "blank")
    assert calls == [1, 2, 4, 8, 12]  # every size run once before any query
    assert padded([5, 6, 7]).tolist() == [[5.0], [6.0], [7.0]] and calls[-1] == 4
    assert padded(list(range(9))).tolist() == [[float(i)] for i in range(9)] and calls[-1] == 12
    assert padded([3]).tolist() == [[3.0]] and calls[-1] == 1


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_searcher_pads_batches_on_cuda_only(index_dir, tmp_path, monkeypatch, device):
    """A model that reports CUDA (run on the CPU here) gets padded, pre-planned batch sizes; rows still belong
    to their own images: each added image then finds itself first."""
    import shutil

    from momentum_proxy.serving import searcher as served

    load, seen = served.load_embedder, []

    class Reporting:
        def __init__(self, inner):
            self.inner, self.device = inner, torch.device(device)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def embed(self, images):
            seen.append(len(images))
            return self.inner.embed(images)

    monkeypatch.setattr(served, "load_embedder", lambda *a, **k: Reporting(load(*a, **k)))
    folder = tmp_path / "idx"
    shutil.copytree(index_dir, folder)
    searcher = Searcher(folder, max_batch=8, device="cpu")
    try:
        assert seen == ([1, 2, 4, 8] if device == "cuda" else [])
        images = [jpeg_bytes(seed=200 + i) for i in range(3)]
        added = searcher.add(images)  # one batch of 3
        assert seen[-1] == (4 if device == "cuda" else 3)
        for image, item in zip(images, added):
            best = searcher.search(image, 1)["results"][0]
            assert best["id"] == item["id"] and best["score"] == pytest.approx(1.0, abs=1e-5)
    finally:
        searcher.close()


def test_searcher_without_http(index_dir, tiny_data):
    from PIL import Image as PILImage

    searcher = Searcher(index_dir)
    try:
        path = tiny_data / "images" / "species_05" / "0000.jpg"
        by_path = searcher.search(path, 5)
        assert by_path["query"]["class_name"] == "species_05"
        assert str(path) not in [r["path"] for r in by_path["results"]]
        by_id = searcher.search(by_path["query"]["id"], 5)
        assert [r["id"] for r in by_id["results"]] == [r["id"] for r in by_path["results"]]
        with PILImage.open(path) as im:
            by_image = searcher.search(im, 6)
        assert by_image["results"][0]["path"] == str(path)
    finally:
        searcher.close()


def test_asearch_in_an_event_loop_batches_and_equals_search(index_dir, tiny_data, monkeypatch):
    """The service's path: concurrent awaited searches share one batch and answer as `search` does; the search
    step runs in the loop's thread for a small exact index and in a worker thread over INLINE_SEARCH_ITEMS."""
    import asyncio

    from momentum_proxy.errors import UserError
    from momentum_proxy.serving import searcher as searcher_module

    sizes = []
    # announced queries are waited for (up to the window), however slowly a busy machine decodes them
    searcher = Searcher(index_dir, batch_wait_ms=600_000, on_batch=sizes.append)
    threads = []
    answer = searcher._answer
    monkeypatch.setattr(
        searcher,
        "_answer",
        lambda *a: threads.append((searcher_module.is_image_query(a[0]), threading.current_thread())) or answer(*a),
    )
    try:
        path = tiny_data / "images" / "species_05" / "0000.jpg"
        queries = [jpeg_bytes(seed=s) for s in range(6)] + [path, 3, searcher.index.vector(9)[0]]

        async def together():
            return threading.current_thread(), await asyncio.gather(*(searcher.asearch(q, 5) for q in queries))

        loop_thread, awaited = asyncio.run(together())
        searcher.batcher.wait = 0.05  # the next lone query waits one window (the last round saw 7)
        images = [t for is_image, t in threads if is_image]
        assert max(sizes) == 7 and images == [loop_thread] * 7  # six uploads and the path: one batch
        for q, a in zip(queries, awaited):
            b = searcher.search(q, 5)
            assert a["query"] == b["query"] and [r["id"] for r in a["results"]] == [r["id"] for r in b["results"]]
            np.testing.assert_allclose(
                [r["score"] for r in a["results"]], [r["score"] for r in b["results"]], atol=1e-5
            )
        monkeypatch.setattr(searcher_module, "INLINE_SEARCH_ITEMS", 10)
        threads.clear()
        loop_thread, _ = asyncio.run(together())
        assert loop_thread not in [t for _, t in threads]
        with pytest.raises(UserError, match="k must be between 1 and 1000"):
            asyncio.run(searcher.asearch(queries[0], 0))
        with pytest.raises(UserError, match="not dict"):
            asyncio.run(searcher.asearch({"id": 3}, 5))
    finally:
        searcher.close()


def test_serve_refuses_open_address_without_token(index_dir, capsys, monkeypatch):
    monkeypatch.delenv("MPROXY_TOKEN", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["serve", str(index_dir), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "refusing to serve on 0.0.0.0 without a write token: pass --token or set MPROXY_TOKEN" in err


def test_serve_freezes_startup_objects_out_of_the_collector(index_dir, monkeypatch):
    import gc

    import uvicorn

    from momentum_proxy.serving.app import serve

    frozen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: frozen.append(gc.get_freeze_count()))
    try:
        serve(index_dir, port=0)
        assert frozen and frozen[0] > 10_000  # the model and libraries, frozen before requests are served
    finally:
        gc.unfreeze()


def test_onnx_runtime_serves_the_same_results(index_dir, tiny_run, tiny_data, tmp_path):
    import shutil

    run = tmp_path / "run"  # the onnx runtime writes its verified export into the run folder: use a copy
    shutil.copytree(tiny_run, run)
    query = (tiny_data / "images" / "species_02" / "0004.jpg").read_bytes()
    with (
        TestClient(create_app(index_dir, run_dir=run)) as a,
        TestClient(create_app(index_dir, run_dir=run, runtime="onnx")) as b,
    ):
        ra, rb = upload(a, query, k=5).json()["results"], upload(b, query, k=5).json()["results"]
        assert [r["id"] for r in ra] == [r["id"] for r in rb]
        np.testing.assert_allclose([r["score"] for r in ra], [r["score"] for r in rb], atol=1e-4)
        assert b.get("/stats").json()["runtime"] == "onnx" and a.get("/stats").json()["runtime"] == "torch"
    tta = open_store(index_dir).model["tta"]  # queries are embedded with the index's own: a new one's is DEFAULT_TTA
    assert tta == DEFAULT_TTA and (run / export_file(tta)).is_file()  # export/model-flip.onnx


def test_batcher_sets_up_and_runs_in_its_own_thread_and_reports_setup_errors():
    from momentum_proxy.serving.searcher import Batcher

    threads = []

    def setup():
        threads.append(threading.current_thread())
        return lambda items: (threads.append(threading.current_thread()), np.array(items) * 2)[1]

    batcher = Batcher(setup)
    try:
        assert [batcher.submit(i).result() for i in (1, 2)] == [2, 4]
        assert len(set(threads)) == 1 and [threads[0]] == batcher.threads
        assert threads[0] is not threading.current_thread()
    finally:
        batcher.close()

    def broken():
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        Batcher(broken)


def test_batcher_waits_for_announced_queries_but_never_for_a_lone_one():
    from momentum_proxy.serving.searcher import Batcher

    sizes = []
    batcher = Batcher(lambda: lambda items: np.array(items), wait_ms=600_000, on_batch=sizes.append)
    try:
        t0 = time.perf_counter()
        assert batcher.submit(1).result(timeout=300) == 1
        assert time.perf_counter() - t0 < 300  # nobody announced: no wait for the 10-minute window
        announced, release = threading.Event(), threading.Event()

        def late_query():
            with batcher.arriving() as submit:  # announced, still "decoding"
                announced.set()
                release.wait()
                return submit(3)

        with ThreadPoolExecutor(1) as pool:
            late = pool.submit(late_query)
            announced.wait()
            early = batcher.submit(2)
            with pytest.raises(FutureTimeout):
                early.result(timeout=0.3)  # waiting for the announced query (however slow the machine)
            release.set()
            assert early.result() == 2 and late.result().result() == 3
        assert sizes == [1, 2]
        with batcher.arriving(2):  # given up: nothing is waited for afterwards
            pass
        assert batcher.announced == 0
    finally:
        batcher.close()


def test_batcher_leaves_out_cancelled_queries_and_goes_on():
    """A caller that gives up (an awaiting request cancelled, e.g. at shutdown) cancels its future; the batch
    must skip it instead of failing to set its result, which would stop the batcher for everyone."""
    import asyncio

    from momentum_proxy.serving.searcher import Batcher

    batches, running, release = [], threading.Event(), threading.Event()

    def run(items):
        batches.append(list(items))
        running.set()
        release.wait()
        return np.array(items) * 10

    batcher = Batcher(lambda: run, wait_ms=0)
    try:
        first = batcher.submit(1)
        running.wait()  # the first batch is running; the next two queue behind it
        gone, kept = batcher.submit(2), batcher.submit(3)
        assert gone.cancel() and not first.cancel()  # a running batch's futures cannot be cancelled
        release.set()
        assert first.result() == 10 and kept.result() == 30 and batches == [[1], [3]]

        async def give_up():
            task = asyncio.ensure_future(asyncio.wrap_future(batcher.submit(4)))
            await asyncio.sleep(0)
            task.cancel()  # cancels the batcher's future too (asyncio.wrap_future)

        release.clear()
        running.clear()
        blocker = batcher.submit(5)
        running.wait()
        asyncio.run(give_up())
        release.set()
        assert blocker.result() == 50 and batcher.submit(6).result() == 60 and [4] not in batches
    finally:
        release.set()
        batcher.close()


def fail_collecting_once(batcher) -> None:
    """Make the batcher's next batch gathering raise (a fault outside the batch function), once."""
    collect, faults = batcher._collect, [RuntimeError("injected")]

    def failing_once(batch):
        if faults:
            raise faults.pop()
        return collect(batch)

    batcher._collect = failing_once


@pytest.mark.parametrize("runners", [1, 2])
def test_a_runner_fault_outside_the_batch_function_answers_its_callers_and_the_runner_goes_on(runners):
    from momentum_proxy.serving.searcher import Batcher

    batcher = Batcher(lambda: lambda items: [x * 2 for x in items], wait_ms=0, runners=runners)
    fail_collecting_once(batcher)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            batcher.submit(1).result(timeout=300)  # answered, not left hanging
        assert [batcher.submit(x).result(timeout=300) for x in (2, 3)] == [4, 6]  # the runner still serves
        assert batcher.restarts == 1 and all(t.is_alive() for t in batcher.threads)
    finally:
        batcher.close()


def test_the_service_answers_500_json_when_a_runner_fails_and_then_serves_again(index_dir):
    with TestClient(create_app(index_dir), raise_server_exceptions=False) as c:
        fail_collecting_once(c.app.state.searcher.batcher)
        image = jpeg_bytes(seed=3)
        r = c.post("/search", files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": "3"})
        assert r.status_code == 500 and r.json() == {"error": "internal error (see the server log)"}
        r = c.post("/search", files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": "3"})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
