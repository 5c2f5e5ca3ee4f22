"""Evaluation jobs: a run's selected checkpoint on its test split, or an embeddings file made elsewhere."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from momentum_proxy.data.loading import EvalSplit, eval_dataset
from momentum_proxy.data.manifest import manifest_sha256, read_manifest, split_frame
from momentum_proxy.embedding.base import Embedder
from momentum_proxy.embedding.inference import TorchEmbedder, embed_dataset
from momentum_proxy.evaluation.metrics import ALL_METRICS, evaluate_embeddings
from momentum_proxy.fileio import write_json
from momentum_proxy.runs import BEST, RunDir, load_embeddings


def evaluate_arrays(features: np.ndarray, labels: np.ndarray, split: np.ndarray | None, *, metrics=None,
                    recalls=None) -> dict:
    """Metrics over the test rows (split == 'test'), or query vs gallery when the split names them."""
    kwargs = dict(metrics=metrics or ALL_METRICS, recalls=recalls or (1, 2, 4, 8))
    if split is not None and {"query", "gallery"} <= set(split):
        q, g = split == "query", split == "gallery"
        return evaluate_embeddings(features[g], labels[g], query_features=features[q], query_labels=labels[q],
                                   **kwargs)
    if split is not None and "test" in set(split):
        keep = split == "test"
        features, labels = features[keep], labels[keep]
    return evaluate_embeddings(features, labels, **kwargs)


def evaluate_file(path: str | Path, *, metrics=None, recalls=None, json_out: str | None = None) -> dict:
    data = load_embeddings(path)
    res = evaluate_arrays(data["features"], data["labels"], data.get("split"), metrics=metrics, recalls=recalls)
    if json_out:
        write_json(json_out, res)
    return res


def evaluate_run(run_dir: str | Path, *, metrics=None, recalls=None, out: str | Path | None = None,
                 device: str = "auto", embedder: Embedder | None = None) -> dict:
    """All metrics (or `metrics`) of the run's selected checkpoint on its test split, embedded by `embedder`
    (default: the run's model in PyTorch on `device`; `deploy.runtimes.load_embedder` gives the others), written
    to `out` (default RUN_DIR/evaluate-RUNTIME.json). RUN_DIR/eval.json, the test result training computed once,
    is never changed. Returns what was written: checkpoint, epoch, how it was selected, split, queries (and
    those without another item of their class, left out of the metrics), runtime, and the values under "test"."""
    run = RunDir(run_dir)
    info = run.info()
    cfg = run.config()
    embedder = embedder or TorchEmbedder(run_dir, device)
    if info.get("data_manifest_sha256") not in (None, manifest_sha256(cfg.data)):
        print(f"mproxy: warning: {Path(cfg.data) / 'manifest.csv'} changed since this run was trained; "
              "these figures are not comparable with the run's own", file=sys.stderr)
    frame = split_frame(read_manifest(cfg.data), "test")
    test = EvalSplit("test", frame, eval_dataset(cfg.data, frame, embedder.image_size))
    feats = embed_dataset(embedder, test.dataset, embedder.device, batch_size=cfg.embed_batch_size,
                          workers=cfg.loader_workers)
    res = evaluate_arrays(feats, test.labels, test.split, metrics=metrics, recalls=recalls or cfg.recalls)
    trained = run.eval() or {}
    summary = {"checkpoint": BEST, "epoch": run.load_checkpoint(BEST)["epoch"],
               "selected_on": trained.get("selected_on", info.get("selection", "?")),
               "select_metric": trained.get("select_metric"), "split": "test", "queries": test.num_queries,
               "lone_queries": test.lone_queries, "runtime": embedder.runtime, "test": res}
    write_json(out or evaluation_file(run_dir, embedder.runtime), summary)
    return summary


def evaluation_file(run_dir: str | Path, runtime: str) -> Path:
    """Where `evaluate_run` writes by default: RUN_DIR/evaluate-RUNTIME.json."""
    return Path(run_dir) / f"evaluate-{runtime}.json"


def describe(summary: dict, run_dir) -> str:
    """One line naming what was evaluated: run, checkpoint, epoch, selection, split and queries."""
    how = summary.get("selected_on")
    chosen = {"last": "the last epoch", "val": f"selected on val {summary.get('select_metric')}",
              "test": "SELECTED ON TEST (optimistic)"}.get(how, f"selected on {how}")
    lone = summary.get("lone_queries")
    left_out = f" ({lone} without another image of its class: left out of the metrics)" if lone else ""
    return (f"{run_dir}: {summary['checkpoint']} (epoch {summary['epoch']}, {chosen}) on the {summary['split']} "
            f"split, {summary['queries']} queries{left_out}, runtime {summary.get('runtime', 'torch')}")


def format_table(res: dict) -> str:
    width = max(len(k) for k in res)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {100 * v:6.2f}" for k, v in res.items()]
    return "\n".join(lines) + "\n(values in %)"
