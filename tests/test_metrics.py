"""Retrieval metrics against a brute-force numpy reference and pytorch-metric-learning's AccuracyCalculator."""

import itertools

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKMeans

from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.metrics import ALL_METRICS, cluster_nmi, evaluate_embeddings
from momentum_proxy.vectors import knn, on_device, search_chunks, search_device

RETRIEVAL = ("recall", "precision@1", "r_precision", "map@r")
PML_NAMES = {
    "precision@1": "precision_at_1",
    "r_precision": "r_precision",
    "map@r": "mean_average_precision_at_r",
    "nmi": "NMI",
}


def clustered(n=300, d=16, classes=20, noise=0.8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, d))
    return (centres[labels] + noise * rng.standard_normal((n, d))).astype(np.float32), labels


def normalized(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(query, query_labels, gallery, gallery_labels, self_retrieval, ks):
    """Textbook metrics from the full similarity matrix (ties ordered by gallery index)."""
    sims = normalized(query) @ normalized(gallery).T
    order = np.argsort(-sims, axis=1, kind="stable")
    out = {f"recall@{k}": [] for k in ks} | {"precision@1": [], "r_precision": [], "map@r": []}
    for i, row in enumerate(order):
        if self_retrieval:
            row = row[row != i]
        hits = gallery_labels[row] == query_labels[i]
        r = int(hits.sum())
        if r == 0:
            continue
        for k in ks:
            out[f"recall@{k}"].append(hits[:k].any())
        out["precision@1"].append(hits[0])
        out["r_precision"].append(hits[:r].sum() / r)
        out["map@r"].append(sum(hits[: j + 1].sum() / (j + 1) for j in range(r) if hits[j]) / r)
    return {key: float(np.mean(v)) for key, v in out.items()}


def pml(query, query_labels, gallery=None, gallery_labels=None):
    calc = AccuracyCalculator(
        include=tuple(PML_NAMES.values()),
        k="max_bin_count",
        device=torch.device("cpu"),
        kmeans_func=FaissKMeans(niter=20, seed=0, min_points_per_centroid=1),
    )
    if gallery is None:
        return calc.get_accuracy(normalized(query), query_labels)
    return calc.get_accuracy(normalized(query), query_labels, normalized(gallery), gallery_labels, False)


def assert_close(ours, theirs, tol):
    assert ours.keys() >= theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=tol), key


def test_self_retrieval_matches_reference_and_pml():
    x, y = clustered()
    ours = evaluate_embeddings(x, y, recalls=(1, 2, 4, 8, 16))
    assert list(ours) == [
        "recall@1",
        "recall@2",
        "recall@4",
        "recall@8",
        "recall@16",
        "precision@1",
        "r_precision",
        "map@r",
        "nmi",
    ]
    assert_close(ours, reference(x, y, x, y, True, (1, 2, 4, 8, 16)), 1e-12)
    assert_close(ours, {k: v for k, v in zip(PML_NAMES, [pml(x, y)[n] for n in PML_NAMES.values()])}, 1e-4)
    assert 0 < ours["map@r"] < ours["r_precision"] < ours["precision@1"] < 1


def test_query_gallery_matches_reference_and_pml():
    x, y = clustered(400)
    q, qy, g, gy = x[:100], y[:100], x[100:], y[100:]
    ours = evaluate_embeddings(g, gy, query_features=q, query_labels=qy, recalls=(1, 10))
    assert_close(ours, reference(q, qy, g, gy, False, (1, 10)), 1e-12)
    theirs = pml(q, qy, g, gy)
    assert_close(ours, {k: theirs[n] for k, n in PML_NAMES.items()}, 1e-4)


def test_duplicates_and_ties():
    """Exact duplicates, some with other labels: self is excluded by index and ties go by gallery index."""
    rng = np.random.default_rng(1)
    # four entries of +-1 a row: unit rows of +-0.5, whose products are exact in float32 whatever the summation
    # order of the kernel (on any CPU), so every tie is a true tie
    base = np.zeros((40, 8), np.float32)
    for row in base:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    x = np.repeat(base, 3, axis=0)
    y = np.repeat(np.arange(40) % 10, 3)
    y[::7] = 11  # some copies carry another label
    ours = evaluate_embeddings(x, y, recalls=(1, 3), metrics=RETRIEVAL)
    assert_close(ours, reference(x, y, x, y, True, (1, 3)), 1e-12)
    theirs = pml(x, y)
    assert_close(ours, {k: theirs[n] for k, n in PML_NAMES.items() if k != "nmi"}, 1e-4)
    sims, idx = knn(x, None, 2, exclude_self=True)
    assert (idx != np.arange(len(x))[:, None]).all()
    np.testing.assert_allclose(sims, 1.0, atol=1e-6)  # each item's two copies come first
    np.testing.assert_array_equal(idx[:2], [[1, 2], [0, 2]])


