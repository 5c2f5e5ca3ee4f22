"""Evaluation jobs: a run's best checkpoint on its test split, or an embeddings file made elsewhere."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from momentum_proxy.data.loading import eval_dataset
from momentum_proxy.data.manifest import read_manifest, split_frame
from momentum_proxy.evaluation import ALL_METRICS, evaluate_embeddings
from momentum_proxy.fileio import write_json
from momentum_proxy.inference import embed_dataset
from momentum_proxy.runtime import load_embedder
from momentum_proxy.runs import RunDir, load_embeddings


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


def evaluate_run(run_dir: str | Path, *, metrics=None, recalls=None, json_out: str | None = None,
                 device: str = "auto", runtime: str = "torch") -> dict:
    """All metrics (or `metrics`) of the run's best checkpoint, embedded by `runtime` (torch | onnx); written
    to RUN_DIR/eval.json (and `json_out`)."""
    embedder = load_embedder(run_dir, runtime, device)
    cfg = RunDir(run_dir).config()
    test = split_frame(read_manifest(cfg.data), "test")
    feats = embed_dataset(embedder, eval_dataset(cfg.data, test, embedder.image_size),
                          embedder.device, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                          workers=cfg.workers)
    res = evaluate_arrays(feats, test["label"].to_numpy(), test["split"].to_numpy(), metrics=metrics,
                          recalls=recalls or cfg.recalls)
    write_json(RunDir(run_dir) / "eval.json", res)
    if json_out:
        write_json(json_out, res)
    return res


def format_table(res: dict) -> str:
    width = max(len(k) for k in res)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {100 * v:6.2f}" for k, v in res.items()]
    return "\n".join(lines) + "\n(values in %)"
