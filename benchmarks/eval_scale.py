"""Time and peak memory of `evaluate_embeddings` (chunked exact faiss search) against a dense N x N evaluation.

Each measurement runs in a fresh subprocess that first generates N random 512-d float32 embeddings in SOP-like
classes of 5-10 images, then reports wall time and the peak-RSS increase over the data (the peak, VmHWM, is reset
after generating the data and compared with the RSS then; Linux only). The dense baseline is pytorch-metric-
learning's AccuracyCalculator with a full cosine-similarity kNN (CustomKNN(CosineSimilarity())); it is skipped when
its N x N float32 matrix would exceed 8 GiB. With --query-sample Q, sizes above Q time only Q queries against the
full gallery and extrapolate: the search and its per-chunk metrics (timed through `evaluate_embeddings`' search
hook) cost O(N) per query and are scaled by N / Q, the rest (checking and normalising the N features, label codes)
is counted once, as a full run pays it once; memory is then measured, not estimated. The child also reports the
search's GFLOP/s (2·Q·N·d flops) and, with a query sample, a bare torch.mm of the same products timed after it in
the same process (`experiments.bench.matmul_seconds`) and their ratio: how close exact search is to the matrix-
multiply limit.

    python benchmarks/eval_scale.py --sizes 10000,100000 --metrics recall,precision@1,r_precision,map@r

"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

import numpy as np

DENSE_LIMIT_BYTES = 8 * 2**30
NOISE = 2.5  # per-dimension noise around unit-variance class centres
PML_NAMES = {
    "precision@1": "precision_at_1",
    "r_precision": "r_precision",
    "map@r": "mean_average_precision_at_r",
    "nmi": "NMI",
}


def make_data(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n float32 embeddings in classes of 5-10 items: class centre plus noise, generated in place."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(5, 11, n // 5 + 1)
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
    rng.shuffle(labels)
    centres = rng.standard_normal((labels.max() + 1, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for i in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - i), dim), dtype=np.float32)
        block *= NOISE
        block += centres[labels[i : i + 65536]]
        x[i : i + 65536] = block
    return x, labels


def memory_status(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class TimedSearch:
    """Evaluation's own exact search (`vectors.search_chunks`, faiss on the CPU), timed: handed to
    `evaluate_embeddings` through its duck-typed `rerank` hook, it records the seconds from the first chunk asked
    for to the last one reduced to metric values (the part of the evaluation that costs O(N) per query)."""

    active = True

    def __init__(self):
        self.seconds = 0.0

    def search_chunks(self, query, gallery, need, exclude_self, chunk_size):
        from momentum_proxy.vectors import search_chunks

        t0 = time.perf_counter()
        yield from search_chunks(query, gallery, need, exclude_self, chunk_size)
        self.seconds = time.perf_counter() - t0


def child(method: str, n: int, dim: int, metrics: list[str], recalls: list[int], query_sample: int) -> dict:
    """Run one measurement in this (fresh) process and return its figures."""
    if method == "chunked":
        import torch

        from momentum_proxy.evaluation.metrics import evaluate_embeddings
        from momentum_proxy.experiments.bench import matmul_seconds
    else:
        import torch
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import CustomKNN, FaissKMeans
    x, y = make_data(n, dim)
    reset_peak_rss()  # after imports and data: the increase is the evaluation's own memory
    before = memory_status("VmRSS")
    start = time.perf_counter()
    timed = TimedSearch()
    if method == "chunked":
        if query_sample and n > query_sample:  # time Q queries against the whole gallery, then extrapolate
            evaluate_embeddings(
                x,
                y,
                query_features=x[:query_sample],
                query_labels=y[:query_sample],
                recalls=recalls,
                metrics=metrics,
                rerank=timed,
            )
            result = {"timed_queries": query_sample}
        else:
            result = evaluate_embeddings(x, y, recalls=recalls, metrics=metrics, rerank=timed)
    else:
        include = tuple(PML_NAMES[m] for m in metrics if m in PML_NAMES)
        calc = AccuracyCalculator(
            include=include,
            k="max_bin_count",
            device=torch.device("cpu"),
            knn_func=CustomKNN(CosineSimilarity()),  # the same k-means as ours:
            kmeans_func=FaissKMeans(niter=20, seed=0, min_points_per_centroid=1),
        )
        raw = calc.get_accuracy(torch.nn.functional.normalize(torch.from_numpy(x)), torch.from_numpy(y))
        result = {ours: raw[theirs] for ours, theirs in PML_NAMES.items() if theirs in raw}
    seconds = time.perf_counter() - start
    peak = memory_status("VmHWM") - before
    figures = {}
    if method == "chunked" and timed.seconds and any(m != "nmi" for m in metrics):
        queries = result.get("timed_queries", n)
        flops = 2 * queries * n * dim
        figures = {"search_seconds": timed.seconds, "search_gflops": flops / timed.seconds / 1e9}
        if "timed_queries" in result:  # once per query: scaled to N queries; the rest counted once
            seconds += timed.seconds * (n / queries - 1)
            q = torch.nn.functional.normalize(torch.from_numpy(x[:queries]))
            g = torch.nn.functional.normalize(torch.from_numpy(x))
            mm = matmul_seconds(q, g, max(recalls))
            figures |= {"mm_gflops": flops / mm / 1e9, "ratio": mm / timed.seconds}
    return {"seconds": seconds, "peak_rss_delta": peak, "data_bytes": x.nbytes, "result": result, **figures}


def measure(method: str, n: int, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--sizes",
        str(n),
        "--dim",
        str(args.dim),
        "--metrics",
        args.metrics,
        "--recalls",
        args.recalls,
        "--query-sample",
        str(args.query_sample),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--metrics",
        default="recall,precision@1,r_precision,map@r",
        help="comma-separated; nmi runs k-means with N/7 clusters, O(N^2 d), slow at scale",
    )
    parser.add_argument("--recalls", default="1,2,4,8")
    parser.add_argument(
        "--query-sample",
        type=int,
        default=0,
        help="above this size, time only this many queries and extrapolate (0: never)",
    )
    parser.add_argument("--child", choices=["chunked", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    metrics = args.metrics.split(",")
    recalls = [int(k) for k in args.recalls.split(",")]
    if args.child:
        print(json.dumps(child(args.child, int(args.sizes), args.dim, metrics, recalls, args.query_sample)))
        return

    print(f"{'N':>9}  {'method':<8} {'seconds':>10}  {'peak RSS over data':>18}  {'data':>9}  metrics")
    for n in (int(s) for s in args.sizes.split(",")):
        for method in ("chunked", "dense"):
            if method == "dense" and 4 * n * n > DENSE_LIMIT_BYTES:
                print(f"{n:>9}  {method:<8} does not fit: N x N float32 = {gib(4 * n * n)} > 8 GiB", flush=True)
                continue
            r = measure(method, n, args)
            note = (
                f"time extrapolated from {r['result']['timed_queries']} queries"
                if "timed_queries" in r["result"]
                else " ".join(f"{k}={v:.4f}" for k, v in r["result"].items())
            )
            if "search_gflops" in r:
                note += f"; search {r['search_gflops']:.0f} GFLOP/s"
            if "ratio" in r:
                note += f", bare torch.mm {r['mm_gflops']:.0f}, ratio {r['ratio']:.2f}"
            print(
                f"{n:>9}  {method:<8} {r['seconds']:>10.1f}  {gib(r['peak_rss_delta']):>18}  "
                f"{gib(r['data_bytes']):>9}  {note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
