"""The `mproxy` command line: a thin layer over the Python API (one sub-command per job)."""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from momentum_proxy.errors import UserError

LOSS_NAMES = ("proxy_nca", "normalized_softmax", "cos_face", "arc_face", "proxy_anchor")
OPTIMIZERS = ("adam*", "sgd*", "adam", "sgd")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------- prepare
def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="make a prepared dataset (images + manifest.csv)")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    s = kinds.add_parser("synthetic", help="generate the embedded fine-grained default dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=int, default=40)
    s.add_argument("--per-class", type=int, default=30)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    for kind, text in [("folder", "an ImageFolder tree (one sub-folder per class)"),
                       ("car", "Stanford Cars (cars_annos.mat + car_ims/)"),
                       ("cub", "CUB-200-2011 (images.txt, ... , images/)"),
                       ("sop", "Stanford Online Products (Ebay_train.txt, Ebay_test.txt)"),
                       ("isc", "In-shop Clothes (list_eval_partition.txt, img/)")]:
        k = kinds.add_parser(kind, help=text)
        k.add_argument("--src", required=True, help="the raw dataset folder")
        k.add_argument("--out", required=True)
        k.add_argument("--max-side", "--short-side", dest="short_side", type=int, default=256,
                       help="resize once so the short side is at most this (0: keep originals' size)")
        k.add_argument("--workers", type=int, default=1, help="processes for re-encoding (1 or 2)")
        if kind in ("car", "cub"):
            k.add_argument("--crop", action="store_true", help="cut each image to its annotated box")
        if kind == "folder":
            k.add_argument("--split-file", help="CSV lines 'class_name,split' (train/test) instead of halves")


def run_prepare(a) -> None:
    if a.kind == "synthetic":
        from momentum_proxy.data.synthetic import generate_synthetic

        out = generate_synthetic(a.out, classes=a.classes, per_class=a.per_class, size=a.size, seed=a.seed)
    else:
        from momentum_proxy.data.prepare import PREPARERS

        kwargs = {"short_side": a.short_side or None, "workers": a.workers}
        if a.kind in ("car", "cub"):
            kwargs["crop"] = a.crop
        if a.kind == "folder":
            kwargs["split_file"] = a.split_file
        out = PREPARERS[a.kind](a.src, a.out, **kwargs)
    print(f"prepared dataset: {out}")


# ----------------------------------------------------------------------------------------------- train
def add_train_options(p, *, for_sweep: bool = False) -> None:
    """The training options (new spelling first, the original MP tool's spelling as an alias)."""
    from momentum_proxy.runs import TrainConfig

    d = TrainConfig(data="", out="")
    p.add_argument("--data", help="prepared dataset folder")
    p.add_argument("--data_path", "--data-path", help="(original) folder holding prepared datasets by name")
    p.add_argument("--data_name", "--data-name", default="car", help="(original) dataset name under --data_path")
    p.add_argument("--backbone", "--backbone_type", dest="backbone", default=None,
                   help="efficientnet_lite0 | resnet50 | inception | googlenet | timm:NAME "
                        "(default: efficientnet_lite0 on CPU, resnet50 on CUDA)")
    p.add_argument("--pretrained", choices=("default", "none"), default=d.pretrained)
    p.add_argument("--weights", help="pretrained backbone weights file (.pth/.safetensors)")
    p.add_argument("--recipe", choices=("default", "original"), default=None,
                   help="default: the measured recipe; original: the original MP tool exactly (implied by "
                        "--data_path); explicit options override either")
    p.add_argument("--loss", "--loss_name", dest="loss", default=None,
                   help=" | ".join(LOSS_NAMES) + f" (default {d.loss})")
    p.add_argument("--optimizer", "--optimizer_type", dest="optimizer", default=d.optimizer,
                   help="adam* | sgd* (momentum proxies) | adam | sgd (learnable proxies)")
    p.add_argument("--loss-scale", type=float, default=d.loss_scale,
                   help="inverse temperature of the loss's logits (default: the library's)")
    p.add_argument("--margin", type=float, default=d.margin, help="margin of cos_face, arc_face, proxy_anchor")
    p.add_argument("--proxy-update", default=None,
                   help=f"mean (class mean) | sum (the original tool) (default {d.proxy_update})")
    p.add_argument("--proxy-init", default=None, help=f"class_mean | random (default {d.proxy_init})")
    p.add_argument("--lr", type=float, default=None, help=f"head learning rate (default {d.lr:g})")
    p.add_argument("--backbone-lr-mult", type=float, default=None,
                   help=f"backbone learning rate = lr x this (default {d.backbone_lr_mult:g})")
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help=f"first epochs train head and proxies only (default {d.warmup_epochs})")
    p.add_argument("--pooling", default=d.pooling, help="max | avgmax")
    p.add_argument("--recalls", type=int_list, default=d.recalls)
    p.add_argument("--metrics", type=str_list, default=d.metrics,
                   help="reported per epoch: recall,precision@1,r_precision,map@r,nmi")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=d.batch_size)
    p.add_argument("--epochs", "--num_epochs", "--num-epochs", dest="epochs", type=int, default=d.epochs)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: cores - 1)")
    p.add_argument("--amp", default=d.amp, help="none | bf16 | fp16 (CUDA) mixed precision")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    if for_sweep:
        p.add_argument("--momentum", type=str, default=str(d.momentum))
        p.add_argument("--feature-dim", type=str, default=str(d.feature_dim))
    else:
        p.add_argument("--momentum", type=float, default=d.momentum, help="proxy momentum m in the * modes")
        p.add_argument("--feature-dim", type=int, default=d.feature_dim)


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model into a run folder")
    add_train_options(p)
    p.add_argument("--out", help="run folder (default results/<data>_<backbone>_<loss>_<optimizer>_<momentum>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last finished epoch")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")


