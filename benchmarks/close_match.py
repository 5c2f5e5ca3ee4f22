"""Does the close-match threshold that `mproxy index` measures on an index hold for new queries?

On the development species of a `regimes.py embed` output (features-dev-*.npz): in each random draw, half the
species are indexed with half of their photos; the threshold is measured on that index alone
(`retrieval.calibrate.close_match_threshold`); the other half of the indexed species' photos are queries with a
match and as many photos of the other species queries without one. Prints the threshold, and the precision and
recall of "top cosine >= threshold" for it and for a fixed one (mean ± sd over the draws) as a Markdown row.

    python benchmarks/close_match.py results/regimes/birds50/features-dev-none.npz [--draws 10 --fixed 0.7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from momentum_proxy.retrieval.calibrate import close_match_threshold


def one_draw(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, fixed: float) -> list[float] | None:
    """[threshold, precision, recall, precision at `fixed`, recall at `fixed`] of one draw (None: unmeasurable)."""
    species = rng.permutation(np.unique(y))
    indexed_species = species[: len(species) // 2]
    index, with_match = [], []
    for c in indexed_species:
        members = rng.permutation(np.flatnonzero(y == c))
        with_match += list(members[: len(members) // 2])
        index += list(members[len(members) // 2 :])
    index, with_match = np.array(index), np.array(with_match)
    without = np.flatnonzero(~np.isin(y, indexed_species))
    n = min(len(with_match), len(without))
    with_match, without = rng.choice(with_match, n, replace=False), rng.choice(without, n, replace=False)
    found = close_match_threshold(x[index], y[index])
    if found is None or found["cosine"] is None:
        return None
    top_match, top_none = (x[with_match] @ x[index].T).max(1), (x[without] @ x[index].T).max(1)

    def precision_recall(t: float) -> tuple[float, float]:
        hits, false = int((top_match >= t).sum()), int((top_none >= t).sum())
        return 100 * hits / max(1, hits + false), 100 * hits / n

    return [found["cosine"], *precision_recall(found["cosine"]), *precision_recall(fixed)]


def read_features(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of a `regimes.py embed` file; exits with one line for anything else."""
    try:
        data = np.load(path, allow_pickle=False)
        return data["features"], data["labels"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"close_match: error: {path} is not features saved by `regimes.py embed` ({str(e).splitlines()[0]})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features", nargs="+", help="features-dev-*.npz files written by `regimes.py embed`")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--fixed", type=float, default=0.7, help="the fixed threshold to compare with")
    a = p.parse_args()
    if a.draws < 1:
        sys.exit("close_match: error: --draws must be at least 1")
    sets = {path: read_features(path) for path in a.features}  # every file checked before anything is printed
    print(
        f"| features | measured threshold | precision at it | recall at it | precision at {a.fixed:g} "
        f"| recall at {a.fixed:g} |\n|---|---|---|---|---|---|"
    )
    for path, (x, y) in sets.items():
        rows = [one_draw(x, y, np.random.default_rng(100 + i), a.fixed) for i in range(a.draws)]
        table = np.array([r for r in rows if r is not None])
        if not len(table):
            print(f"| {path} | not measurable (too few species) | | | | |")
            continue
        mean, sd = table.mean(0), table.std(0, ddof=1) if len(table) > 1 else np.zeros(5)
        cells = [f"{mean[0]:.3f} ± {sd[0]:.3f}"] + [f"{m:.1f} ± {s:.1f}" for m, s in zip(mean[1:], sd[1:])]
        print(f"| {path} ({len(table)} draws) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
