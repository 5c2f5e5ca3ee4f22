"""`mproxy evaluate RUN --index INDEX`: a run's test queries scored against a saved index, the user's real catalogue.

The queries are the run's test photos (an images split's query rows), embedded by the model that built the index
(`build.open_index` refuses a stale one) with the index's test-time augmentation. Their classes are matched to
the index's items by class name; items without a class are never relevant, and an indexed photo that is itself a
query is left out of the gallery (it would find itself): the same file, or, since `prepare` re-encodes each photo
under its class and file name, an item of the query's class with the query's file name (its original). The
metrics are those of `evaluate` (`evaluation.metrics.evaluate_embeddings`, exact search over the index's stored
vectors, re-ranked as asked).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.jobs import embed_split, evaluation_file
from momentum_proxy.evaluation.metrics import ALL_METRICS, evaluate_embeddings
from momentum_proxy.fileio import write_json
from momentum_proxy.retrieval.build import index_tta, open_index
from momentum_proxy.retrieval.store import IndexStore, check_mix
from momentum_proxy.retrieval.stores import describe
from momentum_proxy.runs import BEST, RunDir


def photo_keys(path: str | Path, class_name: str | None) -> set:
    """What identifies a photo across `prepare`'s copy and its original: the real path, and (class, file stem)."""
    return {os.path.realpath(path), (class_name, Path(path).stem)}


def catalogue_gallery(index: IndexStore, exclude: set) -> tuple[np.ndarray, np.ndarray, int]:
    """(unit vectors, class names, items left out) of the index's live items, minus those with a `photo_keys` in
    `exclude`; an item without a class gets a name of its own, which no query has."""
    ids, vectors = index.live_vectors()
    items = [index.item(int(i)) for i in ids]
    keep = np.array([not photo_keys(it["path"], it["class_name"]) & exclude for it in items], bool)
    names = np.array(
        [it["class_name"] if it["class_name"] is not None else f"\0unlabelled {it['id']}" for it in items], dtype=object
    )
    return vectors[keep], names[keep], int((~keep).sum()) if len(items) else 0


def evaluate_index(
    run_dir: str | Path,
    index_dir: str | Path,
    *,
    metrics=None,
    recalls=None,
    device: str = "auto",
    runtime: str = "torch",
    tta: str | None = None,
    rerank=None,
    out: str | Path | None = None,
) -> dict:
    """The run's test queries searched in the index at `index_dir` (see the module); written to `out` (default:
    RUN_DIR/evaluate-RUNTIME[-TTA][-RERANK]-index.json) and returned, as `evaluate_run`'s summary."""
    index, run_dir = open_index(index_dir, run_dir)
    try:
        tta = index_tta(index_dir, index.model, tta)
        embedder = load_embedder(run_dir, runtime, device, tta)
        check_mix(index.model, embedder.identity)
        rows, query = embed_split(run_dir, "test", embedder, queries_only=True)
        run = RunDir(run_dir)
        cfg = run.config()
        exclude = set().union(
            *(photo_keys(Path(cfg.data) / p, c) for p, c in zip(rows.frame["path"], rows.frame["class_name"]))
        )
        gallery, gallery_names, left_out = catalogue_gallery(index, exclude)
    finally:
        index.close()
    if not len(gallery):
        raise UserError(f"the index {index_dir} holds none but the run's own test photos; nothing to search")
    query_names = rows.frame["class_name"].to_numpy(dtype=object)
    lone = int((~np.isin(query_names, gallery_names)).sum())
    if lone == len(query_names):
        raise UserError(
            f"no class of the run's test photos is in the index {index_dir} (matched by class name); "
            "index the catalogue with its class folders (mproxy index RUN --images DIR)"
        )
    rerank = rerank.for_collection(len(gallery)) if rerank is not None else None
    res = evaluate_embeddings(
        gallery,
        gallery_names,
        query_features=query,
        query_labels=query_names,
        metrics=metrics or ALL_METRICS,
        recalls=recalls or cfg.recalls,
        rerank=rerank,
    )
    summary = {
        "checkpoint": BEST,
        "epoch": run.load_checkpoint(BEST)["epoch"],
        "selected_on": (run.eval() or {}).get("selected_on", "?"),
        "select_metric": run.info().get("select_metric"),
        "split": "test",
        "queries": len(query),
        "lone_queries": lone,
        "against": f"the index {describe(index_dir)} ({len(gallery)} items"
        + (f"; {left_out} test photos found in it left out" if left_out else "")
        + ")",
        "index": str(index_dir),
        "gallery": len(gallery),
        "left_out_of_gallery": left_out,
        "runtime": embedder.runtime,
        "tta": tta,
        "rerank": rerank.to_dict() if rerank is not None else {"method": "none"},
        "test": res,
    }
    write_json(out or evaluation_file(run_dir, embedder.runtime, tta, rerank=rerank, index=True), summary)
    return summary