def test_lone_queries_are_left_out_like_pml():
    x, y = clustered(200)
    y[:3] = [100, 101, 102]  # three classes of one item
    ours = evaluate_embeddings(x, y, recalls=(1,), metrics=RETRIEVAL)
    assert_close(ours, reference(x, y, x, y, True, (1,)), 1e-12)
    theirs = pml(x, y)
    assert_close(ours, {k: theirs[n] for k, n in PML_NAMES.items() if k != "nmi"}, 1e-4)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_chunked_equals_unchunked(chunk_size, monkeypatch):
    x, y = clustered(150)
    whole = evaluate_embeddings(x, y, metrics=RETRIEVAL, chunk_size=len(x))
    assert evaluate_embeddings(x, y, metrics=RETRIEVAL, chunk_size=chunk_size) == whole
    monkeypatch.setattr("momentum_proxy.vectors.MAX_CHUNK_NEIGHBOURS", 40)  # large k shrinks the chunk
    assert evaluate_embeddings(x, y, metrics=RETRIEVAL, chunk_size=chunk_size) == whole
    sims, idx = knn(x, x, 10, exclude_self=True, chunk_size=len(x))
    sims_c, idx_c = knn(x, x, 10, exclude_self=True, chunk_size=chunk_size)
    np.testing.assert_array_equal(idx_c, idx)
    np.testing.assert_array_equal(sims_c, sims)


def test_knn_matches_dense_search():
    x, _ = clustered(150)
    q = x[:20] + 0.05
    sims, idx = knn(torch.from_numpy(q), x, 5)
    dense = normalized(q) @ normalized(x).T
    np.testing.assert_array_equal(idx, np.argsort(-dense, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(sims, np.take_along_axis(dense, idx, 1), atol=1e-6)
    assert knn(x, None, 10_000, exclude_self=True)[1].shape == (150, 149)  # k clipped to the gallery


def test_recall_monotonic_and_k_beyond_gallery():
    x, y = clustered(60, classes=6, noise=2.0)
    ours = evaluate_embeddings(
        torch.from_numpy(x), torch.from_numpy(y), recalls=(1, 2, 4, 8, 16, 32, 1000), metrics=("recall",)
    )
    values = list(ours.values())
    assert values == sorted(values) and values[-1] == 1.0


def test_only_requested_metrics():
    x, y = clustered()
    assert set(evaluate_embeddings(x, y, metrics=("map@r",))) == {"map@r"}
    assert set(evaluate_embeddings(x, y, recalls=(5,), metrics=("recall", "nmi"))) == {"recall@5", "nmi"}
    assert set(ALL_METRICS) == {"recall", "precision@1", "r_precision", "map@r", "nmi"}


def test_nmi_identical_to_pml_with_same_kmeans():
    x, y = clustered(noise=1.5)
    assert cluster_nmi(normalized(x), y) == pytest.approx(pml(x, y)["NMI"], abs=1e-12)
    assert evaluate_embeddings(x, y, metrics=("nmi",))["nmi"] == pytest.approx(pml(x, y)["NMI"], abs=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(features=np.zeros((0, 4)), labels=[]), "empty"),
        (dict(features=np.zeros((5, 4)), labels=[0, 1]), "2 entries"),
        (dict(features=np.zeros(5), labels=[0] * 5), "2-D"),
        (dict(features=np.ones((3, 2)), labels=[[0], [1], [2]]), "1-D"),
        (dict(features=np.full((3, 2), np.nan), labels=[0, 0, 1]), "NaN"),
        (dict(features=np.ones((1, 2)), labels=[0]), "at least 2"),
        (dict(features=np.ones((3, 2)), labels=[0, 1, 2]), "no query has a same-label"),
        (dict(features=np.ones((3, 2)), labels=[0, 0, 1], metrics=("f1",)), "unknown metric"),
        (dict(features=np.ones((3, 2)), labels=[0, 0, 1], recalls=(0,)), "K values"),
        (
            dict(features=np.ones((3, 2)), labels=[0, 0, 1], query_features=np.ones((2, 3)), query_labels=[0, 1]),
            "dimensions",
        ),
        (dict(features=np.ones((3, 2)), labels=[0, 0, 1], query_features=np.ones((2, 2))), "without query labels"),
    ],
)
def test_invalid_input_raises_user_error(kwargs, message):
    features, labels = kwargs.pop("features"), kwargs.pop("labels")
    with pytest.raises(UserError, match=message):
        evaluate_embeddings(features, labels, **kwargs)


