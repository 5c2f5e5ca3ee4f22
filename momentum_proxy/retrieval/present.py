"""`mproxy retrieve`'s job and how results are shown: `retrieve_and_draw` searches a saved index or a run and
writes the picture (`plots.draw_results`) and `results.json`; `ranked_list` is the printed list."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from momentum_proxy.config import check_tta
from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.errors import UserError
from momentum_proxy.fileio import check_writable_folder, write_json
from momentum_proxy.plots import MAX_DRAWN, draw_results
from momentum_proxy.retrieval.build import index_tta, open_index
from momentum_proxy.retrieval.hits import Hit
from momentum_proxy.retrieval.rerank import Rerank
from momentum_proxy.retrieval.search import Retrieval, check_database_tta, check_query, run_index, search_image
from momentum_proxy.retrieval.store import check_mix, recall_text
from momentum_proxy.retrieval.stores import describe, local_folder
from momentum_proxy.runs import model_identity


def retrieve_and_draw(
    query: str | Path,
    k: int,
    out_dir: str | Path | None = None,
    *,
    run_dir: str | None = None,
    index_dir: str | None = None,
    data_base: str | None = None,
    split: str = "test",
    device: str = "auto",
    runtime: str = "torch",
    tta: str | None = None,
    rerank: Rerank | None = None,
) -> tuple[Retrieval, Path]:
    """`mproxy retrieve`: search a saved index (`index_dir`, with the run that built it, or `run_dir`), else the
    run's embeddings of `split` (`data_base`: the original tool's run folder or embeddings file), and write
    retrieval.png + results.json into `out_dir` (default: ./retrieval for an index, never the index's own folder;
    RUN/retrieval for a run), numbered when earlier ones are there (`output_names`). The query is embedded
    with `tta` (None: the index's own, else none; see `index_tta`); `rerank` re-ranks the results (an index's saved
    neighbour lists are used, else computed in memory)."""
    check_query(query, k)
    check_tta(tta)
    if index_dir:
        index, run_dir = open_index(index_dir, run_dir)
        tta = index_tta(index_dir, index.model, tta)
        identity = index.model  # open_index checked that it is the run's current checkpoint
        collection = f"the index {index_dir}"
        extra = {
            "index": {
                "path": describe(index_dir),
                "kind": index.kind,
                "items": len(index),
                "params": index.params,
                "recall": index.recall_info(),
            }
        }
        about = f"{index.kind} index, {recall_text(index.recall_info(), len(index))}"
    else:
        run_dir, database = resolve_database(run_dir, data_base)
        identity, extra, tta = model_identity(run_dir), {}, tta or "none"
        check_database_tta(database, tta)
        about = ""
    out_dir = Path(out_dir or (RETRIEVAL if index_dir else Path(run_dir) / RETRIEVAL))
    if index_dir and out_dir.resolve().is_relative_to(local_folder(index_dir).resolve()):
        raise UserError(
            f"--out {out_dir} is inside the index's folder {local_folder(index_dir)}; retrieve writes "
            "its picture elsewhere (default: ./retrieval)"
        )
    check_writable_folder(out_dir, "the output folder")
    embedder = load_embedder(run_dir, runtime, device, tta)
    if index_dir:
        check_mix(index.model, embedder.identity)
    else:
        index, collection = run_index(run_dir, embedder, split, database)
    rerank = rerank.for_collection(len(index)) if rerank is not None else None  # results.json: what was used
    r = search_image(index, embedder, query, k, collection, rerank)
    r.about = about
    model = {
        "run": str(Path(run_dir).resolve()),
        "runtime": runtime,
        "tta": tta,
        **{key: identity.get(key) for key in ("backbone", "checkpoint_sha256", "checkpoint_epoch")},
    }
    rerank_dict = rerank.to_dict() if rerank is not None else {"method": "none"}
    return r, save_retrieval(r, out_dir, {"model": model, "rerank": rerank_dict, **extra})


RETRIEVAL = "retrieval"  # retrieve's output folder: ./retrieval (an index), RUN/retrieval (a run)


def output_names(out_dir: Path) -> tuple[Path, Path]:
    """(picture, results) paths in `out_dir` that replace nothing: retrieval.png and results.json, else the first
    free pair retrieval-N.png and results-N.json (N = 2, 3, ...)."""
    n = 1
    while True:
        suffix = "" if n == 1 else f"-{n}"
        png, results = out_dir / f"retrieval{suffix}.png", out_dir / f"results{suffix}.json"
        if not (png.exists() or results.exists()):
            return png, results
        n += 1


def save_retrieval(r: Retrieval, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the picture and results.json into `out_dir` under names that replace no earlier ones
    (`output_names`); return the picture's path. The picture shows the
    first `plots.MAX_DRAWN` results (results.json and the printed list hold all). Results whose image file is
    missing are kept in results.json (`missing`), left out of the picture, and reported on stderr."""
    rows = [{**res.to_dict(), "missing": not os.path.isfile(res.path)} for res in r.results]
    missing = [row["path"] for row in rows if row["missing"]]
    if missing:
        print(
            f"mproxy: warning: {len(missing)} of {len(rows)} result images are missing (moved or deleted?), "
            f"e.g. {missing[0]}; they are listed in results.json, not drawn",
            file=sys.stderr,
        )
    png, results = output_names(Path(out_dir))
    shown = [res for res, row in zip(r.results, rows) if not row["missing"]][:MAX_DRAWN]
    title = f"top {len(rows)} in {r.collection}" + (f" (first {len(shown)} drawn)" if len(shown) < len(rows) else "")
    png = draw_results(r.query, shown, png, r.label, title=title, label_name=r.label_name)
    write_json(
        results,
        {
            "query": str(r.query),
            "query_label": r.label,
            "query_class_name": r.label_name,
            "searched": r.collection,
            "k": len(rows),
            "requested_k": r.requested_k,
            **(extra or {}),
            "results": rows,
        },
    )
    return png


def resolve_database(run_dir: str | None, data_base: str | None) -> tuple[str, Path | None]:
    """(run folder, database .npz or None) from a run folder and/or the original tool's `--data_base`
    (a run folder or its embeddings file)."""
    database = None
    if data_base:
        db = Path(data_base)
        if db.is_dir():
            run_dir = run_dir or str(db)
        else:
            database = db
            run_dir = run_dir or str(db.parent)
    if not run_dir:
        raise UserError("give a run folder (or --data_base, or --index)")
    return run_dir, database


def ranked_list(r: Retrieval) -> str:
    """The results as text lines: rank, raw cosine similarity (and the re-ranked score that ordered the list),
    class, path, and marks (a copy of the query; same or other class when the query's class is known)."""
    return "\n".join(
        f"#{h.rank:<3d} {h.score:.3f}{_reranked(h)}  {class_text(h)}  {h.path}{mark}"
        for h, mark in zip(r.results, marks(r))
    )


def _reranked(hit: Hit) -> str:
    return "" if hit.rerank_score is None else f" (re-ranked {hit.rerank_score:.3f})"


def class_text(hit: Hit) -> str:
    """How printed lists show a hit's class: its name, else its label, else `-` (unknown)."""
    return hit.class_name or ("-" if hit.label is None else f"class {hit.label}")


def marks(r: Retrieval) -> list[str]:
    """Per result, what the printed list says of it beyond its class: a copy of the query, same or other class."""
    verdict = {True: "  same class", False: "  other class", None: ""}
    return [("  (the query image itself)" if h.same_image else "") + verdict[h.same_class] for h in r.results]
