"""The index-store contract, run on every store: a faiss folder and Milvus Lite (the real engine, embedded in the
test process). Plus what only a Milvus store has: a server that goes away and comes back."""

import ast
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from momentum_proxy.errors import UserError
from momentum_proxy.retrieval.store import StoreUnavailable
from momentum_proxy.retrieval.stores import build_store, check_not_being_written, open_store, store_exists, writer_lock

MODEL = {"backbone": "efficientnet_lite0", "checkpoint_sha256": "ab" * 32, "runtime": "torch"}
CLASSES = {0: "oak", 1: "ash", 2: "elm"}


@pytest.fixture(params=["faiss", "milvus", pytest.param("milvus-server", marks=pytest.mark.slow)])
def location(request, tmp_path):
    """Where a store is made: a folder (faiss), a Milvus Lite file, or a collection of its own on a real Milvus
    server (`conftest.milvus_server`, started once; slow)."""
    if request.param == "milvus-server":
        return f"milvus://127.0.0.1:{request.getfixturevalue('milvus_server')}/store_{uuid.uuid4().hex[:8]}"
    return str(tmp_path / "idx") if request.param == "faiss" else f"milvus:{tmp_path}/idx.db"


def vectors(n, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def paths(n, start=0):
    return [f"/photos/tree {i}/ø{i}.jpg" for i in range(start, start + n)]


@pytest.fixture
def saved(location):
    """A saved store of 12 labelled items (labels 0-2 named, 5 and 11 of unknown class), reopened."""
    labels = [i % 3 for i in range(12)]
    labels[5] = labels[11] = -1
    built = build_store(location, vectors(12), paths(12), labels, model=MODEL, classes=CLASSES)
    built.save(location)
    built.close()
    store = open_store(location)
    yield store
    store.close()


def test_exact_cosine_search_equals_brute_force(saved):
    x, q = unit(vectors(12)), vectors(3, seed=1)
    scores, ids = saved.search(q, 4)
    expected = np.argsort(-(unit(q) @ x.T), axis=1)[:, :4]
    assert ids.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, np.take_along_axis(unit(q) @ x.T, expected, 1), atol=1e-5)
    np.testing.assert_allclose(saved.vector(7), x[7:8], atol=1e-6)
    assert (saved.feature_dim, saved.ntotal, len(saved), saved.kind) == (8, 12, 12, "exact")


def test_metadata_labels_class_names_paths(saved):
    assert saved.item(4) == {"id": 4, "path": paths(12)[4], "label": 1, "class_name": "ash"}
    assert saved.item(5) == {"id": 5, "path": paths(12)[5], "label": None, "class_name": None}
    assert saved.model == MODEL and saved.classes == CLASSES and saved.labelled
    assert saved.ids_of([paths(12)[3], "/not/indexed.jpg"]) == {paths(12)[3]: 3}
    assert saved.file_ids(paths(12)[9]) == {9}
    assert [it["id"] for it in saved.live_items()] == list(range(12))
    hits = saved.hits(*saved.search(vectors(12)[2:3], 2))[0]
    assert [(h.rank, h.id, h.class_name) for h in hits][0] == (1, 2, "elm")


def test_add_remove_ids_never_reused_across_saves(saved, location):
    new = saved.add(vectors(2, seed=5), paths(2, 100), [saved.label_for("pine"), 0])
    assert new == [12, 13] and saved.item(12)["class_name"] == "pine" and saved.item(12)["label"] == 3
    saved.remove(13)
    saved.remove(0)
    with pytest.raises(UserError, match="no item with id 13"):
        saved.remove(13)
    assert not saved.exists(13) and saved.exists(12) and len(saved) == 12 and saved.ntotal == 14
    with pytest.raises(UserError, match="no item with id 0"):
        saved.item(0)
    assert 0 not in saved.search(vectors(1), 20)[1] and saved.ids_of([paths(12)[0]]) == {}
    ids, x = saved.live_vectors()  # what re-ranking reads
    assert ids.tolist() == list(range(1, 13)) and np.allclose(x[:11], unit(vectors(12))[1:], atol=1e-6)
    saved.save(location)
    saved.close()
    again = open_store(location)
    try:
        assert len(again) == 12 and not again.exists(13) and again.classes[3] == "pine"
        assert again.add(vectors(1, seed=6), paths(1, 200), [2]) == [14]  # not 13: a removed id stays unused
        with pytest.raises(UserError, match="labels must be given for every item or for none"):
            again.add(vectors(1, seed=7), paths(1, 300))
    finally:
        again.close()


