"""`mproxy retrieve`, `index` and `serve`: searching with a trained model, saved indexes and the service."""

from __future__ import annotations

import argparse
import os

from momentum_proxy.cli.options import INDEX_TTA_HELP, add_command, add_rerank_options, add_runtime_options, rerank_of
from momentum_proxy.config import DEFAULT_TTA, parse_memory
from momentum_proxy.errors import UserError
from momentum_proxy.perf import passive_omp_wait


def add_retrieve(sub) -> None:
    p = add_command(sub, "retrieve", help="top-K retrieval picture and ranked list for a query image")
    p.add_argument("run_dir", nargs="?", help="run folder")
    p.add_argument("--query", "--query_img_name", dest="query", required=True, help="query image file")
    p.add_argument(
        "-k", "--retrieval_num", "--retrieval-num", dest="k", type=int, default=8, help="how many results to show"
    )
    p.add_argument(
        "--split", default="test", help="which images of the run's dataset to search: test | val | train | all"
    )
    p.add_argument(
        "--data_base", "--data-base", dest="data_base", help="(original) a run folder or its embeddings database (.npz)"
    )
    p.add_argument(
        "--index",
        help="search a saved index (mproxy index: a folder, milvus:PATH.db or "
        "milvus://HOST:PORT/COLLECTION) instead of the run's database",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder of the picture and results.json (default: ./retrieval "
        "with --index, else RUN_DIR/retrieval); earlier ones are kept: the next are numbered "
        "(retrieval-2.png, results-2.json)",
    )
    add_runtime_options(p)
    p.add_argument("--tta", default=None, help=INDEX_TTA_HELP)
    add_rerank_options(p)


def run_retrieve(a) -> None:
    rerank = rerank_of(a)
    from momentum_proxy.retrieval.present import ranked_list, retrieve_and_draw  # job

    r, png = retrieve_and_draw(
        a.query,
        a.k,
        a.out,
        run_dir=a.run_dir,
        index_dir=a.index,
        data_base=a.data_base,
        split=a.split,
        device=a.device,
        runtime=a.runtime,
        tta=a.tta,
        rerank=rerank,
    )
    print(
        f"searched {r.collection}"
        + (f" ({r.about})" if r.about else "")
        + (f", re-ranked by {rerank}" if rerank.active else "")
        + (f"; -k {a.k} capped to the {len(r.results)} images there" if len(r.results) < a.k else "")
    )
    print(ranked_list(r))
    print(f"retrieval picture: {png}")


def add_index(sub) -> None:
    p = add_command(sub, "index", help="embed an image collection with a trained model into an index (faiss or Milvus)")
    p.add_argument("run_dir", help="run folder whose selected checkpoint embeds the images")
    p.add_argument(
        "--images",
        help="a folder of images or a prepared dataset (images already indexed, by path or by content, are skipped)",
    )
    p.add_argument(
        "--list",
        default=None,
        help="instead of --images: a text or CSV file of image paths, one a line, "
        "each optionally followed by ',class_name' (read and embedded a chunk at a time)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="index folder (faiss), milvus:PATH.db (Milvus Lite) or "
        "milvus://HOST:PORT/COLLECTION (a Milvus server, token from $MPROXY_MILVUS_TOKEN); an existing "
        "index is extended",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="make the index anew (from --images, or from its own images), replacing it atomically",
    )
    add_index_kind_options(p)
    p.add_argument(
        "--labels",
        default="auto",
        help="class names: auto (a prepared dataset's, or the sub-folder names of a folder of class "
        "folders) | folders | none | a CSV file of 'path,class_name' lines",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images embedded together")
    add_runtime_options(p)
    p.add_argument(
        "--tta",
        default=None,
        help="test-time augmentation: none | flip (each image and its mirror image, "
        "embeddings averaged; about twice the embedding time); default: the "
        f"index's own, else {DEFAULT_TTA}",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=4096,
        help="under torchrun (`torchrun --nproc-per-node N -m momentum_proxy index ...`), every rank "
        "embeds its share of the images, this many to a chunk file (a rerun of a killed build "
        "reuses them), and rank 0 fills the index",
    )
    add_rerank_options(p, "The index keeps this re-ranking's neighbour lists (saved with it, kept up to date)")


def add_index_kind_options(p) -> None:
    """The faiss index kind of a new or rebuilt index: --kind, or --max-memory to choose it."""
    p.add_argument(
        "--kind",
        default=None,
        help="faiss index of a new or rebuilt index: exact | ivf | hnsw | ivfpq (default: exact, or the one "
        "--max-memory chooses)",
    )
    p.add_argument(
        "--max-memory",
        type=memory_size,
        default=None,
        metavar="SIZE",
        help="memory the faiss index may take (e.g. 512MB, 2GB, 1.5GiB): chooses exact, hnsw, ivf or ivfpq "
        "as autofaiss does, or, with --kind, sizes that kind; recall@10 against exact search is "
        "measured and saved with the index",
    )


def memory_size(text: str) -> int:
    """A size such as 2GB or 1.5GiB in bytes (an option type: a size already parsed, an int, passes)."""
    try:
        return parse_memory(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--max-memory ")) from None


def run_index(a) -> None:
    rerank = rerank_of(a)
    from momentum_proxy.retrieval.stores import check_not_being_written  # faiss: only for these two commands

    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 takes the lock; the others never check
        check_not_being_written(a.out)
    from momentum_proxy.retrieval.build import build_index  # job

    a.on_interrupt = "the index is as it was before; run the same command again"
    summary = build_index(
        a.run_dir,
        a.images,
        a.out,
        kind=a.kind,
        batch_size=a.batch_size,
        device=a.device,
        rebuild=a.rebuild,
        runtime=a.runtime,
        labels=a.labels,
        tta=a.tta,
        rerank=rerank,
        image_list=a.list,
        chunk_size=a.chunk_size,
        max_memory=a.max_memory,
    )
    for k, v in (summary or {}).items():  # None on torchrun ranks other than 0
        print(f"{k}: {v}")


def add_serve(sub) -> None:
    p = add_command(sub, "serve", help="HTTP API and web page over a saved index (mproxy index)")
    p.add_argument("index", help="index folder, milvus:PATH.db or milvus://HOST:PORT/COLLECTION")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback a --token is required)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--token", default=None, help="write token for POST/DELETE /items (default: $MPROXY_TOKEN)")
    p.add_argument("--run", default=None, help="the run that built the index (default: the one it records)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (width x height)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this origin (repeatable; off by default)")
    p.add_argument("--max-batch", type=int, default=32, help="queries embedded together at most")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=50.0,
        help="how long a batch waits for concurrent queries still being decoded (a lone query never waits)",
    )
    add_runtime_options(p)
    p.add_argument("--tta", default=None, help=INDEX_TTA_HELP)
    p.add_argument(
        "--mmap",
        action="store_true",
        help="map an ivf or ivfpq index's inverted lists from its file instead of reading them into memory "
        "(starts without loading the whole index; adds are refused, deletes work)",
    )
    p.add_argument(
        "--model-processes",
        default="auto",
        help="model processes beside the server's (CPU, torch): auto is 2 on a CPU with 2+ cores, else 0 "
        "(the model runs in the server's process)",
    )
    add_rerank_options(
        p,
        "It applies to the searches that name none; a request may name another, within the "
        "neighbour lists the index keeps",
    )


def run_serve(a) -> None:
    rerank = rerank_of(a)
    from momentum_proxy.retrieval.stores import check_not_being_written  # faiss: only for these two commands

    check_not_being_written(a.index)
    passive_omp_wait()  # before torch loads (serving.app imports it)
    from momentum_proxy.serving.app import TOKEN_ENV, serve  # job

    if a.max_upload_mb <= 0 or a.max_pixels < 1 or a.max_batch < 1 or a.batch_wait_ms < 0:
        raise UserError("--max-upload-mb, --max-pixels and --max-batch must be positive, --batch-wait-ms >= 0")
    serve(
        a.index,
        host=a.host,
        port=a.port,
        token=a.token or os.environ.get(TOKEN_ENV) or None,
        run_dir=a.run,
        device=a.device,
        max_upload_bytes=int(a.max_upload_mb * 2**20),
        max_pixels=a.max_pixels,
        cors_origins=a.cors_origin,
        max_batch=a.max_batch,
        batch_wait_ms=a.batch_wait_ms,
        runtime=a.runtime,
        model_processes=a.model_processes,
        tta=a.tta,
        rerank=rerank,
        mmap=a.mmap,
    )