def dyadic(n, seed=0):
    """n unit vectors in 4-d drawn from 24 whose inner products are exact in float32: many exact ties."""
    axes = [v for i in range(4) for v in (np.eye(4)[i], -np.eye(4)[i])]
    halves = [np.array(signs) / 2 for signs in itertools.product((1, -1), repeat=4)]
    v = np.array(axes + halves, np.float32)
    return v[np.random.default_rng(seed).integers(0, len(v), n)]


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("block_sims", [1 << 25, 200, 1500])
def test_torch_and_faiss_kernels_give_the_same_lists_with_ties(exclude_self, block_sims, monkeypatch):
    """Both kernels of `search_chunks` give the brute-force lists, ties at the end of a list included (lowest index
    kept), whatever the chunk and the torch kernel's block; faiss alone keeps an arbitrary tied item there."""
    monkeypatch.setattr("momentum_proxy.vectors.MAX_BLOCK_SIMS", block_sims)
    gallery = dyadic(300)
    query = gallery if exclude_self else dyadic(40, seed=1)
    sims = query.astype(np.float64) @ gallery.T.astype(np.float64)
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    reference = np.argsort(-sims, axis=1, kind="stable")
    need = np.random.default_rng(2).integers(0, 40, len(query))
    need[:3] = [1, len(gallery) - int(exclude_self), 0]  # one list of every item
    for chunk_size in (1, 7, 64):
        lists = {}
        for name, (q, g) in {
            "faiss": (query, gallery),
            "torch": (torch.from_numpy(query), torch.from_numpy(gallery)),
        }.items():
            chunks = list(search_chunks(q, g, need, exclude_self, chunk_size))
            for pos, s, idx in chunks:
                assert s.dtype == np.float32 and idx.dtype == np.int64
                np.testing.assert_array_equal(idx, reference[pos, : idx.shape[1]], err_msg=name)
                np.testing.assert_array_equal(s, np.take_along_axis(sims[pos], idx, 1), err_msg=name)
            lists[name] = chunks
        for (p1, s1, i1), (p2, s2, i2) in zip(lists["faiss"], lists["torch"], strict=True):
            np.testing.assert_array_equal(p1, p2)
            np.testing.assert_array_equal(i1, i2)
            np.testing.assert_array_equal(s1, s2)
        assert sorted(np.concatenate([c[0] for c in lists["torch"]])) == list(np.flatnonzero(need))


def test_evaluation_on_the_torch_kernel_without_cuda_float16_in(monkeypatch):
    """The kernel CUDA evaluations use, run on the CPU (nothing in it names a device): float16 and bfloat16
    tensors are evaluated as their float32 values, exactly as the faiss kernel evaluates them."""
    x, y = clustered(200)
    half = torch.from_numpy(x).half()
    x32 = half.float().numpy()
    expected = reference(x32, y, x32, y, True, (1, 2, 4))
    faiss_result = evaluate_embeddings(half, y, recalls=(1, 2, 4), metrics=RETRIEVAL)
    assert_close(faiss_result, expected, 1e-12)
    monkeypatch.setattr("momentum_proxy.vectors.TORCH_SEARCH_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr("momentum_proxy.vectors.MAX_BLOCK_SIMS", 200 * 64)  # several blocks

    def no_faiss(*args, **kwargs):
        raise AssertionError("faiss searched")

    monkeypatch.setattr("momentum_proxy.vectors.faiss.knn", no_faiss)
    torch_result = evaluate_embeddings(half, y, recalls=(1, 2, 4), metrics=RETRIEVAL)  # the tensor's device, cpu
    assert torch_result == faiss_result
    q, g = x[:50], x[50:]
    assert_close(
        evaluate_embeddings(
            g, y[50:], query_features=q, query_labels=y[:50], recalls=(1, 10), metrics=RETRIEVAL, device="cpu"
        ),
        reference(q, y[:50], g, y[50:], False, (1, 10)),
        1e-12,
    )
    bf16 = torch.from_numpy(x).bfloat16()
    assert evaluate_embeddings(bf16, y, metrics=RETRIEVAL, device="cpu") == evaluate_embeddings(
        bf16.float().numpy(), y, metrics=RETRIEVAL, device="cpu"
    )


def test_search_device_rule(monkeypatch):
    """CUDA searches in torch on that GPU, the CPU in faiss; None stays None (numpy arrays, no torch)."""
    assert search_device(None) is None and search_device("cpu") is None
    assert search_device("cuda:1") == torch.device("cuda", 1)  # no GPU needed to name one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert search_device("auto") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert search_device("auto") == torch.device("cuda")
    x = np.ones((3, 2), np.float32)
    assert on_device(x, None) is x and on_device(x, torch.device("cpu")).data_ptr() == x.ctypes.data