def config_from_args(a):
    """A TrainConfig from parsed `train` options (both spellings resolve to the same configuration)."""
    from momentum_proxy.inference import resolve_device
    from momentum_proxy.runs import ORIGINAL_RECIPE, TrainConfig

    if a.data:
        data = a.data
    elif a.data_path:
        data = str(Path(a.data_path) / a.data_name)
    else:
        raise UserError("give the prepared dataset with --data DIR (or --data_path DIR --data_name NAME)")
    data = str(Path(data).absolute())  # a resume from another folder still finds the data
    recipe = a.recipe or ("original" if a.data_path and not a.data else "default")
    base = TrainConfig(data="", out="")
    if recipe == "original":
        base = TrainConfig(data="", out="", **ORIGINAL_RECIPE)
    elif resolve_device(a.device).type == "cuda":
        base.backbone = "resnet50"
    chosen = {k: getattr(a, k) for k in ("backbone", "loss", "proxy_update", "proxy_init", "lr",
                                          "backbone_lr_mult", "warmup_epochs") if getattr(a, k) is not None}
    base = replace(base, **chosen)
    out = getattr(a, "out", None) or str(Path("results") / (
        f"{Path(data).name}_{base.backbone.replace(':', '-')}_{base.loss}_{a.optimizer}_{a.momentum}"))
    return replace(
        base, data=data, out=out, pretrained=a.pretrained, weights=a.weights, feature_dim=a.feature_dim,
        pooling=a.pooling, loss_scale=a.loss_scale, margin=a.margin, optimizer=a.optimizer, momentum=a.momentum,
        batch_size=a.batch_size, epochs=a.epochs, recalls=a.recalls, metrics=a.metrics, image_size=a.image_size,
        seed=a.seed, device=a.device, workers=a.workers, amp=a.amp, grad_accum=a.grad_accum, compile=a.compile)


def run_train(a) -> None:
    from momentum_proxy import training

    if a.resume:
        best = training.resume(a.resume)
        out = a.resume
    else:
        cfg = config_from_args(a)
        best = training.train(cfg, overwrite=a.overwrite)
        out = cfg.out
    print(f"best epoch {best['epoch']}: " + " ".join(f"{k}={v:.4f}" for k, v in best.items()
                                                    if k.startswith(("recall", "map", "precision", "r_", "nmi"))))
    print(f"run folder: {out}")


# ----------------------------------------------------------------------------------------------- evaluate
def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="all retrieval metrics of a run's best checkpoint or of an embeddings file")
    p.add_argument("run_dir", nargs="?", help="run folder")
    p.add_argument("--embeddings", help="evaluate a .npz (arrays features, labels, optional split) instead")
    p.add_argument("--metrics", type=str_list, default=None, help="recall,precision@1,r_precision,map@r,nmi")
    p.add_argument("--recalls", type=int_list, default=None)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")


