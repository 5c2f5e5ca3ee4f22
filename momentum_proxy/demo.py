"""The main job: synthetic data -> train -> evaluate -> retrieval picture, in a few minutes on a laptop CPU."""
from __future__ import annotations

import time
from pathlib import Path

from momentum_proxy.data.manifest import read_manifest, split_frame
from momentum_proxy.data.synthetic import generate_synthetic
from momentum_proxy.evaluate import evaluate_run, format_table
from momentum_proxy.retrieval import retrieve_and_draw
from momentum_proxy.runs import RunDir, TrainConfig
from momentum_proxy.training import train


def demo(out: str | Path = "runs/demo", *, epochs: int = 3, device: str = "auto") -> dict:
    """Run the whole pipeline on the embedded synthetic dataset; returns R@1 before/after and the picture path."""
    t0 = time.time()
    out = Path(out)
    data = out / "data"
    if not (data / "manifest.csv").exists():
        generate_synthetic(data, classes=40, per_class=30, size=128, seed=0)
    cfg = TrainConfig(data=str(data), out=str(out / "run"), backbone="efficientnet_lite0", image_size=128,
                      batch_size=32, epochs=epochs, device=device)
    train(cfg, overwrite=True)
    res = evaluate_run(cfg.out, device=device)
    print(format_table(res))
    test = split_frame(read_manifest(data), "test")
    query = data / test["path"].iloc[0]
    png = retrieve_and_draw(cfg.out, query, 8, out / "retrieval", device=device)
    rows = RunDir(cfg.out).metrics()
    before, after = rows[0]["recall@1"], res["recall@1"]
    print(f"R@1 before training (pretrained): {100 * before:.1f}%  after: {100 * after:.1f}%")
    print(f"retrieval picture: {png}")
    print(f"demo finished in {time.time() - t0:.0f}s; run folder: {cfg.out}")
    return {"recall@1_before": before, "recall@1_after": after, "picture": str(png)}
