"""Embedding speed of a run's model with BatchNorm folded into the convolutions (as `load_model` gives it) against
the same model unfolded, on one pre-made batch: the two alternate within each round (A, B, A, B, ...), so a slow
spell hits both; medians over the rounds, and their ratio. Also the largest difference of their embeddings.

    python benchmarks/fold_speed.py --run runs/birds50 [--threads 1,2 --batches 1,8,32 --rounds 7]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from momentum_proxy.embedding.inference import load_model
from momentum_proxy.errors import UserError
from momentum_proxy.perf import tune_allocator


def timed(model: torch.nn.Module, batch: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(batch)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder (its best checkpoint)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    try:
        threads, batches = [int(t) for t in a.threads.split(",")], [int(x) for x in a.batches.split(",")]
    except ValueError:
        sys.exit("fold_speed: error: --threads and --batches take comma-separated whole numbers")
    if min(threads + batches) < 1 or a.rounds < 1:
        sys.exit("fold_speed: error: --threads, --batches and --rounds must be at least 1")
    tune_allocator()
    try:
        folded, cfg, _ = load_model(a.run, "cpu")
        plain, _, _ = load_model(a.run, "cpu", fold=False)
    except UserError as e:
        sys.exit(f"fold_speed: error: {e}")
    size = cfg.image_size
    batch = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = float((folded(batch) - plain(batch)).abs().max() / plain(batch).abs().max())
    print(f"{cfg.backbone} at {size} px; largest embedding difference, relative to the largest value: {diff:.1e}")
    print("| threads | batch | unfolded img/s | folded img/s | folded / unfolded |\n|---|---|---|---|---|")
    for n in threads:
        torch.set_num_threads(n)
        for b in batches:
            x = torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)
            times: dict[str, list[float]] = {"unfolded": [], "folded": []}
            with torch.inference_mode():
                for model in (plain, folded, plain, folded):  # warm-up
                    model(x)
                for _ in range(a.rounds):
                    times["unfolded"].append(timed(plain, x))
                    times["folded"].append(timed(folded, x))
            rate = {k: b / float(np.median(v)) for k, v in times.items()}
            print(
                f"| {n} | {b} | {rate['unfolded']:.1f} | {rate['folded']:.1f} | "
                f"{rate['folded'] / rate['unfolded']:.2f} |"
            )


if __name__ == "__main__":
    main()
