"""`mproxy export` and `bench`: deployable models and the speed of the pipelines."""

from __future__ import annotations

import argparse

from momentum_proxy.cli.options import DEVICE_HELP, add_command


def add_export(sub) -> None:
    p = add_command(sub, "export", help="export a run's best model to ONNX or TorchScript (verified, with a sidecar)")
    p.add_argument("run_dir", help="run folder whose selected checkpoint is exported")
    p.add_argument("--format", dest="fmt", default="onnx", metavar="FORMAT", help="onnx | torchscript")
    p.add_argument("--out", required=True, help="model file; its description goes to FILE.json")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the run's)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the output inside the model")
    p.add_argument("--int8", action="store_true", help="static int8 (QDQ) ONNX model, kept only if it pays off")
    p.add_argument("--calibration", metavar="DATA", help="prepared dataset whose training images calibrate --int8")
    p.add_argument(
        "--tta",
        default="none",
        help="test-time augmentation in the exported graph: none | flip (each "
        "image and its mirror image, embeddings averaged; the output is then "
        "L2-normalised)",
    )


def run_export(a) -> None:
    from momentum_proxy.deploy.export import export_run, sidecar_path  # job

    info = export_run(
        a.run_dir,
        a.out,
        fmt=a.fmt,
        image_size=a.image_size,
        normalize=a.normalize,
        int8=a.int8,
        calibration=a.calibration,
        tta=a.tta,
    )
    check = info["check"]
    tta = "" if info["tta"] == "none" else f", test-time augmentation {info['tta']} in the graph"
    print(
        f"exported {info['backbone']} ({info['image_size']} px -> {info['feature_dim']}-d{tta}) to {a.out} "
        f"and {sidecar_path(a.out)}"
    )
    print(
        f"check on {check['images']} test images: min cosine {check['min_cosine']:.6f}, "
        f"top-{check['k']} neighbours identical"
    )
    if a.int8:
        q = info["int8"]
        print(
            f"int8 vs fp32 on {q['images']} images, split {q['split']}: mean cosine {q['mean_cosine_to_fp32']}, R@1 "
            f"{100 * q['recall@1']['int8']:.2f} ({100 * q['recall@1_change']:+.2f}), MAP@R "
            f"{100 * q['map@r']['int8']:.2f} ({100 * q['map@r_change']:+.2f}), "
            f"{q['images_per_second']['int8']} vs {q['images_per_second']['fp32']} img/s (x{q['speedup']})"
        )


def add_bench(sub) -> None:
    p = add_command(
        sub,
        "bench",
        help="images/s of the training and embedding pipelines vs the bare model, and of "
        "embedding in PyTorch vs onnxruntime (interleaved repeats)",
    )
    p.add_argument("--data", help="prepared dataset (default: generate full-size JPEGs and prepare them)")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone to measure (as train's --backbone)")
    p.add_argument("--image-size", type=int, default=224, help="input size in pixels")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (embedding batches are twice it)")
    p.add_argument("--steps", type=int, default=10, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repeats of every measurement")
    p.add_argument("--loader-workers", type=int, default=None, help="data-loader processes (default: as train's)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--amp", default="none", help="none | bf16 | fp16 (CUDA) mixed precision, as train's")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as train's")
    p.add_argument("--json", help="write the figures here")
    p.add_argument(
        "--exact-search",
        type=search_shape,
        metavar="QxNxD",
        help="instead: GFLOP/s of evaluation's exact k-NN, Q queries x N gallery items x D dimensions "
        "(e.g. 4096x100000x512), against a bare torch.mm of the same products",
    )
    p.add_argument("--top-k", type=int, default=10, help="neighbours per query of --exact-search")


def search_shape(text: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """QUERIESxGALLERYxDIM as three positive ints (an option type: a shape already parsed passes, as jsonargparse
    checks every parsed value again)."""
    if isinstance(text, tuple):
        return text
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"takes QUERIESxGALLERYxDIM, e.g. 4096x100000x512, not {text!r}")
    return tuple(int(p) for p in parts)


def run_bench(a) -> None:
    if a.exact_search:
        return run_search_bench(a)
    from momentum_proxy.experiments.bench import bench  # job

    res = bench(
        data=a.data,
        backbone=a.backbone,
        image_size=a.image_size,
        batch_size=a.batch_size,
        steps=a.steps,
        rounds=a.rounds,
        device=a.device,
        loader_workers=a.loader_workers,
        compile=a.compile,
        amp=a.amp,
        json_out=a.json,
    )
    print(f"img/s, median of {res['rounds']} interleaved rounds [min-max]")
    for name, (low, high) in res["spread"].items():
        print(f"{name:16s} {res[f'{name}_ips']:8.1f}  [{low:.1f}-{high:.1f}]")
    print(
        f"train efficiency {res['train_efficiency']:.3f}   embed efficiency {res['embed_efficiency']:.3f}   "
        f"BatchNorm folded / torch {res['fold_speedup']:.3f}   "
        f"onnxruntime fp32 / torch {res['onnx_speedup']:.3f}   int8 / torch {res['onnx_int8_speedup']:.3f}"
    )


def run_search_bench(a) -> None:
    from momentum_proxy.experiments.bench import bench_search  # job

    q, n, d = a.exact_search
    res = bench_search(q, n, d, a.top_k, rounds=a.rounds, device=a.device, json_out=a.json)
    print(
        f"exact search {q} x {n} x {d}, top {res['k']}, {res['device']} ({res['kernel']} kernel), "
        f"{res['threads']} threads: GFLOP/s, median of {res['rounds']} interleaved rounds [min-max]"
    )
    for name, (low, high) in res["spread"].items():
        print(f"{name:16s} {res[f'{name}_gflops']:8.1f}  [{low:.1f}-{high:.1f}]")
    other = f"   torch kernel / mm {res['torch_knn_ratio']:.3f}" if "torch_knn_ratio" in res else ""
    print(f"search / mm {res['ratio']:.3f} (goal >= 0.8){other}")
