"""FaissStore: build/add/save/load round trips, model checks and approximate recall."""

import json
import os

import faiss
import numpy as np
import pytest

from momentum_proxy.errors import UserError
from momentum_proxy.retrieval.faiss_store import META_FILE, FaissStore, default_nlist

MODEL = {"run": "runs/cub-r50", "backbone": "resnet50", "feature_dim": 32, "checkpoint_sha256": "ab12"}


def clustered(n=2000, d=32, classes=50, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, d))[labels] + noise * rng.standard_normal((n, d))
    return x.astype(np.float32), labels, [f"img/{i:05d}.jpg" for i in range(n)]


def test_save_load_add_round_trip_equals_building_at_once(tmp_path):
    x, y, paths = clustered(600)
    whole = FaissStore.build(x, paths, y, model=MODEL)
    part = FaissStore.build(x[:400], paths[:400], y[:400], model=MODEL)
    part.save(tmp_path / "idx")
    loaded = FaissStore.load(tmp_path / "idx", expect_model=MODEL)
    loaded.add(x[400:], paths[400:], y[400:])
    loaded.save(tmp_path / "idx")
    again = FaissStore.load(tmp_path / "idx", expect_model={"backbone": "resnet50"})
    q = x[::37] + 0.01
    for a, b in zip(whole.search(q, 7), again.search(q, 7)):
        np.testing.assert_array_equal(a, b)
    assert again.paths == [os.path.abspath(p) for p in paths] and again.labels == y.tolist() and len(again) == 600
    meta = json.loads((tmp_path / "idx" / META_FILE).read_text())
    assert meta["kind"] == "exact" and meta["feature_dim"] == 32 and meta["model"] == MODEL
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [meta["index_file"], META_FILE]  # no temporaries


def test_search_returns_paths_labels_and_cosine():
    x, y, paths = clustered(300)
    index = FaissStore.build(x, paths, y)
    sims, idx = index.search(x[[5, 17]] * 3.0, 4)  # scale does not matter: cosine
    assert idx[:, 0].tolist() == [5, 17]
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    hits = index.hits(sims, idx)
    assert [h.path for h in hits[0]] == [paths[i] for i in idx[0]]
    assert hits[1][0].path == "img/00017.jpg" and hits[1][0].label == y[17] and hits[1][0].rank == 1
    assert index.search(x[:1], 10_000)[1].shape == (1, 300)  # k clipped to the index size


def test_unlabelled_index(tmp_path):
    x, _, paths = clustered(100)
    index = FaissStore.build(x, paths)
    index.save(tmp_path)
    loaded = FaissStore.load(tmp_path)
    assert loaded.labels is None and loaded.hits(*loaded.search(x[:1], 1))[0][0].label is None
    with pytest.raises(UserError, match="no labels"):
        loaded.add(x[:2], paths[:2], [0, 1])


def test_model_or_feature_dim_mismatch_refused(tmp_path):
    x, y, paths = clustered(200)
    FaissStore.build(x, paths, y, model=MODEL).save(tmp_path)
    with pytest.raises(UserError, match="built with checkpoint_sha256='ab12', not 'ffff'"):
        FaissStore.load(tmp_path, expect_model={**MODEL, "checkpoint_sha256": "ffff"})
    with pytest.raises(UserError, match="feature_dim=32, not 64"):
        FaissStore.load(tmp_path, expect_model={"feature_dim": 64})
    with pytest.raises(UserError, match="built with image_size=None"):
        FaissStore.load(tmp_path, expect_model={"image_size": 224})
    index = FaissStore.load(tmp_path)
    with pytest.raises(UserError, match="64 dimensions, the index 32"):
        index.search(np.ones((1, 64)), 5)
    with pytest.raises(UserError, match="64 dimensions, the index 32"):
        index.add(np.ones((1, 64)), ["a.jpg"], [0])