def run_evaluate(a) -> None:
    from momentum_proxy.evaluate import evaluate_file, evaluate_run, format_table

    if bool(a.run_dir) == bool(a.embeddings):
        raise UserError("give a run folder or --embeddings FILE.npz (one of them)")
    if a.embeddings:
        res = evaluate_file(a.embeddings, metrics=a.metrics, recalls=a.recalls, json_out=a.json)
    else:
        res = evaluate_run(a.run_dir, metrics=a.metrics, recalls=a.recalls, json_out=a.json, device=a.device,
                           runtime=a.runtime)
    print(format_table(res))


# ----------------------------------------------------------------------------------------------- retrieve
def add_retrieve(sub) -> None:
    p = sub.add_parser("retrieve", help="top-K retrieval picture for a query image")
    p.add_argument("run_dir", nargs="?", help="run folder")
    p.add_argument("--query", "--query_img_name", dest="query", required=True, help="query image file")
    p.add_argument("-k", "--retrieval_num", "--retrieval-num", dest="k", type=int, default=8)
    p.add_argument("--data_base", "--data-base", dest="data_base",
                   help="(original) a run folder or its embeddings database (.npz)")
    p.add_argument("--index", help="search a saved index (mproxy index) instead of the run's database")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/retrieval)")
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")


def run_retrieve(a) -> None:
    from momentum_proxy.retrieval import retrieve_and_draw

    if a.k < 1:
        raise UserError("-k must be at least 1")
    run_dir, database = a.run_dir, None
    if a.data_base:
        db = Path(a.data_base)
        if db.is_dir():
            run_dir = run_dir or str(db)
        else:
            database = db
            run_dir = run_dir or str(db.parent)
    if a.index:
        from momentum_proxy.indexing import retrieve_from_index

        png = retrieve_from_index(a.index, a.query, a.k, a.out or str(Path(a.index) / "retrieval"), device=a.device,
                                  runtime=a.runtime)
    else:
        if not run_dir:
            raise UserError("give a run folder (or --data_base, or --index)")
        png = retrieve_and_draw(run_dir, a.query, a.k, a.out or str(Path(run_dir) / "retrieval"),
                                database=database, device=a.device, runtime=a.runtime)
    print(f"retrieval picture: {png}")


# ----------------------------------------------------------------------------------------------- index
def add_index(sub) -> None:
    p = sub.add_parser("index", help="embed an image collection with a trained model into a faiss index")
    p.add_argument("run_dir")
    p.add_argument("--images", required=True, help="a folder of images or a prepared dataset")
    p.add_argument("--out", required=True, help="index folder (an existing one is extended)")
    p.add_argument("--kind", default="exact", help="exact | ivf | hnsw")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--runtime", default="torch", help="torch | onnx (the run's verified ONNX export in onnxruntime)")


def run_index(a) -> None:
    from momentum_proxy.indexing import build_index

    summary = build_index(a.run_dir, a.images, a.out, kind=a.kind, batch_size=a.batch_size, device=a.device,
                          runtime=a.runtime)
    for k, v in summary.items():
        print(f"{k}: {v}")


# ----------------------------------------------------------------------------------------------- export
def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a run's best model to ONNX or TorchScript (verified, with a sidecar)")
    p.add_argument("run_dir")
    p.add_argument("--format", dest="fmt", default="onnx", help="onnx | torchscript")
    p.add_argument("--out", required=True, help="model file; its description goes to FILE.json")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the run's)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the output inside the model")
    p.add_argument("--int8", action="store_true", help="static int8 (QDQ) ONNX model, kept only if it pays off")
    p.add_argument("--calibration", metavar="DATA", help="prepared dataset whose training images calibrate --int8")


def run_export(a) -> None:
    from momentum_proxy.export import export_run, sidecar_path

    info = export_run(a.run_dir, a.out, fmt=a.fmt, image_size=a.image_size, normalize=a.normalize, int8=a.int8,
                      calibration=a.calibration)
    check = info["check"]
    print(f"exported {info['backbone']} ({info['image_size']} px -> {info['feature_dim']}-d) to {a.out} "
          f"and {sidecar_path(a.out)}")
    print(f"check on {check['images']} test images: min cosine {check['min_cosine']:.6f}, "
          f"top-{check['k']} neighbours identical")
    if a.int8:
        q = info["int8"]
        print(f"int8 vs fp32 on {q['images']} images, split {q['split']}: mean cosine {q['mean_cosine_to_fp32']}, R@1 "
              f"{100 * q['recall@1']['int8']:.2f} ({100 * q['recall@1_change']:+.2f}), MAP@R "
              f"{100 * q['map@r']['int8']:.2f} ({100 * q['map@r_change']:+.2f}), "
              f"{q['images_per_second']['int8']} vs {q['images_per_second']['fp32']} img/s (x{q['speedup']})")


# ----------------------------------------------------------------------------------------------- demo
def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthetic data -> train -> evaluate -> retrieve, in a few minutes on CPU")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="auto")


def run_demo(a) -> None:
    from momentum_proxy.demo import demo

    demo(a.out, epochs=a.epochs, device=a.device)


# ----------------------------------------------------------------------------------------------- experiments
def add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="train a grid of runs (resumable: finished runs are skipped)")
    add_train_options(p, for_sweep=True)
    p.add_argument("--out", required=True, help="folder for the grid's run folders")


