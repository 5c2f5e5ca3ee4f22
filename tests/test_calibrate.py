"""The per-index "close match" threshold (retrieval.calibrate): its definition against a brute-force reference,
its boundaries, and its life with the store, `mproxy index` and the service."""

import numpy as np
import pytest
from conftest import run_cli

from momentum_proxy.retrieval import calibrate
from momentum_proxy.retrieval.calibrate import (
    CLOSE_MATCH,
    calibrate_store,
    close_match_text,
    close_match_threshold,
    stored_close_match,
)
from momentum_proxy.retrieval.store import UNKNOWN
from momentum_proxy.retrieval.stores import open_store
from momentum_proxy.vectors import l2_normalize


def clusters(classes: int, per_class: int, spread: float, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    x = np.repeat(centres, per_class, 0) + spread * rng.normal(size=(classes * per_class, dim))
    return l2_normalize(x.astype(np.float32)), np.repeat(np.arange(classes), per_class)


def brute_force(x, y, precision):
    """Every item a query with a match (its best other item) and one without (its best item of another class);
    the lowest top cosine t with at least `precision` of the queries scoring t or more having a match."""
    scores, truth = [], []
    for i in range(len(x)):
        scores.append(max(float(x[i] @ x[j]) for j in range(len(x)) if j != i))
        scores.append(max(float(x[i] @ x[j]) for j in range(len(x)) if y[j] != y[i]))
        truth += [True, False]
    scores, truth = np.array(scores), np.array(truth)
    valid = [t for t in scores if truth[scores >= t].mean() >= precision]
    return min(valid) if valid else None


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0])  # well separated, overlapping, nearly random
@pytest.mark.parametrize("precision", [0.95, 0.8])
def test_the_threshold_matches_the_brute_force_definition(spread, precision, monkeypatch):
    monkeypatch.setattr(calibrate, "BLOCK", 7)  # rows in several blocks, the last one short
    x, y = clusters(8, 6, spread)
    found = close_match_threshold(x, y, precision=precision)
    assert found["cosine"] == pytest.approx(brute_force(x, y, precision), abs=1e-4)
    assert (found["precision"], found["items"], found["classes"]) == (precision, 48, 8)


def test_no_threshold_when_other_classes_always_score_highest():
    e = np.eye(3, dtype=np.float32)
    x = np.stack([e[0], e[1], e[0], e[2], e[1], e[2]])  # each item's twin is in another class
    y = np.array([0, 0, 1, 1, 2, 2])
    found = close_match_threshold(x, y)
    assert found["cosine"] is None and brute_force(x, y, 0.95) is None
    assert "no raw cosine reaches 95%" in close_match_text(found)


def test_well_separated_classes_put_every_query_with_a_match_above_it():
    x, y = clusters(10, 8, 0.3)
    found = close_match_threshold(x, y)
    best_own = [max(x[i] @ x[j] for j in range(80) if j != i and y[j] == y[i]) for i in range(80)]
    assert found["cosine"] <= min(best_own) + 1e-4  # each item's nearest photo of its class counts as a match
    assert f"raw cosine {found['cosine']:.2f} (95% precision" in close_match_text(found)


def test_at_least_three_classes_of_two_items_are_needed():
    x, y = clusters(3, 3, 0.5)
    assert close_match_threshold(x, y)["classes"] == 3
    y2 = y.copy()
    y2[y2 == 2] = [2, 3, 4]  # class 2 split into singletons: 2 classes of 2 or more left
    assert close_match_threshold(x, y2) is None
    assert close_match_threshold(x, np.full(len(y), UNKNOWN)) is None
    assert "not measured" in close_match_text(None)


def test_unknown_labels_and_singletons_take_no_part_and_large_sets_are_sampled():
    x, y = clusters(6, 5, 0.6)
    base = close_match_threshold(x, y)
    extra, _ = clusters(3, 1, 0.0, seed=9)
    with_unknown = close_match_threshold(np.r_[x, extra, extra], np.r_[y, [UNKNOWN] * 3, [10, 11, 12]])
    assert with_unknown == base
    sampled = close_match_threshold(x, y, max_items=20)
    assert sampled["items"] <= 20 and sampled["items"] != base["items"]