def test_corrupt_or_missing_index_refused(tmp_path):
    with pytest.raises(UserError, match="no retrieval index"):
        FaissStore.load(tmp_path)
    x, y, paths = clustered(100)
    FaissStore.build(x, paths, y).save(tmp_path)
    FaissStore.build(x[:50], paths[:50], y[:50]).save(tmp_path / "other")
    current = json.loads((tmp_path / META_FILE).read_text())["index_file"]
    next((tmp_path / "other").glob("*.faiss")).replace(tmp_path / current)  # e.g. a file changed behind its back
    with pytest.raises(UserError, match="does not match"):
        FaissStore.load(tmp_path)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_vs_exact(kind, tmp_path):
    x, y, paths = clustered(3000, classes=300, noise=1.0)  # overlapping classes: ivf misses some (~0.93)
    index = FaissStore.build(x[:2000], paths[:2000], y[:2000], kind=kind)
    index.add(x[2000:], paths[2000:], y[2000:])
    recall = index.recall_vs_exact(10, num_queries=500)
    assert 0.9 <= recall <= 1.0
    index.save(tmp_path)
    loaded = FaissStore.load(tmp_path)
    assert loaded.kind == kind and loaded.params == index.params
    assert loaded.recall_vs_exact(10, num_queries=500) == recall
    sims, idx = loaded.search(x[:50], 10)
    assert (idx[:, 0] == np.arange(50)).mean() >= 0.9


def test_exact_recall_is_one_and_ivf_params():
    x, y, paths = clustered(500)
    assert FaissStore.build(x, paths, y).recall_vs_exact(5) == 1.0
    assert default_nlist(1) == 1 and default_nlist(500) == 12 and default_nlist(1_000_000) == 4000
    ivf = FaissStore.build(x, paths, y, kind="ivf", nlist=4, nprobe=100)
    assert ivf.params == {"nlist": 4, "nprobe": 4}
    assert ivf.recall_vs_exact(5) == 1.0  # all lists probed: exhaustive


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="lsh"), "unknown index kind"),
        (dict(kind="ivf", nlist=0), "nlist"),
        (dict(kind="ivf", nprobe=0), "nprobe"),
        (dict(paths=["a.jpg"]), "1 paths for 20"),
        (dict(labels=[1, 2]), "2 entries"),
    ],
)
def test_build_rejects_bad_input(kwargs, message):
    x, y, paths = clustered(20)
    args = dict(features=x, paths=paths, labels=y) | kwargs
    with pytest.raises(UserError, match=message):
        FaissStore.build(args.pop("features"), args.pop("paths"), args.pop("labels"), **args)


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_deleted_items_keep_ids_and_never_come_back(kind, tmp_path):
    x, y, paths = clustered(600)
    index = FaissStore.build(x, paths, y, kind=kind, nlist=4, nprobe=4)
    sims, idx = index.search(x[:3], 5)
    gone = {int(i) for i in idx[:, :2].ravel()}  # each query's two best, itself included
    for i in gone:
        index.remove(i)
    index.save(tmp_path)
    loaded = FaissStore.load(tmp_path)
    assert len(loaded) == 600 - len(gone) and loaded.ntotal == 600 and loaded.deleted == gone
    sims2, idx2 = loaded.search(x[:3], 5)
    assert not gone & set(idx2.ravel().tolist()) and (idx2 >= 0).all()
    # the survivors keep their ids and order: the old top-5 minus the deleted ones lead the new list
    for old, new in zip(idx, idx2):
        survivors = [i for i in old if i not in gone]
        assert new[: len(survivors)].tolist() == survivors
    assert loaded.search(x[:1], 5, exclude=[int(idx2[0, 0])])[1][0, 0] == idx2[0, 1]
    new_ids = loaded.add(x[:2] + 0.01, ["new/a.jpg", "new/b.jpg"], [0, 1])
    assert new_ids == [600, 601] and loaded.item(600)["path"].endswith("new/a.jpg")
    with pytest.raises(UserError, match="no item with id"):
        loaded.item(next(iter(gone)))


