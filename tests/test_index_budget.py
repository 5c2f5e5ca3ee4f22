"""ANN under a memory budget: the choice (`plan_index`), each kind built with its recall against exact search in
meta.json, `--max-memory` on the command line, recall in `retrieve` and `/stats`, memory-mapped IVF indexes, and the
catalogue benchmark at a tiny size."""

import json
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import run_cli

from momentum_proxy.config import parse_memory
from momentum_proxy.errors import UserError
from momentum_proxy.retrieval.faiss_store import (
    HEADROOM,
    META_FILE,
    FaissStore,
    default_nlist,
    estimate_bytes,
    exact_neighbours,
    plan_index,
)

ROOT = Path(__file__).resolve().parents[1]


def clustered(n=4000, d=32, classes=200, seed=0):
    """Unit vectors in classes: a class centre plus a variation in a 4-d subspace plus a little noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    basis = rng.standard_normal((4, d))
    x = rng.standard_normal((classes, d))[labels] + 0.4 * rng.standard_normal((n, 4)) @ basis
    x += 0.05 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, labels, [f"/img/{i:05d}.jpg" for i in range(n)]


@pytest.fixture(scope="module")
def data():
    return clustered()


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """An ivf and an ivfpq index of `data`, saved (shared: tests copy before changing them)."""
    x, y, paths = data
    out = {}
    for kind in ("ivf", "ivfpq"):
        folder = tmp_path_factory.mktemp(kind) / "idx"
        FaissStore.build(x, paths, y, kind=kind, recall_queries=300).save(folder)
        out[kind] = folder
    return out


# ------------------------------------------------------------------------------------------------ the choice
@pytest.mark.parametrize(
    "text, size",
    [
        ("512MB", 512 * 10**6),
        ("2GB", 2 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("800M", 800 * 2**20),
        ("64 KiB", 2**16),
        ("1000", 1000),
        (" 2gb ", 2 * 10**9),
        (4096, 4096),
    ],
)
def test_memory_sizes_are_read(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "2 GBs", "-1GB", "0", "1e9", "GB", ""])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(UserError, match="--max-memory"):
        parse_memory(text)


@pytest.mark.parametrize(
    "n, d, budget, kind, params",
    [
        (5_000, 512, "1GB", "exact", {}),  # few vectors: exhaustive search
        (20_000, 128, "1GB", "hnsw", {"M": 32}),  # HNSW fits with M = 32
        (20_000, 128, "15MB", "hnsw", {"M": 9}),  # (0.8 * 15e6 / 2e4 - 4 * 128 - 16) / 8 = 9
        (20_000, 128, "14MB", "ivf", {"nlist": 512}),  # M would be 4 (< 8); IVF-Flat, 10.82 MB, fits in 11.2
        (20_000, 128, "11MB", "ivfpq", {"nlist": 512, "m": 64}),  # nothing unquantized fits
        (1_000_000, 512, "1GiB", "ivfpq", {"nlist": 4000, "m": 256}),  # 1M: never IVF-Flat; autofaiss's largest code
        (1_000_000, 512, "4GB", "hnsw", {"M": 32}),
        (1_000_000, 512, "100MB", "ivfpq", {"nlist": 4000, "m": 32}),
    ],
)
def test_the_budget_chooses_like_autofaiss(n, d, budget, kind, params):
    plan = plan_index(n, d, parse_memory(budget))
    assert (plan.kind, plan.params) == (kind, params), plan
    assert plan.estimated_bytes == estimate_bytes(kind, n, d, params) <= HEADROOM * parse_memory(budget)
    assert plan.reason and plan.to_dict()["max_memory"] == parse_memory(budget)


def test_more_memory_never_chooses_a_less_accurate_index():
    rank = {"ivfpq": 0, "ivf": 1, "hnsw": 2, "exact": 3}
    for n, d in [(3_000, 64), (50_000, 256), (2_000_000, 512)]:
        seen, last = [], -1
        for budget in np.geomspace(2**16, 2**36, 60):
            try:
                plan = plan_index(n, d, int(budget))
            except UserError:
                assert not seen  # once something fits, more memory fits it too
                continue
            key = (rank[plan.kind], plan.params.get("M", 0), plan.params.get("m", 0))
            assert key >= (last if isinstance(last, tuple) else (-1,)), (n, d, budget, plan)
            last = key
            seen.append(plan.kind)
        assert seen, (n, d)


def test_a_given_kind_is_sized_or_refused():
    assert plan_index(20_000, 128, parse_memory("15MB"), "hnsw").params == {"M": 9}
    assert plan_index(20_000, 128, parse_memory("2MB"), "ivfpq").params["m"] == 32
    assert plan_index(5_000, 32, parse_memory("1GB"), "ivf").params == {"nlist": default_nlist(5_000)}
    with pytest.raises(UserError, match=r"do not fit in --max-memory 9.54 MiB: the smallest exact index needs about"):
        plan_index(20_000, 128, 10 * 10**6, "exact")
    with pytest.raises(UserError, match="do not fit in --max-memory 1 KiB: the smallest ivfpq index"):
        plan_index(1_000_000, 512, 1024)
    with pytest.raises(UserError, match="ivfpq needs at least 256 vectors"):
        plan_index(100, 32, 10**9, "ivfpq")


# ------------------------------------------------------------------------------------------------ builds and recall
@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw", "ivfpq"])
def test_each_kind_records_its_recall_against_exact_search(kind, data, tmp_path):
    x, y, paths = data
    index = FaissStore.build(x, paths, y, kind=kind, recall_queries=300)
    index.save(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["kind"] == kind and meta["recall"] == index.recall
    assert meta["memory"]["estimated_bytes"] == estimate_bytes(kind, len(x), x.shape[1], index.params)
    loaded = FaissStore.load(tmp_path)
    assert loaded.recall_info() == meta["recall"] and loaded.params == index.params
    if kind == "exact":  # by definition, not measured
        assert meta["recall"] == {"k": 10, "recall": 1.0, "exact": True}
        return
    recall = meta["recall"]
    assert recall["k"] == 10 and recall["queries"] == 300 and recall["items"] == len(x) and recall["target"] == 0.95
    assert recall["recall"] >= (0.9 if kind == "ivfpq" else 0.95), recall
    name = "ef_search" if kind == "hnsw" else "nprobe"
    assert recall["tuned"] == name and recall["tried"][-1][0] >= index.params[name] == loaded.params[name]
    # the same sample measured again gives the recorded figure (ivfpq compares with the original vectors)
    again = loaded.recall_vs_exact(10, num_queries=300, vectors=x if kind == "ivfpq" else None)
    assert round(again, 4) == recall["recall"]


def test_recall_leaves_each_query_out_and_tuning_raises_the_search_parameter(data):
    x, y, paths = data
    index = FaissStore.build(x, paths, y, kind="ivf", nlist=64, recall_queries=300)
    tried = index.recall["tried"]  # nprobe doubled from 8 until the target, no gain, or every list
    assert [v for v, _ in tried] == [min(64, 8 * 2**i) for i in range(len(tried))]
    fixed = FaissStore.build(x, paths, y, kind="ivf", nlist=64, nprobe=1, recall_queries=300)
    assert fixed.params["nprobe"] == 1 and "tried" not in fixed.recall  # given: measured, not tuned
    assert fixed.recall["recall"] < index.recall["recall"]
    exhaustive = FaissStore.build(x, paths, y, kind="ivf", nlist=64, nprobe=64, recall_queries=300)
    assert exhaustive.recall["recall"] == 1.0  # every list probed: the query itself never counts


def test_exact_neighbours_streamed_equal_one_pass_and_skip_tombstones(data):
    x, y, paths = data
    x, ids, own = x[:1000], np.arange(1000), np.array([3, 50, 999])
    whole = exact_neighbours(x[own], own, [(ids, x)], 10)
    parts = exact_neighbours(x[own], own, [(ids[i : i + 128], x[i : i + 128]) for i in range(0, 1000, 128)], 10)
    np.testing.assert_array_equal(whole, parts)
    assert not (whole == own[:, None]).any()
    index = FaissStore.build(x, paths[:1000], y[:1000], kind="hnsw", recall_queries=0)
    for i in whole[0, :3]:
        index.remove(int(i))
    streamed = list(index._stored_chunks(size=100))
    assert len(streamed) == 10 and sum(len(i) for i, _ in streamed) == 997
    assert not set(whole[0, :3]) & set(np.concatenate([i for i, _ in streamed]).tolist())
    assert index.measure_recall(num_queries=200)["items"] == 997


def test_max_memory_chooses_the_kind_at_build(data, tmp_path):
    x, y, paths = data
    index = FaissStore.build(x, paths, y, kind=None, max_memory="200KB", recall_queries=200)
    assert index.kind == "ivfpq" and index.params["m"] == 8  # 4,000 x 32-d: 8-byte codes (141 KB) fit in 160 KB
    index.save(tmp_path)
    memory = json.loads((tmp_path / META_FILE).read_text())["memory"]
    assert memory["max_memory"] == 2 * 10**5 and "IVF-PQ with 8-byte codes fits" in memory["reason"]
    assert FaissStore.build(x, paths, y, kind=None, max_memory="1GB", recall_queries=0).kind == "exact"
    assert FaissStore.build(x, paths, y, kind="hnsw", max_memory="1.2MB", recall_queries=0).params["M"] == 12


# ------------------------------------------------------------------------------------------------ memory-mapped
@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_a_memory_mapped_index_searches_as_the_loaded_one(kind, saved, data, tmp_path):
    import shutil

    x, y, paths = data
    folder = tmp_path / "idx"
    shutil.copytree(saved[kind], folder)
    loaded, mapped = FaissStore.load(folder), FaissStore.load(folder, mmap=True)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(mapped.index).invlists)
    assert type(lists).__name__ == "OnDiskInvertedLists"  # the lists stay in the file
    assert type(faiss.downcast_InvertedLists(loaded.index.invlists)).__name__ == "ArrayInvertedLists"
    q = x[::97] + 0.01
    for a, b in zip(loaded.search(q, 10), mapped.search(q, 10)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.vector(7), mapped.vector(7))
    with pytest.raises(UserError, match="memory-mapped"):
        mapped.add(x[:1], ["/new.jpg"], [0])
    index_file = json.loads((folder / META_FILE).read_text())["index_file"]
    mapped.remove(3)  # a delete only changes meta.json: saved with the same (content-addressed) faiss file
    mapped.save(folder)
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["index_file"] == index_file and meta["deleted"] == [3]
    assert sorted(p.name for p in folder.iterdir()) == [index_file, META_FILE]
    again = FaissStore.load(folder, mmap=True)
    assert 3 not in again.search(x[3:4], 10)[1] and again.recall == loaded.recall
    mapped.save(tmp_path / "copy")  # saved elsewhere: the file is copied
    assert FaissStore.load(tmp_path / "copy").search(q, 5)[1].tolist() == again.search(q, 5)[1].tolist()


def test_mmap_is_for_ivf_indexes(data, tmp_path):
    x, y, paths = data
    FaissStore.build(x[:500], paths[:500], y[:500], kind="hnsw", recall_queries=0).save(tmp_path)
    with pytest.raises(UserError, match="--mmap maps the inverted lists of an ivf or ivfpq index; .* is hnsw"):
        FaissStore.load(tmp_path, mmap=True)


# ------------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize(
    "value, message",
    [
        ("lots", "argument --max-memory: takes a size such as 512MB, 2GB or 1.5GiB, got 'lots'"),
        ("0", "argument --max-memory: must be positive, got '0'"),
    ],
)
def test_bad_max_memory_is_a_one_line_error(value, message, tmp_path, capsys):
    code, out, err = run_cli(
        ["index", tmp_path / "run", "--images", tmp_path, "--out", tmp_path / "idx", "--max-memory", value], capsys
    )
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("mproxy: error: ") and message in err
    assert not (tmp_path / "idx").exists()


def test_index_with_max_memory_reports_recall_and_retrieve_shows_it(tiny_run, tiny_data, tmp_path, capsys):
    idx = tmp_path / "idx"
    code, out, err = run_cli(["index", tiny_run, "--images", tiny_data, "--out", idx, "--max-memory", "1GB"], capsys)
    assert code == 0, err
    assert "kind: exact" in out and "recall: recall@10 against exact search 1 (exact search, by definition)" in out
    assert [line.split(":")[0] for line in out.splitlines() if "recall" in line] == ["recall"]  # said once
    assert "--max-memory 954 MiB: fewer than 10,000 vectors: exhaustive search" in out
    hnsw = tmp_path / "hnsw"
    code, out, err = run_cli(
        ["index", tiny_run, "--images", tiny_data, "--out", hnsw, "--kind", "hnsw", "--max-memory", "40KB"], capsys
    )  # 64 x (128 + 8 M + 16) <= 32,000: M = 44 -> 32
    assert code == 0 and "kind: hnsw" in out and "recall: recall@10 against exact search" in out, err
    meta = json.loads((hnsw / META_FILE).read_text())
    assert meta["params"]["M"] == 32 and meta["recall"]["queries"] == 64 and meta["recall"]["items"] == 64
    query = tiny_data / "images" / "species_04" / "0002.jpg"
    code, out, err = run_cli(["retrieve", "--index", hnsw, "--query", query, "-k", 3, "--out", tmp_path / "q"], capsys)
    assert code == 0, err
    recall = meta["recall"]["recall"]
    assert f"(hnsw index, recall@10 against exact search {recall:.4g} (64 queries among 64 items" in out
    results = json.loads((tmp_path / "q" / "results.json").read_text())
    assert results["index"]["recall"] == meta["recall"]
    code, _, err = run_cli(
        ["index", tiny_run, "--images", tiny_data, "--out", tmp_path / "none", "--max-memory", "1KB"], capsys
    )
    assert code == 2 and "64 vectors of 32 dimensions do not fit in --max-memory" in err and err.count("\n") == 1
    assert not (tmp_path / "none").exists()
    code, _, err = run_cli(
        ["index", tiny_run, "--images", tiny_data, "--out", f"milvus:{tmp_path}/m.db", "--max-memory", "1GB"], capsys
    )
    assert code == 2 and "--max-memory chooses a faiss index" in err


# ------------------------------------------------------------------------------------------------ the service
def test_stats_show_recall_and_a_memory_mapped_service_refuses_adds(tiny_run, data, tmp_path):
    from fastapi.testclient import TestClient

    from momentum_proxy.runs import model_identity
    from momentum_proxy.serving.app import create_app

    x, y, paths = data
    model = {**model_identity(tiny_run), "runtime": "torch", "verified": True, "tta": "none"}
    FaissStore.build(x, paths, y, kind="ivf", model=model, recall_queries=300).save(tmp_path)
    recall = json.loads((tmp_path / META_FILE).read_text())["recall"]
    with TestClient(create_app(tmp_path, mmap=True), raise_server_exceptions=False) as c:
        stats = c.get("/stats").json()
        assert stats["kind"] == "ivf" and stats["recall"] == recall and stats["mmap"] is True
        hits = c.post("/search", json={"id": 5, "k": 3}).json()["results"]
        assert len(hits) == 3 and 5 not in [h["id"] for h in hits]
        r = c.post("/items", files={"images": ("a.jpg", b"not read", "image/jpeg")})
        assert r.status_code == 422 and "memory-mapped" in r.json()["error"]
        assert not (tmp_path / "images").exists()  # refused before the upload was kept
        assert c.delete("/items/5").json() == {"deleted": 5, "total": len(x) - 1}
    assert FaissStore.load(tmp_path).deleted == {5}


# ------------------------------------------------------------------------------------------------ the benchmark
def test_catalogue_benchmark_at_a_tiny_size(tmp_path):
    """faiss (IVF-PQ: 3,000 x 16-d in 120 KB) loaded and memory-mapped, and Milvus Lite, in fresh processes."""
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "catalogue.py"),
            "--n",
            "3000",
            "--dim",
            "16",
            "--budget",
            "120KB",
            "--queries",
            "100",
            "--clients",
            "1,4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    faiss_row, milvus_row = report["stores"]["faiss"], report["stores"]["milvus"]
    assert faiss_row["build"]["kind"] == "ivfpq" and faiss_row["build"]["plan"]["max_memory"] == 120_000
    assert set(faiss_row["search"]) == {"loaded", "mmap"} and set(milvus_row["search"]) == {"loaded"}
    assert faiss_row["search"]["loaded"]["recall"] == faiss_row["search"]["mmap"]["recall"]
    assert faiss_row["build"]["recall_at_build"]["queries"] == 100
    assert milvus_row["search"]["loaded"]["recall"] == 1.0  # exact (FLAT)
    for row in (faiss_row, milvus_row):
        assert row["build"]["insert_per_s"] > 0 and row["disk_mib"] > 0 and row["build"]["peak_tree_rss_mib"] > 0
        for level in ("1", "4"):
            figures = row["search"]["loaded"]["levels"][level]
            assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert "| faiss (mmap) | ivfpq" in done.stdout and "| milvus | exact" in done.stdout and "goals:" in done.stdout