def test_exclude_k_larger_than_the_store_and_empty(saved):
    q = vectors(12)[4:5]
    scores, ids = saved.search(q, 1000, exclude={4, 6, 99})
    assert sorted(ids[0].tolist()) == [i for i in range(12) if i not in (4, 6)]  # every other item, no padding
    assert list(scores[0]) == sorted(scores[0], reverse=True)
    with pytest.raises(UserError, match="k must be at least 1"):
        saved.search(q, 0)
    for i in range(12):
        saved.remove(i)
    with pytest.raises(UserError, match="index must not be empty"):
        saved.search(q, 3)


def test_model_identity_refusal(saved, location):
    assert open_store(location, expect_model={"backbone": "efficientnet_lite0"}).model == MODEL
    with pytest.raises(UserError, match="built with checkpoint_sha256='abab.*rebuild it for this model"):
        open_store(location, expect_model={"checkpoint_sha256": "cd" * 32})
    with pytest.raises(UserError, match="built with feature_dim=8, not 16"):
        open_store(location, expect_model={"feature_dim": 16})


def test_a_new_build_replaces_the_store_only_once_saved(saved, location):
    rebuilt = build_store(location, vectors(3, seed=9), paths(3, 50), model=MODEL)
    assert len(open_store(location)) == 12  # the old store until the save
    rebuilt.save(location)
    rebuilt.close()
    now = open_store(location)
    assert len(now) == 3 and not now.labelled and now.item(0)["path"] == paths(3, 50)[0]
    with pytest.raises(UserError, match="this index has no labels"):
        now.add(vectors(1), paths(1, 60), [0])


def test_unlabelled_store_becomes_labelled_by_a_class_name(location):
    store = build_store(location, vectors(2), paths(2))
    store.save(location)
    assert not store.labelled and store.item(0)["label"] is None
    label = store.label_for("birch")
    assert store.labelled and store.add(vectors(1, seed=3), paths(1, 9), [label]) == [2]
    assert store.item(2)["class_name"] == "birch" and store.item(0)["class_name"] is None
    store.save(location)
    store.close()
    assert store_exists(location) and open_store(location).labelled


def test_exact_stores_answer_the_planning_recall_and_memory_calls(saved):
    """What callers ask of any store (no class checks): recall 1 by definition, nothing to tune, memory known
    where it is this process's."""
    exact = {"k": 10, "recall": 1.0, "exact": True}
    x = unit(vectors(12))
    truth = [[i for i in np.argsort(-(x @ x[q])) if i != q][:3] for q in (0, 7)]  # exact top 3, each without itself
    assert saved.recall_info() == exact and saved.measure_recall(tune=True) == exact
    assert saved.tune(x[[0, 7]], [0, 7], np.array(truth))["recall"] == 1.0
    memory = saved.memory_info()
    assert memory is None or memory["estimated_bytes"] == 4 * 8 * 12  # faiss: exact, 12 vectors of 8 floats