def test_the_index_keeps_its_threshold_and_the_service_reports_it(index_dir, tmp_path, capsys):
    import shutil

    from momentum_proxy.serving.searcher import Searcher

    store = open_store(index_dir)
    found = stored_close_match(store)
    ids, vectors = store.live_vectors()
    labels = np.array([store.item(int(i))["label"] for i in ids])
    assert found == close_match_threshold(vectors, labels) and found["classes"] == 8 and found["items"] == 64
    assert calibrate_store(store) == found
    store.close()

    folder = tmp_path / "idx"
    shutil.copytree(index_dir, folder)
    searcher = Searcher(folder, device="cpu")
    try:
        assert searcher.stats()["close_match"] == found
    finally:
        searcher.close()


def test_mproxy_index_prints_the_threshold_and_drops_it_without_labels(tiny_run, tiny_data, tmp_path, capsys):
    code, out, _ = run_cli(["index", tiny_run, "--images", tiny_data / "images", "--out", tmp_path / "a"], capsys)
    assert code == 0
    line = next(row for row in out.splitlines() if row.startswith("close_match: "))
    found = stored_close_match(open_store(tmp_path / "a"))
    assert found["classes"] == 8 and line == f"close_match: {close_match_text(found)}"
    store = open_store(tmp_path / "a")
    store.attach(CLOSE_MATCH, None)
    assert stored_close_match(store) is None


def test_a_large_index_is_sampled_item_by_item_never_read_whole(index_dir, monkeypatch):
    monkeypatch.setattr(calibrate, "FULL_READ_ITEMS", 10)
    monkeypatch.setattr(calibrate, "MAX_ITEMS", 40)
    store = open_store(index_dir)
    monkeypatch.setattr(store, "live_vectors", lambda: pytest.fail("read every vector"))
    found = calibrate_store(store)
    assert found is not None and found["items"] <= 40 and found["classes"] == 8
    ids, vectors = calibrate._live_sample(store)
    assert len(ids) == 40 and len(set(ids.tolist())) == 40 and vectors.shape == (40, store.feature_dim)
    np.testing.assert_array_equal(vectors[3], store.vector(int(ids[3]))[0])


def test_the_service_measures_again_when_labelled_items_come_or_go_in_a_small_index(index_dir, tmp_path, monkeypatch):
    import io
    import shutil

    from PIL import Image

    from momentum_proxy.serving.searcher import Searcher

    def photo(seed: int) -> bytes:
        pixels = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG")
        return out.getvalue()

    def measured_on_disk(folder):
        store = open_store(folder)
        try:
            ids, vectors = store.live_vectors()
            labels = np.array([UNKNOWN if (c := store.item(int(i))["label"]) is None else c for i in ids])
            return stored_close_match(store), close_match_threshold(vectors, labels)
        finally:
            store.close()

    folder = tmp_path / "idx"
    shutil.copytree(index_dir, folder)
    before = stored_close_match(open_store(folder))
    searcher = Searcher(folder, device="cpu")
    try:
        added = searcher.add([photo(1), photo(2)], class_name="new species")
        saved, reference = measured_on_disk(folder)
        assert saved == reference == searcher.stats()["close_match"]
        assert (saved["classes"], saved["items"]) == (9, 66) and saved != before
        searcher.add([photo(3)])  # no class: not measured, so the threshold stays
        assert measured_on_disk(folder)[0] == saved
        searcher.remove(added[0]["id"])  # the new class is down to one photo: out of the measurement again
        assert measured_on_disk(folder)[0] == searcher.stats()["close_match"] == before
        monkeypatch.setattr(calibrate, "MAX_ITEMS", 60)  # an index larger than that keeps what was measured
        searcher.add([photo(4)], class_name="new species")
        assert measured_on_disk(folder)[0] == before
    finally:
        searcher.close()
