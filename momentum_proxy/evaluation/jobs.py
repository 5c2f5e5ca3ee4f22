"""Evaluation jobs: a run's selected checkpoint on its test (or val) split, or an embeddings file made elsewhere.

A re-ranking (`rerank`: a `retrieval.rerank.Rerank`, passed in by the caller) changes the neighbour lists the
metrics read; each query is left out of the collection for its own search, the re-ranking's database side included.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from momentum_proxy.config import DEFAULT_KEEP
from momentum_proxy.data.loading import EvalSplit, eval_dataset
from momentum_proxy.data.manifest import GALLERY_SPLITS, manifest_sha256, read_manifest, split_frame, split_protocol
from momentum_proxy.embedding.base import Embedder
from momentum_proxy.embedding.inference import TorchEmbedder, embed_dataset
from momentum_proxy.errors import UserError
from momentum_proxy.evaluation.metrics import ALL_METRICS, evaluate_embeddings
from momentum_proxy.fileio import write_json
from momentum_proxy.runs import BEST, RunDir, load_embeddings


def evaluate_arrays(
    features: np.ndarray,
    labels: np.ndarray,
    split: np.ndarray | None,
    *,
    metrics=None,
    recalls=None,
    rerank=None,
    device=None,
) -> dict:
    """Metrics over the test rows (split == 'test'), or query vs gallery when the split names them; `rerank`
    re-ranks the searches; `device`: where the exact search runs (`evaluate_embeddings`; the embedding device)."""
    if rerank is not None:
        gallery = int((split == "gallery").sum()) if split is not None and "gallery" in set(split) else len(features)
        rerank = rerank.for_collection(gallery)
    kwargs = dict(metrics=metrics or ALL_METRICS, recalls=recalls or (1, 2, 4, 8), rerank=rerank, device=device)
    if split is not None and {"query", "gallery"} <= set(split):
        q, g = split == "query", split == "gallery"
        return evaluate_embeddings(features[g], labels[g], query_features=features[q], query_labels=labels[q], **kwargs)
    if split is not None and "test" in set(split):
        keep = split == "test"
        features, labels = features[keep], labels[keep]
    return evaluate_embeddings(features, labels, **kwargs)


def evaluate_file(path: str | Path, *, metrics=None, recalls=None, json_out: str | None = None, rerank=None) -> dict:
    data = load_embeddings(path)
    res = evaluate_arrays(
        data["features"], data["labels"], data.get("split"), metrics=metrics, recalls=recalls, rerank=rerank
    )
    if json_out:
        write_json(json_out, res)
    return res


def evaluate_run(
    run_dir: str | Path,
    *,
    metrics=None,
    recalls=None,
    out: str | Path | None = None,
    device: str = "auto",
    embedder: Embedder | None = None,
    split: str = "test",
    rerank=None,
) -> dict:
    """All metrics (or `metrics`) of the run's selected checkpoint on its `split` (test, or val to choose
    settings such as `rerank` without touching test), searched with `rerank`, embedded by `embedder`
    (default: the run's model in PyTorch on `device`; `deploy.runtimes.load_embedder` gives the others, and test-
    time augmentation), written to `out` (default: `evaluation_file`). RUN_DIR/eval.json, the test result training
    computed once, is never changed. Returns what was written: checkpoint, epoch, how it was selected, split,
    queries (and those without another item of their class, left out of the metrics), runtime, tta, rerank, and
    the values under the split's name."""
    if split not in ("test", "val"):
        raise UserError(f"evaluate --split takes test or val, not {split!r}")
    run = RunDir(run_dir)
    info = run.info()
    cfg = run.config()
    embedder = embedder or TorchEmbedder(run_dir, device)
    tta = embedder.identity.get("tta", "none")
    test, feats = embed_split(run_dir, split, embedder)
    rerank = rerank.for_collection(len(feats)) if rerank is not None else None
    res = evaluate_arrays(
        feats,
        test.labels,
        test.split,
        metrics=metrics,
        recalls=recalls or cfg.recalls,
        rerank=rerank,
        device=embedder.device,
    )
    trained = run.eval() or {}
    summary = {
        "checkpoint": BEST,
        "epoch": run.load_checkpoint(BEST)["epoch"],
        "selected_on": trained.get("selected_on", info.get("selection", "?")),
        "select_metric": trained.get("select_metric", info.get("select_metric")),
        "split": split,
        "queries": test.num_queries,
        "lone_queries": test.lone_queries,
        "against": gallery_text(cfg.data, test, split),
        "runtime": embedder.runtime,
        "tta": tta,
        "rerank": rerank.to_dict() if rerank is not None else {"method": "none"},
        split: res,
    }
    write_json(out or evaluation_file(run_dir, embedder.runtime, tta, split=split, rerank=rerank), summary)
    return summary


