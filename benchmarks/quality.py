"""Retrieval quality on a prepared dataset with a val split: training, image size, backbone, test-time augmentation
and re-ranking, each alone and combined, chosen on validation only, with their CPU cost.

Stages (each resumable: records go to OUT/records.jsonl, runs to OUT/runs/; run a stage again to continue it):

    python benchmarks/quality.py runs  --data D --out O --cells lite0@224:0,lite0@224:4 --seeds 0,1,2
    python benchmarks/quality.py val   --out O          # every run x tta (none, flip) x the re-ranking grid, on val
    python benchmarks/quality.py table --out O          # val means +- 95 % CI per setting, best first
    python benchmarks/quality.py test  --out O --pick "lite0@224:0 none none" ...  # test once per final setting
    python benchmarks/quality.py cost  --out O          # embed ms/img, search ms/query, training minutes

A cell is BACKBONE@SIZE:EPOCHS (lite0 = efficientnet_lite0; epochs 0 = the pretrained start, no training). A
setting is "CELL TTA RERANK" with RERANK a method or method/k=5/alpha=3 (parameters as `mproxy evaluate`'s
--rerank-*). Val figures are computed from one embedding of the split per run and tta by the functions `mproxy
evaluate --split val` uses (`evaluation.jobs.embed_split`, `evaluate_arrays`), so they are its figures; the test
stage calls `evaluate_run` itself, which writes RUN/evaluate-*.json as `mproxy evaluate` does.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from momentum_proxy.deploy.runtimes import load_embedder
from momentum_proxy.evaluation.jobs import embed_split, evaluate_arrays, evaluate_run
from momentum_proxy.fileio import write_text
from momentum_proxy.retrieval.faiss_store import FaissStore
from momentum_proxy.retrieval.rerank import Rerank, rerank_store
from momentum_proxy.runs import RunDir
from momentum_proxy.training.config import TrainConfig
from momentum_proxy.training.loop import train
from momentum_proxy.vectors import l2_normalize

BACKBONES = {"lite0": "efficientnet_lite0", "lite1": "efficientnet_lite1", "lite2": "efficientnet_lite2"}
TTAS = ("none", "flip")
# Each method at its defaults, plus the neighbour counts and weights around them that the calibration suggested;
# k-reciprocal's leave-one-out evaluation recomputes the collection's side per query (~0.1 s a query at 300 items).
GRID = [
    "none",
    "aqe/k=5/alpha=3",
    "dba/k=5/alpha=3",
    *[f"dba+aqe/k={k}/alpha={a}" for k in (5, 10) for a in (0, 3)],
    "dba+aqe/k=20/alpha=0",
    "kreciprocal/k=20/k2=6/lam=0.3",
    "kreciprocal/k=30/k2=6/lam=0.1",
    "kreciprocal/k=40/k2=6/lam=0.1",
]
METRICS = ("recall@1", "map@r", "r_precision", "precision@1")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t, two-sided 95 %, by degrees of freedom


def parse_cell(cell: str) -> tuple[str, int, int]:
    name, rest = cell.split("@")
    size, epochs = rest.split(":")
    return name, int(size), int(epochs)


def parse_rerank(text: str) -> Rerank:
    """A grid entry as a `Rerank`; the method alone (keep 0, as this study measured it) unless it says keep=N."""
    method, *params = text.split("/")
    kwargs = {"keep": 0}
    for p in params:
        key, value = p.split("=")
        kwargs[key] = float(value) if key in ("alpha", "lam") else int(value)
    return Rerank(method, **kwargs)


def run_path(out: Path, cell: str, seed: int) -> Path:
    return out / "runs" / f"{cell.replace('@', '-').replace(':', '-e')}-s{seed}"


def read_records(out: Path) -> list[dict]:
    path = out / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def append_record(out: Path, record: dict) -> None:
    with open(out / "records.jsonl", "a") as f:  # one line per record: a killed stage loses at most the open one
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finished(run: Path, epochs: int) -> bool:
    r = RunDir(run)
    return r.has_model() and len(r.metrics()) == epochs + 1


def stage_runs(a) -> None:
    for seed in a.seeds:
        for cell in a.cells:
            name, size, epochs = parse_cell(cell)
            path = run_path(a.out, cell, seed)
            if finished(path, epochs):
                continue
            cfg = TrainConfig(
                data=str(a.data),
                out=str(path),
                backbone=BACKBONES[name],
                image_size=size,
                epochs=epochs,
                seed=seed,
                final_test=False,
                **({"batch_size": a.batch_size} if a.batch_size else {}),
            )
            print(f"== {cell} seed {seed}", flush=True)
            train(cfg, overwrite=True)


def runs_of(out: Path) -> list[tuple[str, int, Path]]:
    found = []
    for cfg_file in sorted((out / "runs").glob("*/config.json")):
        cfg = json.loads(cfg_file.read_text())
        short = {v: k for k, v in BACKBONES.items()}[cfg["backbone"]]
        cell = f"{short}@{cfg['image_size']}:{cfg['epochs']}"
        if finished(cfg_file.parent, cfg["epochs"]):
            found.append((cell, cfg["seed"], cfg_file.parent))
    return found


def stage_val(a) -> None:
    done = {(r["run"], r["tta"], r["rerank"]) for r in read_records(a.out) if r["split"] == "val"}
    for cell, seed, run in runs_of(a.out):
        if a.runs and not any(fnmatch.fnmatch(run.name, pattern) for pattern in a.runs):
            continue
        for tta in TTAS:
            todo = [g for g in a.grid or GRID if (run.name, tta, g) not in done]
            if not todo:
                continue
            cache = a.out / "val-features" / f"{run.name}-{tta}.npz"  # kept: the grid can grow without re-embedding
            if not cache.exists():
                rows, feats = embed_split(run, "val", load_embedder(run, "torch", "cpu", tta))
                cache.parent.mkdir(exist_ok=True)
                np.savez(cache, features=feats, labels=rows.labels, split=rows.split.astype(str))
            saved = np.load(cache)
            feats, labels, split = saved["features"], saved["labels"], saved["split"]
            for g in todo:
                res = evaluate_arrays(feats, labels, split, rerank=parse_rerank(g))
                append_record(
                    a.out,
                    {
                        "run": run.name,
                        "cell": cell,
                        "seed": seed,
                        "tta": tta,
                        "rerank": g,
                        "split": "val",
                        "images": len(feats),
                        **res,
                    },
                )
            print(f"{run.name} tta {tta}: {len(todo)} settings", flush=True)


def mean_ci(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan
    return m, T95[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def grouped(records: list[dict], split: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["split"] == split and (split != "val" or r["rerank"] in GRID):
            groups.setdefault((r["cell"], r["tta"], r["rerank"]), []).append(r)
    return groups


def fmt(values: list[float]) -> str:
    m, ci = mean_ci([100 * v for v in values])
    return f"{m:.1f}" if math.isnan(ci) else f"{m:.1f} ± {ci:.1f}"


def stage_table(a) -> None:
    records = read_records(a.out)
    groups = grouped(records, "val")
    order = sorted(groups, key=lambda g: -statistics.fmean(r["map@r"] for r in groups[g]))
    lines = ["| cell | tta | rerank | seeds | val MAP@R | val R@1 |", "|---|---|---|---|---|---|"]
    for g in order[: a.top] if a.top else order:
        rs = groups[g]
        lines.append(
            f"| {g[0]} | {g[1]} | {g[2]} | {len(rs)} | {fmt([r['map@r'] for r in rs])} | "
            f"{fmt([r['recall@1'] for r in rs])} |"
        )
    tests = grouped(records, "test")
    if tests:
        lines += [
            "",
            "| cell | tta | rerank | seeds | test R@1 | test MAP@R | test R-precision |",
            "|---|---|---|---|---|---|---|",
        ]
        for g, rs in tests.items():
            lines.append(
                f"| {g[0]} | {g[1]} | {g[2]} | {len(rs)} | {fmt([r['recall@1'] for r in rs])} | "
                f"{fmt([r['map@r'] for r in rs])} | {fmt([r['r_precision'] for r in rs])} |"
            )
    text = "\n".join(lines) + "\n"
    write_text(a.out / "table.md", text)
    print(text)


def stage_test(a) -> None:
    done = {(r["run"], r["tta"], r["rerank"]) for r in read_records(a.out) if r["split"] == "test"}
    for pick in a.pick:
        cell, tta, rerank = pick.split()
        for c, seed, run in runs_of(a.out):
            if c != cell or (run.name, tta, rerank) in done:
                continue
            summary = evaluate_run(
                run,
                split="test",
                embedder=load_embedder(run, "torch", "cpu", tta),
                rerank=parse_rerank(rerank),
                device="cpu",
            )
            append_record(
                a.out,
                {
                    "run": run.name,
                    "cell": cell,
                    "seed": seed,
                    "tta": tta,
                    "rerank": rerank,
                    "split": "test",
                    **summary["test"],
                },
            )
            print(f"{run.name} {tta} {rerank}: test {summary['test']}", flush=True)


def stage_cost(a) -> None:
    """Embedding ms per image (batches of 32 random images through the model: no decoding), each cell's training
    minutes (the sum of its epochs' wall time in metrics.csv, mean over seeds), and search ms per query (one query
    at a time against `--gallery` random items, the collection's side computed once beforehand, as in `serve`)."""
    import torch  # lazy: only this stage times the model

    rng = np.random.default_rng(0)
    by_model: dict[str, list[tuple[int, Path]]] = {}
    for cell, _, run in runs_of(a.out):
        name, size, epochs = parse_cell(cell)
        by_model.setdefault(f"{name}@{size}", []).append((epochs, run))
    lines = [
        "| backbone@size | embed ms/img (tta none) | embed ms/img (flip) | training min, 4 epochs (mean of seeds) |",
        "|---|---|---|---|",
    ]
    for model, runs in sorted(by_model.items()):
        size = int(model.split("@")[1])
        cost = []
        for tta in TTAS:
            embedder = load_embedder(runs[0][1], "torch", "cpu", tta)
            images = torch.from_numpy(rng.integers(0, 256, (32, 3, size, size), dtype=np.uint8))
            embedder.embed(images)  # warm-up
            t0 = time.perf_counter()
            for _ in range(a.repeat):
                embedder.embed(images)
            cost.append(1000 * (time.perf_counter() - t0) / (32 * a.repeat))
        trained = [sum(r["seconds"] for r in RunDir(run).metrics()) / 60 for epochs, run in runs if epochs > 0]
        minutes = f"{statistics.fmean(trained):.1f}" if trained else "–"
        lines.append(f"| {model} | {cost[0]:.1f} | {cost[1]:.1f} | {minutes} |")
    sizes = [int(n) for n in a.gallery.split(",")]
    lines += [
        "",
        "| rerank | " + " | ".join(f"search ms/query, {n} items" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    centres = rng.standard_normal((max(sizes) // 60 + 1, 512)).astype(np.float32)

    def clustered(n: int) -> np.ndarray:  # classes of 60 as in birds50, within-class cosine about 0.4
        return l2_normalize(centres[rng.integers(0, n // 60 + 1, n)] + rng.standard_normal((n, 512), np.float32))

    stores = [FaissStore.build(clustered(n), [str(i) for i in range(n)]) for n in sizes]
    queries = clustered(a.queries)  # new items of the smallest collection's classes, as a served photo
    for g in a.grid or GRID:
        rerank, row = parse_rerank(g), []
        for store in stores:
            rerank_store(store, queries[:1], 10, rerank)  # the collection's side, computed once (as `serve` does)
            t0 = time.perf_counter()
            for q in queries:
                rerank_store(store, q[None], 10, rerank)
            row.append(f"{1000 * (time.perf_counter() - t0) / len(queries):.2f}")
        lines.append(f"| {g} | " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    write_text(a.out / "cost.md", text)
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["runs", "val", "table", "test", "cost"])
    p.add_argument("--data", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cells", type=lambda s: s.split(","), default=[])
    p.add_argument("--runs", type=lambda s: s.split(","), default=[], help="val: only runs matching these globs")
    p.add_argument("--grid", type=lambda s: s.split(","), default=[], help="val: only these settings of GRID")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=None, help="default: train's")
    p.add_argument("--pick", nargs="*", default=[])
    p.add_argument("--top", type=int, default=0)
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--gallery", default="1489,20000", help="cost: collection sizes searched")
    p.add_argument("--queries", type=int, default=100)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    {"runs": stage_runs, "val": stage_val, "table": stage_table, "test": stage_test, "cost": stage_cost}[a.stage](a)


if __name__ == "__main__":
    sys.exit(main())