def run_sweep(a) -> None:
    from momentum_proxy.experiments import sweep

    try:
        momentums = [float(m) for m in str_list(a.momentum)]
        dims = int_list(a.feature_dim)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise UserError(f"bad grid value: {e}") from None
    a.momentum, a.feature_dim = momentums[0], dims[0]
    backbones = str_list(a.backbone) if a.backbone else [None]
    a.backbone = backbones[0]
    base = config_from_args(a)
    backbones = [b or base.backbone for b in backbones]
    folders = sweep(base, a.out, momentums=momentums, backbones=backbones, feature_dims=dims)
    print(f"{len(folders)} runs in {a.out}")


def add_plot(sub) -> None:
    p = sub.add_parser("plot", help="figures: R@1 against momentum over a sweep, or one run's curves")
    p.add_argument("what", choices=("momentum", "curves"))
    p.add_argument("folder", help="a sweep folder (momentum) or a run folder (curves)")
    p.add_argument("--out", help="output path without extension (PNG and PDF are written)")


def run_plot(a) -> None:
    from momentum_proxy.experiments import plot_curves, plot_momentum

    paths = (plot_momentum if a.what == "momentum" else plot_curves)(a.folder, a.out)
    print("\n".join(str(p) for p in paths))


def add_report(sub) -> None:
    p = sub.add_parser("report", help="Markdown Benchmarks table of all runs below a folder")
    p.add_argument("folder")
    p.add_argument("--out", help="Markdown file (default FOLDER/benchmarks.md)")


def run_report(a) -> None:
    from momentum_proxy.experiments import report

    print(report(a.folder, a.out))


# ----------------------------------------------------------------------------------------------- bench
def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="images/s of the training and embedding pipelines vs the bare model, and of "
                                     "embedding in PyTorch vs onnxruntime (interleaved repeats)")
    p.add_argument("--data", help="prepared dataset (default: generate full-size JPEGs and prepare them)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="steps per measurement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved repeats of every measurement")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", help="write the figures here")


def run_bench(a) -> None:
    from momentum_proxy.bench import bench

    res = bench(data=a.data, backbone=a.backbone, image_size=a.image_size, batch_size=a.batch_size,
                steps=a.steps, rounds=a.rounds, device=a.device, workers=a.workers, compile=a.compile, amp=a.amp,
                json_out=a.json)
    print(f"img/s, median of {res['rounds']} interleaved rounds [min-max]")
    for name, (low, high) in res["spread"].items():
        print(f"{name:16s} {res[f'{name}_ips']:8.1f}  [{low:.1f}-{high:.1f}]")
    print(f"train efficiency {res['train_efficiency']:.3f}   embed efficiency {res['embed_efficiency']:.3f}   "
          f"onnxruntime fp32 / torch {res['onnx_speedup']:.3f}   int8 / torch {res['onnx_int8_speedup']:.3f}")


COMMANDS = {"prepare": (add_prepare, run_prepare), "train": (add_train, run_train),
            "evaluate": (add_evaluate, run_evaluate), "retrieve": (add_retrieve, run_retrieve),
            "index": (add_index, run_index), "demo": (add_demo, run_demo), "sweep": (add_sweep, run_sweep),
            "plot": (add_plot, run_plot), "report": (add_report, run_report), "bench": (add_bench, run_bench),
            "export": (add_export, run_export)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mproxy", description="Momentum-proxy fine-grained image retrieval toolkit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    from momentum_proxy.perf import flush_denormals, tune_allocator

    args = parser().parse_args(argv)
    tune_allocator()
    flush_denormals()
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    try:
        COMMANDS[args.command][1](args)
    except UserError as e:
        print(f"mproxy: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mproxy: interrupted", file=sys.stderr)
        sys.exit(130)