def gallery_text(data, rows: EvalSplit, split: str) -> str | None:
    """What the queries of `rows` search, in words, when it is a gallery: an images split's catalogue."""
    gallery = int((rows.split == "gallery").sum())
    if not gallery:
        return None
    if split_protocol(read_manifest(data)) == "images":
        return f"the catalogue ({gallery} {' + '.join(GALLERY_SPLITS[split])} images)"
    return f"{gallery} gallery images"


def embed_split(
    run_dir: str | Path, split: str, embedder: Embedder, queries_only: bool = False
) -> tuple[EvalSplit, np.ndarray]:
    """The run's `split` (test or val) of its dataset and its features by `embedder`, as `evaluate_run` scores
    them (`experiments.tune_rerank` embeds val this way too, so its figures are `evaluate --split val`'s);
    `queries_only`: the split's query rows alone (no gallery: they search one elsewhere, e.g. a saved index)."""
    if split not in ("test", "val"):
        raise UserError(f"evaluate --split takes test or val, not {split!r}")
    run = RunDir(run_dir)
    info, cfg = run.info(), run.config()
    if info.get("data_manifest_sha256") not in (None, manifest_sha256(cfg.data)):
        print(
            f"mproxy: warning: {Path(cfg.data) / 'manifest.csv'} changed since this run was trained; "
            "these figures are not comparable with the run's own",
            file=sys.stderr,
        )
    frame = split_frame(read_manifest(cfg.data), split)
    if queries_only and (frame["split"] == "query").any():
        frame = frame[frame["split"] == "query"].reset_index(drop=True)
    if frame.empty:
        raise UserError(f"{cfg.data} has no {split} split to evaluate")
    rows = EvalSplit(split, frame, eval_dataset(cfg.data, frame, embedder.image_size))
    feats = embed_dataset(embedder, rows.dataset, batch_size=cfg.embed_batch_size, workers=cfg.loader_workers)
    return rows, feats


def evaluation_file(
    run_dir: str | Path, runtime: str, tta: str = "none", *, split: str = "test", rerank=None, index: bool = False
) -> Path:
    """Where `evaluate_run` writes by default: RUN_DIR/evaluate-RUNTIME.json, with -TTA, -val, -METHOD (the
    re-ranking) and -index (queries against a saved index) before .json when they apply
    (evaluate-torch-val-dba.json; -keepN after the method when it keeps other than `config.DEFAULT_KEEP` hits)."""
    method = rerank.method if rerank is not None else "none"
    if method != "none" and rerank.keep != DEFAULT_KEEP:
        method += f"-keep{rerank.keep}"
    parts = [
        runtime,
        *([tta] if tta != "none" else []),
        *([split] if split != "test" else []),
        *([method] if method != "none" else []),
        *(["index"] if index else []),
    ]
    return Path(run_dir) / f"evaluate-{'-'.join(parts)}.json"


def describe(summary: dict, run_dir) -> str:
    """One line naming what was evaluated: run, checkpoint, epoch, selection, split and queries."""
    how = summary.get("selected_on")
    chosen = {
        "last": "the last epoch",
        "val": f"selected on val {summary.get('select_metric')}",
        "test": "SELECTED ON TEST (optimistic)",
    }.get(how, f"selected on {how}")
    lone = summary.get("lone_queries")
    left_out = f" ({lone} without another image of its class: left out of the metrics)" if lone else ""
    rerank = dict(summary.get("rerank", {"method": "none"}))
    method = rerank.pop("method")
    rerank_text = method + (f" ({', '.join(f'{k} {v:g}' for k, v in rerank.items())})" if rerank else "")
    against = f" against {summary['against']}" if summary.get("against") else ""
    return (
        f"{run_dir}: {summary['checkpoint']} (epoch {summary['epoch']}, {chosen}) on the {summary['split']} "
        f"split, {summary['queries']} queries{left_out}{against}, runtime {summary.get('runtime', 'torch')}, "
        f"tta {summary.get('tta', 'none')}, rerank {rerank_text}"
    )


def format_table(res: dict) -> str:
    width = max(len(k) for k in res)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {100 * v:6.2f}" for k, v in res.items()]
    return "\n".join(lines) + "\n(values in %)"
