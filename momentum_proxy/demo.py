"""The main job: synthetic data -> train -> evaluate -> retrieval picture, in a few minutes on a laptop CPU."""

from __future__ import annotations

import time
from pathlib import Path

from momentum_proxy.data.manifest import MANIFEST, read_manifest, split_frame
from momentum_proxy.data.synthetic import generate_synthetic
from momentum_proxy.retrieval.present import retrieve_and_draw
from momentum_proxy.runs import RunDir
from momentum_proxy.training.config import TrainConfig
from momentum_proxy.training.loop import train


def demo(out: str | Path = "runs/demo", *, epochs: int = 3, device: str = "auto") -> dict:
    """Run the whole pipeline on the embedded synthetic dataset (validation-selected model, test reported once).

    Returns the test R@1 and MAP@R of the pretrained start and of the selected checkpoint, and the picture path.
    """
    t0 = time.time()
    out = Path(out)
    data = out / "data"
    if not (data / MANIFEST).exists():
        generate_synthetic(data, classes=40, per_class=30, size=128, seed=0)
    # --test-every-epoch only to show the start's test figure; selection uses the val split alone
    cfg = TrainConfig(
        data=str(data),
        out=str(out / "run"),
        image_size=128,
        batch_size=32,
        epochs=epochs,
        device=device,
        test_every_epoch=True,
    )
    summary = train(cfg, overwrite=True)
    test = split_frame(read_manifest(data), "test")
    _, png = retrieve_and_draw(data / test["path"].iloc[0], 8, out / "retrieval", run_dir=cfg.out, device=device)
    start = RunDir(cfg.out).metrics()[0]
    res = {
        "recall@1_before": start["test_recall@1"],
        "recall@1_after": summary["test"]["recall@1"],
        "map@r_before": start["test_map@r"],
        "map@r_after": summary["test"]["map@r"],
        "picture": str(png),
    }
    print(
        f"test R@1 (pretrained start): {100 * res['recall@1_before']:.1f}%  after training: "
        f"{100 * res['recall@1_after']:.1f}% (epoch {summary['epoch']}, selected on val {cfg.select_metric}); "
        f"MAP@R {100 * res['map@r_before']:.1f}% -> {100 * res['map@r_after']:.1f}%"
    )
    print(f"retrieval picture: {png}")
    print(f"demo finished in {time.time() - t0:.0f}s; run folder: {cfg.out}")
    return res
