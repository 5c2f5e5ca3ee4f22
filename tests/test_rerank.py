"""Re-ranking (retrieval/rerank.py): each method against a brute-force reference written from its definition,
leave-one-out without leaks, the index's neighbour lists kept up to date, and the command line."""

import itertools
import json

import numpy as np
import pytest
from conftest import run_cli

from momentum_proxy.data.loading import eval_dataset
from momentum_proxy.data.manifest import read_manifest, split_frame
from momentum_proxy.embedding.inference import TorchEmbedder, embed_dataset
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.metrics import evaluate_embeddings
from momentum_proxy.retrieval.faiss_store import FaissStore
from momentum_proxy.retrieval.rerank import Neighbours, Rerank, kept_neighbours, kept_size, rerank_knn, rerank_store
from momentum_proxy.vectors import knn


# ----------------------------------------------------------------------------------- references (float64, loops)
def nearest(sims, among, k):
    """The k of `among` with the largest sims, ties (equal to 9 decimals) by id."""
    return sorted(among, key=lambda j: (-round(sims[j], 9), j))[:k]


def ref_aqe(q, x, k, alpha):
    s = x @ q
    expanded = q + sum(max(s[j], 0) ** alpha * x[j] for j in nearest(s, range(len(x)), k))
    return x @ (expanded / np.linalg.norm(expanded))


def ref_augmented(x, k, alpha):
    y = []
    for a in range(len(x)):
        s = x @ x[a]
        v = x[a] + sum(max(s[j], 0) ** alpha * x[j] for j in nearest(s, [j for j in range(len(x)) if j != a], k))
        y.append(v / np.linalg.norm(v))
    return np.array(y)


def ref_dba(q, x, k, alpha):
    return ref_augmented(x, k, alpha) @ q


def ref_dba_aqe(q, x, k, alpha):
    return ref_aqe(q, ref_augmented(x, k, alpha), k, alpha)


def ref_kreciprocal(q, x, k1, k2, lam):
    """Zhong et al.'s sets and Jaccard distance; the items' own neighbourhoods, the query Q inserted for its own."""
    n, Q = len(x), "Q"
    gram, s = x @ x.T, x @ q

    def sim(a, b):
        if a == b:
            return 1.0
        return s[b] if a == Q else s[a] if b == Q else gram[a, b]

    def big_n(a, m):  # a and its m - 1 nearest items
        if a == Q:
            return [Q] + nearest(s, range(n), m - 1)
        return [a] + nearest(gram[a], [j for j in range(n) if j != a], m - 1)

    def q_in_big_n(g, m):  # Q would be among g's m - 1 nearest others (ties: items first)
        return sum(1 for j in range(n) if j != g and gram[g, j] >= s[g]) < m - 1

    def r(a, m):
        if a == Q:
            return {Q} | {g for g in big_n(Q, m + 1)[1:] if q_in_big_n(g, m + 1)}
        return {b for b in big_n(a, m + 1) if a in big_n(b, m + 1)}

    h = round(k1 / 2)

    def v(a):
        star = set(r(a, k1))
        for c in r(a, k1):
            if len(r(c, h) & r(a, k1)) >= 2 / 3 * len(r(c, h)):
                star |= r(c, h)
        w = {b: np.exp(-(1 - sim(a, b))) for b in star}
        return {b: wb / sum(w.values()) for b, wb in w.items()}

    def v_expanded(a):
        members = big_n(a, k2)
        out = {}
        for m in members:
            for b, wb in v(m).items():
                out[b] = out.get(b, 0) + wb / len(members)
        return out

    vq = v_expanded(Q)
    scores = []
    for g in range(n):
        vg = v_expanded(g)
        keys = vq.keys() | vg.keys()
        jaccard = 1 - sum(min(vq.get(b, 0), vg.get(b, 0)) for b in keys) / sum(
            max(vq.get(b, 0), vg.get(b, 0)) for b in keys
        )
        scores.append((1 - lam) * (1 - jaccard) + lam * s[g])
    return np.array(scores)


REFERENCES = {
    "aqe": lambda q, x, r: ref_aqe(q, x, r.k, r.alpha),
    "dba": lambda q, x, r: ref_dba(q, x, r.k, r.alpha),
    "dba+aqe": lambda q, x, r: ref_dba_aqe(q, x, r.k, r.alpha),
    "kreciprocal": lambda q, x, r: ref_kreciprocal(q, x, r.k, r.k2, r.lam),
    "none": lambda q, x, r: x @ q,
}