def test_attachments_are_saved_with_the_store_and_read_back(saved, location):
    big = np.random.default_rng(0).bytes(150_000)  # more than one Milvus row holds
    saved.attach("notes", b"first")
    saved.attach("lists", big)
    with pytest.raises(ValueError, match="attachment names"):
        saved.attach("../x", b"")
    saved.save(location)
    saved.close()
    again = open_store(location)
    assert again.attachment("notes") == b"first" and again.attachment("lists") == big
    again.attach("notes", b"second")
    again.attach("lists", None)
    again.save(location)
    again.close()
    last = open_store(location)
    try:
        assert last.attachment("notes") == b"second" and last.attachment("lists") is None
        assert last.attachments() == {"notes": b"second"}
    finally:
        last.close()
    if not location.startswith("milvus:"):  # one file per attachment, the replaced ones removed
        assert sorted(p.name.split("-")[1] for p in Path(location).glob("attachment-*")) == ["notes"]


def same_lists(a, b) -> bool:
    return np.array_equal(a.ids, b.ids) and np.array_equal(a.lists, b.lists) and np.allclose(a.sims, b.sims, atol=1e-6)


def test_neighbour_lists_are_saved_loaded_not_recomputed_and_kept_right(location, monkeypatch):
    from momentum_proxy.retrieval.rerank import NEIGHBOURS, Neighbours, Rerank, kept_neighbours, rerank_store

    computed, compute = [], Neighbours.compute.__func__

    def neighbour_lists_now(store, size):  # the reference: computed anew (not counted)
        return compute(Neighbours, *store.live_vectors(), size)

    monkeypatch.setattr(Neighbours, "compute", classmethod(lambda cls, *a: computed.append(a[2]) or compute(cls, *a)))
    rerank, q = Rerank("dba", k=4), vectors(2, seed=3)
    built = build_store(location, vectors(40), paths(40), model=MODEL)
    before = rerank_store(built, q, 5, rerank)
    assert computed == [5]  # k + 1 spare
    built.save(location)
    built.close()
    store = open_store(location)  # a fresh store object, as another process gets it
    try:
        assert same_lists(kept_neighbours(store), neighbour_lists_now(store, 5))
        after = rerank_store(store, q, 5, rerank)
        assert computed == [5]  # loaded, not computed
        np.testing.assert_array_equal(after[1], before[1])
        store.add(vectors(6, seed=4), paths(6, 100))
        store.remove(3)
        store.remove(41)
        assert same_lists(
            store_lists := Neighbours.from_bytes(store.attachments()[NEIGHBOURS]), neighbour_lists_now(store, 5)
        ), "a snapshot takes the lists up to date"
        rerank_store(store, q, 5, rerank)
        assert same_lists(kept_neighbours(store), store_lists) and computed == [5]  # updated, not computed
        store.save(location)
    finally:
        store.close()
    last = open_store(location)
    try:
        assert same_lists(Neighbours.from_bytes(last.attachment(NEIGHBOURS)), neighbour_lists_now(last, 5))
    finally:
        last.close()


def concrete_store_checks(tree, store_classes: set[str]):
    """(line, text) of each isinstance/issubclass/type(...) test of one of `store_classes` in a parsed module."""
    for node in ast.walk(tree):
        tested = []
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
            tested = node.args[1:]
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.left, ast.Call)
            and getattr(node.left.func, "id", None) == "type"
        ):
            tested = node.comparators
        names = {getattr(n, "id", None) or getattr(n, "attr", None) for t in tested for n in ast.walk(t)}
        if names & store_classes:
            yield node.lineno, ast.unparse(node)


def test_no_code_tests_for_a_concrete_store_outside_its_module():
    """`IndexStore` is the only path: no isinstance (issubclass, type() ==) check of a store class in the
    package or the benchmarks, except in the class's own module."""
    root = Path(__file__).parent.parent
    files = sorted([*(root / "momentum_proxy").rglob("*.py"), *(root / "benchmarks").rglob("*.py")])
    trees = {f: ast.parse(f.read_text(), str(f)) for f in files}
    owners = {
        node.name: f
        for f, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any("IndexStore" in ast.unparse(b) or "Store" in ast.unparse(b) for b in node.bases)
    }
    assert {"FaissStore", "MilvusStore"} <= set(owners)
    found = [
        f"{f.relative_to(root)}:{line}: {text}"
        for f, tree in trees.items()
        for line, text in concrete_store_checks(tree, {n for n, home in owners.items() if home != f})
    ]
    assert not found, "\n".join(found)


