"""The "close match" threshold of a labelled collection, measured on its own items.

A raw cosine means different things for different models (docs: Choosing post-processing: 0.71 at 95 % precision
for the pretrained Lite0 on birds, 0.59 for a model trained on them), so a fixed threshold cannot say "no match".
`mproxy index` measures one per index from its labelled classes: each item is a query with a match (its best
other item) and, its class left out, one without (its best item of another class); the threshold is the lowest
top cosine at which at least 95 % of the queries scoring that much or more have a match. The store keeps it
(attachment `close_match`); the service's page starts from it, and the service measures it again when items with a
class come or go in an index of at most MAX_ITEMS items.
"""

from __future__ import annotations

import json

import numpy as np

from momentum_proxy.retrieval.store import UNKNOWN, IndexStore

CLOSE_MATCH = "close_match"  # the store attachment
PRECISION = 0.95
MIN_CLASSES = 3  # classes with 2 items or more
MAX_ITEMS = 5000  # a larger collection is sampled (every item is compared with every other)
FULL_READ_ITEMS = 200_000  # up to this many live items, all vectors are read at once (400 MB at 512-d)
BLOCK = 1024  # rows of the similarity matrix held at once


def close_match_threshold(
    features: np.ndarray, labels: np.ndarray, *, precision: float = PRECISION, max_items: int = MAX_ITEMS, seed: int = 0
) -> dict | None:
    """{"cosine", "precision", "items", "classes"}: the lowest top cosine at which at least `precision` of the
    queries scoring that much or more have a match (cosine None when none reaches it), where every item is a query
    twice: with a match (its best other item) and without one, its class left out (its best item of another
    class). Both thus search nearly the whole collection, as a query of the deployed index does. Unit `features`;
    items labelled UNKNOWN and classes of one item take no part (a sample of `max_items` when there are more).
    None when fewer than MIN_CLASSES classes have two items or more."""
    labels = np.asarray(labels)
    keep = np.flatnonzero(labels != UNKNOWN)
    if len(keep) > max_items:
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_items, replace=False))
    classes, counts = np.unique(labels[keep], return_counts=True)
    classes = classes[counts >= 2]
    if len(classes) < MIN_CLASSES:
        return None
    keep = keep[np.isin(labels[keep], classes)]
    x, y = np.asarray(features, np.float32)[keep], labels[keep]
    with_match, without = np.empty(len(x), np.float32), np.empty(len(x), np.float32)
    for start in range(0, len(x), BLOCK):
        rows = slice(start, start + BLOCK)
        sims = x[rows] @ x.T
        sims[np.arange(sims.shape[0]), np.arange(start, start + sims.shape[0])] = -np.inf  # not its own match
        with_match[rows] = sims.max(1)
        without[rows] = np.where(y[rows, None] == y[None, :], -np.inf, sims).max(1)
    scores = np.concatenate([with_match, without])
    truth = np.r_[np.ones(len(x)), np.zeros(len(x))]
    order = np.argsort(-scores)
    ranked = scores[order]
    cut = np.r_[ranked[1:] != ranked[:-1], True]  # thresholds between distinct scores: ties count together
    ok = np.flatnonzero(cut & (np.cumsum(truth[order]) / np.arange(1, len(order) + 1) >= precision))
    return {
        "cosine": round(float(ranked[ok[-1]]), 4) if len(ok) else None,
        "precision": precision,
        "items": len(x),
        "classes": len(classes),
    }


def calibrate_store(store: IndexStore) -> dict | None:
    """Measure the threshold of `store`'s live labelled items and keep it with the store (saved by its next save);
    None, and any earlier one dropped, when the store has too few labelled classes."""
    sample = calibration_sample(store)
    return keep_close_match(store, None if sample is None else close_match_threshold(*sample))


def calibration_sample(store: IndexStore) -> tuple[np.ndarray, np.ndarray] | None:
    """(unit vectors, labels) of the live items `close_match_threshold` measures (copies: the measurement may run
    outside the store's lock); None for a store without labels."""
    if not store.labelled or not len(store):
        return None
    ids, vectors = _live_sample(store)
    items = store.items(ids)
    return vectors, np.array([UNKNOWN if items[int(i)]["label"] is None else items[int(i)]["label"] for i in ids])


def keep_close_match(store: IndexStore, found: dict | None) -> dict | None:
    """Keep a measured threshold with `store` (None drops an earlier one); returns it."""
    store.attach(CLOSE_MATCH, None if found is None else json.dumps(found).encode())
    return found


def _live_sample(store: IndexStore, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of every live item, or above FULL_READ_ITEMS of about MAX_ITEMS of them drawn at random
    and read one by one, so that a catalogue's vectors are never all in memory at once."""
    if len(store) <= FULL_READ_ITEMS:
        return store.live_vectors()
    rng = np.random.default_rng(seed)
    drawn = rng.choice(store.ntotal, min(store.ntotal, 2 * MAX_ITEMS), replace=False)
    ids = np.sort(np.array([i for i in drawn.tolist() if store.exists(i)][:MAX_ITEMS], np.int64))
    return ids, np.concatenate([store.vector(int(i)) for i in ids]).astype(np.float32)


def stored_close_match(store: IndexStore) -> dict | None:
    """The threshold kept with `store` (see `calibrate_store`), or None."""
    data = store.attachment(CLOSE_MATCH)
    return None if data is None else json.loads(data)


def close_match_text(found: dict | None) -> str:
    """One line for `mproxy index`."""
    if found is None:
        return (
            f"not measured: fewer than {MIN_CLASSES} labelled classes of 2 or more images "
            "(the page starts from 0.7, measured for the pretrained Lite0)"
        )
    if found["cosine"] is None:
        return f"no raw cosine reaches {found['precision']:.0%} precision on {found['classes']} classes"
    return (
        f"raw cosine {found['cosine']:.2f} ({found['precision']:.0%} precision for 'has a match', measured on "
        f"{found['items']:,} labelled images of {found['classes']} classes)"
    )