def assert_matches(reference, scores, idx):
    """Re-ranked (scores, idx) of one query over the whole collection are the reference's scores, best first
    (items whose scores are equal but for float32 rounding may come in either order)."""
    assert sorted(idx) == list(range(len(reference)))
    np.testing.assert_allclose(scores, reference[idx], atol=1e-5)
    assert (np.diff(np.round(reference[idx], 5)) <= 0).all()


def dyadic_vectors():
    """Unit vectors whose inner products are exact in float32: many exact ties, duplicates included."""
    axes = [v for i in range(4) for v in (np.eye(4)[i], -np.eye(4)[i])]
    halves = [np.array(signs) / 2 for signs in itertools.product((1, -1), repeat=4)]
    return np.array(axes + halves, np.float32)


SETTINGS = [
    Rerank("aqe", k=3, alpha=0, keep=0),
    Rerank("aqe", k=2, alpha=3, keep=0),
    Rerank("dba", k=3, alpha=0, keep=0),
    Rerank("dba", k=2, alpha=2, keep=0),
    Rerank("dba+aqe", k=3, alpha=1, keep=0),
    Rerank("kreciprocal", k=4, k2=3, lam=0.3, keep=0),
    Rerank("kreciprocal", k=3, k2=1, lam=0, keep=0),
    Rerank("kreciprocal", k=6, k2=4, lam=0.5, keep=0),
    Rerank("none"),
]  # each method alone (keep 0)


@pytest.mark.parametrize("rerank", SETTINGS, ids=str)
def test_each_method_matches_its_definition_with_ties_and_duplicates(rerank):
    v = dyadic_vectors()
    gallery = v[[0, 0, 8, 9, 9, 10, 12, 2, 15, 4, 17, 8]]  # duplicates, and many equal similarities
    queries = v[[8, 1, 20, 9]]
    scores, idx = rerank_knn(queries, gallery, len(gallery), rerank)
    for q, s, i in zip(queries.astype(np.float64), scores, idx):
        assert_matches(REFERENCES[rerank.method](q, gallery.astype(np.float64), rerank), s, i)


@pytest.mark.parametrize(
    "rerank",
    [
        Rerank("aqe", k=9, keep=0),
        Rerank("dba", k=9, keep=0),
        Rerank("dba+aqe", k=20, keep=0),
        Rerank("kreciprocal", k=12, k2=9, keep=0),
    ],
    ids=str,
)
def test_k_larger_than_the_collection_takes_every_item(rerank):
    rng = np.random.default_rng(1)
    gallery, queries = rng.normal(size=(5, 6)), rng.normal(size=(2, 6))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, idx = rerank_knn(queries, gallery, 50, rerank)
    assert idx.shape == (2, 5)
    for q, s, i in zip(queries, scores, idx):
        assert_matches(REFERENCES[rerank.method](q, gallery, rerank), s, i)


@pytest.mark.parametrize("method, keep", [("dba", 1), ("dba+aqe", 1), ("aqe", 2), ("kreciprocal", 3), ("dba", 12)])
def test_keep_puts_the_plain_cosine_hits_first_and_reranks_the_rest(method, keep):
    v = dyadic_vectors()
    gallery = v[[0, 0, 8, 9, 9, 10, 12, 2, 15, 4, 17, 8]]  # ties: the first of equals (by position) is kept
    queries = v[[8, 1, 20, 9]]
    alone = Rerank(method, keep=0)
    scores, idx = rerank_knn(queries, gallery, 6, Rerank(method, keep=keep))
    pure_scores, pure_idx = rerank_knn(queries, gallery, len(gallery), alone)
    plain = knn(queries, gallery, min(keep, 6))[1]
    for row in range(len(queries)):
        first = list(plain[row])
        assert list(idx[row][: len(first)]) == first
        assert list(idx[row][len(first) :]) == [i for i in pure_idx[row] if i not in first][: 6 - len(first)]
        by_item = dict(zip(pure_idx[row], pure_scores[row]))  # every hit keeps its re-ranked score
        np.testing.assert_allclose(scores[row], [by_item[i] for i in idx[row]], atol=1e-6)