# ----------------------------------------------------------------------------------------------- Milvus only
def test_an_unreachable_server_is_one_line_and_the_store_recovers(server):
    location, stop, start = server
    assert not store_exists(location)
    built = build_store(location, vectors(5), paths(5), model=MODEL)
    built.save(location)
    store = open_store(location)
    before = store.search(vectors(1), 3)
    stop()
    with pytest.raises(
        StoreUnavailable,
        match=r"^the Milvus store milvus://127\.0\.0\.1:\d+/products cannot be "
        r"reached: [^\n]*$",
    ):
        store.search(vectors(1), 3)
    start()
    np.testing.assert_array_equal(store.search(vectors(1), 3)[1], before[1])
    assert len(store) == 5 and store.add(vectors(1, seed=2), paths(1, 7)) == [5]


def test_a_killed_build_leaves_the_old_store_and_its_collections_go_with_the_next(server):
    from pymilvus import MilvusClient

    location, _, _ = server
    first = build_store(location, vectors(4), paths(4), model=MODEL)
    first.save(location)
    build_store(location, vectors(2), paths(2, 10), model=MODEL).close()  # never saved: a killed rebuild
    assert [it["path"] for it in open_store(location).live_items()] == paths(4)
    last = build_store(location, vectors(3), paths(3, 20), model=MODEL)
    last.save(location)
    client = MilvusClient(location.replace("milvus://", "http://").rsplit("/", 1)[0])
    assert sorted(client.list_collections()) == [last.name, f"{last.name}_meta"]
    assert client.describe_alias("products")["collection_name"] == last.name


def test_milvus_writes_are_persisted_before_they_return(tmp_path):
    location = f"milvus:{tmp_path}/idx.db"
    built = build_store(location, vectors(3), paths(3), model=MODEL)
    built.save(location)
    assert built.add(vectors(2, seed=4), paths(2, 10)) == [3, 4]  # no save: a process killed here keeps them
    built.remove(4)
    built.close()
    store = open_store(location)
    assert len(store) == 4 and store.item(3)["path"] == paths(1, 10)[0] and not store.exists(4)
    assert store.add(vectors(1, seed=5), paths(1, 20)) == [5]


def test_a_server_store_keeps_its_attachments_across_a_server_restart(server):
    location, stop, start = server
    built = build_store(location, vectors(5), paths(5), model=MODEL)
    built.attach("notes", b"notes" * 20_000)  # 100 kB: three rows
    built.save(location)
    stop()
    with pytest.raises(StoreUnavailable):  # the server is down
        built.search(vectors(1), 1)
    built.close()
    start()
    store = open_store(location)
    try:
        assert store.attachment("notes") == b"notes" * 20_000
    finally:
        store.close()


def test_the_early_writer_check_refuses_a_held_store_at_once_and_holds_nothing(tmp_path):
    folder = tmp_path / "idx"
    check_not_being_written(folder)  # no folder yet
    folder.mkdir()
    check_not_being_written(folder)  # no lock file: never held
    assert list(folder.iterdir()) == []  # the check creates nothing
    with writer_lock(folder, "mproxy serve"):
        with pytest.raises(UserError) as refused:
            check_not_being_written(folder)
    holder = f"pid {os.getpid()} (mproxy serve)"
    assert str(refused.value) == f"{folder.absolute()} is being written by {holder}; stop it first"
    check_not_being_written(folder)  # released with the block
    with writer_lock(folder, "mproxy index"):  # the passing check left no lock behind
        pass
    lite = f"milvus:{tmp_path / 'store.db'}"
    check_not_being_written(lite)  # Milvus Lite: its files folder holds no lock yet
    with writer_lock(lite, "mproxy index"), pytest.raises(UserError, match=r"store\.files is being written by"):
        check_not_being_written(lite)
    check_not_being_written("milvus://localhost:19530/products")  # a server: the operator's to lock; nothing touched