def test_save_is_crash_safe_and_paths_work_from_anywhere(tmp_path, monkeypatch):
    x, y, paths = clustered(50)
    folder = tmp_path / "idx"
    inside = [str(folder / "images" / f"{i}.jpg") for i in range(50)]
    monkeypatch.chdir(tmp_path)
    index = FaissStore.build(x, inside, y, classes={int(c): f"class {c}" for c in set(y)})
    index.save("idx")
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["paths"][0] == os.path.join("images", "0.jpg")  # inside the folder: relative to it
    # a save killed after writing its faiss file but before committing meta.json leaves the previous index
    index.add(x[:5], ["/elsewhere/a.jpg"] * 5, y[:5])
    snapshot = index.snapshot()
    (folder / "index-0123456789abcdef.faiss").write_bytes(faiss.serialize_index(index.index).tobytes())
    monkeypatch.chdir("/")
    again = FaissStore.load(folder)
    assert len(again) == 50 and again.paths == inside and again.item(3)["class_name"] == f"class {y[3]}"
    snapshot.write(folder)
    assert len(FaissStore.load(folder)) == 55 and FaissStore.load(folder).paths[-1] == "/elsewhere/a.jpg"
    assert sorted(p.name for p in folder.iterdir()) == [
        json.loads((folder / META_FILE).read_text())["index_file"],
        META_FILE,
    ]


def test_format_1_is_read_and_unknown_formats_refused(tmp_path, monkeypatch):
    x, y, paths = clustered(40)
    faiss.write_index(faiss.IndexFlatIP(32), str(tmp_path / "index.faiss"))
    flat = faiss.read_index(str(tmp_path / "index.faiss"))
    flat.add(x / np.linalg.norm(x, axis=1, keepdims=True))
    faiss.write_index(flat, str(tmp_path / "index.faiss"))
    from momentum_proxy.fileio import file_sha256

    v1 = {
        "format_version": 1,
        "kind": "exact",
        "metric": "cosine",
        "feature_dim": 32,
        "count": 40,
        "params": {},
        "model": MODEL,
        "index_sha256": file_sha256(tmp_path / "index.faiss"),
        "paths": paths,
        "labels": y.tolist(),
    }
    (tmp_path / META_FILE).write_text(json.dumps(v1))
    monkeypatch.chdir(tmp_path)
    old = FaissStore.load(tmp_path)
    assert old.paths[0] == str(tmp_path / "img" / "00000.jpg") and old.search(x[:1], 1)[1][0, 0] == 0
    old.save(tmp_path)  # upgraded in place to the current format
    assert not (tmp_path / "index.faiss").exists() and FaissStore.load(tmp_path).paths == old.paths
    (tmp_path / META_FILE).write_text(json.dumps({**v1, "format_version": 9}))
    with pytest.raises(UserError, match="not a retrieval index of format 1 or 2; rebuild it with `mproxy index"):
        FaissStore.load(tmp_path)


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_vector_of_an_item_after_save_load_and_add(kind, tmp_path):
    x, y, paths = clustered(300)
    index = FaissStore.build(x[:200], paths[:200], y[:200], kind=kind)
    index.add(x[200:], paths[200:], y[200:])
    index.save(tmp_path)
    loaded = FaissStore.load(tmp_path)
    loaded.add(x[:1] + 1, ["new.jpg"], [0])
    for i, row in ((250, x[250]), (300, x[0] + 1)):
        np.testing.assert_allclose(loaded.vector(i)[0], row / np.linalg.norm(row), atol=1e-5)


def test_vectors_stay_numpy_after_pytorch_metric_learning_patches_faiss():
    import faiss.contrib.torch_utils  # noqa: F401  (what pytorch-metric-learning imports: torch-returning methods)

    x, y, paths = clustered(50)
    index = FaissStore.build(x, paths, y)
    assert isinstance(index.vector(3), np.ndarray) and index.vector(3).shape == (1, x.shape[1])
    assert index.recall_vs_exact(k=5) == 1.0