def test_keep_leaves_the_left_out_query_out_and_defaults_to_one_for_a_method():
    x = unit_rows(30)
    _, idx = rerank_knn(x, x, 5, Rerank("dba", k=3), exclude_self=True)
    plain = knn(x, x, 1, exclude_self=True)[1][:, 0]
    assert (idx[:, 0] == plain).all() and (idx != np.arange(30)[:, None]).all()
    assert Rerank("dba").keep == 1 and Rerank().keep == 0
    assert Rerank("dba").to_dict() == {"method": "dba", "k": 5, "alpha": 3.0, "keep": 1}
    assert str(Rerank("dba", keep=0)) == "dba (k 5, alpha 3, keep 0)"


def unit_rows(n, d=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "rerank",
    [
        Rerank("aqe", k=3),
        Rerank("dba", k=3),
        Rerank("dba+aqe", k=2),
        Rerank("kreciprocal", k=3, k2=2),
        Rerank("kreciprocal", k=5, k2=4, lam=0.2),
    ],
    ids=str,
)
def test_leave_one_out_scores_do_not_change_when_the_query_enters_the_collection(rerank):
    x = unit_rows(40)
    loo_scores, loo_idx = rerank_knn(x, x, 39, rerank, exclude_self=True)
    for i in range(40):
        others = np.delete(np.arange(40), i)
        alone_scores, alone_idx = rerank_knn(x[i : i + 1], x[others], 39, rerank)  # the collection without i
        assert list(others[alone_idx[0]]) == list(loo_idx[i])
        np.testing.assert_allclose(loo_scores[i], alone_scores[0], atol=1e-6)
    if rerank.method != "aqe":  # the database side over all 40 items (the query inside) would score otherwise
        leaky = rerank_knn(x, x, 40, rerank)[0][:, 1:]
        assert np.abs(leaky - loo_scores).max() > 1e-3


def test_evaluation_uses_the_leave_one_out_lists():
    x, labels = unit_rows(30, seed=3), np.repeat(np.arange(6), 5)
    rerank = Rerank("dba", k=2)
    res = evaluate_embeddings(x, labels, metrics=["recall"], recalls=[1, 2], rerank=rerank)
    idx = rerank_knn(x, x, 2, rerank, exclude_self=True)[1]
    for k in (1, 2):
        found = [(labels[row[:k]] == y).any() for row, y in zip(idx, labels)]
        assert res[f"recall@{k}"] == pytest.approx(np.mean(found))


# ----------------------------------------------------------------------------------- the index's neighbour lists
def assert_same_lists(a: Neighbours, b: Neighbours):
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.lists, b.lists)
    np.testing.assert_allclose(a.sims, b.sims, atol=1e-6)


def test_neighbour_lists_follow_adds_and_removes_as_if_computed_anew(tmp_path):
    x = unit_rows(60, seed=4)
    store = FaissStore.build(x[:40], [f"{i}.jpg" for i in range(40)])
    rerank = Rerank("kreciprocal", k=4, k2=3)
    rerank_store(store, x[0:1], 5, rerank)  # computes the lists
    store.save(tmp_path / "idx")
    store = FaissStore.load(tmp_path / "idx")
    assert kept_neighbours(store) is not None and kept_size(store) == 5  # saved with the index
    for i in (3, 7, 8, 21):
        store.remove(i)
    store.add(x[40:60], [f"{i}.jpg" for i in range(40, 60)])
    store.remove(45)
    store.save(tmp_path / "idx")  # a save brings the lists up to date
    live = np.array([i for i in range(60) if store.exists(i)])
    store = FaissStore.load(tmp_path / "idx")
    assert_same_lists(kept_neighbours(store), Neighbours.compute(live, x[live], 5))
    got, got_ids = rerank_store(store, x[50:52], 10, rerank, exclude=[51])
    ref_scores, ref_idx = rerank_knn(x[50:52], x[live[live != 51]], 10, rerank)
    assert np.array_equal(got_ids, live[live != 51][ref_idx])
    np.testing.assert_allclose(got, ref_scores, atol=1e-6)
    store.remove(52)  # and a search between saves sees the change
    assert 52 not in rerank_store(store, x[50:51], 60, rerank)[1]
    assert_same_lists(kept_neighbours(store), Neighbours.compute(live[live != 52], x[live[live != 52]], 5))


def test_lists_saved_before_attachments_are_read_and_moved_on_the_next_save(tmp_path):
    from momentum_proxy.fileio import read_json, write_json

    x, folder = unit_rows(20, seed=6), tmp_path / "idx"
    store = FaissStore.build(x, [f"{i}.jpg" for i in range(20)])
    rerank_store(store, x[:1], 3, Rerank("dba", k=2))
    store.save(folder)
    meta = read_json(folder / "meta.json")  # as the previous version wrote it
    record = meta.pop("attachments")["neighbours"]
    (folder / record["file"]).rename(folder / "neighbours-0123456789abcdef.npz")
    write_json(
        folder / "meta.json",
        {**meta, "neighbours_file": "neighbours-0123456789abcdef.npz", "neighbours_sha256": record["sha256"]},
    )
    old = FaissStore.load(folder)
    assert kept_size(old) == 3
    old.save(folder)
    assert [p.name for p in folder.glob("*neighbours-*")] == [record["file"]]


# ----------------------------------------------------------------------------------- parameters and command line
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "qe"}, "unknown re-ranking 'qe'; choose from none, aqe, dba, dba+aqe, kreciprocal"),
        ({"method": "dba", "k": 0}, "--rerank-k must be a whole number from 1 to 1000, got 0"),
        ({"method": "aqe", "alpha": -1.0}, "--rerank-alpha must be a number from 0 to 100, got -1.0"),
        ({"method": "kreciprocal", "lam": 1.5}, "--rerank-lambda must be a number from 0 to 1, got 1.5"),
        ({"method": "aqe", "lam": 0.3}, "--rerank-lambda does not apply to --rerank aqe (only to kreciprocal)"),
        ({"method": "none", "k": 3}, "--rerank-k does not apply to --rerank none"),
        ({"method": "dba", "keep": -1}, "--rerank-keep must be a whole number from 0 to 1000, got -1"),
        ({"method": "dba", "keep": 1.5}, "--rerank-keep must be a whole number from 0 to 1000, got 1.5"),
    ],
)
def test_bad_parameters_are_refused_in_words(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        Rerank(**kwargs)


def test_command_line_refuses_bad_rerank_options_in_one_line_before_torch_is_imported(tiny_run, tmp_path):
    import subprocess
    import sys

    np.savez(tmp_path / "e.npz", features=unit_rows(10), labels=np.arange(10) % 2)
    image = tmp_path / "q.jpg"
    image.write_bytes(b"not read")
    (tmp_path / "meta.json").write_text("{}")  # passes the cheap path check; never read
    cases = [
        (["evaluate", "--embeddings", tmp_path / "e.npz", "--rerank", "qe"], "unknown re-ranking 'qe'"),
        (["evaluate", tiny_run, "--rerank", "dba", "--rerank-k", "0"], "--rerank-k must be a whole number"),
        (
            ["retrieve", tiny_run, "--query", image, "--rerank", "aqe", "--rerank-lambda", "0.5"],
            "--rerank-lambda does not apply",
        ),
        (["serve", tmp_path, "--rerank", "kreciprocal", "--rerank-alpha", "1"], "--rerank-alpha does not apply"),
    ]
    code = (
        "import contextlib, io, json, sys\nfrom momentum_proxy.cli import main\nresults = []\n"
        "for argv in json.loads(sys.argv[1]):\n    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n        try:\n            main(argv)\n"
        "        except SystemExit as e:\n            results.append([e.code, err.getvalue()])\n"
        "print(json.dumps({'results': results, 'torch': 'torch' in sys.modules}))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps([[str(a) for a in argv] for argv, _ in cases])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(res.stdout)
    assert report["torch"] is False and len(report["results"]) == len(cases)
    for (argv, message), (status, err) in zip(cases, report["results"]):
        assert status == 2 and err.startswith(f"mproxy: error: {message}") and err.count("\n") == 1, (argv, err)


def test_evaluate_embeddings_with_rerank_scores_each_query_without_itself(tmp_path, capsys):
    x, labels = unit_rows(24, seed=5), np.repeat(np.arange(6), 4)
    np.savez(tmp_path / "e.npz", features=x, labels=labels)
    code, out, err = run_cli(
        [
            "evaluate",
            "--embeddings",
            tmp_path / "e.npz",
            "--rerank",
            "dba",
            "--rerank-k",
            "2",
            "--rerank-alpha",
            "1",
            "--rerank-keep",
            "0",
            "--metrics",
            "recall",
            "--recalls",
            "1",
            "--out",
            tmp_path / "r.json",
        ],
        capsys,
    )
    assert code == 0, err
    hits = []
    for i in range(24):  # the reference: DBA over the other 23 items only, straight from the definition
        others = np.delete(np.arange(24), i)
        scores = ref_dba(x[i].astype(np.float64), x[others].astype(np.float64), 2, 1.0)
        hits.append(labels[others[nearest(scores, range(23), 1)[0]]] == labels[i])
    assert json.loads((tmp_path / "r.json").read_text())["recall@1"] == pytest.approx(np.mean(hits))
    assert "rerank dba (k 2, alpha 1, keep 0)" in out


def test_evaluate_run_on_val_with_rerank(tiny_run, tiny_data, tmp_path, capsys):
    code, out, err = run_cli(
        [
            "evaluate",
            tiny_run,
            "--split",
            "val",
            "--rerank",
            "aqe",
            "--rerank-k",
            "2",
            "--metrics",
            "recall,map@r",
            "--device",
            "cpu",
            "--tta",
            "none",
            "--out",
            tmp_path / "e.json",
        ],
        capsys,
    )  # tta none: the reference below embeds without it
    assert code == 0, err
    summary = json.loads((tmp_path / "e.json").read_text())
    assert summary["split"] == "val" and summary["queries"] == 16 and "test" not in summary
    assert summary["rerank"] == {"method": "aqe", "k": 2, "alpha": 3.0, "keep": 1} and summary["tta"] == "none"
    assert "on the val split" in out and "tta none, rerank aqe (k 2, alpha 3, keep 1)" in out
    frame = split_frame(read_manifest(tiny_data), "val")
    embedder = TorchEmbedder(tiny_run, "cpu")
    feats = embed_dataset(embedder, eval_dataset(tiny_data, frame, embedder.image_size))
    expected = evaluate_embeddings(
        feats, frame["label"].to_numpy(), metrics=["recall", "map@r"], rerank=Rerank("aqe", k=2)
    )
    assert summary["val"] == pytest.approx(expected)


@pytest.fixture(scope="module")
def rerank_index(tiny_run, tiny_data, tmp_path_factory):
    """The tiny dataset's index, prepared for kreciprocal with k1 3 (neighbour lists of 5 + 1 kept)."""
    from momentum_proxy.retrieval.build import build_index

    idx = tmp_path_factory.mktemp("rerank") / "idx"
    build_index(tiny_run, tiny_data, idx, rerank=Rerank("kreciprocal", k=3))
    return idx


def test_retrieve_from_an_index_with_rerank_leaves_the_query_out_of_the_database_side(
    rerank_index, tiny_data, tmp_path, capsys
):
    store = FaissStore.load(rerank_index)
    assert kept_size(store) == 6 and len(list(rerank_index.glob("attachment-neighbours-*.bin"))) == 1
    ids, x = store.live_vectors()
    query = store.item(int(ids[10]))["path"]
    code, out, err = run_cli(
        [
            "retrieve",
            "--index",
            rerank_index,
            "--query",
            query,
            "-k",
            "5",
            "--rerank",
            "kreciprocal",
            "--rerank-k",
            "3",
            "--rerank-keep",
            "0",
            "--out",
            tmp_path / "o",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert "re-ranked by kreciprocal (k 3, k2 6, lambda 0.3, keep 0)" in out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["rerank"] == {"method": "kreciprocal", "k": 3, "k2": 6, "lambda": 0.3, "keep": 0}
    others = np.delete(np.arange(len(ids)), 10)  # the query's own item is not in the collection it searches
    reference = ref_kreciprocal(x[10].astype(np.float64), x[others].astype(np.float64), 3, 6, 0.3)
    best = nearest(reference, range(len(others)), 5)
    assert [r["id"] for r in results["results"]] == [int(ids[others[j]]) for j in best]
    np.testing.assert_allclose([r["rerank_score"] for r in results["results"]], reference[best], atol=1e-4)
    np.testing.assert_allclose([r["score"] for r in results["results"]], x[others[best]] @ x[10], atol=1e-5)


def test_the_service_reranks_reports_its_cost_and_keeps_requests_within_its_lists(rerank_index, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from momentum_proxy.serving.app import create_app

    folder = tmp_path / "idx"
    shutil.copytree(rerank_index, folder)
    with TestClient(create_app(folder, rerank=Rerank("dba", k=8, alpha=0, keep=0), device="cpu")) as client:
        assert kept_size(FaissStore.load(folder)) == 9  # longer lists computed at start and saved
        store = FaissStore.load(folder)
        ids, x = store.live_vectors()
        answer = client.post("/search", json={"id": int(ids[3]), "k": 4}).json()
        assert answer["rerank"] == {"method": "dba", "k": 8, "alpha": 0.0, "keep": 0}
        assert answer["timing_ms"]["rerank"] >= 0
        others = np.delete(np.arange(len(ids)), 3)
        reference = ref_dba(x[3].astype(np.float64), x[others].astype(np.float64), 8, 0.0)
        assert [r["id"] for r in answer["results"]] == [int(ids[others[j]]) for j in nearest(reference, range(63), 4)]
        plain = client.post("/search", json={"id": int(ids[3]), "k": 4, "rerank": "none"}).json()
        assert [r["id"] for r in plain["results"]] == [int(i) for i in store.search(x[3:4], 4, exclude={ids[3]})[1][0]]
        kept = client.post("/search", json={"id": int(ids[3]), "k": 4, "rerank_keep": 1}).json()
        assert kept["results"][0]["id"] == plain["results"][0]["id"] and kept["rerank"]["keep"] == 1
        assert plain["timing_ms"]["rerank"] == 0
        other = client.post("/search", json={"id": int(ids[3]), "k": 4, "rerank": "kreciprocal", "rerank_k": 3})
        assert other.status_code == 200 and other.json()["rerank"]["k2"] == 6
        too_long = client.post("/search", json={"id": int(ids[3]), "rerank": "dba", "rerank_k": 9})
        assert too_long.status_code == 422
        assert too_long.json()["error"].startswith(
            "re-ranking dba (k 9, alpha 0, keep 0) needs 9 neighbours per item; this server keeps 8"
        )
        bad = client.post("/search", json={"id": int(ids[3]), "rerank": "qe"})
        assert bad.status_code == 422 and bad.json()["error"].startswith("unknown re-ranking 'qe'")


# ----------------------------------------------------------------------------------- the default's size limit
def test_the_default_reranking_stops_above_its_limit_and_says_so_in_one_line(capsys):
    default = Rerank("dba+aqe", up_to=100)
    assert default.for_collection(100) is default and capsys.readouterr().err == ""
    assert default.for_collection(101) == Rerank()
    assert capsys.readouterr().err == (
        "mproxy: note: searching without re-ranking: 101 items, more than the 100 that "
        "the default re-ranking (dba+aqe) is used for (its neighbour lists cost O(N²) "
        "to compute); --rerank dba+aqe asks for it anyway\n"
    )
    asked = Rerank("dba+aqe")  # an explicit --rerank has no limit
    assert asked.for_collection(10**7) is asked and capsys.readouterr().err == ""


def test_index_says_at_build_time_that_the_default_reranking_is_off(tiny_run, tiny_data, tmp_path, capsys, monkeypatch):
    import momentum_proxy.cli.options as cli_options

    for limit, folder in ((63, tmp_path / "off"), (64, tmp_path / "on")):  # 64 images
        monkeypatch.setattr(cli_options, "DEFAULT_RERANK_MAX_ITEMS", limit)
        code, out, err = run_cli(
            ["index", tiny_run, "--images", tiny_data, "--out", folder, "--tta", "none", "--device", "cpu"], capsys
        )
        assert code == 0, err
        notes = [line for line in err.splitlines() if "re-ranking" in line]
        lists = list(folder.glob("attachment-neighbours-*.bin"))
        if limit == 63:
            assert (
                notes
                == [
                    "mproxy: note: re-ranking is off for this index: 64 items, more than the 63 that the "
                    "default re-ranking (dba) is used for (its neighbour lists cost O(N²) to compute); "
                    "searches are plain cosine unless they ask for --rerank dba"
                ]
                and not lists
            )
        else:
            assert notes == [] and len(lists) == 1 and kept_size(FaissStore.load(folder)) == 6
